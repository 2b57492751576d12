"""Cleanup passes: dead code, no-ops, redundant layout chains, common subexpressions."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass

# Ops whose result differs between two evaluations with equal inputs: never merged or folded.
NONDETERMINISTIC_OPS = ir.NONDETERMINISTIC_OPS


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    description = "Remove nodes whose outputs nothing reads (unused initializers go with them)"
    opt_level = 1
    preserves = frozenset({"shapes"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        in_graph = {id(n) for n in graph.nodes}
        live: set[int] = set()
        worklist: list[gs.Tensor] = list(graph.outputs)
        seen: set[int] = set()
        while worklist:
            tensor = worklist.pop()
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            for node in tensor.inputs:
                if id(node) in in_graph and id(node) not in live:
                    live.add(id(node))
                    worklist.extend(t for t in node.inputs if not t.is_empty())
                    # A live If/Loop/Scan keeps alive whatever its bodies read from this scope.
                    worklist.extend(ir.outer_uses(node))
        dead = [n for n in graph.nodes if id(n) not in live]
        ir.remove_nodes(graph, dead)
        return PassResult(bool(dead), {"removed_nodes": len(dead)})


@register_pass
class ConstantNodesToInitializers(Pass):
    name = "constant-to-initializer"
    description = "Turn Constant nodes into initializers so every pass sees one kind of constant"
    opt_level = 1
    preserves = frozenset({"shapes"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        converted = []
        for node in graph.nodes:
            if node.op != "Constant" or node.domain not in ir.DEFAULT_DOMAINS or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            value = _constant_node_value(node)
            if value is None or ir.is_graph_output(graph, out):
                continue
            const = ir.make_constant(ctx.fresh_name(out.name), value)
            ir.redirect_uses(out, const)
            converted.append(node)
        ir.remove_nodes(graph, converted)
        return PassResult(bool(converted), {"converted": len(converted)})


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return attrs["value"].values
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None  # sparse and string constants stay nodes


@register_pass
class EliminateNoOps(Pass):
    name = "eliminate-noop"
    description = "Remove nodes that return their input unchanged (Identity, inference Dropout, same-type Cast, ...)"
    opt_level = 1

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.analysis("shapes")
        removed: list[gs.Node] = []
        for node in graph.nodes:
            if node.domain not in ir.DEFAULT_DOMAINS or not node.inputs or not node.outputs:
                continue
            source = _unchanged_input(node)
            if source is not None and ir.replace_all_uses(graph, node.outputs[0], source):
                removed.append(node)
        ir.remove_nodes(graph, removed)
        return PassResult(bool(removed), {"removed_nodes": len(removed)})


def _only_output_used(node: gs.Node) -> bool:
    return all(not t.outputs for t in node.outputs[1:])


def _is_dropout_noop(node: gs.Node) -> bool:
    if not _only_output_used(node):
        return False
    # Dropout is the identity in inference mode, and always when the ratio is 0.
    training = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if training is None:
        return True
    value = ir.constant_value(training)
    return value is not None and not bool(np.asarray(value).item())


def _is_same_type_cast(node: gs.Node) -> bool:
    src = node.inputs[0].dtype
    to = node.attrs.get("to")
    if src is None or to is None:
        return False
    try:
        import onnx

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to))) == np.dtype(src)
    except (TypeError, KeyError, ValueError):
        return False


def _same_static_shape(node: gs.Node) -> bool:
    # Symbolic dims count as equal only by name: onnx inference gives two dims one name only when
    # it proved them equal.
    inp, out = node.inputs[0].shape, node.outputs[0].shape
    return inp is not None and out is not None and list(inp) == list(out) and all(d is not None for d in inp)


def _is_identity_transpose(node: gs.Node) -> bool:
    perm = node.attrs.get("perm")
    if perm is None:
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        return rank is not None and rank <= 1
    return list(perm) == list(range(len(perm)))


def _is_zero_pad(node: gs.Node) -> bool:
    # Any mode pads nothing when every pad is 0 (opset < 11 holds pads in an attribute).
    pads = node.attrs.get("pads")
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        pads = ir.constant_value(node.inputs[1])
    return pads is not None and not np.any(np.asarray(pads))


def _is_full_slice(node: gs.Node) -> bool:
    # Opset >= 10 form only (starts/ends/axes/steps as inputs); the shape must be static to prove "all".
    shape = ir.static_shape(node.inputs[0])
    if shape is None or len(node.inputs) < 3:
        return False
    optional = list(node.inputs[1:5]) + [None] * (4 - len(node.inputs[1:5]))
    values = [None if t is None or t.is_empty() else ir.constant_value(t) for t in optional]
    if any(v is None and t is not None and not t.is_empty() for v, t in zip(values, optional)):
        return False
    starts, ends, axes, steps = (None if v is None else np.asarray(v).reshape(-1).tolist() for v in values)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = shape[axis % len(shape)]
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        if step != 1 or start != 0 or end != dim:
            return False
    return True


# Ops that give back one input when the other is a constant neutral element, with that element,
# whether it may stand first, and whether only integers qualify: x * 1 and x / 1 are x exactly for
# every numeric type (IEEE included); x + 0 and x - 0 only for integers (float -0.0 + 0.0 is +0.0).
_NEUTRAL_OPERANDS = {"Mul": (1, True, False), "Div": (1, False, False), "Add": (0, True, True), "Sub": (0, False, True)}


def _beside_neutral_operand(node: gs.Node) -> gs.Tensor | None:
    """The input `node` (Add/Sub/Mul/Div) gives back unchanged because its other input is a
    constant neutral element of the same type that does not broadcast it to a bigger shape."""
    neutral, commutative, integer_only = _NEUTRAL_OPERANDS[node.op]
    if len(node.inputs) != 2:
        return None
    for index in ((1, 0) if commutative else (1,)):
        const, other = node.inputs[index], node.inputs[1 - index]
        value = ir.constant_value(const)
        if value is None or value.dtype.kind not in ("iu" if integer_only else "iuf") or not np.all(value == neutral):
            continue
        try:
            same_type = other.dtype is not None and np.dtype(other.dtype) == value.dtype
        except TypeError:  # gs keeps types numpy lacks (bfloat16, float8) as ONNX type codes
            same_type = False
        if same_type and other.shape is not None and value.ndim <= len(other.shape) and value.size == 1:
            return other
    return None


def _unchanged_input(node: gs.Node) -> gs.Tensor | None:
    """The input a no-op node returns unchanged, or None when the node does something."""
    if node.op in _NEUTRAL_OPERANDS:
        return _beside_neutral_operand(node)
    check = _NOOP_CHECKS.get(node.op)
    return node.inputs[0] if check is not None and check(node) else None


_NOOP_CHECKS = {
    "Identity": lambda n: True,
    "Dropout": _is_dropout_noop,
    "Cast": _is_same_type_cast,
    "Reshape": _same_static_shape,
    "Expand": _same_static_shape,
    "Flatten": _same_static_shape,
    "Squeeze": _same_static_shape,
    "Unsqueeze": _same_static_shape,
    "Transpose": _is_identity_transpose,
    "Pad": _is_zero_pad,
    "Slice": _is_full_slice,
    "Tile": _same_static_shape,
    "Concat": lambda n: len(n.inputs) == 1,
}


@register_pass
class MergeTransposes(Pass):
    name = "merge-transpose"
    description = "Compose consecutive Transposes into one (or none when they cancel)"
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged, removed = 0, []
        for node in graph.nodes:
            if node.op != "Transpose" or node.domain not in ir.DEFAULT_DOMAINS:
                continue
            first = ir.producer(node.inputs[0])
            if first is None or first.op != "Transpose" or first.domain not in ir.DEFAULT_DOMAINS:
                continue
            p1, p2 = first.attrs.get("perm"), node.attrs.get("perm")
            if p1 is None or p2 is None:
                continue
            composed = [int(p1[i]) for i in p2]
            source = first.inputs[0]
            if composed == list(range(len(composed))):
                if ir.replace_all_uses(graph, node.outputs[0], source):
                    removed.append(node)
                    merged += 1
                continue
            ir.set_input(node, 0, source)
            node.attrs["perm"] = composed
            merged += 1
        ir.remove_nodes(graph, removed)
        return PassResult(merged > 0, {"merged": merged})


@register_pass
class MergeReshapes(Pass):
    """Chains of reshaping ops become one op.

    A reshaping op feeding a Reshape with a constant target is skipped; an Unsqueeze or Squeeze of
    a Reshape with a constant target becomes one Reshape (its target with the 1s inserted or
    dropped); Unsqueeze of Unsqueeze becomes one Unsqueeze; Squeeze and Unsqueeze of the same axes
    cancel. Each rewrite leaves the node it skipped to dce when nothing else reads it.
    """

    name = "merge-reshape"
    description = "Merge chains of reshaping ops (Reshape, Flatten, Squeeze, Unsqueeze) into one op or none"
    opt_level = 2

    _RESHAPING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"merged": 0, "cancelled": 0}
        local = {id(n) for n in graph.nodes}
        removed: list[gs.Node] = []
        for node in graph.nodes:
            if node.domain not in ir.DEFAULT_DOMAINS or not node.inputs or not node.outputs:
                continue
            first = ir.producer(node.inputs[0])
            if first is None or first.op not in self._RESHAPING or first.domain not in ir.DEFAULT_DOMAINS:
                continue
            if node.op == "Reshape":
                if len(node.inputs) < 2:
                    continue
                shape = ir.constant_value(node.inputs[1])
                # A 0 in the target copies a dimension of this Reshape's own input, which would change.
                if shape is None or (np.any(np.asarray(shape) == 0) and not node.attrs.get("allowzero", 0)):
                    continue
                ir.set_input(node, 0, first.inputs[0])
                stats["merged"] += 1
            elif node.op in ("Squeeze", "Unsqueeze") and id(first) in local:
                outcome = _merge_squeeze_like(graph, node, first, ctx)
                if outcome == "cancelled":
                    removed.append(node)
                    stats["cancelled"] += 1
                elif outcome:
                    stats["merged"] += 1
        ir.remove_nodes(graph, removed)
        stats = {k: v for k, v in stats.items() if v}
        return PassResult(bool(stats), stats)


def _squeeze_axes(node: gs.Node) -> list[int] | None:
    """The constant axes of a Squeeze/Unsqueeze (attribute before opset 13, input from 13 on)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        value = ir.constant_value(node.inputs[1])
        if value is not None and np.asarray(value).dtype.kind in "iu":
            return [int(a) for a in np.asarray(value).reshape(-1)]
    return None


