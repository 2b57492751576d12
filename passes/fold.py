"""Folding passes: evaluate at compile time what does not depend on the model's inputs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.evaluate import evaluate_subgraph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
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
        ir.toposort(graph)
        declined: set[int] = set()
        # A result over the size limit is declined and the region recomputed without it; each
        # round declines at least one node, and in practice one round is all there is.
        for _ in range(8):
            region = self._foldable_region(graph, declined, limit)
            if not region:
                return PassResult(False)
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
            return PassResult(False)
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
        return PassResult(True, {"folded_nodes": len(region)})

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


@register_pass
class FoldShapes(Pass):
    name = "fold-shapes"
    description = "Replace Shape/Size of statically known dimensions (and Shape->Gather/Slice of them) with constants"
    opt_level = 2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.analysis("shapes")
        replaced = 0
        for node in graph.nodes:
            if node.domain not in ir.DEFAULT_DOMAINS or not node.inputs or not node.outputs:
                continue
            out = node.outputs[0]
            if ir.is_graph_output(graph, out):
                continue
            if node.op == "Shape":
                value = _known_shape_slice(node)
                if value is not None:
                    self._replace(graph, out, value, ctx)
                    replaced += 1
                    continue
                # Shape of a partly symbolic tensor: its static entries may still be picked out.
                for consumer in ir.consumers(out):
                    value = _picked_static_dims(node, consumer)
                    if value is not None and not ir.is_graph_output(graph, consumer.outputs[0]):
                        self._replace(graph, consumer.outputs[0], value, ctx)
                        replaced += 1
            elif node.op == "Size":
                shape = ir.static_shape(node.inputs[0])
                if shape is not None:
                    self._replace(graph, out, np.array(int(np.prod(shape)), dtype=np.int64), ctx)
                    replaced += 1
        return PassResult(replaced > 0, {"replaced": replaced})

    @staticmethod
    def _replace(graph: gs.Graph, tensor: gs.Tensor, value: np.ndarray, ctx: PassContext) -> None:
        const = ir.make_constant(ctx.fresh_name(tensor.name), value)
        ir.redirect_uses(tensor, const)


def _shape_dims(node: gs.Node) -> list | None:
    """The dims Shape(x) returns (honouring opset-15 start/end), as ints or symbolic names."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
    return list(shape[start:end])


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def _known_shape_slice(node: gs.Node) -> np.ndarray | None:
    dims = _shape_dims(node)
    if dims is None or not all(_is_static(d) for d in dims):
        return None
    return np.array(dims, dtype=np.int64)


def _picked_static_dims(shape_node: gs.Node, consumer: gs.Node) -> np.ndarray | None:
    dims = _shape_dims(shape_node)
    if dims is None or consumer.domain not in ir.DEFAULT_DOMAINS or not consumer.inputs:
        return None
    if consumer.inputs[0] is not shape_node.outputs[0]:
        return None
    if consumer.op == "Gather" and len(consumer.inputs) == 2:
        indices = ir.constant_value(consumer.inputs[1])
        if indices is None or int(consumer.attrs.get("axis", 0)) != 0:
            return None
        picked = np.asarray(dims, dtype=object)[np.asarray(indices, dtype=np.int64)]
    elif consumer.op == "Slice" and len(consumer.inputs) >= 3:
        args = [ir.constant_value(t) if not t.is_empty() else None for t in consumer.inputs[1:]]
        if args[0] is None or args[1] is None or any(
            a is None and not t.is_empty() for a, t in zip(args[2:], consumer.inputs[3:])
        ):
            return None
        step = int(args[3][0]) if len(args) > 3 and args[3] is not None else 1
        if len(args) > 2 and args[2] is not None and int(args[2][0]) != 0:
            return None
        picked = np.asarray(dims, dtype=object)[slice(int(args[0][0]), int(args[1][0]), step)]
    else:
        return None
    flat = np.asarray(picked).reshape(-1)
    if not all(_is_static(d) for d in flat):
        return None
    return np.asarray(picked).astype(np.int64)

