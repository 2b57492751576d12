"""Numerical verification: run the original and the optimized model on the same inputs and compare.

Verification runs onnxruntime on CPU with ORT's own graph optimizer switched off, so that a bug in
one of our passes cannot be masked (or introduced) by ORT rewriting the graph behind our back.
`latency_ms` is the exception: it measures deployment latency, so it lets ORT optimize by default.

Decisions worth knowing (also in the docstrings below):

* Relative error uses ``|a - b| / (|a| + eps)`` with ``eps = 1e-6 * max(1, max finite |a|)``, ``a``
  being the reference. A fixed eps would make exact zeros in the reference explode the ratio; scaling
  eps with the tensor keeps near-zero elements of a large-valued tensor from dominating it.
* The tolerance test is ``np.isclose(candidate, reference, rtol, atol, equal_nan=True)``: NaN in the
  same place counts equal, infinities must match exactly (same sign). Integer, bool and string
  outputs are compared exactly; rtol/atol do not apply to them.
* An output whose dtype changed is reported as not within tolerance even when the values agree:
  the optimized model must keep the original's interface.
* Generated inputs need sizes for symbolic dims, and many models run only on some (a reflect Pad
  longer than the input, skip connections that line up only when H and W divide by 32):
  ``find_inputs`` tries make_inputs' sizes first, then sizes the graph hints at, then a ladder of
  common sizes, all in one ORT session, and reports the sizes it used.
* In ``to_dict`` non-finite floats become the strings "inf", "-inf" and "nan", so the result is
  strict JSON (``json.dumps(..., allow_nan=False)`` works).
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from graphopt.errors import GraphoptError, VerificationError, one_line

from graphopt.export import PROTOBUF_LIMIT_BYTES, approx_nbytes  # over the limit: ORT gets a file
from graphopt.ir import all_graphs, all_nodes

# onnxruntime's own logger prints errors (coloured, multi-line) before raising them to us; the
# exception carries the same text, which we report in one line.
ort.set_default_logger_severity(4)

# Size given to a symbolic or unknown dim that is neither named in dim_values nor batch-like.
# Small, so that generated inputs stay cheap, but above 1 so that broadcasting mistakes (a pass that
# treats a dim of 1 as broadcastable when it is not) still show up.
DEFAULT_DIM = 8

# Integer inputs that feed nothing we understand get values in [0, DEFAULT_INT_HIGH).
DEFAULT_INT_HIGH = 10

# dim_param names that mean "batch" when they sit on an input's leading axis. tf2onnx names every
# unknown dim "unk__<n>", and the leading one is the batch in practice.
_BATCH_LIKE = re.compile(r"^(n|b|bs|unk(__\d+)?|.*batch.*)$", re.IGNORECASE)

# Ops an integer index may pass through, unchanged in value, on its way to a Gather.
# (op type -> which input of the op carries the value through)
_PASS_THROUGH = {
    "Cast": 0,
    "Identity": 0,
    "Unsqueeze": 0,
    "Squeeze": 0,
    "Reshape": 0,
    "Flatten": 0,
    "Expand": 0,
}

_GATHERS = {"Gather", "GatherElements", "GatherND"}


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class OutputFidelity:
    name: str
    max_abs_error: float
    # max |a-b| / (|a| + eps), eps = 1e-6 * max(1, max finite |reference|); see module docstring.
    max_rel_error: float
    # 1.0 for identical tensors. Computed over elements finite in both; integer/bool outputs are
    # cast to float for it (their pass/fail is still exact).
    cosine_similarity: float
    # Fraction of rows whose argmax agrees, for classifier-like float outputs; None otherwise.
    top1_agreement: float | None
    # Elements outside tolerance (all elements when the output is missing or its shape changed).
    mismatched: int
    within_tolerance: bool
    # Why the output failed before any value was compared ("missing in candidate", a shape or
    # dtype change); None when the values decided it.
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "cosine_similarity": _json_float(self.cosine_similarity),
            "top1_agreement": None if self.top1_agreement is None else _json_float(self.top1_agreement),
            "mismatched": int(self.mismatched),
            "within_tolerance": bool(self.within_tolerance),
            "note": self.note,
        }


@dataclass
class Fidelity:
    outputs: list[OutputFidelity]
    ok: bool
    rtol: float | None = None
    atol: float | None = None

    def worst(self) -> OutputFidelity:
        """The output that most needs a look: failing before passing, then largest relative error,
        then largest absolute error (relative first because absolute error depends on each output's
        scale, so it does not rank outputs of different magnitudes fairly)."""
        if not self.outputs:
            raise GraphoptError("no outputs were compared")

        def badness(o: OutputFidelity) -> tuple[bool, float, float]:
            rel = math.inf if math.isnan(o.max_rel_error) else o.max_rel_error
            abs_ = math.inf if math.isnan(o.max_abs_error) else o.max_abs_error
            return (not o.within_tolerance, rel, abs_)

        return max(self.outputs, key=badness)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": bool(self.ok),
            "rtol": self.rtol,
            "atol": self.atol,
            "worst": self.worst().name if self.outputs else None,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _json_float(x: float) -> float | str:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


# ---------------------------------------------------------------------------------------------
# Inputs


def as_proto(model: onnx.ModelProto | str | os.PathLike, *, weights: bool = False) -> onnx.ModelProto:
    """The model itself, or the file loaded; one-line GraphoptErrors for a missing or broken file.

    Without `weights`, external data is not read: the graph's structure and the initializers'
    dims (stored even when their bytes live elsewhere) are all that inputs and shapes need.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise GraphoptError(f"{path}: no such file")
    try:
        return onnx.load_model(path, load_external_data=weights)
    except Exception as exc:  # protobuf raises several unrelated types
        raise GraphoptError(f"{path}: cannot load ONNX model: {one_line(exc)}") from None


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Before IR 4 every initializer had to be listed as an input too; since then, an input with an
    # initializer is an overridable default. Either way the model runs without a feed for it.
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    if vi.type.WhichOneof("value") != "tensor_type":
        kind = vi.type.WhichOneof("value") or "unknown"
        raise GraphoptError(f"input '{vi.name}' is a {kind.replace('_type', '')}, not a tensor; only tensor inputs are supported")
    return vi.type.tensor_type.elem_type


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    et = _elem_type(vi)
    if et == onnx.TensorProto.STRING:
        return np.dtype(object)  # onnxruntime takes string tensors as object arrays of str
    if et == onnx.TensorProto.BFLOAT16 or et >= onnx.TensorProto.FLOAT8E4M3FN:
        name = onnx.TensorProto.DataType.Name(et)
        raise GraphoptError(f"input '{vi.name}' has element type {name}, which numpy cannot represent; cannot generate inputs for it")
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et))
    except (KeyError, TypeError, ValueError):
        raise GraphoptError(f"input '{vi.name}' has unsupported element type {et}") from None


