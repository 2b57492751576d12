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
            check = _NOOP_CHECKS.get(node.op)
            if check is None or not check(node):
                continue
            if ir.replace_all_uses(graph, node.outputs[0], node.inputs[0]):
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
    name = "merge-reshape"
    description = "Skip a reshaping op that feeds a Reshape whose target shape does not depend on it"
    opt_level = 2

    _RESHAPING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = 0
        for node in graph.nodes:
            if node.op != "Reshape" or node.domain not in ir.DEFAULT_DOMAINS or len(node.inputs) < 2:
                continue
            first = ir.producer(node.inputs[0])
            if first is None or first.op not in self._RESHAPING or first.domain not in ir.DEFAULT_DOMAINS:
                continue
            shape = ir.constant_value(node.inputs[1])
            # A 0 in the target copies a dimension of this Reshape's own input, which would change.
            if shape is None or (np.any(np.asarray(shape) == 0) and not node.attrs.get("allowzero", 0)):
                continue
            ir.set_input(node, 0, first.inputs[0])
            merged += 1
        return PassResult(merged > 0, {"merged": merged})


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
