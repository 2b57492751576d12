"""Dynamic INT8 for MatMul-heavy models: MatMul (+ bias Add) by a constant weight ->
com.microsoft DynamicQuantizeMatMul, and the fused com.microsoft Attention -> QAttention, with
int8 weights, one scale per output column. An activation read by several of them (a
transformer's Q, K and V projections) is quantized once: one DynamicQuantizeLinear, and
com.microsoft MatMulIntegerToFloat for each reader (what onnxruntime's quantize_dynamic emits).

onnxruntime's kernel quantizes the activation per call (its min/max on the fly, uint8) and
multiplies in integers, then adds the float bias: no calibration data, and activation ranges that
are exact for every input, which is what transformer activations (outliers per token) need. Weight
scales per column rather than per tensor: a BERT projection's columns differ by 10x and more.
An embedding table read by Gather (rows >= MIN_EMBEDDING_ROWS) is stored int8 with one scale per
row; the rows a Gather picks are widened and scaled (Cast, Mul), so the model shrinks by the
table's 3/4 and its activations stay float.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.calibration import int8_weight_levels, weight_int8
from graphopt.pass_manager import PassContext, PassResult, register_pass
from graphopt.passes.quantize.matmul_weights import bias_fits, bias_follows, matmul, matmul_bias, weight_ok
from graphopt.patterns import Match, RewritePass, Rule


def bias_applies(m: Match) -> bool:
    return weight_ok(m) and bias_fits(m)


def plain_applies(m: Match) -> bool:
    return weight_ok(m) and not bias_follows(m)


def _quantized(op, m: Match, bias):
    q, scale = weight_int8(m.value("w"), axis=1, levels=int8_weight_levels(m.ctx.target))
    return op.DynamicQuantizeMatMul(
        m.x, op.constant(q, f"{m.w.name}_int8"), op.constant(scale, f"{m.w.name}_scale"),
        op.constant(np.zeros(scale.shape, np.int8), f"{m.w.name}_zero_point"), bias, _domain="com.microsoft",
    )


def with_bias(op, m: Match):
    return _quantized(op, m, m.b)


def without_bias(op, m: Match):
    return _quantized(op, m, None)


def attention(op, x, w, b, mask):
    return op.Attention(x, w, b, op.optional(mask), _domain="com.microsoft")


def attention_applies(m: Match) -> bool:
    w, b = m.value("w"), m.value("b")
    return (not m.excluded() and w is not None and w.dtype == np.float32 and w.ndim == 2 and b is not None and b.dtype == np.float32
            and m.dtype("x") == np.float32)


def quantized_attention(op, m: Match):
    # What fuse-attention made of Q, K and V: the packed projection becomes integer too, the
    # activation quantized per call like DynamicQuantizeMatMul does (uint8, its own min/max).
    q, scale = weight_int8(m.value("w"), axis=1, levels=int8_weight_levels(m.ctx.target))
    x_q, x_scale, x_zero = op.DynamicQuantizeLinear(m.x, _outputs=3)
    return op.QAttention(
        x_q, op.constant(q, f"{m.w.name}_int8"), m.b, x_scale, op.constant(scale, f"{m.w.name}_scale"),
        m.mask, x_zero, op.constant(np.zeros(scale.shape, np.int8), f"{m.w.name}_zero_point"),
        _domain="com.microsoft", **m.node("Attention").attrs,
    )


# A table with fewer rows is a small lookup (token types), not worth three nodes for its bytes. A
# one-column table is a vector of scales (this rule's own, among them), not an embedding.
MIN_EMBEDDING_ROWS = 256


def gather(op, table, ids):
    return op.Gather(table, ids)


def embedding_applies(m: Match) -> bool:
    table = m.value("table")
    return (not m.excluded() and table is not None and table.dtype == np.float32 and table.ndim == 2
            and table.shape[0] >= MIN_EMBEDDING_ROWS and table.shape[1] > 1 and int(m.node("Gather").attrs.get("axis", 0)) == 0)


def quantized_embedding(op, m: Match):
    # An embedding table is most of an encoder's bytes (all-MiniLM-L6: 47 of 90 MB): int8 with one
    # scale per row, the gathered rows widened and scaled; a row's values are one token's, so a
    # per-row scale fits it as a per-column one fits a projection. (com.microsoft
    # GatherBlockQuantized does this in one node but measured slower in onnxruntime 1.32: 67 us
    # against these four nodes' 54 us, 128 tokens from a 30522 x 384 table.)
    q, scale = weight_int8(m.value("table"), axis=0)
    rows = op.Cast(op.Gather(op.constant(q, f"{m.table.name}_int8"), m.ids, axis=0), to=onnx.TensorProto.FLOAT)
    return op.Mul(rows, op.Gather(op.constant(scale.reshape(-1, 1), f"{m.table.name}_row_scale"), m.ids, axis=0))


_EMITS = [("DynamicQuantizeMatMul", "com.microsoft")]


@register_pass
class QuantizeDynamicInt8(RewritePass):
    name = "quantize-int8-dynamic"
    description = "Dynamic INT8: MatMul (+ bias) by a constant weight -> com.microsoft DynamicQuantizeMatMul, per-column int8 weights"
    needs_shapes = True
    # The nodes an accuracy search may keep float, one at a time (graphopt/accuracy.py).
    layer_ops = ("MatMul", "Attention", "Gather")
    rules = (
        Rule(matmul_bias, with_bias, bias_applies, name="with_bias", emits=_EMITS),
        Rule(matmul, without_bias, plain_applies, name="without_bias", emits=_EMITS),
        Rule(attention, quantized_attention, attention_applies, name="attention", emits=[("QAttention", "com.microsoft")]),
        Rule(gather, quantized_embedding, embedding_applies, name="embedding"),
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        if result.changed and ctx.can_emit("MatMulIntegerToFloat", "com.microsoft") and ctx.can_emit("DynamicQuantizeLinear"):
            shared = _share_activation_quantization(graph, ctx)
            if shared:
                result.stats["activations_quantized_once"] = shared
        return result


def _share_activation_quantization(graph: gs.Graph, ctx: PassContext) -> int:
    """DynamicQuantizeMatMuls reading one activation -> one DynamicQuantizeLinear feeding a
    MatMulIntegerToFloat each: the same arithmetic (uint8, the activation's own min/max per call),
    one pass over the activation instead of one per reader. Returns the activations shared."""
    readers: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op == "DynamicQuantizeMatMul" and node.domain == "com.microsoft" and node.inputs and isinstance(node.inputs[0], gs.Variable):
            readers.setdefault(id(node.inputs[0]), []).append(node)
    shared = 0
    for nodes in readers.values():
        if len(nodes) < 2:
            continue
        x = nodes[0].inputs[0]
        base = ctx.fresh_name(f"{x.name}_quantized")
        x_q = gs.Variable(base, dtype=np.uint8, shape=x.shape)
        x_scale = gs.Variable(ctx.fresh_name(f"{base}_scale"), dtype=np.float32, shape=[])
        x_zero = gs.Variable(ctx.fresh_name(f"{base}_zero_point"), dtype=np.uint8, shape=[])
        graph.nodes.append(gs.Node("DynamicQuantizeLinear", name=ctx.fresh_name(f"{x.name}_quantize"), inputs=[x], outputs=[x_q, x_scale, x_zero]))
        for node in nodes:
            w, w_scale, w_zero, *bias = node.inputs[1:]
            node.op = "MatMulIntegerToFloat"
            node.inputs.clear()
            node.inputs.extend([x_q, w, x_scale, w_scale, x_zero, w_zero, *bias])
        shared += 1
    if shared:
        ir.toposort(graph)
    return shared
