"""Fold an inference BatchNormalization into the Conv that feeds it.

    y = BN(Conv(x, W, b)) = Conv(x, W * s, (b - mean) * s + beta),   s = gamma / sqrt(var + eps)

with s broadcast over W's output-channel axis (0). The exporters of torch, tf2onnx and paddle all
emit BatchNormalization as its own node after a bias-free or biased Conv in eval mode.
"""

from __future__ import annotations

import numpy as np

from graphopt.pass_manager import register_pass
from graphopt.patterns import Match, RewritePass, Rule


def conv_bn(op, x, w, b, gamma, beta, mean, var):
    return op.BatchNormalization(op.Conv(x, w, op.optional(b)), gamma, beta, mean, var)


def applies(m: Match) -> bool:
    weight = m.value("w")
    return (
        m.is_constant("w", "gamma", "beta", "mean", "var")
        and (m.b is None or m.is_constant("b"))
        and not m.node("BatchNormalization").attrs.get("training_mode", 0)
        and weight.dtype.kind == "f"
        and weight.ndim >= 3
        and all(m.value(p).size == weight.shape[0] for p in ("gamma", "beta", "mean", "var"))
    )


def folded_conv(op, m: Match):
    weight = m.value("w")
    channels = weight.shape[0]
    eps = float(m.node("BatchNormalization").attrs.get("epsilon", 1e-5))
    gamma, beta, mean, var = (m.value(p).astype(np.float64).reshape(-1) for p in ("gamma", "beta", "mean", "var"))
    # float64 for the fold itself so the folded model is as close to the original as rounding allows
    scale = gamma / np.sqrt(var + eps)
    bias = np.zeros(channels) if m.b is None else m.value("b").astype(np.float64).reshape(-1)
    new_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_bias = (bias - mean) * scale + beta
    return op.Conv(
        m.x,
        op.constant(new_weight.astype(weight.dtype), f"{m.w.name}_bn"),
        op.constant(new_bias.astype(weight.dtype), f"{(m.b or m.w).name}_bn_bias"),
        **m.node("Conv").attrs,
    )


@register_pass
class FoldConvBatchNorm(RewritePass):
    name = "fold-conv-bn"
    description = "Fold inference BatchNormalization into the preceding Conv's weights and bias"
    opt_level = 2
    rules = (Rule(conv_bn, folded_conv, applies, name="folded"),)
