"""graphopt's IR: a thin layer over onnx-graphsurgeon.

`Model` holds one `onnx_graphsurgeon.Graph` (the mutable graph passes rewrite) plus what gs does not
keep for us: the IR version, every opset import, metadata, and the defaults of graph inputs that also
have an initializer (IR >= 4), which gs would otherwise silently turn into constants.

Subgraphs (If/Loop/Scan bodies) are `gs.Graph` objects held in node attributes. A value a subgraph
takes from an outer scope is the very same `gs.Tensor` object as in the outer graph, so a
`replace_all_uses` on the outer value also rewires the subgraph.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.errors import GraphoptError, one_line

# Protobuf cannot serialize a message of 2 GiB or more, so bigger models must keep weights outside.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Tensors at least this big go to the external data file when a model is saved with external data.
EXTERNAL_DATA_MIN_BYTES = 1024

# gs leaves the domain of default-domain nodes as None.
DEFAULT_DOMAINS = ("", "ai.onnx", None)


@dataclass
class Model:
    graph: gs.Graph
    ir_version: int
    opset_imports: dict[str, int]
    # Initializers that are also graph inputs (IR >= 4): defaults a caller may override, never constants.
    input_defaults: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    functions: list[onnx.FunctionProto] = field(default_factory=list)

    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset version."""
        for domain in DEFAULT_DOMAINS:
            if domain in self.opset_imports:
                return self.opset_imports[domain]
        return 1

    def graphs(self) -> Iterator[gs.Graph]:
        """The main graph and every subgraph below it, outer graphs before inner ones."""
        yield self.graph
        yield from subgraphs_below(self.graph)


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    graphs: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            graphs.append(value)
        elif isinstance(value, (list, tuple)):
            graphs.extend(v for v in value if isinstance(v, gs.Graph))
    return graphs


def subgraphs_below(graph: gs.Graph) -> Iterator[gs.Graph]:
    for node in graph.nodes:
        for sub in subgraphs_of(node):
            yield sub
            yield from subgraphs_below(sub)


# ---------------------------------------------------------------------------------------------
# Loading


def load(path: str | os.PathLike, *, fold_input_defaults: bool = False) -> Model:
    """Load, check and import a model file. Raises GraphoptError with a one-line reason."""
    proto = load_proto(path)
    return from_proto(proto, fold_input_defaults=fold_input_defaults)


def load_proto(path: str | os.PathLike, *, files: set[Path] | None = None) -> onnx.ModelProto:
    """Read, bounds-check and onnx.checker a model file with its external data.

    `files`, when given, receives the resolved paths of every file the model consists of, so a
    caller can refuse to overwrite any of them.
    """
    path = Path(path)
    if not path.exists():
        raise GraphoptError(f"{path}: no such file")
    if path.is_dir():
        raise GraphoptError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise GraphoptError(f"{path}: file is empty")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise GraphoptError(f"{path}: not a valid ONNX model (protobuf parse failed: {one_line(exc)})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise GraphoptError(f"{path}: not an ONNX model (no graph or IR version in the file)")
    data_files = _load_external_data(proto, path.parent)
    check(None, path)
    if files is not None:
        files.update(data_files | {path.resolve()})
    return proto


def _external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if onnx.external_data_helper.uses_external_data(tensor):
            yield tensor


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> set[Path]:
    base = base_dir.resolve()
    files: set[Path] = set()
    for tensor in _external_tensors(proto):
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        target = (base / location).resolve()
        # A model must not make us read files outside its own folder (e.g. "../../etc/passwd").
        if location.is_absolute() or base not in target.parents:
            raise GraphoptError(
                f"external data location '{info.location}' of tensor '{tensor.name}' escapes the model's folder; refused"
            )
        if not target.is_file():
            raise GraphoptError(f"external data file '{info.location}' of tensor '{tensor.name}' is missing")
        files.add(target)
        size = target.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if end > size:
            raise GraphoptError(
                f"external data file '{info.location}' is truncated: tensor '{tensor.name}' needs bytes up to {end}, file has {size}"
            )
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise GraphoptError(f"cannot read external data: {one_line(exc)}") from None
    return files


def check(proto: onnx.ModelProto | None, path: Path | None = None) -> None:
    """onnx.checker on a model of any size; a failure is a GraphoptError naming the problem.

    With a path the checker reads the file itself, which costs no serialized copy of the weights.
    """
    try:
        if path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        where = f"{path}: " if path is not None else ""
        raise GraphoptError(f"{where}model fails onnx.checker: {one_line(exc)}") from None




def approx_nbytes(proto: onnx.ModelProto) -> int:
    """Serialized size, estimated from tensor shapes (exact ByteSize() costs a pass over every byte)."""
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, ValueError, TypeError):
            itemsize = 1
        total += count * itemsize + 64
    return total + 128 * sum(1 for _ in _all_nodes(proto.graph))


