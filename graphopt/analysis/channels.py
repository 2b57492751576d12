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
    """The graph's prunable channel groups and the refused ones (main graph only: a pruned
    subgraph would change what its parent reads)."""
    walks: list[_Walk] = []
    refused: list[Refused] = []
    for node in graph.nodes:
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
    return _tied(walks, refused)


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
