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
* In ``to_dict`` non-finite floats become the strings "inf", "-inf" and "nan", so the result is
  strict JSON (``json.dumps(..., allow_nan=False)`` works).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.errors import GraphoptError, one_line

from graphopt.ir import PROTOBUF_LIMIT_BYTES, all_graphs, all_nodes, approx_nbytes  # over the limit: ORT gets a file

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


def _as_proto(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise GraphoptError(f"{path}: no such file")
    try:
        # Only the graph's structure is needed here; initializer dims are stored even when their
        # bytes live in external data, so the (possibly huge) weights are not read.
        return onnx.load_model(path, load_external_data=False)
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
        raise GraphoptError(f"input '{vi.name}' is a string tensor; cannot generate inputs for it (supply them with --inputs)")
    if et == onnx.TensorProto.BFLOAT16 or et >= onnx.TensorProto.FLOAT8E4M3FN:
        name = onnx.TensorProto.DataType.Name(et)
        raise GraphoptError(f"input '{vi.name}' has element type {name}, which numpy cannot represent; cannot generate inputs for it")
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et))
    except (KeyError, TypeError, ValueError):
        raise GraphoptError(f"input '{vi.name}' has unsupported element type {et}") from None


def _resolve_shape(
    vi: onnx.ValueInfoProto, dim_values: dict[str, int], batch: int, leading_params: set[str]
) -> tuple[int, ...]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise GraphoptError(f"input '{vi.name}' has unknown rank; cannot generate inputs for it (supply them with --inputs)")
    shape = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            shape.append(_param_value(d.dim_param, dim_values, batch, leading_params))
        elif axis == 0:
            shape.append(batch)
        else:
            shape.append(DEFAULT_DIM)
    return tuple(shape)


def _param_value(param: str, dim_values: dict[str, int], batch: int, leading_params: set[str]) -> int:
    # Decided per name, not per position, so that a dim shared by several inputs (the sequence
    # length of input_ids and attention_mask) gets one size everywhere.
    if param in dim_values:
        return int(dim_values[param])
    if "batch" in param.lower() or (param in leading_params and _BATCH_LIKE.match(param)):
        return batch
    return DEFAULT_DIM




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

    for g in all_graphs(model.graph):
        for t in g.initializer:
            shapes[t.name] = tuple(t.dims)
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        shapes[n.output[0]] = tuple(a.t.dims)
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
    is ``batch`` on axis 0 and DEFAULT_DIM elsewhere.

    Values: inputs named like *mask* (any numeric or bool type) get random 0/1 with at least one 1
    in every row (last axis), so no attention row is fully masked. Other float16/32/64 inputs are
    standard normal. Integer inputs that reach the indices of a Gather/GatherElements/GatherND
    (directly or via Cast/Identity/Unsqueeze/Squeeze/Reshape/Flatten/Expand) get values in [0, n),
    n the size of the gathered axis when the data tensor's shape is known (the smallest such n
    when there are several Gathers); other integers are in [0, 10); bools are random. bfloat16, float8 and string inputs raise GraphoptError.
    """
    proto = _as_proto(model)
    graph = proto.graph
    dim_values = dict(dim_values or {})
    rng = np.random.default_rng(seed)
    inputs = _real_inputs(graph)

    leading_params = set()
    for vi in inputs:
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            if d0.HasField("dim_param"):
                leading_params.add(d0.dim_param)

    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in all_nodes(graph):
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
    shapes: dict[str, tuple[int | None, ...]] | None = None  # computed only if an integer input needs it

    feeds: dict[str, np.ndarray] = {}
    for vi in inputs:
        dtype = _np_dtype(vi)
        shape = _resolve_shape(vi, dim_values, batch, leading_params)
        is_mask = "mask" in vi.name.lower()
        if dtype.kind == "f":
            if is_mask:
                value = _mask(rng, shape).astype(dtype)
            else:
                value = rng.standard_normal(size=shape).astype(dtype)
        elif dtype.kind == "b":
            value = _mask(rng, shape).astype(bool) if is_mask else rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.kind in "iu":
            if is_mask:
                value = _mask(rng, shape).astype(dtype)
            else:
                if shapes is None:
                    shapes = _known_shapes(proto)
                high = _index_bound(vi.name, consumers, shapes)
                if high is None:
                    high = DEFAULT_INT_HIGH
                high = max(1, min(high, int(np.iinfo(dtype).max) + 1))
                value = rng.integers(0, high, size=shape, dtype=np.int64).astype(dtype)
        else:
            raise GraphoptError(f"input '{vi.name}' has element type {dtype}, which input generation does not support")
        feeds[vi.name] = np.ascontiguousarray(value)
    return feeds


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

    graph = _as_proto(model).graph
    declared = {vi.name: vi for vi in graph.input}
    for name in arrays:
        if name not in declared:
            raise GraphoptError(f"{path}: array '{name}' is not an input of the model (inputs: {', '.join(declared) or 'none'})")
    for vi in _real_inputs(graph):
        if vi.name not in arrays:
            raise GraphoptError(f"{path}: input '{vi.name}' is missing")
    for name, arr in arrays.items():
        vi = declared[name]
        expected = _np_dtype(vi)
        if arr.dtype != expected:
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
        proto = _as_proto(model)
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
    outs = _run_session(sess, _feeds_for(sess, inputs))
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
    """Run both models on the same inputs (generated from the original when not given) and compare."""
    if inputs is None:
        inputs = make_inputs(original, seed=seed)
    reference = run(original, inputs)
    candidate = run(optimized, inputs)
    return compare(reference, candidate, rtol=rtol, atol=atol)
