"""graphopt's IR: a thin layer over onnx-graphsurgeon, and the graph helpers passes use.

`Model` holds one `onnx_graphsurgeon.Graph` (the mutable graph passes rewrite) plus what gs does not
keep for us: the IR version, every opset import, metadata, and the defaults of graph inputs that also
have an initializer (IR >= 4), which gs would otherwise silently turn into constants.

Subgraphs (If/Loop/Scan bodies) are `gs.Graph` objects held in node attributes. A value a subgraph
takes from an outer scope is the very same `gs.Tensor` object as in the outer graph, so a
`replace_all_uses` on the outer value also rewires the subgraph.

Also here: walkers over ONNX protos (`all_graphs`, `all_nodes`) and the graph helpers passes use
(producer, consumers, constant_value, replace_all_uses, remove_nodes, toposort, ...). Reading a
model into a `Model` lives in `graphopt.loading`, writing one out in `graphopt.export`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.errors import GraphoptError


# gs leaves the domain of default-domain nodes as None.
DEFAULT_DOMAINS = ("", "ai.onnx", None)

# Ops whose result differs between two evaluations with equal inputs: never merged, folded, or
# taken for constants.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)

# The IEEE float types ONNX computes in (fused kernels take these; bfloat16 and the float8 types
# are stored, quantized or cast formats to them).
FLOAT_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


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


def used_constants(model: Model) -> Iterator[gs.Constant]:
    """Each constant some node of the model reads, once (however many nodes share it)."""
    seen: set[int] = set()
    for graph in model.graphs():
        for node in graph.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    yield t


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
# Walking ONNX protos


def node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs a NodeProto's attributes hold (an If's branches, a Loop's or Scan's body)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and every subgraph below it (If/Loop/Scan bodies, at any depth)."""
    yield graph
    for node in graph.node:
        for sub in node_subgraphs(node):
            yield from all_graphs(sub)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a GraphProto, those of its subgraphs (at any depth) included."""
    for g in all_graphs(graph):
        yield from g.node


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


def check_shapes(model: Model) -> None:
    """Contradictions onnx.checker and shape inference let through, found once the "shapes" analysis
    has annotated the graph: a Reshape whose constant target cannot hold its input's elements (it
    would fail only when run). Raises GraphoptError naming the node."""
    for graph in model.graphs():
        for node in graph.nodes:
            if node.op != "Reshape" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
                continue
            shape = static_shape(node.inputs[0])
            target = constant_value(node.inputs[1])
            if shape is None or target is None or np.ndim(target) != 1 or np.asarray(target).dtype.kind not in "iu":
                continue
            problem = _reshape_problem(shape, [int(d) for d in target], bool(node.attrs.get("allowzero", 0)))
            if problem:
                raise GraphoptError(f"Reshape {problem}", node=node.name or node.op)


def _reshape_problem(shape: tuple[int, ...], target: list[int], allowzero: bool) -> str | None:
    count = int(np.prod(shape, dtype=np.int64))
    dims = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= len(shape):
                return f"target {target} copies dimension {i} of its rank-{len(shape)} input {list(shape)}"
            d = shape[i]
        elif d < -1:
            return f"target {target} has the negative dimension {d}"
        dims.append(d)
    if dims.count(-1) > 1:
        return f"target {target} has more than one -1"
    known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
    if -1 in dims:
        if known and count % known:
            return f"cannot reshape {list(shape)} ({count} elements) to {target}: {count} is not a multiple of {known}"
    elif known != count:
        return f"cannot reshape {list(shape)} ({count} elements) to {target} ({known} elements)"
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
        redirect_uses(new, old)
        index = next(i for i, t in enumerate(new_producer.outputs) if t is new)
        new_producer.outputs[index] = old
        if old.dtype is None:
            old.dtype = new.dtype
        if old.shape is None:
            old.shape = new.shape
        return True
    redirect_uses(old, new)
    return True


# gs keeps producer/consumer lists in sync through its own list type, which finds the entry to
# drop with list.remove, i.e. with gs's deep Node.__eq__: rewiring the consumers of a tensor read by
# k nodes then costs O(k^2) slow comparisons. These helpers edit the lists directly, by identity.


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`node.inputs[index] = tensor`, without gs's quadratic bookkeeping."""
    old = node.inputs[index]
    if old is tensor:
        return
    consumers_of_old = old.outputs
    for i, n in enumerate(consumers_of_old):
        if n is node:
            list.__delitem__(consumers_of_old, i)
            break
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)


