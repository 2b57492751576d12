"""Fold a per-channel Add or Mul after a Conv into the Conv's bias and weights.

    Conv(x, W, b) + c = Conv(x, W, b + c)          Conv(x, W, b) * s = Conv(x, W * s, b * s)

for constants c, s that hold one value per output channel (shape [C, 1, ..., 1], [1, C, 1, ..., 1]
or a scalar). paddle2onnx writes every biased convolution as a bias-free Conv and an Add of a
[1, C, 1, 1] constant, and folded normalizations leave such Adds and Muls behind elsewhere.
"""

from __future__ import annotations

import numpy as np

from graphopt.pass_manager import register_pass
from graphopt.patterns import Match, RewritePass, Rule


def conv_add(op, x, w, b, c):
    return op.Add(op.Conv(x, w, op.optional(b)), c)


def conv_mul(op, x, w, b, c):
    return op.Mul(op.Conv(x, w, op.optional(b)), c)


def _per_channel(m: Match) -> np.ndarray | None:
    """The constant as one float64 value per output channel, or None when it is not per-channel."""
    weight, value = m.value("w"), m.value("c")
    if weight is None or value is None or weight.dtype.kind != "f" or value.dtype != weight.dtype or weight.ndim < 3:
        return None
    if m.b is not None and m.value("b") is None:
        return None
    channels, rank = weight.shape[0], weight.ndim  # the Conv's output has the weight's rank
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    # Broadcast along the channel axis only: any other non-1 axis would change what the Add reads.
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,))


def add_to_bias(op, m: Match):
    shift = _per_channel(m)
    if shift is None:
        return None
    weight = m.value("w")
    bias = np.zeros(weight.shape[0]) if m.b is None else m.value("b").astype(np.float64).reshape(-1)
    new_bias = op.constant((bias + shift).astype(weight.dtype), f"{(m.b or m.w).name}_plus")
    return op.Conv(m.x, m.w, new_bias, **m.node("Conv").attrs)


def mul_into_weights(op, m: Match):
    scale = _per_channel(m)
    if scale is None:
        return None
    weight = m.value("w")
    new_weight = (weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
    bias = None
    if m.b is not None:
        bias = op.constant((m.value("b").astype(np.float64).reshape(-1) * scale).astype(weight.dtype), f"{m.b.name}_scaled")
    return op.Conv(m.x, op.constant(new_weight, f"{m.w.name}_scaled"), bias, **m.node("Conv").attrs)


@register_pass
class FoldConvAffine(RewritePass):
    name = "fold-conv-affine"
    description = "Fold a per-channel constant Add or Mul after a Conv into its bias and weights"
    opt_level = 2
    rules = (Rule(conv_add, add_to_bias, name="biases"), Rule(conv_mul, mul_into_weights, name="scales"))