def _unnamed_key(input_name: str, axis: int) -> str:
    return f"{input_name}:{axis}"


def _dim_keys(vi: onnx.ValueInfoProto) -> list[int | str]:
    """Per axis, the fixed size, or the name its size goes by: the dim_param, or "input:axis" for a
    dim with neither value nor name (dim_values accepts both kinds of name)."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise GraphoptError(f"input '{vi.name}' has unknown rank; cannot generate inputs for it (supply them with --inputs)")
    keys: list[int | str] = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            keys.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            keys.append(d.dim_param)
        else:
            keys.append(_unnamed_key(vi.name, axis))
    return keys


def _resolve_shape(
    vi: onnx.ValueInfoProto, dim_values: dict[str, int], batch: int, leading_params: set[str]
) -> tuple[int, ...]:
    shape = []
    for axis, key in enumerate(_dim_keys(vi)):
        if isinstance(key, int):
            shape.append(key)
        elif key in dim_values:
            shape.append(int(dim_values[key]))
        elif key == _unnamed_key(vi.name, axis):
            shape.append(batch if axis == 0 else DEFAULT_DIM)
        else:
            shape.append(_param_value(key, dim_values, batch, leading_params))
    return tuple(shape)


def _param_value(param: str, dim_values: dict[str, int], batch: int, leading_params: set[str]) -> int:
    # Decided per name, not per position, so that a dim shared by several inputs (the sequence
    # length of input_ids and attention_mask) gets one size everywhere.
    if param in dim_values:
        return int(dim_values[param])
    return batch if _batch_param(param, leading_params) else DEFAULT_DIM


def _batch_param(param: str, leading_params: set[str]) -> bool:
    return "batch" in param.lower() or (param in leading_params and bool(_BATCH_LIKE.match(param)))


def _constants(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Initializers and Constant-node values of every graph, subgraphs included."""
    for g in all_graphs(model.graph):
        for t in g.initializer:
            yield t.name, t
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        yield n.output[0], a.t


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Static shapes of tensors a Gather may read from: initializers, Constant outputs, and whatever
    shape inference can tell (best effort: inference failing must not stop input generation)."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    try:
        # Inference serializes the model; over the protobuf limit it cannot, so rely on initializers.
        if approx_nbytes(model) > PROTOBUF_LIMIT_BYTES:
            raise ValueError("too large for shape inference")
        try:
            # data_prop: the shape a Shape->Gather->Concat->Reshape chain computes is known too
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        # Graph outputs too: a value that is an output is in graph.output, not in value_info. The
        # first entry of a name wins: an input passed through as an output may be declared vaguer there.
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.HasField("shape"):
                shapes.setdefault(vi.name, tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
                ))
    except Exception:
        pass

    for name, t in _constants(model):
        shapes[name] = tuple(t.dims)
    return shapes


def _index_bound(
    name: str,
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]],
    shapes: dict[str, tuple[int | None, ...]],
) -> int | None:
    """Exclusive upper bound for an integer input that ends up as Gather indices, or None when it
    does not (or the gathered axis's size is unknown). The smallest bound wins when it feeds several."""
    bound: int | None = None
    seen = {name}
    frontier = [name]
    while frontier:
        tensor = frontier.pop()
        for node, idx in consumers.get(tensor, ()):
            if node.op_type in _PASS_THROUGH and idx == _PASS_THROUGH[node.op_type]:
                for out in node.output[:1]:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append(out)
                continue
            if node.op_type not in _GATHERS or idx != 1:
                continue
            data_shape = shapes.get(node.input[0])
            if not data_shape:
                continue
            b = _gather_axis_size(node, data_shape, shapes.get(node.input[1]))
            if b is not None:
                bound = b if bound is None else min(bound, b)
    return bound


def _gather_axis_size(
    node: onnx.NodeProto, data_shape: tuple[int | None, ...], indices_shape: tuple[int | None, ...] | None
) -> int | None:
    rank = len(data_shape)
    if node.op_type == "GatherND":
        # Each index row addresses the leading k data axes (k = last dim of indices, after
        # batch_dims); one bound for all of them, so take the smallest.
        batch_dims = next((a.i for a in node.attribute if a.name == "batch_dims"), 0)
        k = indices_shape[-1] if indices_shape and indices_shape[-1] else rank - batch_dims
        dims = data_shape[batch_dims : batch_dims + k]
        if not dims or any(d is None for d in dims):
            return None
        return min(dims)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if axis < 0:
        axis += rank
    if not 0 <= axis < rank:
        return None
    return data_shape[axis]


# Attributes whose strings are words the model looks for: TfIdfVectorizer's n-gram pool, the keys
# of LabelEncoder and CategoryMapper, classifier labels.
_WORD_ATTRIBUTES = {"pool_strings", "keys_strings", "values_strings", "cats_strings", "classlabels_strings"}