def from_proto(proto: onnx.ModelProto, *, fold_input_defaults: bool = False) -> Model:
    """Import a checked ModelProto, taking ownership of it: its tensors are shared, not copied."""
    input_defaults: dict[str, onnx.TensorProto] = {}
    if proto.ir_version >= 4 and not fold_input_defaults:
        input_names = {i.name for i in proto.graph.input}
        overridable = [i for i, init in enumerate(proto.graph.initializer) if init.name in input_names]
        # gs would import these as constants; take them out so they stay graph inputs.
        for index in reversed(overridable):
            default = onnx.TensorProto()
            default.CopyFrom(proto.graph.initializer[index])
            input_defaults[default.name] = default
            del proto.graph.initializer[index]
    graph = gs.import_onnx(proto)
    opsets = {imp.domain: imp.version for imp in proto.opset_import}
    return Model(
        graph=graph,
        ir_version=proto.ir_version,
        opset_imports=opsets,
        input_defaults=input_defaults,
        producer_name=proto.producer_name,
        producer_version=proto.producer_version,
        domain=proto.domain,
        model_version=proto.model_version,
        doc_string=proto.doc_string,
        metadata_props={p.key: p.value for p in proto.metadata_props},
        functions=list(proto.functions),
    )


# ---------------------------------------------------------------------------------------------
# Exporting and saving


def to_proto(model: Model) -> onnx.ModelProto:
    graph = model.graph
    for g in model.graphs():
        toposort(g)
    proto = gs.export_onnx(graph, do_type_check=False)
    del proto.opset_import[:]
    for domain, version in sorted(model.opset_imports.items()):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    # gs adds imports for domains of new nodes; keep the original versions and add only what's new.
    for node in _all_nodes(proto.graph):
        if node.domain not in model.opset_imports and not (node.domain in DEFAULT_DOMAINS and _has_default(model)):
            proto.opset_import.append(onnx.helper.make_opsetid(node.domain, 1))
            model.opset_imports[node.domain] = 1
    proto.ir_version = model.ir_version
    proto.producer_name = model.producer_name
    proto.producer_version = model.producer_version
    proto.domain = model.domain
    proto.model_version = model.model_version
    proto.doc_string = model.doc_string
    del proto.metadata_props[:]
    for key, value in model.metadata_props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    del proto.functions[:]
    proto.functions.extend(model.functions)
    g = proto.graph
    live_inputs = {i.name for i in g.input}
    existing = {i.name for i in g.initializer}
    for name, default in model.input_defaults.items():
        if name in live_inputs and name not in existing:
            g.initializer.append(default)
    if model.ir_version < 4:
        # IR 3 requires every initializer to be listed as a graph input as well.
        for init in g.initializer:
            if init.name not in live_inputs:
                g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return proto


def _has_default(model: Model) -> bool:
    return any(d in model.opset_imports for d in DEFAULT_DOMAINS)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def save(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    validate: Callable[[Path], None] | None = None,
) -> int:
    """Write a model atomically and return its size in bytes (model file plus external data).

    The model goes to a temporary folder beside `path`, is checked there with onnx.checker (and by
    `validate(tmp_path)`, which may raise to abandon the write), and only then renamed into place.
    With external_data=None, weights go to `<name>.data` when the model would not fit in one
    protobuf (2 GiB). Saving with external data moves tensor bytes out of the in-memory proto, so
    save last.
    """
    proto = to_proto(model) if isinstance(model, Model) else model
    path = Path(path)
    out_dir = path.parent if str(path.parent) else Path(".")
    if not out_dir.is_dir():
        raise GraphoptError(f"cannot write {path}: folder {out_dir} does not exist")
    if external_data is None:
        external_data = approx_nbytes(proto) > PROTOBUF_LIMIT_BYTES
    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=out_dir))
    except OSError as exc:
        raise GraphoptError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            onnx.save_model(
                proto,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_DATA_MIN_BYTES,
            )
        else:
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        try:
            check(None, tmp_model)
        except GraphoptError as exc:
            raise GraphoptError(f"refusing to write an invalid model (a graphopt bug): {exc}") from None
        if validate is not None:
            validate(tmp_model)
        size = sum(p.stat().st_size for p in tmp_dir.iterdir())
        if external_data:
            os.replace(tmp_dir / data_name, out_dir / data_name)
        os.replace(tmp_model, path)
        return size
    except OSError as exc:
        raise GraphoptError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            for leftover in tmp_dir.iterdir():
                leftover.unlink()
            tmp_dir.rmdir()


# ---------------------------------------------------------------------------------------------
# Helpers passes use


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor known at compile time: an initializer or the output of a Constant node."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        # Load lazily-held weights without caching them on the tensor: gs would otherwise keep a
        # numpy copy next to the proto's bytes, and every weight would live in memory twice.
        if isinstance(tensor._values, LazyValues):
            return tensor._values.load()
        return tensor.values
    node = producer(tensor)
    if node is not None and node.op == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.attrs) == 1:
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def is_constant(tensor: gs.Tensor | None) -> bool:
    if tensor is None:
        return False
    if isinstance(tensor, gs.Constant):
        return True
    node = producer(tensor)
    return node is not None and node.op == "Constant" and constant_value(tensor) is not None


