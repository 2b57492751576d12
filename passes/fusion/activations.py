"""Fuse decomposed activations (GELU, HardSwish, HardSigmoid, SiLU, Mish) into one node.

Two passes:

* `fuse-activations` (-O2) emits standard ONNX ops only, so its output stays portable:

  - GELU, erf form ``x * 0.5 * (1 + Erf(x / sqrt2))`` in every order exporters write it
    (torch legacy ``(x * (1 + erf)) * 0.5``, torch dynamo ``x * (0.5 * (1 + erf))``,
    ``(0.5 * x) * (1 + erf)``; the scaling as Div by sqrt(2) or Mul by 1/sqrt(2)) -> ``Gelu``
    (opset 20);
  - GELU, tanh form ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (x^3 as
    ``Pow(x, 3)`` or ``x * x * x``) -> ``Gelu(approximate="tanh")`` (opset 20);
  - HardSwish ``x * HardSigmoid(x, alpha=1/6, beta=0.5)`` and ``x * Clip(x + 3, 0, 6) / 6``
    (Div by 6 or Mul by 1/6; Clip's bounds as inputs or, before opset 11, attributes; torch's
    relu6 is that Clip) -> ``HardSwish`` (opset 14), or ``x * HardSigmoid(x)`` below opset 14;
  - HardSigmoid ``Clip(x + 3, 0, 6) / 6`` -> ``HardSigmoid(alpha=1/6, beta=0.5)`` (opset 6);
  - SiLU ``x * Sigmoid(x)`` (and ``x * Sigmoid(alpha * x)``) -> ``Swish`` (opset 24), but only
    for a target whose runtime does not fuse it into com.microsoft QuickGelu itself:
    onnxruntime's session optimizer fuses both forms into QuickGelu, and inlines a standard Swish
    into Cast/Mul/Sigmoid/Mul, so a Swish would block that fusion;
  - Mish ``x * Tanh(Softplus(x))`` -> ``Mish`` (opset 18).

* `fuse-activations-contrib` (-O3) emits onnxruntime's com.microsoft ops, where the target has the
  kernel (`emits=`) and the model's opset has no standard Gelu (below 20; from 20 on the standard
  pass covers both GELU forms):

  - erf GELU -> com.microsoft ``Gelu`` (onnxruntime fuses the torch-legacy orders itself, but not
    the dynamo order ``x * (0.5 * (1 + erf))`` nor the Mul-by-1/sqrt(2) scaling);
  - tanh GELU -> com.microsoft ``FastGelu`` (onnxruntime 1.32's session optimizer fuses none of
    these forms on CPU).

  Not rewritten, because onnxruntime's session optimizer already does it on the original graph:
  Add(bias) + Gelu -> BiasGelu (also after a standard Gelu-20; Add + Gelu(tanh) becomes FastGelu
  with a bias), and ``x * Sigmoid(alpha * x)`` / ``x * Sigmoid(x)`` -> QuickGelu.

Conditions (the pattern is left alone when any fails): x is float32 or float16 (onnxruntime's CPU
kernels of Erf, Gelu, HardSigmoid, Softplus take float only; float16 runs through the casts it
inserts, float64 would not run at all); every constant is a one-element tensor of x's dtype (that
does not broadcast x to a higher rank) within a relative machine epsilon of x's dtype of the exact
value; the same x feeds every place of the formula.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.pass_manager import register_pass
from graphopt.patterns import Match, RewritePass, Rule

_FLOAT_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32)})
_MS = "com.microsoft"

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_COEFF = 0.044715


# ---------------------------------------------------------------------------------------------
# Patterns


def gelu_erf(op, x, scale, one, half):
    scaled = op.either(op.Div(x, scale, _name="scale"), op.Mul(x, scale, _name="scale"))
    e = op.Add(op.Erf(scaled), one)
    # (x * e) * 0.5 (torch legacy), (x * 0.5) * e or (0.5 * x) * e, x * (0.5 * e) (torch dynamo)
    return op.either(op.Mul(op.Mul(x, e), half), op.Mul(op.Mul(x, half), e), op.Mul(x, op.Mul(half, e)))


def gelu_tanh(op, x, three, coeff, k, one, half):
    cube = op.either(op.Pow(x, three), op.Mul(x, op.Mul(x, x)))
    t = op.Add(op.Tanh(op.Mul(k, op.Add(x, op.Mul(coeff, cube)))), one)
    return op.either(op.Mul(op.Mul(x, t), half), op.Mul(op.Mul(x, half), t), op.Mul(x, op.Mul(half, t)))


def _clip_0_6(op, x, three, zero, six):
    """Clip(x + 3, 0, 6): bounds as inputs (opset >= 11) or as attributes (opsets 6-10)."""
    shifted = op.Add(x, three)
    return op.either(
        op.Clip(shifted, zero, six),
        op.Clip(shifted, min=lambda v: v is not None and v == 0.0, max=lambda v: v is not None and _near(v, 6.0, np.float32)),
    )


def hard_sigmoid_form(op, x, three, zero, six, by):
    # `by`: Div by 6 or Mul by 1/6
    clip = _clip_0_6(op, x, three, zero, six)
    return op.either(op.Div(clip, by, _name="scale"), op.Mul(clip, by, _name="scale"))


def _attr_near(exact: float):
    # An omitted attribute arrives as its schema default (HardSigmoid's alpha 0.2, beta 0.5).
    return lambda v: v is not None and _near(v, exact, np.float32)


def hard_swish_form(op, x, three, zero, six, by):
    hard_sigmoid = op.HardSigmoid(x, alpha=_attr_near(1.0 / 6.0), beta=_attr_near(0.5))
    # x * (Clip(x + 3, 0, 6) / 6) becomes x * HardSigmoid(x) first (hard_sigmoid), then matches here.
    product = op.Mul(x, _clip_0_6(op, x, three, zero, six))
    return op.either(op.Mul(x, hard_sigmoid), op.Div(product, by, _name="scale"), op.Mul(product, by, _name="scale"))


def silu(op, x, alpha):
    return op.Mul(x, op.Sigmoid(op.optional(op.Mul(x, alpha))))


def mish(op, x):
    return op.Mul(x, op.Tanh(op.Softplus(x)))


# ---------------------------------------------------------------------------------------------
# Checks


def _near(value: float, exact: float, dtype) -> bool:
    """Within a relative machine epsilon of `dtype` of the exact value, about one rounding (0 must be 0)."""
    if exact == 0.0:
        return value == 0.0
    return abs(value - exact) <= np.finfo(dtype).eps * abs(exact)


def _float_x(m: Match) -> bool:
    return m.dtype("x") in _FLOAT_DTYPES


def _constant(m: Match, name: str, exact: float, *, same_dtype: bool = True) -> bool:
    """`name` is a one-element constant near `exact`, of x's dtype, that does not raise x's rank."""
    value = m.value(name)
    if value is None or value.size != 1 or value.dtype.kind not in "fiu":
        return False
    if same_dtype and value.dtype != m.dtype("x"):
        return False
    if value.ndim > 0 and (m.rank("x") is None or value.ndim > m.rank("x")):
        return False
    dtype = value.dtype if value.dtype.kind == "f" else np.float32
    return _near(float(value.reshape(-1)[0]), exact, dtype)


def _scale_ok(m: Match, name: str, divisor: float) -> bool:
    """The node labelled "scale" divides by constant `name` = `divisor` (Div) or multiplies by its inverse (Mul)."""
    by = divisor if m.node("scale").op == "Div" else 1.0 / divisor
    return _constant(m, name, by)


def gelu_erf_applies(m: Match) -> bool:
    return _float_x(m) and _scale_ok(m, "scale", SQRT2) and _constant(m, "one", 1.0) and _constant(m, "half", 0.5)


def gelu_tanh_applies(m: Match) -> bool:
    if not _float_x(m):
        return False
    if m.three is not None and not _constant(m, "three", 3.0, same_dtype=False):
        return False
    return all(_constant(m, n, v) for n, v in (("coeff", GELU_TANH_COEFF), ("k", SQRT_2_OVER_PI), ("one", 1.0), ("half", 0.5)))


def _clip_ok(m: Match) -> bool:
    """Clip(x + 3, 0, 6) with the bounds as inputs, or as attributes (checked in the pattern)."""
    if not _constant(m, "three", 3.0):
        return False
    clip = m.node("Clip")
    if len(clip.inputs) == 1:
        return True
    return _constant(m, "zero", 0.0) and _constant(m, "six", 6.0)


def hard_sigmoid_applies(m: Match) -> bool:
    return _float_x(m) and _clip_ok(m) and _scale_ok(m, "by", 6.0)


def hard_swish_applies(m: Match) -> bool:
    if not _float_x(m):
        return False
    if "HardSigmoid" in m.nodes:
        return True
    return _clip_ok(m) and _scale_ok(m, "by", 6.0)


def silu_applies(m: Match) -> bool:
    if not _float_x(m):
        return False
    if m.alpha is None:
        return True
    alpha = m.scalar("alpha")
    # Any positive finite alpha: Swish's attribute takes it as it is.
    return alpha is not None and math.isfinite(alpha) and alpha > 0 and _constant(m, "alpha", alpha)


def mish_applies(m: Match) -> bool:
    return _float_x(m)


# ---------------------------------------------------------------------------------------------
# Rewrites


def standard_gelu(op, m: Match):
    return op.Gelu(m.x)


def standard_gelu_tanh(op, m: Match):
    return op.Gelu(m.x, approximate="tanh")


def hard_sigmoid(op, m: Match):
    return op.HardSigmoid(m.x, alpha=1.0 / 6.0, beta=0.5)


def hard_swish(op, m: Match):
    if op.can_emit("HardSwish"):
        return op.HardSwish(m.x)
    if "HardSigmoid" in m.nodes:
        return None  # already x * HardSigmoid(x): nothing shorter below opset 14
    return op.Mul(m.x, op.HardSigmoid(m.x, alpha=1.0 / 6.0, beta=0.5))


def swish(op, m: Match):
    # onnxruntime fuses x * Sigmoid(alpha * x) into QuickGelu at session time, and inlines Swish
    # (it has no Swish kernel) into Cast, Mul, Sigmoid, Mul, which it does not fuse: leave it.
    if op.can_emit("QuickGelu", _MS):
        return None
    alpha = 1.0 if m.alpha is None else float(m.scalar("alpha"))
    return op.Swish(m.x) if alpha == 1.0 else op.Swish(m.x, alpha=alpha)


def standard_mish(op, m: Match):
    return op.Mish(m.x)


def contrib_gelu(op, m: Match):
    if op.can_emit("Gelu"):
        return None  # standard Gelu at this opset: fuse-activations' job
    return op.Gelu(m.x, _domain=_MS)


def contrib_fast_gelu(op, m: Match):
    if op.can_emit("Gelu"):
        return None
    return op.FastGelu(m.x, _domain=_MS)


@register_pass
class FuseActivations(RewritePass):
    name = "fuse-activations"
    description = "Replace decomposed GELU, HardSwish, HardSigmoid, SiLU and Mish by the standard ONNX op"
    opt_level = 2
    needs_shapes = True
    rules = (
        Rule(gelu_erf, standard_gelu, gelu_erf_applies, name="gelu", emits=("Gelu",)),
        Rule(gelu_tanh, standard_gelu_tanh, gelu_tanh_applies, name="gelu_tanh", emits=("Gelu",)),
        Rule(hard_sigmoid_form, hard_sigmoid, hard_sigmoid_applies, name="hard_sigmoid", emits=("HardSigmoid",)),
        Rule(hard_swish_form, hard_swish, hard_swish_applies, name="hard_swish", emits=("HardSigmoid",)),
        Rule(silu, swish, silu_applies, name="swish", emits=("Swish",)),
        Rule(mish, standard_mish, mish_applies, name="mish", emits=("Mish",)),
    )


@register_pass
class FuseActivationsContrib(RewritePass):
    name = "fuse-activations-contrib"
    description = "Replace decomposed GELU by onnxruntime's com.microsoft Gelu / FastGelu below opset 20"
    opt_level = 3
    needs_shapes = True
    rules = (
        Rule(gelu_erf, contrib_gelu, gelu_erf_applies, name="gelu", emits=(("Gelu", _MS),)),
        Rule(gelu_tanh, contrib_fast_gelu, gelu_tanh_applies, name="fast_gelu", emits=(("FastGelu", _MS),)),
    )
