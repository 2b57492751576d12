"""Channel groups: the channels that must be removed together when a layer is pruned.

A group starts at a producer of channels (a Conv with group=1, or a Gemm/MatMul with a constant
weight: its output channels) and follows the tensor forward through everything that keeps channel
c in channel c: per-channel and elementwise ops (BatchNormalization, activations, a per-channel or
scalar constant Add/Mul/Sub/Div, pooling), depthwise Convs (group = channels: input channel c is
output channel c), Concat along the channels (at an offset), up to the readers that reduce over the
channels: the input channels of a Conv, the rows of a Gemm/MatMul weight, and Flatten/Reshape into
a Gemm, which maps channel c to the block of features [c*S, (c+1)*S). A residual Add ties the
groups of both its operands into one: they must keep the same channels.

What a group touches is a list of `Slice`s: a constant, the axis of it that the channels index,
and where along it (offset, block). Pruning keeps the same channel indices in every slice, and in
the depthwise Convs' `group` attribute; the shapes of the `tensors` along the way change with it.

A group is refused (with the node that stops it, for the report) where the channels reach
anything else: a graph output, a grouped Conv, a Reshape or Transpose that moves the channel axis,
a subgraph, a constant shared with a node outside the group, an Add of a tensor no group produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir

# Ops that compute each element from the same element of their input (channel c stays c).
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Gelu", "Erf",
                         "Softplus", "Mish", "Identity", "Dropout", "Neg", "Abs", "Exp", "Sqrt", "Swish"})
POOLING = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Mul", "Sub", "Div"})
# onnxruntime's contrib activations that graphopt's own fusions write (-O3 turns an exported GELU
# into com.microsoft Gelu): elementwise like ELEMENTWISE.
MS_ELEMENTWISE = frozenset({"Gelu", "QuickGelu", "FastGelu", "BiasGelu"})
MS_DOMAIN = "com.microsoft"
CHANNEL_AXIS = 1  # of what a Conv produces (NCHW); a Gemm/MatMul's channels are its output's last axis


@dataclass(frozen=True)
class Slice:
    """Channel c of the group indexes `constant` along `axis` at [offset + c*block, offset + (c+1)*block)."""

    node: gs.Node
    constant: gs.Constant
    axis: int
    offset: int = 0
    block: int = 1
    role: str = "producer"  # producer (output channels), consumer (input channels) or passthrough


@dataclass
class ChannelGroup:
    channels: int
    producers: list[gs.Node] = field(default_factory=list)  # nodes whose output channels these are
    slices: list[Slice] = field(default_factory=list)
    depthwise: list[gs.Node] = field(default_factory=list)  # Convs whose `group` equals the channels
    # Tensors whose channel axis (or Flatten feature axis: block) is the group's: (tensor, offset, block, axis).
    tensors: list[tuple[gs.Variable, int, int, int]] = field(default_factory=list)
    consumers: list[gs.Node] = field(default_factory=list)  # the layers that reduce over the channels
    # Attention heads (channels = heads, each a block of head_size features):
    head_counts: list[tuple[gs.Node, str]] = field(default_factory=list)  # attributes that hold the head count
    head_shapes: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (Reshape, entry, features per head) of constant targets
    reshaped: list[gs.Variable] = field(default_factory=list)  # tensors inside attention whose shapes pruning changes
    head_size: int = 1

    @property
    def name(self) -> str:
        return "+".join(n.name for n in self.producers)


@dataclass(frozen=True)
class Refused:
    producers: tuple[str, ...]
    node: str
    reason: str

    def to_dict(self) -> dict:
        return {"producers": list(self.producers), "node": self.node, "reason": self.reason}


class _Stop(Exception):
    def __init__(self, node: gs.Node | None, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def _const(t) -> gs.Constant | None:
    return t if isinstance(t, gs.Constant) else None


def _gemm_weight(node: gs.Node) -> tuple[gs.Constant, int, int] | None:
    """(weight, its input-feature axis, its output-feature axis) of a Gemm/MatMul reading x @ W."""
    if len(node.inputs) < 2 or _const(node.inputs[1]) is None or node.inputs[1].values.ndim != 2:
        return None
    if node.op == "MatMul":
        return node.inputs[1], 0, 1
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return (node.inputs[1], 1, 0) if node.attrs.get("transB", 0) else (node.inputs[1], 0, 1)
    return None


def _producer_slices(node: gs.Node) -> tuple[int, list[Slice]] | None:
    """(channels, the constants indexed by the output channels) of a channel producer, or None."""
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and _const(node.inputs[1]) is not None:
        w = node.inputs[1]
        slices = [Slice(node, w, 0)]
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            if _const(node.inputs[2]) is None:
                return None
            slices.append(Slice(node, node.inputs[2], 0))
        return w.values.shape[0], slices
    if node.op in ("Gemm", "MatMul"):
        found = _gemm_weight(node)
        if found is None:
            return None
        w, _, out_axis = found
        slices = [Slice(node, w, out_axis)]
        if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
            bias = _const(node.inputs[2])
            if bias is None or bias.values.ndim != 1 or bias.values.shape[0] != w.values.shape[out_axis]:
                return None  # a broadcast scalar or [1, N] bias: not worth the special case
            slices.append(Slice(node, bias, 0))
        return w.values.shape[out_axis], slices
    return None


def _per_channel_axis(value: np.ndarray, rank: int, channels: int, channel_axis: int) -> int | None | str:
    """The axis of a broadcast constant that runs along `channel_axis` of a rank-`rank` tensor;
    None for a scalar-like constant (nothing to slice); "no" when it broadcasts otherwise."""
    if value.size == 1:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if len(shape) != rank or shape[channel_axis] != channels or any(d != 1 for i, d in enumerate(shape) if i != channel_axis):
        return "no"
    if value.ndim < rank - channel_axis:
        return "no"
    return value.ndim - (rank - channel_axis)


class _Walk:
    """One producer's channels followed forward."""

    def __init__(self, graph: gs.Graph, start: gs.Node, channels: int, slices: list[Slice]):
        self.channels = channels
        self.features_last = start.op != "Conv"  # a Gemm/MatMul's channels are the last axis, at any rank
        self.group = ChannelGroup(channels, [start], list(slices))
        self.ties: list[gs.Node] = []  # residual Adds: tie this group with the other operand's
        self.seen: set[int] = set()
        self.outputs = {id(t) for t in graph.outputs}

    def follow(self, t: gs.Tensor, offset: int, via: gs.Node) -> None:
        if id(t) in self.outputs:
            raise _Stop(via, "the channels reach a graph output")
        if offset == 0 and id(t) in self.seen:
            return
        self.seen.add(id(t))
        self.group.tensors.append((t, offset, 1, self.axis(t)))
        for reader in ir.consumers(t):
            self.read(reader, t, offset)

    def axis(self, t: gs.Tensor) -> int:
        if not self.features_last:
            return CHANNEL_AXIS
        if t.shape is None:
            raise _Stop(t.inputs[0] if t.inputs else None, f"tensor {t.name} has an unknown rank")
        return len(t.shape) - 1

    def read(self, node: gs.Node, t: gs.Tensor, offset: int) -> None:
        if node.domain == MS_DOMAIN and node.op in MS_ELEMENTWISE and node.inputs[0] is t:
            # FastGelu's and BiasGelu's second input is a bias added before the activation.
            if len(node.inputs) > 1 and not node.inputs[1].is_empty() and not self._per_channel(node, 1, t, offset, "passthrough"):
                raise _Stop(node, f"{node.op} with a bias that is not per channel")
            self.follow(node.outputs[0], offset, node)
            return
        if ir.subgraphs_of(node) or node.domain not in ir.DEFAULT_DOMAINS:
            raise _Stop(node, f"{node.op} is not a channel-wise op the analysis knows")
        op = node.op
        if op in POOLING and self.features_last:
            raise _Stop(node, f"{op} over the features of a Gemm/MatMul")
        if op in ELEMENTWISE or op in POOLING:
            if op == "PRelu" and not self._per_channel(node, 1, t, offset, "passthrough"):
                raise _Stop(node, "PRelu with a slope that is not per channel")
            if op == "Clip" and any(_const(i) is None for i in node.inputs[1:] if not i.is_empty()):
                raise _Stop(node, "Clip with computed bounds")
            self.follow(node.outputs[0], offset, node)
        elif op == "BatchNormalization" and node.inputs[0] is t:
            for param in node.inputs[1:5]:
                if _const(param) is None:
                    raise _Stop(node, "BatchNormalization with computed statistics")
                self.group.slices.append(Slice(node, param, 0, offset, 1, "passthrough"))
            self.follow(node.outputs[0], offset, node)
        elif op in BINARY:
            other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
            if _const(other) is not None or ir.constant_value(other) is not None:
                if _const(other) is None:
                    raise _Stop(node, f"{op} with a Constant node operand (fold constants first)")
                if not self._per_channel(node, node.inputs.index(other), t, offset, "passthrough"):
                    raise _Stop(node, f"{op} with a constant that broadcasts across the channels")
                self.follow(node.outputs[0], offset, node)
            elif offset == 0 and t.shape is not None and other.shape is not None and list(t.shape) == list(other.shape):
                # Elementwise of two same-shape tensors (a residual Add, the x * erf(x) of a
                # decomposed GELU): both must carry the same channels, which `_tied` checks.
                self.ties.append(node)
                self.follow(node.outputs[0], 0, node)
            else:
                raise _Stop(node, f"{op} of two computed tensors of different shapes (a broadcast)")
        elif op == "Conv" and node.inputs[0] is t and not self.features_last:
            self.conv_reader(node, offset)
        elif op in ("Gemm", "MatMul") and node.inputs[0] is t:
            found = _gemm_weight(node)
            if found is None or t.shape is None or (len(t.shape) != 2 and not (self.features_last and op == "MatMul")):
                raise _Stop(node, f"{op} without a constant 2-D weight reading the channels as its features")
            w, in_axis, _ = found
            self.group.slices.append(Slice(node, w, in_axis, offset, 1, "consumer"))
            self.group.consumers.append(node)
        elif op in ("Flatten", "Reshape") and node.inputs[0] is t and not self.features_last:
            self.flatten(node, t, offset)
        elif op == "Concat" and t.shape is not None and int(node.attrs.get("axis", 0)) % len(t.shape) == self.axis(t):
            before, axis = 0, self.axis(t)
            for i in node.inputs:
                if i is t:
                    break
                if i.shape is None or not isinstance(i.shape[axis], int):
                    raise _Stop(node, "Concat of an input with an unknown channel count")
                before += i.shape[axis]
            self.follow(node.outputs[0], offset + before, node)
        else:
            raise _Stop(node, f"{op} is not a channel-wise op the analysis knows")

    def _per_channel(self, node: gs.Node, index: int, t: gs.Tensor, offset: int, role: str) -> bool:
        const = _const(node.inputs[index])
        rank = len(t.shape) if t.shape is not None else None
        if const is None or rank is None:
            return False
        channel_axis = self.axis(t)
        axis = _per_channel_axis(const.values, rank, t.shape[channel_axis], channel_axis)
        if axis == "no":
            return False
        if axis is not None:
            self.group.slices.append(Slice(node, const, axis, offset, 1, role))
        return True

    def conv_reader(self, node: gs.Node, offset: int) -> None:
        w = _const(node.inputs[1])
        if w is None:
            raise _Stop(node, "Conv with a computed weight")
        groups = int(node.attrs.get("group", 1))
        if groups == 1:
            self.group.slices.append(Slice(node, w, 1, offset, 1, "consumer"))
            self.group.consumers.append(node)
            return
        if offset == 0 and groups == self.channels and w.values.shape[0] == self.channels and w.values.shape[1] == 1:
            self.group.depthwise.append(node)
            self.group.slices.append(Slice(node, w, 0, 0, 1, "passthrough"))
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                if _const(node.inputs[2]) is None:
                    raise _Stop(node, "depthwise Conv with a computed bias")
                self.group.slices.append(Slice(node, node.inputs[2], 0, 0, 1, "passthrough"))
            self.follow(node.outputs[0], 0, node)
            return
        raise _Stop(node, f"grouped Conv (group={groups}) ties channels across groups")

    def flatten(self, node: gs.Node, t: gs.Tensor, offset: int) -> None:
        shape, out = t.shape, node.outputs[0]
        if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]) or out.shape is None or len(out.shape) != 2:
            raise _Stop(node, f"{node.op} of a tensor with an unknown shape")
        if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
            raise _Stop(node, "Flatten that keeps more than the batch axis")
        if out.shape[1] != int(np.prod(shape[1:])):
            raise _Stop(node, "Reshape that does not flatten everything after the batch axis")
        if node.op == "Reshape":
            target = ir.constant_value(node.inputs[1])
            if target is None or int(target[-1]) != -1:
                raise _Stop(node, "Reshape to a fixed feature count (its shape constant would need rewriting)")
        block = int(np.prod(shape[2:]))
        readers = ir.consumers(out)
        if id(out) in self.outputs or not readers:
            raise _Stop(node, "the flattened channels reach a graph output")
        self.group.tensors.append((out, offset * block, block, 1))
        for reader in readers:
            found = _gemm_weight(reader) if reader.op in ("Gemm", "MatMul") and reader.inputs[0] is out else None
            if found is None:
                raise _Stop(reader, f"{reader.op} reads the flattened channels (only a Gemm/MatMul with a constant weight may)")
            w, in_axis, _ = found
            self.group.slices.append(Slice(reader, w, in_axis, offset * block, block, "consumer"))
            self.group.consumers.append(reader)