def _normalized(axes: list[int], rank: int | None) -> list[int] | None:
    if any(a < 0 for a in axes) and rank is None:
        return None
    out = [a + rank if a < 0 else a for a in axes]
    if rank is not None and any(not 0 <= a < rank for a in out):
        return None
    return sorted(out) if len(set(out)) == len(out) else None


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _merge_squeeze_like(graph: gs.Graph, node: gs.Node, first: gs.Node, ctx) -> str | bool:
    """Rewrite the Squeeze/Unsqueeze `node` of the reshaping op `first`; what happened, or False."""
    axes = _squeeze_axes(node)
    if not axes:
        return False  # Squeeze of every 1, or axes computed at run time
    source = first.inputs[0]
    if first.op == "Reshape":
        target = ir.constant_value(first.inputs[1]) if len(first.inputs) > 1 else None
        if target is None or np.asarray(target).ndim != 1 or np.asarray(target).dtype.kind not in "iu":
            return False
        target = [int(t) for t in np.asarray(target)]
        allowzero = bool(first.attrs.get("allowzero", 0))
        new = _reshape_target_after(node.op, target, axes, allowzero)
        if new is None:
            return False
        _become_reshape(node, source, new, allowzero, ctx)
        return True
    if first.op not in ("Squeeze", "Unsqueeze"):
        return False
    inner = _squeeze_axes(first)
    if not inner:
        return False
    rank = _rank(source)
    if first.op != node.op:
        # Squeeze(axes A) then Unsqueeze(axes A), or the other way round: the shape comes back.
        middle = None if rank is None else (rank - len(inner) if first.op == "Squeeze" else rank + len(inner))
        a = _normalized(inner, rank if first.op == "Squeeze" else middle)
        b = _normalized(axes, middle if node.op == "Squeeze" else rank)
        if a is None or a != b or not ir.replace_all_uses(graph, node.outputs[0], source):
            return False
        return "cancelled"
    if node.op != "Unsqueeze":
        return False  # Squeeze of Squeeze: rare, left alone
    middle = None if rank is None else rank + len(inner)
    final = None if middle is None else middle + len(axes)
    a = _normalized(inner, middle)
    b = _normalized(axes, final)
    if a is None or b is None:
        return False
    # The first Unsqueeze's 1s sit, in the final shape, at the positions the second leaves free.
    total = (len(a) + len(b) + rank) if rank is not None else None
    if total is None:
        # Without the rank, non-negative axes still compose: every position up to the last matters.
        total = max(a + b) + len(a) + len(b) + 1
    free = [j for j in range(total) if j not in b]
    if any(i >= len(free) for i in a):
        return False
    combined = sorted(set(b) | {free[i] for i in a})
    ir.set_input(node, 0, source)
    _set_axes(node, combined, ctx)
    return True