# Words for string inputs of a model that names none.
_FALLBACK_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")


class _Generator:
    """Input generation for one model. What it reads from the graph (the consumers of each input,
    static shapes, the model's words) is worked out once, and only when some input needs it, so
    that find_inputs generates inputs for many sizes at the cost of one."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.inputs = _real_inputs(proto.graph)
        self.leading_params = set()
        for vi in self.inputs:
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.shape.dim:
                d0 = vi.type.tensor_type.shape.dim[0]
                if d0.HasField("dim_param"):
                    self.leading_params.add(d0.dim_param)

    def shapes(self, dim_values: dict[str, int], batch: int) -> dict[str, tuple[int, ...]]:
        return {vi.name: _resolve_shape(vi, dim_values, batch, self.leading_params) for vi in self.inputs}

    @functools.cached_property
    def consumers(self) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in all_nodes(self.proto.graph):
            for i, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((node, i))
        return consumers

    @functools.cached_property
    def known_shapes(self) -> dict[str, tuple[int | None, ...]]:
        return _known_shapes(self.proto)

    @functools.cached_property
    def words(self) -> list[str]:
        return _model_words(self.proto)

    def generate(self, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {vi.name: np.ascontiguousarray(self._value(vi, shapes[vi.name], rng)) for vi in self.inputs}

    def _value(self, vi: onnx.ValueInfoProto, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        dtype = _np_dtype(vi)
        is_mask = "mask" in vi.name.lower()
        if dtype.kind == "f":
            return _mask(rng, shape).astype(dtype) if is_mask else rng.standard_normal(size=shape).astype(dtype)
        if dtype.kind == "b":
            return _mask(rng, shape).astype(bool) if is_mask else rng.integers(0, 2, size=shape).astype(bool)
        if dtype.kind in "iu":
            if is_mask:
                return _mask(rng, shape).astype(dtype)
            high = _index_bound(vi.name, self.consumers, self.known_shapes)
            if high is None:
                high = DEFAULT_INT_HIGH
            high = max(1, min(high, int(np.iinfo(dtype).max) + 1))
            return rng.integers(0, high, size=shape, dtype=np.int64).astype(dtype)
        if dtype.kind == "O":
            return _sentences(rng, shape, self.words)
        raise GraphoptError(f"input '{vi.name}' has element type {dtype}, which input generation does not support")


def make_inputs(
    model: onnx.ModelProto | str,
    *,
    seed: int = 0,
    batch: int = 1,
    dim_values: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that has no initializer behind it.

    Shapes: fixed dims as declared. A symbolic dim takes ``dim_values[param]`` when given; else
    ``batch`` when its name contains "batch", or when it is named like a batch (N, B, bs, unk__<n>)
    and is the leading axis of some input; else DEFAULT_DIM (8). A dim with neither value nor name
    takes ``dim_values["input:axis"]`` when given, else ``batch`` on axis 0 and DEFAULT_DIM elsewhere.

    Values: inputs named like *mask* (any numeric or bool type) get random 0/1 with at least one 1
    in every row (last axis), so no attention row is fully masked. Other float16/32/64 inputs are
    standard normal. Integer inputs that reach the indices of a Gather/GatherElements/GatherND
    (directly or via Cast/Identity/Unsqueeze/Squeeze/Reshape/Flatten/Expand) get values in [0, n),
    n the size of the gathered axis when the data tensor's shape is known (the smallest such n
    when there are several Gathers); other integers are in [0, 10); bools are random. String
    inputs get one to four words per element, joined by spaces, drawn from the words the model
    contains (vocabularies, lookup keys, class labels, string constants; see `_model_words`).
    bfloat16 and float8 inputs raise GraphoptError.
    """
    gen = _Generator(as_proto(model))
    return gen.generate(gen.shapes(dict(dim_values or {}), batch), seed)


def _model_words(proto: onnx.ModelProto) -> list[str]:
    """The strings the model's ops look for, in order of first appearance: text built from them
    reaches past lookups and n-gram pools that a made-up word would miss entirely."""
    words: dict[str, None] = {}
    stopwords: dict[str, None] = {}
    tensors = [t for g in all_graphs(proto.graph) for t in g.initializer]
    for node in all_nodes(proto.graph):
        for a in node.attribute:
            if a.name in _WORD_ATTRIBUTES:
                words.update(dict.fromkeys(a.strings))
            elif a.name == "stopwords":
                stopwords.update(dict.fromkeys(a.strings))
            elif a.type == onnx.AttributeProto.TENSOR:
                tensors.append(a.t)  # Constant values, LabelEncoder's keys_tensor
    for t in tensors:
        if t.data_type == onnx.TensorProto.STRING:
            words.update(dict.fromkeys(t.string_data))
    # Stopwords only as a last resort: text made of them alone normalizes to nothing, which
    # exercises nothing after the StringNormalizer.
    found = [w.decode("utf-8", "replace") for w in (words or stopwords)]
    return [w for w in found if w.strip()] or list(_FALLBACK_WORDS)


def _sentences(rng: np.random.Generator, shape: tuple[int, ...], words: list[str]) -> np.ndarray:
    # One word can match a lookup key exactly; several exercise tokenizers and n-gram counting.
    count = math.prod(shape)
    lengths = rng.integers(1, 5, size=count)
    picks = iter(rng.integers(0, len(words), size=int(lengths.sum())).tolist())
    out = np.empty(count, dtype=object)
    for i, n in enumerate(lengths.tolist()):
        out[i] = " ".join(words[next(picks)] for _ in range(n))
    return out.reshape(shape)


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    value = rng.integers(0, 2, size=shape, dtype=np.int64)
    if value.ndim and value.size:
        # A fully masked row makes softmax divide 0 by 0 in some models: NaN in both models would
        # compare equal and hide everything else in that row.
        value[..., 0] = 1
    elif value.ndim == 0:
        value[...] = 1
    return value