def channel_groups(graph: gs.Graph) -> tuple[list[ChannelGroup], list[Refused]]:
    """The graph's prunable channel groups, attention heads among them, and the refused ones (main
    graph only: a pruned subgraph would change what its parent reads)."""
    heads, head_refusals = attention_head_groups(graph)
    # Projections split into heads are the head analysis' to group or refuse (with its reason).
    in_heads = {id(p) for g in heads for p in g.producers} | {id(found[0]) for n in graph.nodes if (found := _head_split(n)) is not None}
    walks: list[_Walk] = []
    refused: list[Refused] = list(head_refusals)
    for node in graph.nodes:
        if id(node) in in_heads:
            continue  # a Q/K/V projection: its output features are heads, grouped above
        found = _producer_slices(node)
        if found is None:
            continue
        channels, slices = found
        walk = _Walk(graph, node, channels, slices)
        try:
            walk.follow(node.outputs[0], 0, node)
        except _Stop as stop:
            refused.append(Refused((node.name,), stop.node.name if stop.node is not None else node.name, stop.reason))
            walk = None
        if walk is not None:
            walks.append(walk)
    groups, refused = _tied(walks, refused)
    for group in heads:
        problem = _shared_constant(group)
        if problem is not None:
            refused.append(Refused(tuple(p.name for p in group.producers), *problem))
        else:
            groups.append(group)
    return groups, refused


