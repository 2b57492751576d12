"""Fuse decomposed layer normalization into one LayerNormalization node (opset >= 17), RMS
normalization into RMSNormalization (opset >= 23).

The forms exporters write, all from the same ReduceMean of x over its last k axes (keepdims=1):

* torch (legacy and dynamo), paddle2onnx: ``(x - mean) / Sqrt(ReduceMean(Pow(x - mean, 2)) + eps)``;
* tf2onnx: the square as ``Mul(d, d)``, the division as ``Mul(d, Reciprocal(std))``, and the
  variance and the division reading two separate ``Sub(x, mean)``;
* tf2onnx of Keras' LayerNormalization (the tf.nn.batch_normalization form):
  ``x * r + (beta - mean * r)`` with ``r = Reciprocal(std) [* gamma]`` (or ``x*r - mean*r``,
  ``x*r + Neg(mean*r)`` without beta).

* RMS normalization (T5, LLaMA): ``x / Sqrt(ReduceMean(Pow(x, 2)) + eps)`` or
  ``x * Reciprocal(...)``: RMSNormalization, opset >= 23 only (older models keep it decomposed:
  onnxruntime fuses it into its own SimplifiedLayerNormalization at session time).

A scale or shift after the normalization (``* gamma``, ``+ beta``: the affine part as torch and
paddle write it) is absorbed by two more rules, which also apply to LayerNormalization nodes the
exporter wrote itself.

Conditions (the pattern is left alone when any fails): both reductions are over the same last k
axes; x is float16/32/64 with a static normalized shape; eps is a one-element constant of x's
dtype; the exponent is 2; gamma and beta are constants of x's dtype that broadcast over the
normalized axes only (a gamma over other axes stays a Mul after the fused node).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.patterns import Match, RewritePass, Rule



def decomposed(op, x, axes, square_axes, two, eps):
    mean = op.ReduceMean(x, op.optional(axes), _name="mean")
    d = op.Sub(x, mean)
    square = op.either(op.Pow(d, two), op.Mul(d, d))
    std = op.Sqrt(op.Add(op.ReduceMean(square, op.optional(square_axes), _name="variance"), eps))
    centered = op.either(d, op.Sub(x, mean))
    return op.either(op.Div(centered, std), op.Mul(centered, op.Reciprocal(std)))


def batch_norm_form(op, x, axes, square_axes, two, eps, gamma, beta):
    mean = op.ReduceMean(x, op.optional(axes), _name="mean")
    d = op.Sub(x, mean)
    square = op.either(op.Mul(d, d), op.Pow(d, two))
    std = op.Sqrt(op.Add(op.ReduceMean(square, op.optional(square_axes), _name="variance"), eps))
    r = op.optional(op.Mul(op.Reciprocal(std), gamma))
    x_r, mean_r = op.Mul(x, r), op.Mul(mean, r)
    return op.either(op.Add(x_r, op.Sub(beta, mean_r)), op.Add(x_r, op.Neg(mean_r)), op.Sub(x_r, mean_r))


def root_mean_square(op, x, square_axes, two, eps):
    square = op.either(op.Pow(x, two), op.Mul(x, x))
    std = op.Sqrt(op.Add(op.ReduceMean(square, op.optional(square_axes), _name="variance"), eps))
    return op.either(op.Div(x, std), op.Mul(x, op.Reciprocal(std)))


def _normalized_axes(m: Match) -> int | None:
    """k when x is a float tensor with a static normalized shape and the reductions are all over
    exactly its last k axes."""
    rank = m.rank("x")
    if m.dtype("x") not in ir.FLOAT_DTYPES or rank is None:
        return None
    reductions = [(label, axes) for label, axes in (("mean", "axes"), ("variance", "square_axes")) if label in m.nodes]
    ks = {_reduced_last_k(m.node(label), m.values[axes], rank) for label, axes in reductions}
    if len(ks) != 1 or None in ks:
        return None
    k = ks.pop()
    return k if all(isinstance(d, int) and d > 0 for d in m.shape("x")[rank - k :]) else None


def _reduced_last_k(node, axes_input, rank: int) -> int | None:
    """k when `node` is a keepdims ReduceMean over exactly the last k axes of a rank-`rank` input."""
    if int(node.attrs.get("keepdims", 1)) != 1:
        return None
    if axes_input is not None:
        value = ir.constant_value(axes_input)
        if value is None:
            return None
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    else:
        axes = [int(a) for a in node.attrs.get("axes") or ()]
    if not axes:
        # No axes: all of them, unless noop_with_empty_axes makes it an Identity.
        return None if int(node.attrs.get("noop_with_empty_axes", 0)) or rank == 0 else rank
    if any(a < -rank or a >= rank for a in axes):
        return None
    reduced = sorted(a % rank for a in axes)
    return len(reduced) if reduced == list(range(rank - len(reduced), rank)) else None


def _over_normalized_axes(value: np.ndarray | None, dtype, norm_shape: tuple[int, ...]) -> np.ndarray | None:
    """`value` broadcast to the normalized shape, when it is a constant of x's dtype that reads the
    normalized axes only (so multiplying or adding it changes no other axis and no result shape)."""
    if value is None or value.dtype != dtype:
        return None
    k = len(norm_shape)
    shape = (1,) * max(0, k - value.ndim) + value.shape
    outer, inner = shape[: len(shape) - k], shape[len(shape) - k :]
    if any(d != 1 for d in outer) or any(d not in (1, n) for d, n in zip(inner, norm_shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(value.reshape(inner), norm_shape))


def decomposed_applies(m: Match) -> bool:
    k = _normalized_axes(m)
    if k is None or m.dtype("eps") != m.dtype("x") or m.scalar("eps") is None:
        return False
    if m.two is not None and m.scalar("two") != 2:
        return False
    norm_shape = m.shape("x")[-k:]
    return all(m.values.get(p) is None or _over_normalized_axes(m.value(p), m.dtype("x"), norm_shape) is not None for p in ("gamma", "beta"))


def layer_normalization(op, m: Match):
    k = _normalized_axes(m)
    dtype, norm_shape = m.dtype("x"), m.shape("x")[-k:]
    gamma = np.ones(norm_shape, dtype) if m.gamma is None else _over_normalized_axes(m.value("gamma"), dtype, norm_shape)
    beta = None if m.beta is None else op.constant(_over_normalized_axes(m.value("beta"), dtype, norm_shape), f"{m.root.name}_bias")
    return op.LayerNormalization(m.x, op.constant(gamma, f"{m.root.name}_scale"), beta, axis=-k, epsilon=float(m.scalar("eps")))


def rms_normalization(op, m: Match):
    k = _normalized_axes(m)
    scale = op.constant(np.ones(m.shape("x")[-k:], m.dtype("x")), f"{m.root.name}_scale")
    return op.RMSNormalization(m.x, scale, axis=-k, epsilon=float(m.scalar("eps")))


# The affine part after a normalization: y = LN(x) * s + c folds into its scale and bias.


def _normalization(op, x, scale, bias):
    return op.either(op.LayerNormalization(x, scale, op.optional(bias), _name="norm"), op.RMSNormalization(x, scale, _name="norm"))


def scaled(op, x, scale, bias, s):
    return op.Mul(_normalization(op, x, scale, bias), s)


def shifted(op, x, scale, bias, c):
    return op.Add(op.LayerNormalization(x, scale, op.optional(bias), _name="norm"), c)


def _affine_operands(m: Match, operand: str):
    """(norm_shape, dtype, scale, bias, operand) as arrays of the normalized shape, or None."""
    node = m.node("norm")
    rank, dtype = m.rank("x"), m.dtype("x")
    if rank is None or dtype is None or len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:]):
        return None
    k = rank - int(node.attrs.get("axis", -1)) % rank
    norm_shape = m.shape("x")[rank - k :]
    if not all(isinstance(d, int) for d in norm_shape):
        return None
    arrays = [_over_normalized_axes(m.value(p), dtype, norm_shape) for p in ("scale", operand)]
    bias = None if m.bias is None else _over_normalized_axes(m.value("bias"), dtype, norm_shape)
    if any(a is None for a in arrays) or (m.bias is not None and bias is None):
        return None
    return arrays[0], bias, arrays[1]


def _refit(op, m: Match, scale: np.ndarray, bias: np.ndarray | None):
    node = m.node("norm")
    bias_tensor = None if bias is None else op.constant(bias, f"{m.root.name}_bias")
    make = op.LayerNormalization if node.op == "LayerNormalization" else op.RMSNormalization
    return make(m.x, op.constant(scale, f"{m.root.name}_scale"), bias_tensor, **node.attrs)


def absorb_scale(op, m: Match):
    found = _affine_operands(m, "s")
    if found is None:
        return None
    scale, bias, s = found
    dtype = scale.dtype
    # float64 for the products, so the folded constants are as exact as rounding allows
    return _refit(op, m, (scale.astype(np.float64) * s).astype(dtype), None if bias is None else (bias.astype(np.float64) * s).astype(dtype))


def absorb_shift(op, m: Match):
    found = _affine_operands(m, "c")
    if found is None:
        return None
    scale, bias, c = found
    return _refit(op, m, scale, c if bias is None else (bias.astype(np.float64) + c).astype(scale.dtype))


@register_pass
class FuseLayerNorm(RewritePass):
    name = "fuse-layernorm"
    description = "Replace decomposed layer and RMS normalization (ReduceMean/Sub/Pow/.../Div) by LayerNormalization or RMSNormalization"
    opt_level = 2
    needs_shapes = True
    rules = (
        Rule([decomposed, batch_norm_form], layer_normalization, decomposed_applies, name="fused", emits=("LayerNormalization",)),
        Rule(root_mean_square, rms_normalization, decomposed_applies, name="rms_fused", emits=("RMSNormalization",)),
        # These rewrite a normalization node that is there already: nothing new to emit.
        Rule(scaled, absorb_scale, name="scales_absorbed"),
        Rule(shifted, absorb_shift, name="biases_absorbed"),
    )


# ---------------------------------------------------------------------------------------------
# The residual Add before a LayerNormalization: onnxruntime's SkipLayerNormalization


def skip_layer_norm(op, x, skip, bias, scale, shift):
    summed = op.Add(op.optional(op.Add(x, bias, _name="bias_add")), skip, _name="residual")
    return op.LayerNormalization(summed, scale, op.optional(shift))


def skip_applies(m: Match) -> bool:
    """x and skip are [B, S, H] of one shape (symbols included), normalized over H; scale, shift
    and bias are constants of shape [H]."""
    shape, dtype = m.shape("x"), m.dtype("x")
    if dtype not in ir.FLOAT_DTYPES - {np.dtype(np.float64)} or shape is None or len(shape) != 3 or m.shape("skip") != shape:
        return False
    hidden = shape[2]
    if not isinstance(hidden, int) or int(m.node("LayerNormalization").attrs.get("axis", -1)) not in (-1, 2):
        return False
    vectors = [m.value(p) for p in ("scale", "shift", "bias") if m.values.get(p) is not None]
    if m.is_constant("x") or any(v is None or v.shape != (hidden,) or v.dtype != dtype for v in vectors):
        return False
    return m.value("scale") is not None


def skip_layer_normalization(op, m: Match):
    epsilon = float(m.node("LayerNormalization").attrs.get("epsilon", 1e-5))
    return op.SkipLayerNormalization(m.x, m.skip, m.scale, m.shift, m.bias, _domain="com.microsoft", epsilon=epsilon)


@register_pass
class FuseSkipLayerNorm(RewritePass):
    name = "fuse-skip-layernorm"
    description = "Replace a residual Add (and bias Add) before LayerNormalization by onnxruntime's com.microsoft SkipLayerNormalization"
    # Opt-in: onnxruntime 1.32's CPU kernel runs 3-6x slower than Add + LayerNormalization (see
    # ResidualAddAsSum below); a runtime with a fast kernel may want it.
    opt_level = None
    needs_shapes = True
    rules = (Rule(skip_layer_norm, skip_layer_normalization, skip_applies, name="fused",
                  emits=[("SkipLayerNormalization", "com.microsoft")]),)


# ---------------------------------------------------------------------------------------------
# The residual Add before a LayerNormalization, kept away from onnxruntime's SkipLayerNormalization


@register_pass
class ResidualAddAsSum(Pass):
    """Why: onnxruntime's session fuses Add + LayerNormalization into com.microsoft
    SkipLayerNormalization by itself (core/optimizer/skip_layer_norm_fusion.cc, from the extended
    level, whenever the Add's two inputs are 3-D of one static shape), and onnxruntime 1.32's CPU
    kernel for it is 3-6x slower than the two nodes it replaces: on this x86_64 host, at 1 and 2
    threads, [1, 128, 384] 362 us against 66 us, [1, 128, 768] 726 us against 125 us. On
    all-MiniLM-L6 (1 thread) the Sums make fp32 8% and int8-dynamic 20% faster. Sum of two inputs
    is the same arithmetic with the same broadcasting, and that fusion looks for an Add only.

    onnxruntime's own Attention fusion (attention_fusion.cc) also starts from an Add after a
    LayerNormalization; it fused no attention in any model of the zoo or the real-model tier
    (BERT, MiniLM, ViT exports, torch legacy and dynamo), and at -O3 graphopt fuses attention
    before this pass runs. A target asks for this pass in its `extra_passes`
    (targets/data/x86_64.toml)."""

    name = "residual-add-as-sum"
    description = "Write the residual Add before a LayerNormalization as Sum, which onnxruntime's session does not fuse into its slower SkipLayerNormalization"
    opt_level = None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.opset < 8:  # Sum broadcasts from opset 8 on
            return PassResult(False)
        outputs = {id(t) for t in graph.outputs}
        rewritten = 0
        for node in graph.nodes:
            if node.op != "Add" or (node.domain and node.domain not in ir.DEFAULT_DOMAINS) or len(node.inputs) != 2:
                continue
            out = node.outputs[0]
            readers = out.outputs
            if id(out) in outputs or len(readers) != 1 or readers[0].op != "LayerNormalization" or readers[0].inputs[0] is not out:
                continue
            if any(ir.constant_value(t) is not None for t in node.inputs):
                continue  # a bias Add, not a residual: the fusion wants two activations
            node.op = "Sum"
            rewritten += 1
        return PassResult(bool(rewritten), {"residual_adds": rewritten} if rewritten else {})