def load_inputs(path: str | os.PathLike, model: onnx.ModelProto | str | None = None) -> dict[str, np.ndarray]:
    """Inputs from a .npz file whose array names are the input names.

    With ``model``, every input that needs a feed must be present with the model's dtype, rank and
    fixed dims, and no name may be unknown to the model; a violation is a GraphoptError naming the
    input. Inputs backed by an initializer may be fed (that overrides the default) but need not be.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphoptError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise GraphoptError(f"{path}: cannot read inputs: {one_line(exc)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise GraphoptError(f"{path}: not a .npz archive (save inputs with numpy.savez, one array per input name)")
    try:
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise GraphoptError(f"{path}: cannot read inputs: {one_line(exc)}") from None
    if model is None:
        return arrays

    graph = as_proto(model).graph
    declared = {vi.name: vi for vi in graph.input}
    for name in arrays:
        if name not in declared:
            raise GraphoptError(f"{path}: array '{name}' is not an input of the model (inputs: {', '.join(declared) or 'none'})")
    for vi in _real_inputs(graph):
        if vi.name not in arrays:
            raise GraphoptError(f"{path}: input '{vi.name}' is missing")
    for name, arr in list(arrays.items()):
        vi = declared[name]
        expected = _np_dtype(vi)
        if expected.kind == "O" and arr.dtype.kind == "U":
            # Without pickling, .npz holds text as fixed-width str arrays; ORT takes object arrays.
            arrays[name] = arr = arr.astype(object)
        elif arr.dtype != expected:
            raise GraphoptError(f"{path}: input '{name}' has dtype {arr.dtype}, the model expects {expected}")
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape"):
            if arr.ndim != len(dims):
                raise GraphoptError(f"{path}: input '{name}' has rank {arr.ndim} (shape {list(arr.shape)}), the model expects rank {len(dims)}")
            for axis, (d, n) in enumerate(zip(dims, arr.shape)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n:
                    raise GraphoptError(
                        f"{path}: input '{name}' has size {n} on axis {axis}, the model expects {d.dim_value}"
                    )
    return arrays


# ---------------------------------------------------------------------------------------------
# Running




def _session(model: onnx.ModelProto | str | os.PathLike, threads: int, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT would print its own (multi-line, coloured) errors before raising them; we report them once.
    so.log_severity_level = 4
    if isinstance(model, onnx.ModelProto):
        if approx_nbytes(model) > PROTOBUF_LIMIT_BYTES:
            raise GraphoptError(
                "model is over 2 GiB and cannot be passed to onnxruntime in memory; save it with external data and pass its path"
            )
        source: bytes | str = model.SerializeToString()
    else:
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise GraphoptError(f"{source}: no such file")
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, all worth one line
        text = one_line(exc)
        raise GraphoptError(f"onnxruntime cannot load the model: {text}", node=_unregistered_op_node(model, text)) from None


_UNREGISTERED_OP = re.compile(r"([\w.]*):([\w.]+)\(-?\d+\) is not a registered function/op")


def _unregistered_op_node(model: onnx.ModelProto | str | os.PathLike, message: str) -> str | None:
    """The first node using the op ORT says it has no kernel for ("com.x:Op(-1) is not a registered
    function/op" names only the op), so the error can name the node."""
    match = _UNREGISTERED_OP.search(message)
    if match is None:
        return None
    domain, op = match.groups()
    try:
        proto = as_proto(model)
    except GraphoptError:
        return None
    for node in all_nodes(proto.graph):
        if node.op_type == op and node.domain in ((domain,) if domain not in ("", "ai.onnx") else ("", "ai.onnx")):
            return node.name or f"{domain}:{op}"
    return None


def _feeds_for(sess: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Extra names are dropped rather than rejected: the same feed dict serves both models, and an
    # input with a default (initializer) may legitimately exist in one and not the other.
    feeds = {}
    # get_inputs() leaves out inputs with a default (initializer); a caller may still override them.
    for i in list(sess.get_inputs()) + list(sess.get_overridable_initializers()):
        if i.name in inputs:
            feeds[i.name] = inputs[i.name]
    return feeds


def _run_session(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as exc:
        raise GraphoptError(f"onnxruntime failed to run the model: {one_line(exc)}") from None


def run(
    model: onnx.ModelProto | str,
    inputs: dict[str, np.ndarray],
    *,
    threads: int = 2,
) -> dict[str, np.ndarray]:
    """Run on ORT's CPU provider with ORT graph optimizations disabled; outputs by name.

    Pass a file path for models over 2 GiB (or with external data): ORT then loads the weights
    itself. Load and run failures are GraphoptErrors with ORT's first line.
    """
    sess = _session(model, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return _outputs_by_name(sess, _run_session(sess, _feeds_for(sess, inputs)))


def _outputs_by_name(sess: ort.InferenceSession, outs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), outs)}


def latency_ms(
    model: onnx.ModelProto | str,
    inputs: dict[str, np.ndarray],
    *,
    threads: int = 2,
    warmup: int = 3,
    runs: int = 20,
    optimized_by_ort: bool = True,
) -> float:
    """Median wall time of one run in milliseconds, on the batch as given.

    ORT optimizes at ORT_ENABLE_ALL by default here (unlike `run`): this measures what a deployment
    would see. optimized_by_ort=False measures the graph exactly as written.
    """
    if runs < 1:
        raise GraphoptError("latency_ms needs runs >= 1")
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized_by_ort else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = _session(model, threads, level)
    feeds = _feeds_for(sess, inputs)
    for _ in range(max(0, warmup)):
        _run_session(sess, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        _run_session(sess, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3

def interleaved_latency_ms(
    models: dict[str, onnx.ModelProto | str],
    inputs: dict[str, np.ndarray],
    *,
    threads: int = 1,
    warmup: int = 3,
    rounds: int = 30,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{name: {"median_ms", "min_ms"}} of one run of each model (ORT_ENABLE_ALL), the models run
    one after another in a fresh random order each round: timing on a shared machine drifts, and
    interleaving lets the drift reach every model alike (../shared/notes/host-and-timing.md)."""
    import random

    if rounds < 1:
        raise GraphoptError("interleaved_latency_ms needs rounds >= 1")
    sessions = {name: _session(m, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL) for name, m in models.items()}
    feeds = {name: _feeds_for(sess, inputs) for name, sess in sessions.items()}
    for name, sess in sessions.items():
        for _ in range(max(0, warmup)):
            _run_session(sess, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order, shuffle = list(sessions), random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            _run_session(sessions[name], feeds[name])
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3} for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Verifying a result against its original (what `graphopt run` and `api.optimize` share)


def reference_inputs(
    reference: onnx.ModelProto | str,
    proto: onnx.ModelProto | None = None,
    given: dict[str, np.ndarray] | str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, dict]:
    """What to verify on: (inputs, the original's outputs on them if already computed, how they were chosen).

    `given` inputs (a dict, or an .npz path checked against `proto`) are used as they are;
    otherwise `find_inputs` generates inputs the original runs on, shaped like `proto` (the
    original, possibly specialized) and run with `reference` (its file, when there is one).
    """
    if given is None:
        found = find_inputs(reference, proto=proto)
        return found.inputs, found.outputs, {"source": "generated", "dims": found.dims, "tries": found.tries}
    if isinstance(given, dict):
        return given, None, {"source": "given"}
    return load_inputs(given, proto if proto is not None else reference), None, {"source": os.fspath(given)}


def original_outputs(reference: onnx.ModelProto | str, inputs: dict[str, np.ndarray], *, remedy: str) -> dict[str, np.ndarray]:
    """The original's outputs; when the original itself fails, say so: it is not the result failing."""
    try:
        return run(reference, inputs)
    except GraphoptError as exc:
        raise GraphoptError(f"the original model fails in onnxruntime on the given inputs ({exc}); {remedy}") from None


def require_within_tolerance(fidelity: Fidelity, rtol: float, atol: float, consequence: str = "") -> None:
    """Raise VerificationError naming the worst output unless every output is within tolerance."""
    if fidelity.ok:
        return
    worst = fidelity.worst()
    raise VerificationError(
        f"optimized model differs from the original: output '{worst.name}' max abs error "
        f"{worst.max_abs_error:.3g} (rtol {rtol}, atol {atol}){consequence}"
    )


def judged_by_cosine(fidelity: Fidelity, min_cosine: float) -> Fidelity:
    """A lossy result's fidelity (quantization): each output passes when its cosine similarity
    to the original's is at least `min_cosine`, whatever rtol/atol say."""
    outputs = [replace(o, within_tolerance=o.note is None and o.cosine_similarity >= min_cosine) for o in fidelity.outputs]
    return replace(fidelity, outputs=outputs, ok=all(o.within_tolerance for o in outputs), rtol=None, atol=None)


def require_cosine(fidelity: Fidelity, min_cosine: float, consequence: str = "") -> None:
    """Raise VerificationError naming the first output below the cosine budget (judged_by_cosine)."""
    for o in fidelity.outputs:
        if o.note is not None:
            raise VerificationError(f"lossy model differs from the original: output '{o.name}': {o.note}{consequence}")
        if not o.cosine_similarity >= min_cosine:  # NaN fails too
            raise VerificationError(
                f"lossy model moved too far: output '{o.name}' cosine {o.cosine_similarity:.5f} is below the budget {min_cosine}{consequence}"
            )


# ---------------------------------------------------------------------------------------------
# Finding sizes the original model runs on

# Sizes tried for symbolic dims once the model's own hints have failed: 1 for dims that must match
# a batch, then common image sides and sequence lengths, and one second of 16 kHz audio.
_LADDER = (1, 32, 64, 128, 224, 256, 512, 1024, 16000)

# A candidate whose inputs alone would take more than this is skipped: the model's activations on
# it would be larger still.
_MAX_CANDIDATE_BYTES = 256 << 20

# Ops whose window must fit in the (padded) input and whose strides shrink it.
_WINDOWED = {"Conv", "ConvInteger", "MaxPool", "AveragePool", "LpPool"}

# Pad modes that read the input's own values, so the input must be longer than the padding.
_READING_PAD_MODES = {b"reflect", b"edge", b"wrap"}

# Ops whose attributes the size hints read.
_SIZE_OPS = _WINDOWED | {"ConvTranspose", "Resize", "Upsample", "Pad"}


@dataclass
class FoundInputs:
    inputs: dict[str, np.ndarray]
    # The original model's outputs on them (as `run` computes them): callers need not run it again.
    outputs: dict[str, np.ndarray]
    # The size used for every symbolic dim of the inputs, by dim_param; a dim without one as "input:axis".
    dims: dict[str, int]
    # How many candidate sizes were run, the one that worked included.
    tries: int


def find_inputs(
    model: onnx.ModelProto | str,
    *,
    dim_values: dict[str, int] | None = None,
    seed: int = 0,
    max_tries: int = 12,
    threads: int = 2,
    proto: onnx.ModelProto | None = None,
) -> FoundInputs:
    """Generated inputs (`make_inputs`) the original model runs on, with sizes chosen for its symbolic dims.

    Candidates, in order: make_inputs' own sizes, so a model that runs on them gets exactly
    make_inputs' inputs; the sizes the graph hints at (`_dim_hints`: sizes it names, minimums,
    multiples); then `_LADDER`, each rung giving batch-like dims 1 and every other dim the rung's
    size, or the size the graph names, or at least its minimum (one size per dim name, so an
    image's H and W, or a sequence length shared by several inputs, agree). Dims named in
    ``dim_values`` (by dim_param, or "input:axis") keep their value in every candidate. All
    candidates run in one onnxruntime session (CPU, graph optimizations off, as `run`), at most
    ``max_tries`` of them; one whose inputs would exceed 256 MiB is skipped. A model with no free
    symbolic dim runs once.

    ``proto``: the structure to generate inputs from, when the caller holds it already (the CLI's,
    with --input-shape/--dim written into it); the session still runs ``model``. Defaults to
    ``model`` itself (a path is read without its external data).

    Raises GraphoptError at once when onnxruntime cannot load the model, and, when no candidate
    runs, with the first candidate's error and what the user can pass instead.
    """
    if max_tries < 1:
        raise GraphoptError("find_inputs needs max_tries >= 1")
    gen = _Generator(proto if proto is not None else as_proto(model))
    fixed = {key: int(value) for key, value in (dim_values or {}).items()}
    sess = None
    seen: list[dict[str, int]] = []
    tries = 0
    first_failure: tuple[GraphoptError, dict[str, tuple[int, ...]]] | None = None
    for dims in _candidates(gen, fixed):
        if tries >= max_tries:
            break
        if dims in seen:
            continue
        seen.append(dims)
        shapes = gen.shapes(dims, batch=1)
        if tries and _nbytes(gen, shapes) > _MAX_CANDIDATE_BYTES:
            continue
        inputs = gen.generate(shapes, seed)
        if sess is None:
            # Created once: building a session costs far more than running a small input.
            sess = _session(model, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        tries += 1
        try:
            outputs = _run_session(sess, _feeds_for(sess, inputs))
        except GraphoptError as exc:
            first_failure = first_failure or (exc, shapes)
            continue
        return FoundInputs(inputs, _outputs_by_name(sess, outputs), dims, tries)

    assert first_failure is not None  # the first candidate always runs
    error, shapes = first_failure
    first = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
    raise GraphoptError(
        f"the original model fails on generated inputs for every tried size ({tries} tried; the first, {first}: {error}); "
        "give sizes it runs on with --dim NAME=VALUE or --input-shape NAME:D0,D1,..., or inputs with --inputs FILE.npz"
    )


def _nbytes(gen: _Generator, shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shapes[vi.name]) * _np_dtype(vi).itemsize for vi in gen.inputs)


def _candidates(gen: _Generator, fixed: dict[str, int]) -> Iterator[dict[str, int]]:
    """Sizes for every symbolic dim, best guess first (duplicates possible)."""
    default: dict[str, int] = {}
    for vi in gen.inputs:
        for key, size in zip(_dim_keys(vi), _resolve_shape(vi, fixed, 1, gen.leading_params)):
            if isinstance(key, str):
                default[key] = size
    yield default
    if all(key in fixed for key in default):
        return
    # Worked out only now: most models run on the default sizes.
    batch = _batch_keys(gen)
    hints = _dim_hints(gen, batch)

    def rung(size: int, align: bool) -> dict[str, int]:
        dims = {}
        for key in default:
            hint = hints.get(key, _DimHint())
            if key in fixed:
                dims[key] = fixed[key]
            elif key in batch and not hint.exact:
                dims[key] = 1
            else:
                dims[key] = hint.fit(size, align=align)
        return dims

    yield rung(DEFAULT_DIM, align=True)
    # The ladder does not round up to the hinted multiple: the multiples of an If's branches combine
    # into one that can be too large for the branch that runs (silero-vad's 8 kHz branch takes at
    # most 351 samples, its 16 kHz branch asks for multiples of 512), and the ladder's sizes are
    # multiples of 32 already.
    for size in _LADDER:
        yield rung(size, align=False)


def _batch_keys(gen: _Generator) -> set[str]:
    """Dims that most likely count a batch: named so (as make_inputs decides), or the leading axis
    of an input of rank 2 or more. The ladder keeps them at 1 and the graph's size hints skip them."""
    keys = set()
    for vi in gen.inputs:
        dims = _dim_keys(vi)
        for axis, key in enumerate(dims):
            if isinstance(key, str) and (_batch_param(key, gen.leading_params) or (axis == 0 and len(dims) >= 2)):
                keys.add(key)
    return keys


@dataclass
class _DimHint:
    """What the graph says about the size of one symbolic dim."""

    exact: list[int] = field(default_factory=list)  # sizes the model names for it, most trusted first
    minimum: int = 1
    multiple: int = 1

    def fit(self, size: int, *, align: bool = True) -> int:
        """The size to use instead of ``size``: the model's own, else at least the minimum and,
        when aligning, rounded up to the multiple."""
        if self.exact:
            return self.exact[0]
        size = max(size, self.minimum)
        return -(-size // self.multiple) * self.multiple if align else size


def _dim_hints(gen: _Generator, batch: set[str]) -> dict[str, _DimHint]:
    """Sizes the graph suggests for the inputs' symbolic dims, from one cheap walk. A hint may be
    wrong (this is no dataflow analysis); it only decides which candidates find_inputs tries.

    * exact sizes: the initializer behind a graph input that shares the dim's name; the channels of
      a Conv, or the contraction size of a MatMul/Gemm, reading the input directly; the size a
      constant Reshape target without -1 leaves for the input's one free dim; a fixed size at the
      same axis of another input of the same rank (they are probably combined elementwise);
    * minimums: a reflect/edge/wrap Pad needs more input than padding, a Conv/Pool window must fit
      in the padded input; both scaled by the downsampling between the input and that op;
    * multiples: the product of the strides of Conv/Pool layers between an input and any tensor,
      less the upsampling of Resize/Upsample/ConvTranspose (an encoder-decoder's skip connections
      only line up when the input divides by it); the factor a -1 Reshape target needs.

    Minimums and multiples go to every non-batch symbolic dim of the inputs a tensor depends on:
    which input axis a tensor's axis came from is not tracked.
    """
    proto = gen.proto
    hints: dict[str, _DimHint] = defaultdict(_DimHint)
    keys = {vi.name: _dim_keys(vi) for vi in gen.inputs}
    spatial = {name: [k for k in ks if isinstance(k, str) and k not in batch] for name, ks in keys.items()}
    constants = dict(_constants(proto))

    def value(name: str) -> np.ndarray | None:
        t = constants.get(name)
        if t is None or math.prod(t.dims) > 64:  # small index tensors only; never read weights
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:  # external data, not loaded
            return None

    def require(origins: dict[str, Fraction], minimum: int | None = None, multiple: bool = False) -> None:
        """``minimum`` elements of a tensor downsampled by ``factor`` span (minimum - 1) * factor + 1
        elements of the input; ``multiple``: the input must divide by the factor."""
        for origin, factor in origins.items():
            for key in spatial[origin]:
                hint = hints[key]
                if minimum is not None:
                    hint.minimum = max(hint.minimum, math.ceil((minimum - 1) * factor) + 1)
                if multiple and factor.denominator == 1 and factor > 1:
                    hint.multiple = math.lcm(hint.multiple, int(factor))

    initializers = {t.name: t for t in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in initializers and vi.type.tensor_type.HasField("shape"):
            for d, size in zip(vi.type.tensor_type.shape.dim, initializers[vi.name].dims):
                if d.dim_param:
                    hints[d.dim_param].exact.append(int(size))

    for node in all_nodes(proto.graph):
        _direct_hints(node, keys, batch, constants, value, hints)

    # reach[tensor]: the inputs it depends on, each with how much smaller than that input the
    # tensor's spatial axes are (Conv/Pool strides over Resize/ConvTranspose upsampling).
    reach: dict[str, dict[str, Fraction]] = {name: {name: Fraction(1)} for name in keys}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            bodies += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
            for body in bodies:
                walk(body)
            origins = _merge_reach([reach.get(n) for n in node.input] + [reach.get(o.name) for b in bodies for o in b.output])
            if not origins:
                continue
            op = node.op_type
            data = reach.get(node.input[0], {}) if node.input else {}
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} if op in _SIZE_OPS else {}
            if op in _WINDOWED and data:
                weight = constants.get(node.input[1]) if op in ("Conv", "ConvInteger") and len(node.input) > 1 else None
                kernel = list(attrs.get("kernel_shape") or (weight.dims[2:] if weight is not None else []))
                if kernel:
                    n = len(kernel)
                    dilations = list(attrs.get("dilations") or [1] * n)
                    pads = list(attrs.get("pads") or [0] * (2 * n))
                    if attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"):
                        window = max((k - 1) * d + 1 - pads[i] - pads[i + n] for i, (k, d) in enumerate(zip(kernel, dilations)))
                        require(data, minimum=window)
                stride = max(attrs.get("strides") or [1])
                origins = {o: f * stride for o, f in origins.items()}
                require(origins, multiple=True)
            elif op == "ConvTranspose":
                stride = max(attrs.get("strides") or [1])
                origins = {o: f / stride for o, f in origins.items()}
            elif op in ("Resize", "Upsample"):
                scale = _resize_scale(node, attrs, value)
                if scale is not None:
                    origins = {o: f / scale for o, f in origins.items()}
                    require(origins, multiple=True)
            elif op == "Pad" and attrs.get("mode", b"constant") in _READING_PAD_MODES and data:
                pads = attrs.get("pads")
                if pads is None and len(node.input) > 1:
                    pads = value(node.input[1])
                if pads is not None and np.size(pads):
                    require(data, minimum=int(np.max(pads)) + 1)
            for out in node.output:
                if out:
                    reach[out] = origins

    walk(proto.graph)

    # Last, as the least trusted exact hint.
    for name, ks in keys.items():
        for other, other_keys in keys.items():
            if other != name and len(other_keys) == len(ks):
                for key, size in zip(ks, other_keys):
                    if isinstance(key, str) and isinstance(size, int) and size > 1:
                        hints[key].exact.append(size)
    return dict(hints)


def _resize_scale(node: onnx.NodeProto, attrs: dict[str, Any], value: Callable[[str], np.ndarray | None]) -> Fraction | None:
    """The largest constant scale of a Resize/Upsample over its spatial axes, or None when the
    output size is computed (or given as sizes)."""
    if "scales" in attrs:  # Upsample before opset 9
        scales = np.asarray(attrs["scales"])
    else:
        # Resize-10 and Upsample-9 take (X, scales); Resize-11 and later (X, roi, scales, sizes).
        index = 2 if node.op_type == "Resize" and len(node.input) > 2 else 1
        scales = value(node.input[index]) if len(node.input) > index else None
    if scales is None or not scales.size:
        return None
    scale = Fraction(float(np.max(scales[2:] if scales.size > 2 else scales))).limit_denominator(1000)
    return scale if scale > 0 else None


def _merge_reach(maps: list[dict[str, Fraction] | None]) -> dict[str, Fraction]:
    merged: dict[str, Fraction] = {}
    for m in maps:
        for origin, factor in (m or {}).items():
            merged[origin] = max(merged.get(origin, factor), factor)
    return merged


def _direct_hints(
    node: onnx.NodeProto,
    keys: dict[str, list[int | str]],
    batch: set[str],
    constants: dict[str, onnx.TensorProto],
    value: Callable[[str], np.ndarray | None],
    hints: dict[str, _DimHint],
) -> None:
    """Exact sizes (or a multiple) a node asks of a graph input it reads directly."""
    if not node.input or not keys.get(node.input[0]):
        return
    data = keys[node.input[0]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = constants.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type in ("Conv", "ConvInteger") and weight is not None and len(data) > 1 and isinstance(data[1], str):
        hints[data[1]].exact.append(int(weight.dims[1]) * int(attrs.get("group", 1)))
    elif node.op_type == "MatMul" and weight is not None and len(weight.dims) >= 2 and isinstance(data[-1], str):
        hints[data[-1]].exact.append(int(weight.dims[-2]))
    elif node.op_type == "Gemm" and weight is not None and len(weight.dims) == 2 and len(data) == 2:
        axis = 0 if attrs.get("transA", 0) else 1
        if isinstance(data[axis], str):
            hints[data[axis]].exact.append(int(weight.dims[1] if attrs.get("transB", 0) else weight.dims[0]))
    elif node.op_type == "Reshape":
        target = value(node.input[1]) if len(node.input) > 1 else None
        free = [k for k in data if isinstance(k, str) and k not in batch]
        if target is None or len(free) != 1 or (not attrs.get("allowzero", 0) and 0 in target.tolist()):
            return
        # The one free dim times the fixed ones (and a batch of 1) must equal the target's element
        # count; with a -1 in the target, be divisible by the product of its other entries.
        known = math.prod(k for k in data if isinstance(k, int))
        wanted = math.prod(int(t) for t in target.tolist() if t > 0)
        if -1 in target.tolist():
            hints[free[0]].multiple = math.lcm(hints[free[0]].multiple, wanted // math.gcd(wanted, known))
        elif wanted % known == 0:
            hints[free[0]].exact.append(wanted // known)


# ---------------------------------------------------------------------------------------------
# Comparing


def _missing(name: str, size: int, note: str) -> OutputFidelity:
    return OutputFidelity(
        name=name,
        max_abs_error=math.inf,
        max_rel_error=math.inf,
        cosine_similarity=0.0,
        top1_agreement=None,
        mismatched=int(size),
        within_tolerance=False,
        note=note,
    )


def _classifier_like(shape: tuple[int, ...]) -> bool:
    # [N, C], or [N, 1, ..., 1, C]: one score vector per row. Anything else (sequence logits,
    # feature maps) has no single "class" per row.
    return len(shape) >= 2 and shape[-1] > 1 and all(d == 1 for d in shape[1:-1])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    if a.size == 0:
        return 1.0
    # Normalize first so that large magnitudes do not overflow the dot product.
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))))
    if scale == 0.0:
        return 1.0
    a, b = a / scale, b / scale
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _compare_one(name: str, ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float) -> OutputFidelity:
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.shape != cand.shape:
        return _missing(name, ref.size, f"shape changed: {list(ref.shape)} -> {list(cand.shape)}")
    note = None
    if ref.dtype != cand.dtype:
        note = f"dtype changed: {ref.dtype} -> {cand.dtype}"

    if ref.dtype.kind in "OSU" or cand.dtype.kind in "OSU":
        mismatched = int(np.count_nonzero(ref != cand))
        err = 0.0 if mismatched == 0 else math.inf
        return OutputFidelity(name, err, err, 1.0 if mismatched == 0 else 0.0, None, mismatched,
                              mismatched == 0 and note is None, note)

    exact = ref.dtype.kind in "biu"
    # At least 1-d: arithmetic on 0-d arrays returns numpy scalars, which cannot be indexed below.
    a = np.atleast_1d(ref.astype(np.float64))
    b = np.atleast_1d(cand.astype(np.float64))
    if exact:
        # Compared in the original dtypes: int64 values beyond 2**53 can collide in float64.
        close = ref == cand
    else:
        close = np.isclose(b, a, rtol=rtol, atol=atol, equal_nan=True)
    mismatched = int(close.size - np.count_nonzero(close))

    if a.size:
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a - b)
        diff[same] = 0.0
        diff[np.isnan(diff)] = math.inf  # NaN against a number
        finite_ref = np.abs(a[np.isfinite(a)])
        eps = 1e-6 * max(1.0, float(finite_ref.max()) if finite_ref.size else 1.0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            rel = diff / (np.abs(a) + eps)
        rel[diff == 0] = 0.0
        rel[np.isnan(rel)] = math.inf  # inf / inf: an infinity against a finite value
        max_abs = float(diff.max())
        max_rel = float(rel.max())
        cosine = 1.0 if bool(same.all()) else _cosine(a.ravel(), b.ravel())
    else:
        max_abs = max_rel = 0.0
        cosine = 1.0

    top1 = None
    if ref.dtype.kind == "f" and _classifier_like(ref.shape) and ref.size:
        rows_a = a.reshape(-1, ref.shape[-1])
        rows_b = b.reshape(-1, ref.shape[-1])
        top1 = float(np.mean(np.argmax(rows_a, axis=1) == np.argmax(rows_b, axis=1)))

    return OutputFidelity(
        name=name,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        cosine_similarity=cosine,
        top1_agreement=top1,
        mismatched=mismatched,
        within_tolerance=mismatched == 0 and note is None,
        note=note,
    )


def compare(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Fidelity:
    """Compare outputs by name, in the reference's order. An output missing from the candidate, or
    of another shape or dtype, is not within tolerance; outputs only the candidate has are ignored."""
    results = []
    for name, ref in reference.items():
        if name not in candidate:
            results.append(_missing(name, np.asarray(ref).size, "missing in candidate"))
        else:
            results.append(_compare_one(name, ref, candidate[name], rtol, atol))
    return Fidelity(outputs=results, ok=all(o.within_tolerance for o in results), rtol=rtol, atol=atol)


def verify(
    original: onnx.ModelProto | str,
    optimized: onnx.ModelProto | str,
    *,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Fidelity:
    """Run both models on the same inputs and compare. Without ``inputs``, they are generated
    (`find_inputs`: sizes the original runs on)."""
    if inputs is None:
        found = find_inputs(original, seed=seed)
        inputs, reference = found.inputs, found.outputs
    else:
        reference = run(original, inputs)
    candidate = run(optimized, inputs)
    return compare(reference, candidate, rtol=rtol, atol=atol)
