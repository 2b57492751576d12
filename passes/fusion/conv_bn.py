"""Fold an inference BatchNormalization into the Conv or Gemm that feeds it.

    y = BN(Conv(x, W, b)) = Conv(x, W * s, (b - mean) * s + beta),   s = gamma / sqrt(var + eps)

with s broadcast over W's output-channel axis (0). The exporters of torch, tf2onnx and paddle all
emit BatchNormalization as its own node after a bias-free or biased Conv in eval mode. After a
Gemm ([M, N]: BatchNorm1d after a Linear), the channels are the N columns: W's columns (rows
under transB) are scaled, and C becomes beta_gemm * C * s + (beta - mean * s) with beta_gemm 1.
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
    # float64 for the fold itself so the folded model is as close to the original as rounding allows
    scale, shift = _bn_scale_shift(m)
    bias = np.zeros(channels) if m.b is None else m.value("b").astype(np.float64).reshape(-1)
    new_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_bias = bias * scale + shift
    return op.Conv(
        m.x,
        op.constant(new_weight.astype(weight.dtype), f"{m.w.name}_bn"),
        op.constant(new_bias.astype(weight.dtype), f"{(m.b or m.w).name}_bn_bias"),
        **m.node("Conv").attrs,
    )


def gemm_bn(op, x, w, b, gamma, beta, mean, var):
    return op.BatchNormalization(op.Gemm(x, w, op.optional(b)), gamma, beta, mean, var)


def _bn_scale_shift(m: Match) -> tuple[np.ndarray, np.ndarray]:
    eps = float(m.node("BatchNormalization").attrs.get("epsilon", 1e-5))
    gamma, beta, mean, var = (m.value(p).astype(np.float64).reshape(-1) for p in ("gamma", "beta", "mean", "var"))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def gemm_applies(m: Match) -> bool:
    weight = m.value("w")
    if not m.is_constant("w", "gamma", "beta", "mean", "var") or (m.b is not None and not m.is_constant("b")):
        return False
    if m.node("BatchNormalization").attrs.get("training_mode", 0) or weight.dtype.kind != "f" or weight.ndim != 2:
        return False
    columns = weight.shape[0 if m.node("Gemm").attrs.get("transB", 0) else 1]
    bias = m.value("b")
    return all(m.value(p).size == columns for p in ("gamma", "beta", "mean", "var")) and (
        bias is None or bias.ndim <= 2 and bias.shape[-1:] in ((1,), (columns,)) or bias.ndim == 0)


def folded_gemm(op, m: Match):
    gemm = m.node("Gemm")
    weight = m.value("w")
    scale, shift = _bn_scale_shift(m)
    trans_b = gemm.attrs.get("transB", 0)
    new_weight = weight.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
    c = 0.0 if m.b is None else float(gemm.attrs.get("beta", 1.0)) * m.value("b").astype(np.float64)
    new_bias = c * scale + shift
    attrs = {**gemm.attrs, "beta": 1.0}
    return op.Gemm(m.x, op.constant(new_weight.astype(weight.dtype), f"{m.w.name}_bn"),
                   op.constant(new_bias.astype(weight.dtype), f"{(m.b or m.w).name}_bn_bias"), **attrs)


@register_pass
class FoldConvBatchNorm(RewritePass):
    name = "fold-conv-bn"
    description = "Fold inference BatchNormalization into the preceding Conv's or Gemm's weights and bias"
    opt_level = 2
    rules = (Rule(conv_bn, folded_conv, applies, name="folded"), Rule(gemm_bn, folded_gemm, gemm_applies, name="folded_gemm"))