def _reshape_target_after(op: str, target: list[int], axes: list[int], allowzero: bool) -> list[int] | None:
    """The Reshape target that does Reshape(target) then Squeeze/Unsqueeze(axes), or None."""
    if op == "Unsqueeze":
        rank = len(target) + len(axes)
        where = _normalized(axes, rank)
        if where is None:
            return None
        it = iter(target)
        new = [1 if j in where else next(it) for j in range(rank)]
    else:
        where = _normalized(axes, len(target))
        if where is None or any(target[a] != 1 for a in where):
            return None
        new = [t for i, t in enumerate(target) if i not in where]
    if not allowzero:
        # A 0 copies the input dimension at its own index: it must not move.
        zeros_before = [i for i, t in enumerate(target) if t == 0]
        zeros_after = [i for i, t in enumerate(new) if t == 0]
        if zeros_before != zeros_after:
            return None
    return new


def _become_reshape(node: gs.Node, source: gs.Tensor, target: list[int], allowzero: bool, ctx) -> None:
    """Turn the Squeeze/Unsqueeze `node` into Reshape(source, target)."""
    shape = ir.make_constant(ctx.fresh_name(f"{node.name or node.op}_shape"), np.array(target, dtype=np.int64))
    ir.set_input(node, 0, source)
    if len(node.inputs) > 1:
        ir.set_input(node, 1, shape)
    else:
        list.append(node.inputs, shape)
        list.append(shape.outputs, node)
    node.op = "Reshape"
    node.attrs = {"allowzero": 1} if allowzero else {}