def constant_bytes(tensor: gs.Constant) -> bytes:
    """The raw little-endian bytes of a constant, without caching a numpy copy on the tensor."""
    if isinstance(tensor._values, LazyValues):
        proto = tensor._values.tensor
        if proto.HasField("raw_data"):
            return proto.raw_data
    return np.ascontiguousarray(constant_value(tensor)).tobytes()


def constant_fingerprint(tensor: gs.Constant) -> tuple:
    """A key equal for two constants exactly when dtype, shape and bytes are equal."""
    data = constant_bytes(tensor)
    return (str(tensor.dtype), tuple(tensor.shape), hashlib.blake2b(data, digest_size=16).digest())


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is a known non-negative integer, else None."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    shape = tensor.shape
    if shape is None:
        return None
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return tuple(int(d) for d in shape)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every consumer of `old` read `new` instead (in subgraphs too).

    A graph output keeps its name: if `old` is an output of `graph`, `new`'s producer is made to
    produce `old` directly. Returns False (changing nothing) when that is impossible: `new` has no
    producer in this graph (a graph input, constant or outer-scope value) or is itself an output.
    """
    if old is new:
        return True
    if is_graph_output(graph, old):
        new_producer = producer(new)
        if (
            new_producer is None
            or isinstance(new, gs.Constant)
            or is_graph_output(graph, new)
            or any(t is new for t in graph.inputs)
            # an outer-scope producer cannot be made to produce this subgraph's output
            or not any(n is new_producer for n in graph.nodes)
        ):
            return False
        # `old` becomes the producer's output; `new`'s other consumers read `old`.
        old.inputs.clear()
        for node in consumers(new):
            _swap_input(node, new, old)
        index = next(i for i, t in enumerate(new_producer.outputs) if t is new)
        new_producer.outputs[index] = old
        if old.dtype is None:
            old.dtype = new.dtype
        if old.shape is None:
            old.shape = new.shape
        return True
    for node in consumers(old):
        _swap_input(node, old, new)
    return True


def _swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def make_constant(name: str, value: np.ndarray) -> gs.Constant:
    # np.ascontiguousarray would turn a scalar into shape (1,)
    return gs.Constant(name, np.asarray(value, order="C"))


class NameAllocator:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: Model):
        self._used: set[str] = set()
        for graph in model.graphs():
            self._used.update(graph.tensors().keys())
            self._used.update(n.name for n in graph.nodes if n.name)
        self._counters: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        n = self._counters.get(base, 0)
        while True:
            candidate = f"{base}_{n}" if n else base
            n += 1
            if candidate not in self._used:
                self._counters[base] = n
                self._used.add(candidate)
                return candidate


def parameter_count(model: Model) -> int:
    return sum(int(np.prod(t.shape)) for g in model.graphs() for t in g.tensors().values() if isinstance(t, gs.Constant))


def remove_nodes(graph: gs.Graph, dead: list[gs.Node]) -> None:
    """Disconnect and drop nodes in one sweep (removing one by one from the list would be quadratic)."""
    if not dead:
        return
    dead_ids = {id(n) for n in dead}
    for node in dead:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in dead_ids]


def outer_uses(node: gs.Node) -> list[gs.Tensor]:
    """Tensors that the subgraphs of `node` (at any depth) read, wherever they are produced."""
    used: list[gs.Tensor] = []
    for sub in subgraphs_of(node):
        for inner in sub.nodes:
            used.extend(t for t in inner.inputs if not t.is_empty())
            used.extend(outer_uses(inner))
        used.extend(sub.outputs)
    return used


def toposort(graph: gs.Graph) -> None:
    """Sort `graph.nodes` topologically in place, keeping the existing order wherever it is valid.

    Hand-written rather than gs.Graph.toposort: that one recurses once per node (deep graphs hit
    Python's recursion limit) and rescans subgraphs per node; this is Kahn's algorithm, linear
    apart from the heap that keeps the result deterministic.
    """
    import heapq

    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    deps: list[set[int]] = []
    for node in nodes:
        producers = set()
        for tensor in list(node.inputs) + outer_uses(node):
            for p in tensor.inputs:
                j = index.get(id(p))
                if j is not None and j != index[id(node)]:
                    producers.add(j)
        deps.append(producers)
    users: list[list[int]] = [[] for _ in nodes]
    pending = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, n in enumerate(pending) if n > 0)
        raise GraphoptError("graph has a cycle", node=stuck.name or stuck.op)
    if order != list(range(len(nodes))):
        graph.nodes = [nodes[i] for i in order]