def _tied(walks: list[_Walk], refused: list[Refused]) -> tuple[list[ChannelGroup], list[Refused]]:
    """Walks joined by the residual Adds they share; a tie to a refused or unknown operand refuses."""
    parent = list(range(len(walks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_add: dict[int, list[int]] = {}
    for i, walk in enumerate(walks):
        for add in walk.ties:
            by_add.setdefault(id(add), []).append(i)
    bad: dict[int, tuple[str, str]] = {}
    adds = {id(add): add for walk in walks for add in walk.ties}
    for key, members in by_add.items():
        add = adds[key]
        reached = {id(entry[0]) for i in members for entry in walks[i].group.tensors}
        if not all(id(operand) in reached for operand in add.inputs):
            bad[members[0]] = (add.name, "residual Add of a tensor that no prunable layer produces (a graph input, or a group left whole)")
        for i in members[1:]:
            parent[root(i)] = root(members[0])
    merged: dict[int, list[int]] = {}
    for i in range(len(walks)):
        merged.setdefault(root(i), []).append(i)
    groups: list[ChannelGroup] = []
    for members in merged.values():
        names = tuple(walks[i].group.producers[0].name for i in members)
        problem = next((bad[i] for i in members if i in bad), None)
        if problem is None and len({walks[i].channels for i in members}) > 1:
            problem = (names[0], "elementwise op of tensors with different channel counts")
        group = _merge([walks[i].group for i in members]) if problem is None else None
        if problem is None:
            problem = _shared_constant(group)
        if problem is not None:
            refused.append(Refused(names, *problem))
            continue
        groups.append(group)
    return groups, refused


def _merge(parts: list[ChannelGroup]) -> ChannelGroup:
    group = ChannelGroup(parts[0].channels)
    seen_slices, seen_tensors = set(), set()
    for part in parts:
        group.producers += part.producers
        for s in part.slices:
            key = (id(s.node), id(s.constant), s.axis, s.offset, s.block)
            if key not in seen_slices:
                seen_slices.add(key)
                group.slices.append(s)
        for entry in part.tensors:
            if (id(entry[0]), entry[1]) not in seen_tensors:
                seen_tensors.add((id(entry[0]), entry[1]))
                group.tensors.append(entry)
        group.depthwise += [n for n in part.depthwise if n not in group.depthwise]
        group.consumers += [n for n in part.consumers if n not in group.consumers]
    return group


def _shared_constant(group: ChannelGroup) -> tuple[str, str] | None:
    """A constant the group slices that a node outside the group also reads, as (node, reason)."""
    members = {id(s.node) for s in group.slices}
    for s in group.slices:
        for reader in s.constant.outputs:
            if id(reader) not in members:
                return reader.name, f"constant {s.constant.name} is shared with a node outside the group"
    return None


# ---------------------------------------------------------------------------------------------
# Attention heads
#
# A head h of multi-head attention is the block of features [h*d, (h+1)*d) of the Q, K and V
# projections (their weights' output columns and biases) and of the output projection's input
# rows: removing it from all four removes the head exactly. Two forms are recognized:
#
# * com.microsoft Attention (graphopt's own fusion, onnxruntime's transformer optimizer): one
#   packed [K, 3F] weight and [3F] bias, `num_heads`; its output is read by the O projection.
# * decomposed attention as torch's exporters write it: projections (MatMul, optional bias Add)
#   Reshaped to [.., H or -1, d], then Transposes, Reshapes, scalar Mul/Div, the two activation
#   MatMuls, Softmax over the last axis, the additive mask, dynamo's IsNaN/Where, up to the Reshape
#   back to [.., F] that the O projection reads. Every node between is walked; anything else, a
#   Softmax over another axis, a mask that varies per head, a constant Reshape target holding a
#   multiple of H that is not H or H*d, refuses the layer. Constant targets holding H or H*d are
#   rewritten; computed ones (Shape/Concat) are read at run time and need nothing.

# Unary ops of decomposed attention that keep every axis where it is.
_HEAD_UNARY = frozenset({"IsNaN", "Cast", "Identity", "Dropout", "Neg", "Sqrt", "Exp"})
# Elementwise ops whose other operands may be a mask, a scalar, or another head tensor.
_HEAD_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "And", "Or"})
# What computes a Reshape target from a Shape: the values it carries are run-time sizes.
_SHAPE_ARITHMETIC = frozenset({"Slice", "Gather", "Concat", "Squeeze", "Unsqueeze", "Cast", "Identity"})


def _shape_entries(target: gs.Tensor) -> list[int | None] | None:
    """A Reshape target's entries: ints where constant, None where computed; None if unreadable."""
    value = ir.constant_value(target)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    node = ir.producer(target)
    if node is None or node.op != "Concat" or node.domain not in ir.DEFAULT_DOMAINS:
        return None
    entries: list[int | None] = []
    for part in node.inputs:
        value = ir.constant_value(part)
        if value is not None:
            entries += [int(v) for v in np.asarray(value).reshape(-1)]
        elif part.shape is not None and len(part.shape) == 1 and isinstance(part.shape[0], int):
            entries += [None] * part.shape[0]
        else:
            return None
    return entries


def set_shape_entry(graph: gs.Graph, reshape: gs.Node, entry: int, value: int, fresh_name) -> None:
    """Reshape target entry `entry` := value, in a fresh constant (the old one may be shared): the
    target itself, or the constant part of a copy of the Concat that computes it (dynamo shares
    one Concat among the Reshapes of every layer)."""
    target = reshape.inputs[1]
    constant = ir.constant_value(target)
    if constant is not None:
        changed = np.array(constant, dtype=np.int64).reshape(-1)
        changed[entry] = value
        reshape.inputs[1] = ir.make_constant(fresh_name(f"{reshape.name}_pruned_shape"), changed)
        return
    concat = ir.producer(target)
    start = 0
    for index, part in enumerate(concat.inputs):
        length = part.shape[0] if ir.constant_value(part) is None else np.asarray(ir.constant_value(part)).size
        if start <= entry < start + length:
            changed = np.array(ir.constant_value(part), dtype=np.int64).reshape(-1)
            changed[entry - start] = value
            inputs = list(concat.inputs)
            inputs[index] = ir.make_constant(fresh_name(f"{concat.name}_pruned_part"), changed)
            copy = gs.Node("Concat", fresh_name(f"{concat.name}_pruned"), attrs=dict(concat.attrs), inputs=inputs,
                           outputs=[gs.Variable(fresh_name(f"{target.name}_pruned"), dtype=target.dtype, shape=target.shape)])
            graph.nodes.insert(graph.nodes.index(concat) + 1, copy)
            reshape.inputs[1] = copy.outputs[0]
            return
        start += length


def _projection(split: gs.Node):
    """(projection node, its bias Add or None, the bias constant or None) of the tensor a
    Reshape splits, where that tensor is x @ W (+ b) and read by nothing else."""
    t = split.inputs[0]
    if len(ir.consumers(t)) != 1:
        return None
    node, bias_add, bias = ir.producer(t), None, None
    if node is not None and node.op == "Add" and node.domain in ir.DEFAULT_DOMAINS and len(node.inputs) == 2:
        const_index = next((i for i, x in enumerate(node.inputs) if _const(x) is not None), None)
        if const_index is None:
            return None
        bias_add, bias = node, node.inputs[const_index]
        projected = node.inputs[1 - const_index]
        if len(ir.consumers(projected)) != 1:
            return None
        node = ir.producer(projected)
    if node is None or node.op not in ("MatMul", "Gemm") or node.domain not in ir.DEFAULT_DOMAINS or _producer_slices(node) is None:
        return None
    return node, bias_add, bias


class _HeadRegion:
    """Everything one head split's tensor reaches before the O projection, walked forward."""

    def __init__(self, split: gs.Node, heads: int, head_size: int, graph: gs.Graph):
        self.heads, self.head_size = heads, head_size
        self.features = heads * head_size
        self.nodes: dict[int, gs.Node] = {}
        self.tensors: dict[int, gs.Variable] = {}
        self.pairs: list[gs.Node] = []  # nodes of two computed operands: both must be head tensors
        self.shape_reshapes: list[gs.Node] = []  # Reshapes whose target comes from a head tensor's Shape
        self.head_shapes: list[tuple[gs.Node, int, int]] = []
        self.consumer: gs.Node | None = None
        self.merge: gs.Variable | None = None
        self.outputs = {id(t) for t in graph.outputs}
        self.opset = int(getattr(graph, "opset", None) or 13)
        self.split = split
        self.stop: _Stop | None = None  # why the walk stopped, if it did

    def walk(self) -> _HeadRegion:
        self.nodes[id(self.split)] = self.split
        try:
            self.head_shapes += self._rewrites(self.split, _shape_entries(self.split.inputs[1]), split=True)
            self.follow(self.split.outputs[0], self.split)
        except _Stop as stop:
            self.stop = stop
        return self

    def follow(self, t: gs.Tensor, via: gs.Node) -> None:
        if id(t) in self.outputs:
            raise _Stop(via, "attention heads reach a graph output")
        if id(t) in self.tensors:
            return
        self.tensors[id(t)] = t
        for reader in ir.consumers(t):
            self.read(reader, t)

    def read(self, node: gs.Node, t: gs.Tensor) -> None:
        if id(node) in self.nodes:
            return
        self.nodes[id(node)] = node
        if ir.subgraphs_of(node) or node.domain not in ir.DEFAULT_DOMAINS:
            raise _Stop(node, f"{node.op} inside attention is not an op the head analysis knows")
        op = node.op
        if op == "Shape":
            self._shape_use(node.outputs[0], node)
        elif op == "Reshape" and node.inputs[0] is t:
            self.reshape(node, t)
        elif op == "Transpose" or op in _HEAD_UNARY:
            self.follow(node.outputs[0], node)
        elif op == "Softmax":
            rank = len(t.shape) if t.shape is not None else None
            axis = int(node.attrs.get("axis", -1 if self.opset >= 13 else 1))
            if rank is None or axis % rank != rank - 1:
                raise _Stop(node, "Softmax over an axis other than the keys")
            self.follow(node.outputs[0], node)
        elif op == "MatMul" and all(_const(i) is None and ir.constant_value(i) is None for i in node.inputs):
            self.pairs.append(node)
            self.follow(node.outputs[0], node)
        elif op in _HEAD_ELEMENTWISE:
            for other in node.inputs:
                if other is t or other.is_empty():
                    continue
                value = ir.constant_value(other)
                if value is not None:
                    if self.heads > 1 and self.heads in np.shape(value):
                        raise _Stop(node, f"{op} inside attention with a constant that may vary per head")
                elif other.shape is None or any(d == self.heads for d in other.shape if isinstance(d, int)) and self.heads > 1:
                    self.pairs.append(node)  # a head tensor itself, or a mask that may vary per head
            self.follow(node.outputs[0], node)
        else:
            raise _Stop(node, f"{op} inside attention is not an op the head analysis knows")

    def reshape(self, node: gs.Node, t: gs.Tensor) -> None:
        entries = _shape_entries(node.inputs[1])
        if entries is None:
            raise _Stop(node, "Reshape inside attention with a target the head analysis cannot read")
        out = node.outputs[0]
        readers = ir.consumers(out)
        reads_features = len(readers) == 1 and readers[0].op in ("MatMul", "Gemm") and readers[0].inputs[0] is out and _gemm_weight(readers[0]) is not None
        if reads_features:
            w, in_axis, _ = _gemm_weight(readers[0])
            shape = t.shape
            known = [] if shape is None or len(shape) < 2 else [(shape[-1], self.head_size), (shape[-2], self.heads)]
            if w.values.shape[in_axis] != self.features or any(isinstance(got, int) and got != want for got, want in known):
                raise _Stop(node, "the merged heads are not [.., heads, head_size] features of the O projection")
            if self.consumer is not None and self.consumer is not readers[0]:
                raise _Stop(node, "attention heads reach two output projections")
            self.head_shapes += self._rewrites(node, entries, split=False)
            self.consumer, self.merge = readers[0], out
            if id(out) in self.outputs:
                raise _Stop(node, "attention heads reach a graph output")
            return
        self.head_shapes += self._rewrites(node, entries, split=False)
        self.follow(out, node)

    def _rewrites(self, node: gs.Node, entries: list[int | None] | None, split: bool) -> list[tuple[gs.Node, int, int]]:
        """(node, entry, features per head) for each constant target entry that counts heads."""
        if entries is None:
            raise _Stop(node, "head split with a target the head analysis cannot read")
        found = []
        for i, v in enumerate(entries):
            if v is None or v in (-1, 0) or (v == self.head_size and not (split and i == len(entries) - 2)):
                if v == self.head_size == self.heads and not split:
                    raise _Stop(node, f"Reshape target entry {v} inside attention is both the head count and the head size")
                continue
            if v == self.heads:
                per_head = 1
            elif v == self.features:
                per_head = self.head_size
            elif v % self.heads:
                continue  # a batch or sequence size
            else:
                raise _Stop(node, f"Reshape target entry {v} inside attention may count heads ({self.heads}) and cannot be proven not to")
            found.append((node, i, per_head))
        return found

    def _shape_use(self, t: gs.Tensor, via: gs.Node) -> None:
        """A head tensor's Shape may only size Reshapes of head tensors (checked once all is walked)."""
        for reader in ir.consumers(t):
            if reader.op in _SHAPE_ARITHMETIC and reader.domain in ir.DEFAULT_DOMAINS:
                self._shape_use(reader.outputs[0], reader)
            elif reader.op == "Reshape" and reader.inputs[1] is t:
                self.shape_reshapes.append(reader)
            else:
                raise _Stop(reader, "a head tensor's shape is used outside the attention")


def _head_split(node: gs.Node):
    """(projection, bias Add, bias, heads, head_size) where a Reshape splits a projection's
    features into [.., heads, head_size]; None otherwise."""
    if node.op != "Reshape" or node.domain not in ir.DEFAULT_DOMAINS:
        return None
    found = _projection(node)
    if found is None:
        return None
    x = node.inputs[0]
    entries = _shape_entries(node.inputs[1])
    if x.shape is None or entries is None or len(entries) != len(x.shape) + 1:
        return None
    features = _producer_slices(found[0])[0]
    head_size = entries[-1]
    if head_size is None or head_size <= 1 or features % head_size or entries[-2] not in (-1, features // head_size):
        return None
    if found[2] is not None and found[2].values.shape != (features,):
        return None
    return (*found, features // head_size, head_size)


def attention_head_groups(graph: gs.Graph) -> tuple[list[ChannelGroup], list[Refused]]:
    """Head groups of every attention layer the analysis can prove, and the refused layers."""
    groups: list[ChannelGroup] = []
    refused: list[Refused] = []
    for node in graph.nodes:
        if node.domain == MS_DOMAIN and node.op == "Attention":
            try:
                groups.append(_fused_attention(node, graph))
            except _Stop as stop:
                refused.append(Refused((node.name,), stop.node.name if stop.node is not None else node.name, stop.reason))
    splits = [(n, found) for n in graph.nodes if (found := _head_split(n)) is not None]
    regions = []
    for split, (_, _, _, heads, head_size) in splits:
        regions.append((split, _HeadRegion(split, heads, head_size, graph).walk()))
    # Q, K and V of one layer meet in the same nodes (the two activation MatMuls): one group.
    parent = list(range(len(regions)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, (_, region) in enumerate(regions):
        for key in region.nodes:
            if key in owner:
                parent[root(i)] = root(owner[key])
            owner.setdefault(key, i)
    members: dict[int, list[int]] = {}
    for i in range(len(regions)):
        members.setdefault(root(i), []).append(i)
    found = {id(s): f for s, f in splits}
    for indices in members.values():
        parts = [regions[i] for i in indices]
        names = tuple(found[id(s)][0].name for s, _ in parts)
        try:
            groups.append(_decomposed_attention(parts, found, graph))
        except _Stop as stop:
            refused.append(Refused(names, stop.node.name if stop.node is not None else names[0], stop.reason))
    return groups, refused


def _decomposed_attention(parts, found: dict, graph: gs.Graph) -> ChannelGroup:
    stops = [r.stop for _, r in parts if r.stop is not None]
    if stops:
        raise stops[0]
    regions = [r for _, r in parts]
    first = regions[0]
    if len(regions) < 3:
        raise _Stop(parts[0][0], "a head split that does not meet a Q, K and V of one attention")
    if any((r.heads, r.head_size) != (first.heads, first.head_size) for r in regions):
        raise _Stop(parts[0][0], "Q, K and V split into different heads")
    consumers = {id(r.consumer): r.consumer for r in regions if r.consumer is not None}
    if len(consumers) != 1:
        raise _Stop(parts[0][0], "attention heads that do not reach exactly one output projection")
    tensors = {k: t for r in regions for k, t in r.tensors.items()}
    nodes = {k: n for r in regions for k, n in r.nodes.items()}
    for r in regions:
        for node in r.pairs:
            outside = [i for i in node.inputs if not i.is_empty() and ir.constant_value(i) is None and id(i) not in tensors]
            if node.op == "MatMul" and outside or any(i.shape is None for i in outside):
                raise _Stop(node, f"{node.op} of a head tensor and a tensor that is not proven to broadcast over the heads")
            for i in outside:
                if first.heads > 1 and any(d == first.heads for d in i.shape if isinstance(d, int)):
                    raise _Stop(node, f"{node.op} with {i.name}, which may vary per head")
        for node in r.shape_reshapes:
            if id(node) not in nodes:
                raise _Stop(node, "a head tensor's shape sizes a Reshape outside the attention")
    consumer = next(iter(consumers.values()))
    d = first.head_size
    group = ChannelGroup(first.heads, head_size=d)
    for split, _ in parts:
        projection, bias_add, bias, _, _ = found[id(split)]
        _, slices = _producer_slices(projection)
        group.producers.append(projection)
        group.slices += [Slice(s.node, s.constant, s.axis, 0, d, s.role) for s in slices]
        if bias is not None:
            group.slices.append(Slice(bias_add, bias, 0, 0, d, "producer"))
            group.tensors.append((bias_add.outputs[0], 0, d, len(bias_add.outputs[0].shape) - 1) if bias_add.outputs[0].shape else None)
        group.tensors.append((projection.outputs[0], 0, d, len(projection.outputs[0].shape) - 1) if projection.outputs[0].shape else None)
    w, in_axis, _ = _gemm_weight(consumer)
    group.slices.append(Slice(consumer, w, in_axis, 0, d, "consumer"))
    group.consumers.append(consumer)
    merges = {id(r.merge): r.merge for r in regions if r.merge is not None}
    for merge in merges.values():
        group.tensors.append((merge, 0, d, len(merge.shape) - 1) if merge.shape else None)
    group.tensors = [t for t in group.tensors if t is not None]
    listed = {id(t[0]) for t in group.tensors}
    group.reshaped = [t for k, t in tensors.items() if k not in listed]
    group.head_shapes = list({(id(n), i): (n, i, p) for r in regions for n, i, p in r.head_shapes}.values())
    return group


def _fused_attention(node: gs.Node, graph: gs.Graph) -> ChannelGroup:
    """The heads of a com.microsoft Attention: its packed Q|K|V weight and bias, its num_heads,
    and the O projection that reads its output."""
    weight = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.values.ndim != 2 or weight.values.shape[1] % 3:
        raise _Stop(node, "Attention without a constant packed Q|K|V weight")
    features = weight.values.shape[1] // 3
    heads = int(node.attrs.get("num_heads", 0))
    sizes = node.attrs.get("qkv_hidden_sizes")
    if sizes is not None and len(set(int(s) for s in sizes)) != 1:
        raise _Stop(node, "Attention with different Q, K and V sizes")
    if heads < 1 or features % heads:
        raise _Stop(node, "Attention whose num_heads does not divide its features")
    if len(node.inputs) > 4 and not node.inputs[4].is_empty():
        raise _Stop(node, "Attention with a past state")
    if any(ir.consumers(o) or id(o) in {id(t) for t in graph.outputs} for o in node.outputs[1:]):
        raise _Stop(node, "Attention whose present state is read")
    out = node.outputs[0]
    if id(out) in {id(t) for t in graph.outputs}:
        raise _Stop(node, "attention heads reach a graph output")
    readers = ir.consumers(out)
    found = _gemm_weight(readers[0]) if len(readers) == 1 and readers[0].op in ("MatMul", "Gemm") and readers[0].inputs[0] is out else None
    if found is None or found[0].values.shape[found[1]] != features:
        raise _Stop(readers[0] if readers else node, "Attention output not read by one output projection with a constant weight")
    d = features // heads
    group = ChannelGroup(heads, producers=[node], head_size=d, head_counts=[(node, "num_heads")])
    group.slices += [Slice(node, weight, 1, part * features, d, "producer") for part in range(3)]
    bias = _const(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        if bias is None or bias.values.shape != (3 * features,):
            raise _Stop(node, "Attention with a computed bias")
        group.slices += [Slice(node, bias, 0, part * features, d, "producer") for part in range(3)]
    w, in_axis, _ = found
    group.slices.append(Slice(readers[0], w, in_axis, 0, d, "consumer"))
    group.consumers.append(readers[0])
    if out.shape is not None:
        group.tensors.append((out, 0, d, len(out.shape) - 1))
    return group