def _set_axes(node: gs.Node, axes: list[int], ctx) -> None:
    if "axes" in node.attrs:
        node.attrs["axes"] = axes
        return
    ir.set_input(node, 1, ir.make_constant(ctx.fresh_name(f"{node.name or node.op}_axes"), np.array(axes, dtype=np.int64)))


@register_pass
class MergeConcats(Pass):
    name = "merge-concat"
    description = "Give a Concat the inputs of each Concat it reads along the same axis"
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # Only Concats of this graph: an outer one read by a subgraph is not this graph's to rewire.
        local = {id(n) for n in graph.nodes}
        merged = sum(
            1 for node in graph.nodes
            if node.op == "Concat" and node.domain in ir.DEFAULT_DOMAINS and _flatten_concat(node, local)
        )
        return PassResult(merged > 0, {"merged": merged})


def _concat_axis(node: gs.Node) -> int | None:
    if "axis" not in node.attrs:
        return None  # only Concat-1 and -2 may leave it out (then it is 1)
    axis = int(node.attrs["axis"])
    if axis >= 0:
        return axis
    for t in list(node.outputs) + list(node.inputs):
        if t.shape is not None:
            return axis + len(t.shape)
    return None


def _flatten_concat(node: gs.Node, local: set[int]) -> bool:
    """Give `node` the inputs of each Concat (of this graph, same axis) that it reads."""
    axis = _concat_axis(node)
    if axis is None:
        return False
    changed = False
    inputs: list[gs.Tensor] = []
    for tensor in node.inputs:
        inner = ir.producer(tensor)
        if (
            inner is not None
            and id(inner) in local
            and inner.op == "Concat"
            and inner.domain in ir.DEFAULT_DOMAINS
            and inner.inputs
            and _concat_axis(inner) == axis
        ):
            inputs.extend(inner.inputs)
            changed = True
        else:
            inputs.append(tensor)
    if not changed:
        return False
    for tensor in node.inputs:
        for i, n in enumerate(tensor.outputs):
            if n is node:
                list.__delitem__(tensor.outputs, i)
                break
    list.__setitem__(node.inputs, slice(None), inputs)
    for tensor in inputs:
        list.append(tensor.outputs, node)
    return True