def redirect_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of `old` (in this graph and in subgraphs) reads `new` instead; O(consumers)."""
    if old is new:
        return
    for node in {id(n): n for n in old.outputs}.values():
        for i, t in enumerate(node.inputs):
            if t is old:
                list.__setitem__(node.inputs, i, new)
                list.append(new.outputs, node)
    list.clear(old.outputs)


def subnormal_mask(values: np.ndarray) -> np.ndarray:
    """Where a float array holds subnormal numbers (nonzero, below the dtype's smallest normal)."""
    return (values != 0) & (np.abs(values) < np.finfo(values.dtype).tiny)


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


def remove_nodes(graph: gs.Graph, dead: list[gs.Node]) -> None:
    """Disconnect and drop nodes in one sweep, in time linear in their edges.

    (Removing one by one from graph.nodes, or through gs's own list bookkeeping, is quadratic.)
    """
    if not dead:
        return
    # Nodes inside the bodies of a dead If/Loop/Scan die with it: they must stop counting as
    # consumers of the outer values they read, or those values look used forever.
    everything = list(_with_nested(dead))
    dead_ids = {id(n) for n in everything}
    touched: dict[int, gs.Tensor] = {}
    for node in everything:
        for t in list(node.inputs) + list(node.outputs):
            touched[id(t)] = t
        list.clear(node.inputs)
        list.clear(node.outputs)
    for t in touched.values():
        list.__setitem__(t.outputs, slice(None), [n for n in t.outputs if id(n) not in dead_ids])
        list.__setitem__(t.inputs, slice(None), [n for n in t.inputs if id(n) not in dead_ids])
    graph.nodes = [n for n in graph.nodes if id(n) not in dead_ids]


def _with_nested(nodes: list[gs.Node]) -> Iterator[gs.Node]:
    for node in nodes:
        yield node
        for sub in subgraphs_of(node):
            yield from _with_nested(sub.nodes)


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


def add_to_bias(node: gs.Node, shift: np.ndarray, fresh_name) -> bool:
    """Adds `shift` to the node's bias: its bias input (created for a Conv without one), or the
    constant of the Add that is a MatMul's bias; False where there is no such place (a
    MatMul without one, a bias broadcast another way or shared). `fresh_name` names the new constant."""
    if node.op in ("Conv", "Gemm"):
        if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0 and len(node.inputs) > 2:
            return False
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            bias = constant_value(node.inputs[2])
            if bias is None or bias.shape != shift.shape:
                return False
        else:
            bias = np.zeros(shift.shape, np.float32)
        name = node.inputs[2].name if len(node.inputs) > 2 and not node.inputs[2].is_empty() else f"{node.name}_bias"
        corrected = make_constant(fresh_name(f"{name}_corrected"), (bias + shift).astype(np.float32))
        if len(node.inputs) > 2:
            node.inputs[2] = corrected
        else:
            node.inputs.append(corrected)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        return True
    y = node.outputs[0]
    add = y.outputs[0] if len(y.outputs) == 1 and y.outputs[0].op == "Add" else None
    if add is None:
        return False
    index = next((i for i, t in enumerate(add.inputs) if t is not y), None)
    bias = constant_value(add.inputs[index]) if index is not None else None
    if bias is None or bias.shape[-1:] != shift.shape or bias.size != shift.size or len(add.inputs[index].outputs) != 1:
        return False  # a bias broadcast another way, or shared with another node, keeps its value
    add.inputs[index] = make_constant(fresh_name(f"{add.inputs[index].name}_corrected"),
                                         (bias + shift.reshape(bias.shape)).astype(np.float32))
    return True
