"""Fold an inference BatchNormalization into the Conv that feeds it.

    y = BN(Conv(x, W, b)) = Conv(x, W * s, (b - mean) * s + beta),   s = gamma / sqrt(var + eps)

with s broadcast over W's output-channel axis (0). The exporters of torch, tf2onnx and paddle all
emit BatchNormalization as its own node after a bias-free or biased Conv in eval mode.
Conditions: W, b and the BN parameters are constants; the Conv's output is read by the BN alone
and is no graph output; the BN is in inference mode with only its first output used.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass
class FoldConvBatchNorm(Pass):
    name = "fold-conv-bn"
    description = "Fold inference BatchNormalization into the preceding Conv's weights and bias"
    opt_level = 2
    preserves = frozenset({"shapes"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded: list[gs.Node] = []
        for bn in graph.nodes:
            if bn.op != "BatchNormalization" or bn.domain not in ir.DEFAULT_DOMAINS:
                continue
            conv = ir.producer(bn.inputs[0])
            if conv is None or conv.op != "Conv" or conv.domain not in ir.DEFAULT_DOMAINS:
                continue
            params = self._fold(conv, bn, graph)
            if params is None:
                continue
            weight, bias = params
            ir.set_input(conv, 1, ir.make_constant(ctx.fresh_name(conv.inputs[1].name + "_bn"), weight))
            bias_name = conv.inputs[2].name if len(conv.inputs) > 2 and not conv.inputs[2].is_empty() else conv.inputs[1].name
            bias_const = ir.make_constant(ctx.fresh_name(bias_name + "_bn_bias"), bias)
            if len(conv.inputs) > 2:
                ir.set_input(conv, 2, bias_const)
            else:
                conv.inputs.append(bias_const)
            if ir.replace_all_uses(graph, bn.outputs[0], conv.outputs[0]):
                folded.append(bn)
        ir.remove_nodes(graph, folded)
        return PassResult(bool(folded), {"folded": len(folded)})

    @staticmethod
    def _fold(conv: gs.Node, bn: gs.Node, graph: gs.Graph):
        conv_out = conv.outputs[0]
        if len(conv_out.outputs) != 1 or ir.is_graph_output(graph, conv_out):
            return None
        if bn.attrs.get("training_mode", 0) or any(t.outputs or ir.is_graph_output(graph, t) for t in bn.outputs[1:]):
            return None
        if len(bn.inputs) != 5:
            return None
        weight = ir.constant_value(conv.inputs[1])
        bias = ir.constant_value(conv.inputs[2]) if len(conv.inputs) > 2 and not conv.inputs[2].is_empty() else None
        gamma, beta, mean, var = (ir.constant_value(t) for t in bn.inputs[1:])
        if weight is None or any(v is None for v in (gamma, beta, mean, var)) or (len(conv.inputs) > 2 and not conv.inputs[2].is_empty() and bias is None):
            return None
        if weight.dtype.kind != "f" or weight.ndim < 3:
            return None
        channels = weight.shape[0]
        if any(np.size(v) != channels for v in (gamma, beta, mean, var)):
            return None
        eps = float(bn.attrs.get("epsilon", 1e-5))
        # float64 for the fold itself so the folded model is as close to the original as rounding allows
        scale = gamma.astype(np.float64).reshape(-1) / np.sqrt(var.astype(np.float64).reshape(-1) + eps)
        new_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        old_bias = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        new_bias = (old_bias - mean.astype(np.float64).reshape(-1)) * scale + beta.astype(np.float64).reshape(-1)
        return new_weight.astype(weight.dtype), new_bias.astype(weight.dtype)