@register_pass
class MergeSlices(Pass):
    name = "merge-slice"
    description = "Merge a Slice into the Slice it reads when they cut different axes"
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = 0
        for node in graph.nodes:
            first = ir.producer(node.inputs[0]) if self._is_slice(node) else None
            if first is None or not self._is_slice(first) or len(ir.consumers(first.outputs[0])) != 1:
                continue
            if ir.is_graph_output(graph, first.outputs[0]):
                continue
            outer, inner = self._args(first), self._args(node)
            if outer is None or inner is None:
                continue
            # Two cuts of one axis compose into one only with arithmetic on clamped bounds; cuts
            # of different axes are independent, so one Slice does both.
            if set(outer[2]) & set(inner[2]):
                continue
            args = [np.concatenate([a, b]).astype(np.int64) for a, b in zip(outer, inner)]
            names = ("starts", "ends", "axes", "steps")
            tensors = [ir.make_constant(ctx.fresh_name(f"{node.name or 'slice'}_{n}"), a) for n, a in zip(names, args)]
            ir.set_input(node, 0, first.inputs[0])
            for index, tensor in enumerate(tensors, start=1):
                if index < len(node.inputs):
                    ir.set_input(node, index, tensor)
                else:
                    node.inputs.append(tensor)
            merged += 1
        return PassResult(merged > 0, {"merged": merged})

    @staticmethod
    def _is_slice(node: gs.Node | None) -> bool:
        # Slice-10 and later take starts/ends/axes/steps as inputs (Slice-1 has attributes).
        return node is not None and node.op == "Slice" and node.domain in ir.DEFAULT_DOMAINS and len(node.inputs) >= 3

    @staticmethod
    def _args(node: gs.Node) -> tuple[np.ndarray, ...] | None:
        """Constant (starts, ends, axes, steps) with axes made non-negative, or None."""
        values = []
        for tensor in node.inputs[1:5]:
            value = None if tensor.is_empty() else ir.constant_value(tensor)
            if value is None and not tensor.is_empty():
                return None  # computed at run time
            values.append(value)
        starts, ends, axes, steps = values + [None] * (4 - len(values))
        if starts is None or ends is None:
            return None
        count = np.asarray(starts).size
        axes = np.arange(count) if axes is None else np.asarray(axes, dtype=np.int64).reshape(-1)
        if np.any(axes < 0):
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            if rank is None:
                return None
            axes = np.where(axes < 0, axes + rank, axes)
        steps = np.ones(count, dtype=np.int64) if steps is None else steps
        return tuple(np.asarray(v, dtype=np.int64).reshape(-1) for v in (starts, ends, axes, steps))


@register_pass
class CommonSubexpressionElimination(Pass):
    name = "cse"
    description = "Merge identical constants and nodes computing the same op on the same inputs"
    opt_level = 2
    preserves = frozenset({"shapes"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ir.toposort(graph)
        merged_constants = self._merge_constants(graph)
        seen: dict[tuple, gs.Node] = {}
        removed: list[gs.Node] = []
        for node in graph.nodes:
            if node.op in NONDETERMINISTIC_OPS or ir.subgraphs_of(node) or not node.outputs:
                continue
            attrs = _attrs_key(node.attrs)
            # A graph output keeps its own producer, so its name and value stay where callers look.
            if attrs is None or any(ir.is_graph_output(graph, t) for t in node.outputs):
                continue
            key = (node.domain, node.op, tuple(id(t) for t in node.inputs), len(node.outputs), attrs)
            twin = seen.setdefault(key, node)
            if twin is not node:
                for mine, theirs in zip(node.outputs, twin.outputs):
                    ir.replace_all_uses(graph, mine, theirs)
                removed.append(node)
        ir.remove_nodes(graph, removed)
        count = len(removed) + merged_constants
        return PassResult(count > 0, {"merged_nodes": len(removed), "merged_constants": merged_constants})

    @staticmethod
    def _merge_constants(graph: gs.Graph) -> int:
        """Point every use of a constant at the first constant with equal dtype, shape and bytes.

        Hashing every weight's bytes is the costly part, so a constant is hashed only when another
        one shares its dtype, shape and first bytes.
        """
        uses: list[tuple[gs.Node, int, gs.Constant]] = []
        by_layout: dict[tuple, list[gs.Constant]] = {}
        seen: set[int] = set()
        for node in graph.nodes:
            for i, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant):
                    uses.append((node, i, tensor))
                    if id(tensor) not in seen:
                        seen.add(id(tensor))
                        prefix = ir.constant_bytes(tensor)[:64]
                        by_layout.setdefault((str(tensor.dtype), tuple(tensor.shape), prefix), []).append(tensor)
        canonical_of: dict[int, gs.Constant] = {}
        for group in by_layout.values():
            if len(group) < 2:
                continue
            first_with: dict[tuple, gs.Constant] = {}
            for tensor in group:
                canonical_of[id(tensor)] = first_with.setdefault(ir.constant_fingerprint(tensor), tensor)
        merged = 0
        for node, i, tensor in uses:
            canonical = canonical_of.get(id(tensor), tensor)
            if canonical is not tensor:
                ir.set_input(node, i, canonical)
                merged += 1
        return merged


def _attrs_key(attrs: dict):
    try:
        return tuple(sorted((k, _freeze(v)) for k, v in attrs.items()))
    except TypeError:
        return None


def _freeze(value):
    if isinstance(value, gs.Constant):
        v = value.values
        return ("tensor", v.dtype.str, v.shape, v.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return value
    raise TypeError(f"unhashable attribute {type(value)}")
