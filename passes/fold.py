"""Folding passes: evaluate at compile time what does not depend on the model's inputs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.evaluate import evaluate_subgraph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.analysis.symbolic import END_OF_ANY_DIM, ShapeEvaluator, Sym, broadcast_dims, reshape_dims, sym_equal
from graphopt.passes.cleanup import NONDETERMINISTIC_OPS

# A fold whose result is bigger than this and bigger than its constant inputs is declined, so that
# folding never blows up the file (ConstantOfShape, Expand, Tile, Range of large shapes).
DEFAULT_FOLD_SIZE_LIMIT = 1 << 20

# Ops whose evaluation at compile time we never attempt: control flow (bodies may read outer values),
# sequences/optionals (no tensor result to store as an initializer).
_NEVER_FOLD = NONDETERMINISTIC_OPS | {
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
    "SequenceAt", "SequenceLength", "SplitToSequence", "ConcatFromSequence", "Optional",
    "OptionalGetElement", "OptionalHasElement", "Constant",
}


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    description = "Evaluate nodes whose inputs are all constants and store their results as initializers"
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        limit = int(ctx.options.get("fold_size_limit", DEFAULT_FOLD_SIZE_LIMIT))
        ctx.analysis("shapes")
        inlined = _inline_constant_ifs(graph, ctx)
        ir.toposort(graph)
        declined: set[int] = set()
        nothing = PassResult(bool(inlined), {"inlined_ifs": inlined} if inlined else {})
        # A result over the size limit is declined and the region recomputed without it; each
        # round declines at least one node, and in practice one round is all there is.
        for _ in range(8):
            region = self._foldable_region(graph, declined, limit)
            if not region:
                return nothing
            boundary = self._boundary(graph, region)
            values = evaluate_subgraph(region, boundary, ctx.model.opset_imports)
            rejected = [
                t for t in boundary
                if t.name not in values
                or (values[t.name].nbytes > limit and values[t.name].nbytes > _input_bytes(t.inputs[0]))
            ]
            if not rejected:
                break
            declined.update(id(t.inputs[0]) for t in rejected)
        else:
            return nothing
        for tensor in boundary:
            value = values[tensor.name]
            if ir.is_graph_output(graph, tensor):
                # Graph outputs keep their names: a Constant node produces them.
                tensor.inputs.clear()
                graph.nodes.append(
                    gs.Node("Constant", name=ctx.fresh_name(tensor.name + "_folded"),
                            attrs={"value": ir.make_constant(ctx.fresh_name(tensor.name + "_value"), value)},
                            outputs=[tensor])
                )
                continue
            const = ir.make_constant(ctx.fresh_name(tensor.name), value)
            ir.redirect_uses(tensor, const)
        ir.remove_nodes(graph, region)
        stats = {"folded_nodes": len(region)}
        if inlined:
            stats["inlined_ifs"] = inlined
        return PassResult(True, stats)

    @staticmethod
    def _foldable_region(graph: gs.Graph, declined: set[int], limit: int) -> list[gs.Node]:
        folded: set[int] = set()  # ids of tensors known at compile time through folding
        region = []
        for node in graph.nodes:
            if (
                id(node) in declined
                or node.op in _NEVER_FOLD
                or node.domain not in ir.DEFAULT_DOMAINS
                or ir.subgraphs_of(node)
                or not node.outputs
            ):
                continue
            if all(t.is_empty() or isinstance(t, gs.Constant) or id(t) in folded for t in node.inputs):
                # Decline up front what inference already says is too big, rather than compute it.
                out_bytes = _known_bytes(node.outputs)
                if out_bytes is not None and out_bytes > limit and out_bytes > _input_bytes(node):
                    continue
                region.append(node)
                folded.update(id(t) for t in node.outputs)
        return region

    @staticmethod
    def _boundary(graph: gs.Graph, region: list[gs.Node]) -> list[gs.Tensor]:
        """Results of the region that something outside it reads (or that are graph outputs)."""
        inside = {id(n) for n in region}
        boundary = []
        for node in region:
            for tensor in node.outputs:
                if tensor.is_empty():
                    continue
                if ir.is_graph_output(graph, tensor) or any(id(c) not in inside for c in tensor.outputs):
                    boundary.append(tensor)
        return boundary


def _inline_constant_ifs(graph: gs.Graph, ctx: PassContext) -> int:
    """Replace each If whose condition is a constant by the nodes of the branch it takes."""
    chosen: list[tuple[gs.Node, str]] = []
    for node in graph.nodes:
        if node.op != "If" or node.domain not in ir.DEFAULT_DOMAINS or not node.inputs:
            continue
        cond = ir.constant_value(node.inputs[0])
        if cond is None or np.asarray(cond).size != 1:
            continue
        key = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
        body = node.attrs.get(key)
        if isinstance(body, gs.Graph) and len(body.outputs) == len(node.outputs):
            chosen.append((node, key))
    if not chosen:
        return 0
    # The branch's tensors move to this graph's scope, where a sibling subgraph may already use
    # their names: those are renamed.
    bodies = {id(node.attrs[key]) for node, key in chosen}
    inner = {id(g) for node, key in chosen for g in ir.subgraphs_below(node.attrs[key])}
    names_elsewhere: set[str] = set()
    for g in ctx.model.graphs():
        if id(g) not in bodies and id(g) not in inner:
            names_elsewhere.update(g.tensors().keys())
    position = {id(node): node.attrs[key] for node, key in chosen}
    nodes: list[gs.Node] = []
    for node in graph.nodes:
        body = position.get(id(node))
        if body is None:
            nodes.append(node)
            continue
        for inner_node in body.nodes:
            for t in inner_node.outputs:
                if not t.is_empty() and t.name in names_elsewhere:
                    t.name = ctx.fresh_name(t.name)
                names_elsewhere.add(t.name)
        nodes.extend(body.nodes)
    graph.nodes = nodes
    for node, key in chosen:
        body = node.attrs.pop(key)  # the dead branch stays attached, to die with the node
        moved: dict[int, gs.Tensor] = {}  # a branch output that now goes by the name of an If output
        for old, new in list(zip(node.outputs, body.outputs)):
            if old.is_empty():
                continue
            new = moved.get(id(new), new)
            output = ir.is_graph_output(graph, old)
            if ir.replace_all_uses(graph, old, new):
                if output:
                    moved[id(new)] = old
                continue
            # `old` is a graph output that `new` (an outer value or a constant) cannot produce.
            list.__setitem__(old.inputs, slice(None), [])
            graph.nodes.append(gs.Node("Identity", name=ctx.fresh_name(old.name + "_inlined"), inputs=[new], outputs=[old]))
    ir.remove_nodes(graph, [node for node, _ in chosen])
    return len(chosen)


def _known_bytes(tensors) -> int | None:
    total = 0
    for t in tensors:
        shape = ir.static_shape(t) if not t.is_empty() else None
        if shape is None or t.dtype is None:
            return None
        try:
            total += int(np.prod(shape)) * np.dtype(t.dtype).itemsize
        except TypeError:  # gs keeps types numpy lacks (bfloat16, float8) as ONNX type codes
            return None
    return total


def _input_bytes(node: gs.Node) -> int:
    return sum(_known_bytes([t]) or 0 for t in node.inputs if not t.is_empty())


def _is_zero_fill(tensor: gs.Tensor) -> bool:
    """The tensor is all zeros: a constant of zeros or ConstantOfShape with a zero (or no) value."""
    value = ir.constant_value(tensor)
    if value is not None:
        return not np.any(value)
    node = ir.producer(tensor)
    if node is None or node.op != "ConstantOfShape" or node.domain not in ir.DEFAULT_DOMAINS:
        return False
    fill = node.attrs.get("value")
    return fill is None or not np.any(np.asarray(fill.values))


# Inputs of the recurrent ops that default to zeros when left out: B, initial_h, initial_c, P.
_ZERO_DEFAULT_INPUTS = {"LSTM": (3, 5, 6, 7), "GRU": (3, 5), "RNN": (3, 5)}


@register_pass
class FoldShapes(Pass):
    """What graphopt.analysis.symbolic's evaluator proves, made into rewrites: computed shape values
    that came out as numbers become constants; a Reshape whose target still holds symbolic elements
    gets a constant target (0 copies an input dimension, -1 stands for the one remaining one) or
    becomes an Unsqueeze/Squeeze/nothing; an Expand or a Slice proven to change nothing goes; an
    LSTM/GRU/RNN initial state built as zeros (ConstantOfShape of the batch size) is dropped, zero
    being the default."""

    name = "fold-shapes"
    description = (
        "Evaluate shape arithmetic symbolically: fold every static part of a partly symbolic shape, "
        "give Reshape constant targets, drop Expand/Slice that change nothing and zero RNN states"
    )
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.analysis("shapes")
        ir.toposort(graph)
        ev = ShapeEvaluator(graph, ctx.opset)
        ev.run()
        stats = {"replaced": 0, "shape_targets": 0, "removed_noops": 0, "rnn_states": 0}
        removed: list[gs.Node] = []
        for node in list(graph.nodes):
            if node.domain not in ir.DEFAULT_DOMAINS or not node.outputs or node.op == "Constant":
                continue
            if self._fold_known_outputs(graph, node, ev, ctx, removed):
                stats["replaced"] += 1
                continue
            if node.op in ("Reshape", "Expand") and len(node.inputs) == 2:
                # Both take a shape vector; a partly symbolic one becomes a constant, or the op goes.
                outcome = (self._reshape if node.op == "Reshape" else self._expand)(graph, node, ev, ctx)
                if outcome == "noop":
                    removed.append(node)
                    stats["removed_noops"] += 1
                elif outcome:
                    stats["shape_targets"] += 1
            elif (
                node.op == "Slice"
                and self._slice_is_noop(node, ev)
                and not _contradicts_declared(graph, node.outputs[0], ev.shape(node.inputs[0]))
                and ir.replace_all_uses(graph, node.outputs[0], node.inputs[0])
            ):
                removed.append(node)
                stats["removed_noops"] += 1
            elif node.op in _ZERO_DEFAULT_INPUTS:
                for index in _ZERO_DEFAULT_INPUTS[node.op]:
                    if index < len(node.inputs) and not node.inputs[index].is_empty() and _is_zero_fill(node.inputs[index]):
                        ir.set_input(node, index, gs.Variable.empty())
                        stats["rnn_states"] += 1
        ir.remove_nodes(graph, removed)
        stats = {k: v for k, v in stats.items() if v}
        return PassResult(bool(stats), stats)

    @staticmethod
    def _fold_known_outputs(graph, node, ev: ShapeEvaluator, ctx, removed) -> bool:
        """Replace the outputs of `node` that the evaluator computed from shapes with constants."""
        changed = False
        for tensor in node.outputs:
            value = ev.values.get(id(tensor))
            if tensor.is_empty() or value is None or not value.derived or not value.known():
                continue
            array = value.array()
            if ir.is_graph_output(graph, tensor):
                if len(node.outputs) != 1 or _contradicts_declared(graph, tensor, list(array.shape)):
                    continue
                # A graph output keeps its name: a Constant node produces it.
                tensor.inputs.clear()
                graph.nodes.append(
                    gs.Node("Constant", name=ctx.fresh_name(tensor.name + "_folded"),
                            attrs={"value": ir.make_constant(ctx.fresh_name(tensor.name + "_value"), array)},
                            outputs=[tensor])
                )
                removed.append(node)
                return True
            if not tensor.outputs:
                continue
            ir.redirect_uses(tensor, ir.make_constant(ctx.fresh_name(tensor.name), array))
            changed = True
        return changed

    @staticmethod
    def _reshape(graph, node, ev: ShapeEvaluator, ctx) -> str | bool:
        data, out = node.inputs[0], node.outputs[0]
        target = ev.value(node.inputs[1])
        if target is None or target.scalar or target.dtype.kind not in "iu":
            return False
        allowzero = bool(node.attrs.get("allowzero", 0))
        dims = ev.shape(data)
        if _contradicts_declared(graph, out, reshape_dims(dims, target.elems, allowzero, ev)):
            return False
        result = ev.shapes.get(id(out)) if id(out) in ev.refined else None
        if (
            result is not None
            and dims is not None
            and len(result) == len(dims)
            and all(sym_equal(a, b) is True for a, b in zip(result, dims))
            and ir.replace_all_uses(graph, out, data)
        ):
            return "noop"
        if target.known():
            return False
        new = _constant_target(dims, target.elems, allowzero)
        if new is not None:
            ir.set_input(node, 1, ir.make_constant(ctx.fresh_name(node.inputs[1].name), np.array(new, dtype=np.int64)))
            return True
        axes = None if result is None or dims is None else _inserted_ones(dims, result)
        if axes is not None:
            _become_squeeze_like(node, "Unsqueeze", axes, ctx)
            return True
        axes = None if result is None or dims is None else _inserted_ones(result, dims)
        if axes is not None:
            _become_squeeze_like(node, "Squeeze", axes, ctx)
            return True
        return False

    @staticmethod
    def _expand(graph, node, ev: ShapeEvaluator, ctx) -> str | bool:
        data, out = node.inputs[0], node.outputs[0]
        target = ev.value(node.inputs[1])
        dims = ev.shape(data)
        if target is None or target.scalar or target.dtype.kind not in "iu":
            return False
        if dims is None or _contradicts_declared(graph, out, broadcast_dims(dims, target.elems, ev)):
            return False
        offset = len(dims) - len(target)
        if (
            offset >= 0
            and all(t == 1 or sym_equal(t, dims[offset + i]) is True for i, t in enumerate(target.elems))
            and ir.replace_all_uses(graph, out, data)
        ):
            return "noop"
        if target.known():
            return False
        # A target element equal to the data's dimension it lines up with may as well be 1.
        new = []
        for i, t in enumerate(target.elems):
            j = offset + i
            if isinstance(t, Sym) and j >= 0 and sym_equal(t, dims[j]) is True:
                t = 1
            new.append(t)
        if any(isinstance(t, Sym) for t in new):
            return False
        ir.set_input(node, 1, ir.make_constant(ctx.fresh_name(node.inputs[1].name), np.array(new, dtype=np.int64)))
        return True

    @staticmethod
    def _slice_is_noop(node, ev: ShapeEvaluator) -> bool:
        dims = ev.shape(node.inputs[0])
        if dims is None or ev.opset < 10 or len(node.inputs) < 3:
            return False
        args = []
        for i in range(1, 5):
            if i >= len(node.inputs) or node.inputs[i].is_empty():
                args.append(None)
                continue
            v = ev.value(node.inputs[i])
            if v is None or v.dtype.kind not in "iu":
                return False
            args.append(list(v.elems))
        starts, ends, axes, steps = args
        if starts is None or ends is None or len(starts) != len(ends):
            return False
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if any(isinstance(a, Sym) or not -len(dims) <= a < len(dims) for a in axes) or len({a % len(dims) for a in axes}) != len(axes):
            return False
        for start, end, axis, step in zip(starts, ends, axes, steps):
            dim = dims[axis % len(dims)]
            if step != 1 or isinstance(start, Sym):
                return False
            if not (start == 0 or isinstance(dim, int) and start <= -dim):
                return False
            if isinstance(end, Sym):
                if sym_equal(end, dim) is not True:
                    return False
            elif not (end >= END_OF_ANY_DIM or isinstance(dim, int) and end >= dim):
                return False
        return True


def _contradicts_declared(graph: gs.Graph, tensor: gs.Tensor, dims: list | None) -> bool:
    """`tensor` is an output of `graph` whose declared shape disagrees with `dims`.

    Exporters sometimes declare a wrong output shape (onnxruntime does not check it). A rewrite that
    lets inference see the real shape would make the model fail onnx's strict check, so it is not
    made there.
    """
    if not ir.is_graph_output(graph, tensor) or tensor.shape is None:
        return False
    declared = tensor.shape
    if dims is None or len(declared) != len(dims):
        return True
    return any(isinstance(a, (int, np.integer)) and a >= 0 and isinstance(d, int) and a != d for a, d in zip(declared, dims))


def _constant_target(dims: list | None, target, allowzero: bool) -> list[int] | None:
    """A constant Reshape target equivalent to the partly symbolic `target`, or None.

    A symbolic element equal to the input's dimension at the same index becomes 0 (copy it); one
    other symbolic element becomes -1, provided every other dimension is a static positive number
    (-1 is undefined when the others multiply to 0, where the symbolic target was fine).
    """
    new: list = []
    for i, t in enumerate(target):
        if isinstance(t, Sym):
            same = not allowzero and dims is not None and i < len(dims) and sym_equal(dims[i], t) is True
            new.append(0 if same else None)
        else:
            new.append(int(t))
    unknown = [i for i, t in enumerate(new) if t is None]
    if not unknown:
        return new
    if len(unknown) > 1 or -1 in new:
        return None
    for i, t in enumerate(new):
        if i == unknown[0]:
            continue
        value = dims[i] if t == 0 and not allowzero and dims is not None and i < len(dims) else t
        if not isinstance(value, int) or value <= 0:
            return None
    new[unknown[0]] = -1
    return new


def _inserted_ones(short: list, long: list) -> list[int] | None:
    """Positions in `long` of the 1s that, inserted into `short`, make it `long`; None if not so."""
    if len(long) <= len(short):
        return None
    axes, i = [], 0
    for j, d in enumerate(long):
        if i < len(short) and sym_equal(short[i], d) is True:
            i += 1
        elif d == 1 and not isinstance(d, Sym):
            axes.append(j)
        else:
            return None
    return axes if i == len(short) else None


def _become_squeeze_like(node: gs.Node, op: str, axes: list[int], ctx) -> None:
    """Turn a Reshape into Unsqueeze/Squeeze(data, axes), axes as an input from opset 13 on."""
    target = node.inputs[1]
    for i, n in enumerate(target.outputs):
        if n is node:
            list.__delitem__(target.outputs, i)
            break
    list.__delitem__(node.inputs, slice(1, None))
    node.op = op
    node.attrs = {}
    if ctx.opset >= 13:
        axes_const = ir.make_constant(ctx.fresh_name(f"{node.name or op}_axes"), np.array(axes, dtype=np.int64))
        list.append(node.inputs, axes_const)
        list.append(axes_const.outputs, node)
    else:
        node.attrs["axes"] = axes


# A weight this close to zero changes no fp32 output, but a CPU multiplies by a subnormal number
# in a microcode assist that takes ~100x a normal multiply: PP-OCRv6's small text detector (rapidocr) ships 256K
# subnormal weights (decayed by training), and the two 1x1 convolutions holding most of them take
# 47 of its 75 ms in onnxruntime (measured: benchmarks/cost_model.py found them 46x and 116x
# slower than the cost model predicts for their shapes).
_FLUSHED_DTYPES = (np.float32, np.float64)  # float16 subnormals reach 6e-5: a change fp16 would notice
_CHUNK = 1 << 22


@register_pass
class FlushSubnormalWeights(Pass):
    name = "flush-subnormal-weights"
    description = "Set subnormal float32/float64 weights (|w| below the smallest normal, ~1.2e-38) to zero: CPUs compute with them ~100x slower"
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # A fixed-point pipeline runs this every iteration: a constant looked at once stays done.
        seen: set[int] = ctx.options.setdefault("_subnormals_checked", set())
        flushed = tensors = 0
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if tensor.dtype not in _FLUSHED_DTYPES and np.dtype(tensor.dtype) not in (np.dtype(d) for d in _FLUSHED_DTYPES):
                continue
            value = ir.constant_value(tensor)
            if value is None or value.size == 0:
                continue
            flat = value.reshape(-1)
            if not any(ir.subnormal_mask(flat[i:i + _CHUNK]).any() for i in range(0, flat.size, _CHUNK)):
                continue
            fixed = value.copy()
            subnormal = ir.subnormal_mask(fixed)
            fixed[subnormal] = np.copysign(0, fixed[subnormal])
            tensor.values = fixed
            flushed += int(subnormal.sum())
            tensors += 1
        return PassResult(bool(flushed), {"flushed": flushed, "weights": tensors})
