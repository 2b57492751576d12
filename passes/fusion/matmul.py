"""Fold what sits around a MatMul, Gemm or Conv into the op itself: biases, scales, transposes, pads.

fuse-gemm: a 2-D MatMul by a constant weight and a constant bias Add is a Gemm (what
onnx-simplifier writes, and what runtimes that consume standard ONNX, TVM and OpenVINO, map to
one dense kernel); a constant Add after a Gemm is merged into its C; a 2-D Transpose feeding a
Gemm becomes its transA/transB.

    Add(MatMul(x, W), b)          -> Gemm(x, W, b)                 x of rank 2, b broadcasts to [M, N]
    Add(Gemm(A, B, C), d)         -> Gemm(A, B, beta * C + d, beta=1)
    Gemm(Transpose(A), B, C)      -> Gemm(A, B, C, transA=1 - transA)     (and B, transB)

MatMuls of rank 3 and more stay (onnxruntime fuses those itself at session time, and Gemm is 2-D).
A Transpose of a constant weight before a MatMul is fold-constants' job, not this module's.

fold-scale-into-weights: a Mul or Div by a constant scalar or per-column vector after a MatMul
or Gemm with a constant weight goes into the weight (and the Gemm's bias); a Mul or Div of the
input by a scalar or a per-input-column (per-channel for a Conv) vector goes into the rows (input
channels) of the weight. The attention scale `/ sqrt(d)` after a Q projection and normalizations
folded into Linear layers are the real cases. A per-channel Mul after a Conv is fold-conv-affine's.

    MatMul(x, W) * s              -> MatMul(x, W * s)              s: scalar or [..., 1, N]
    Gemm(A, W, C) * s             -> Gemm(A, W * s, C * s)         (along transB's column axis)
    MatMul(x * s, W)              -> MatMul(x, s[:, None] * W)     s: scalar or [..., 1, K]
    Gemm(A * s, W, C)             -> Gemm(A, W scaled along K, C)
    Conv(x * s, W, b)             -> Conv(x, W * s, b)             s: scalar or per input channel

A Conv pads with zeros, and zero times s is zero, so the last is exact whatever the padding. The
products are taken in float64 and rounded once; a weight that another node also reads is left
alone (folding would copy it), as is a fold that would overflow or flush a weight to zero. A scale
of a Mul's result before a layer stays: that is the tail of an activation (GELU's * 0.5,
HardSwish's / 6), which fuse-activations and onnxruntime fuse only while it is there.

fold-pad-into-conv: an explicit constant Pad before a Conv, AveragePool or MaxPool becomes the op's
own pads (begin and end separately: tf "SAME" with stride 2 is asymmetric). paddle2onnx,
tf2onnx and torch's TorchScript exporter (F.pad, nn.ZeroPad2d) write such Pads; torch's dynamo
exporter already folds them itself.

    Conv(Pad(x, pads, 0), W, b)   -> Conv(x, W, b, pads=conv pads + spatial pads)

Legal when the Pad is mode "constant", pads are constant, non-negative and on the spatial axes
only, the op's auto_pad is NOTSET, and the padded value is what the op's implicit padding would
produce: 0 for a Conv and for an AveragePool with count_include_pad=1 (and ceil_mode=0); -inf
(the integer minimum for integer tensors) for a MaxPool with ceil_mode=0 and no dilation. A pool's
pads stay smaller than its kernel: onnxruntime refuses more, and so no MaxPool window is padding
alone (where onnxruntime's MaxPool answers the dtype's lowest value, not -inf).
"""

from __future__ import annotations

import numpy as np

from graphopt import ir
from graphopt.pass_manager import PassResult, register_pass
from graphopt.patterns import Match, RewritePass, Rule



def _float_constant(m: Match, name: str) -> np.ndarray | None:
    value = m.value(name)
    return value if value is not None and value.dtype in ir.FLOAT_DTYPES else None


def _output_shape(node) -> tuple | None:
    shape = node.outputs[0].shape
    return None if shape is None else tuple(shape)


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _checked(check=None):
    """`check` as a Rule check: the checks here return what the rewrite needs (a factor, which may
    be 0.0, or the pads) and None or False to refuse."""

    def applies(m: Match) -> bool:
        found = True if check is None else check(m)
        return found is not None and found is not False

    return applies


def _fits_2d(shape: tuple[int, ...], rows, columns) -> bool:
    """Whether a constant of `shape` broadcasts unidirectionally to [rows, columns] (Gemm's C):
    every dimension 1 or equal to the known size (a symbolic size only takes 1)."""
    if len(shape) > 2:
        return False
    padded = (1,) * (2 - len(shape)) + tuple(shape)
    return all(d == 1 or (isinstance(n, (int, np.integer)) and d == n) for d, n in zip(padded, (rows, columns)))


# ---------------------------------------------------------------------------------------------
# fuse-gemm


def matmul_add(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def matmul_add_applies(m: Match) -> bool:
    weight, bias = _float_constant(m, "w"), m.value("b")
    if m.rank("x") != 2 or weight is None or weight.ndim != 2 or bias is None or bias.dtype != weight.dtype:
        return False
    # C must broadcast to the product's [M, N]: a bias that would broadcast the product up (more
    # rows, another axis) is an Add that Gemm cannot express.
    return _fits_2d(bias.shape, m.shape("x")[0], weight.shape[1])


def gemm_from_matmul(op, m: Match):
    return op.Gemm(m.x, m.w, m.b)


def gemm_add(op, a, b, c, d):
    return op.Add(op.Gemm(a, b, op.optional(c)), d)


def gemm_add_applies(m: Match) -> bool:
    shift = _float_constant(m, "d")
    if shift is None or m.c is not None and (m.value("c") is None or m.value("c").dtype != shift.dtype):
        return False
    shape = _output_shape(m.node("Gemm"))
    return shape is not None and len(shape) == 2 and _fits_2d(shift.shape, *shape)


def bias_merged(op, m: Match):
    gemm = m.node("Gemm")
    shift = m.value("d")
    beta = float(gemm.attrs.get("beta", 1.0))
    # beta * C is what the Gemm adds; with beta 0 the C is not read at all.
    bias = np.zeros((), np.float64) if m.c is None or beta == 0.0 else beta * m.value("c").astype(np.float64)
    merged = (bias + shift.astype(np.float64)).astype(shift.dtype)
    if not _fits_2d(merged.shape, *_output_shape(gemm)):
        return None
    return op.Gemm(m.a, m.b, op.constant(merged, f"{(m.c or m.d).name}_merged"), **{**gemm.attrs, "beta": 1.0})


def _is_2d_swap(perm) -> bool:
    # No perm reverses the axes; Gemm's inputs are 2-D, so the Transpose's input is too.
    return perm is None or list(perm) == [1, 0]


def gemm_transposed(op, a, b, c):
    # One rule for both inputs: a rewrite's old root still reads its inputs until the pass ends, so
    # a second rule could not take the other Transpose in the same run.
    ta = op.either(op.Transpose(a, perm=_is_2d_swap, _name="transpose_a"), a)
    tb = op.either(op.Transpose(b, perm=_is_2d_swap, _name="transpose_b"), b)
    return op.Gemm(ta, tb, op.optional(c))


def _transposes(m: Match) -> list[str]:
    return [flag for flag, label in (("transA", "transpose_a"), ("transB", "transpose_b")) if label in m.nodes]


def transposes_folded(op, m: Match):
    attrs = dict(m.node("Gemm").attrs)
    for flag in _transposes(m):
        attrs[flag] = 1 - int(attrs.get(flag, 0))
    return op.Gemm(m.a, m.b, m.c, **attrs)


@register_pass
class FuseGemm(RewritePass):
    name = "fuse-gemm"
    description = "Turn a 2-D MatMul + constant bias Add into Gemm; merge Adds into a Gemm's C and Transposes into transA/transB"
    opt_level = 2
    needs_shapes = True
    rules = (
        Rule(matmul_add, gemm_from_matmul, _checked(matmul_add_applies), name="matmul_add", emits=("Gemm",)),
        Rule(gemm_add, bias_merged, _checked(gemm_add_applies), name="bias_add", emits=("Gemm",)),
        Rule(gemm_transposed, transposes_folded, _checked(lambda m: bool(_transposes(m))), name="transposes"),
    )

    def run(self, graph, ctx):
        # Gemm's C broadcasts unidirectionally from opset 7 on (before, only with broadcast=1).
        if ctx.opset < 7:
            return PassResult(False)
        return super().run(graph, ctx)


# ---------------------------------------------------------------------------------------------
# fold-scale-into-weights


def matmul_scaled(op, x, w, s):
    return op.Mul(op.MatMul(x, w), s)


def matmul_divided(op, x, w, s):
    return op.Div(op.MatMul(x, w), s)


def gemm_scaled(op, a, w, c, s):
    return op.Mul(op.Gemm(a, w, op.optional(c)), s)


def gemm_divided(op, a, w, c, s):
    return op.Div(op.Gemm(a, w, op.optional(c)), s)


def scaled_matmul(op, x, s, w):
    return op.MatMul(op.either(op.Mul(x, s), op.Div(x, s)), w)


def scaled_gemm(op, x, s, w, c):
    return op.Gemm(op.either(op.Mul(x, s), op.Div(x, s)), w, op.optional(c))


def scaled_conv(op, x, s, w, b):
    return op.Conv(op.either(op.Mul(x, s), op.Div(x, s)), w, op.optional(b))


def _factor(m: Match, rank, axis: int, size: int, operand: tuple | None = None) -> np.ndarray | None:
    """The constant `s` as float64 values along `axis` of a rank-`rank` operand (one value, or
    `size`), as the folded weight multiplies by it; None when `s` varies along any other axis, would
    broadcast the operand to a bigger shape, or divides by zero. A Div's s is inverted here.

    `operand`, the shape of what s scales when that is not the weight's product: s must not
    broadcast it along `axis` either (x of shape [..., 1] times s of shape [K])."""
    s, weight = _float_constant(m, "s"), m.value("w")
    if s is None or weight is None or s.dtype != weight.dtype or rank is None or s.ndim > rank:
        return None
    padded = (1,) * (rank - s.ndim) + s.shape
    axis %= rank
    if any(d != 1 for i, d in enumerate(padded) if i != axis) or padded[axis] not in (1, size):
        return None
    if operand is not None and padded[axis] != 1 and (len(operand) != rank or operand[axis] != padded[axis]):
        return None
    factor = s.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(factor)) or np.any(factor == 0):
        return None
    divided = any(n.op == "Div" for _, n in m.matched)
    return 1.0 / factor if divided else factor


def _weight_alone(m: Match) -> bool:
    """The weight is read by the matched node only: folding into a shared one would copy it."""
    return len(m.w.outputs) == 1


def _scaled_weight(op, m: Match, factor: np.ndarray, shape: tuple[int, ...]):
    """W * factor (reshaped to `shape`) as a new constant, or None when rounding it back to W's
    dtype overflows or flushes a non-zero weight to zero (the original would not have)."""
    weight = m.value("w")
    product = weight.astype(np.float64) * factor.reshape(shape)
    with np.errstate(over="ignore"):
        folded = product.astype(weight.dtype)
    if not np.all(np.isfinite(folded)) or np.any((folded == 0) & (product != 0)):
        return None
    return op.constant(folded, f"{m.w.name}_scaled")


def _scaled_weights_valid(m: Match) -> bool:
    return _float_constant(m, "w") is not None and m.value("w").ndim >= 2 and _weight_alone(m)


def _not_an_activation_tail(m: Match) -> bool:
    """A scale of a product is how activations end: GELU's (x * (1 + erf(x / sqrt2))) * 0.5,
    HardSwish's x * Clip(x + 3, 0, 6) / 6. Folding that constant into the next layer's weight
    would unmake the formula that fuse-activations and onnxruntime's session optimizer (Gelu,
    BiasGelu) recognize, so the scale of a Mul's result stays where it is."""
    producer = m.x.inputs[0] if m.x.inputs else None
    return producer is None or producer.op != "Mul"


def matmul_output_factor(m: Match) -> np.ndarray | None:
    if not _scaled_weights_valid(m):
        return None
    shape = _output_shape(m.node("MatMul"))
    return None if shape is None else _factor(m, len(shape), -1, m.value("w").shape[-1])


def fold_after_matmul(op, m: Match):
    factor = matmul_output_factor(m)
    weight = _scaled_weight(op, m, factor, (1,) * (m.value("w").ndim - 1) + (-1,))
    return None if weight is None else op.MatMul(m.x, weight)


def _gemm_columns(m: Match) -> tuple[int, int]:
    """(K, N) of a Gemm from its constant weight and transB."""
    rows, columns = m.value("w").shape
    return (columns, rows) if int(m.node("Gemm").attrs.get("transB", 0)) else (rows, columns)


def gemm_output_factor(m: Match) -> np.ndarray | None:
    if not _scaled_weights_valid(m) or m.value("w").ndim != 2:
        return None
    if m.c is not None and (m.value("c") is None or m.value("c").dtype != m.value("w").dtype):
        return None
    return _factor(m, 2, -1, _gemm_columns(m)[1])


def fold_after_gemm(op, m: Match):
    gemm = m.node("Gemm")
    factor = gemm_output_factor(m)
    # B' = W, or W^T with transB: its columns are W's columns, or W's rows.
    weight = _scaled_weight(op, m, factor, (-1, 1) if int(gemm.attrs.get("transB", 0)) else (1, -1))
    if weight is None:
        return None
    bias = m.c
    if m.c is not None and float(gemm.attrs.get("beta", 1.0)) != 0.0:  # with beta 0, C is not read
        value = m.value("c")
        scaled = (value.astype(np.float64).reshape((1,) * (2 - value.ndim) + value.shape) * factor.reshape(1, -1))
        bias = op.constant(scaled.astype(value.dtype), f"{m.c.name}_scaled")
    return op.Gemm(m.a, weight, bias, **gemm.attrs)


def matmul_input_factor(m: Match) -> np.ndarray | None:
    if not _scaled_weights_valid(m) or not _not_an_activation_tail(m):
        return None
    return _factor(m, m.rank("x"), -1, m.value("w").shape[-2], m.shape("x"))


def fold_before_matmul(op, m: Match):
    # x * s with s along x's last axis (K) scales the rows of W.
    weight = _scaled_weight(op, m, matmul_input_factor(m), (-1, 1))
    return None if weight is None else op.MatMul(m.x, weight)


def gemm_input_factor(m: Match) -> np.ndarray | None:
    if not _scaled_weights_valid(m) or not _not_an_activation_tail(m) or m.value("w").ndim != 2:
        return None
    # A' = A (K its columns), or A^T with transA (K its rows).
    axis = 0 if int(m.node("Gemm").attrs.get("transA", 0)) else 1
    return _factor(m, 2, axis, _gemm_columns(m)[0], m.shape("x"))


def fold_before_gemm(op, m: Match):
    gemm = m.node("Gemm")
    # B' rows are K: W's rows, or W's columns with transB.
    weight = _scaled_weight(op, m, gemm_input_factor(m), (1, -1) if int(gemm.attrs.get("transB", 0)) else (-1, 1))
    return None if weight is None else op.Gemm(m.x, weight, m.c, **gemm.attrs)


def conv_input_factor(m: Match) -> np.ndarray | None:
    if not _scaled_weights_valid(m) or not _not_an_activation_tail(m) or m.value("w").ndim < 3:
        return None
    weight = m.value("w")
    group = int(m.node("Conv").attrs.get("group", 1))
    return _factor(m, weight.ndim, 1, weight.shape[1] * group, m.shape("x"))


def fold_before_conv(op, m: Match):
    conv, weight = m.node("Conv"), m.value("w")
    factor = conv_input_factor(m)
    if factor.size > 1:
        # W[o, i] reads input channel g(o) * (C / group) + i, g(o) the group of output channel o.
        out_channels, per_group = weight.shape[0], weight.shape[1]
        group = int(conv.attrs.get("group", 1))
        first = (np.arange(out_channels) // (out_channels // group)) * per_group
        factor = factor[first[:, None] + np.arange(per_group)[None, :]]
    new_weight = _scaled_weight(op, m, factor, factor.shape + (1,) * (weight.ndim - factor.ndim))
    return None if new_weight is None else op.Conv(m.x, new_weight, m.b, **conv.attrs)


@register_pass
class FoldScaleIntoWeights(RewritePass):
    name = "fold-scale-into-weights"
    description = "Fold a constant Mul/Div after a MatMul/Gemm, or before a MatMul/Gemm/Conv, into the constant weight"
    opt_level = 2
    needs_shapes = True
    rules = (
        Rule([matmul_scaled, matmul_divided], fold_after_matmul, _checked(matmul_output_factor),
             name="after_matmul"),
        Rule([gemm_scaled, gemm_divided], fold_after_gemm, _checked(gemm_output_factor), name="after_gemm"),
        Rule(scaled_matmul, fold_before_matmul, _checked(matmul_input_factor), name="before_matmul"),
        Rule(scaled_gemm, fold_before_gemm, _checked(gemm_input_factor), name="before_gemm"),
        Rule(scaled_conv, fold_before_conv, _checked(conv_input_factor), name="before_conv"),
    )


# ---------------------------------------------------------------------------------------------
# fold-pad-into-conv


def pad_conv(op, x, pads, fill, axes, w, b):
    return op.Conv(op.Pad(x, op.optional(pads), op.optional(fill), op.optional(axes)), w, op.optional(b))


def pad_average_pool(op, x, pads, fill, axes):
    return op.AveragePool(op.Pad(x, op.optional(pads), op.optional(fill), op.optional(axes)))


def pad_max_pool(op, x, pads, fill, axes):
    return op.MaxPool(op.Pad(x, op.optional(pads), op.optional(fill), op.optional(axes)))


def _ints(m: Match, name: str) -> list[int] | None:
    value = m.value(name)
    if value is None or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


def _spatial_pads(m: Match, rank: int | None) -> list[int] | None:
    """The Pad's padding of the spatial axes in Conv's layout ([begins..., ends...]), or None when it
    is not a constant, non-negative, constant-mode padding of the spatial axes alone."""
    pad = m.node("Pad")
    if _text(pad.attrs.get("mode"), "constant") != "constant":
        return None
    pads = _ints(m, "pads") if m.pads is not None else (list(pad.attrs["pads"]) if "pads" in pad.attrs else None)
    if pads is None or len(pads) % 2:
        return None
    if rank is None:
        if m.axes is not None:
            return None
        rank = len(pads) // 2
    axes = list(range(rank)) if m.axes is None else _ints(m, "axes")
    if axes is None or len(pads) != 2 * len(axes) or any(not -rank <= a < rank for a in axes):
        return None
    axes = [a % rank for a in axes]
    if len(set(axes)) != len(axes):
        return None
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
    if rank < 3 or any(p < 0 for p in full) or full[0] or full[1] or full[rank] or full[rank + 1]:
        return None
    return full[2:rank] + full[rank + 2 :]


def _fill_value(m: Match):
    """The padded value as a Python number (0 when absent), or None when it is not a constant."""
    if m.fill is not None:
        value = m.value("fill")
        return None if value is None or value.size != 1 else value.reshape(-1)[0].item()
    return m.node("Pad").attrs.get("value", 0)  # opset < 11: an attribute, default 0


def _op_rank(m: Match) -> int | None:
    shape = m.static_shape("w") if "w" in m.values and m.w is not None else None
    return len(shape) if shape is not None else m.rank("x")


def _merged_pads(m: Match, op_type: str) -> list[int] | None:
    node = m.node(op_type)
    if _text(node.attrs.get("auto_pad"), "NOTSET") != "NOTSET":
        return None
    spatial = _spatial_pads(m, _op_rank(m))
    if spatial is None:
        return None
    own = list(node.attrs.get("pads") or [0] * len(spatial))
    return [a + b for a, b in zip(own, spatial)] if len(own) == len(spatial) else None


def conv_pads(m: Match) -> list[int] | None:
    return _merged_pads(m, "Conv") if _fill_value(m) == 0 else None


def _within_kernel(node, merged: list[int] | None) -> list[int] | None:
    """`merged` when every pad is smaller than the kernel along its axis: onnxruntime refuses a
    pool with more ("Pad should be smaller than kernel"), and a MaxPool window of padding alone
    would be -inf before and onnxruntime's lowest float after."""
    kernel = list(node.attrs.get("kernel_shape") or ())
    if merged is None or len(kernel) * 2 != len(merged):
        return None
    return merged if all(p < k for p, k in zip(merged, kernel + kernel)) else None


def average_pool_pads(m: Match) -> list[int] | None:
    node = m.node("AveragePool")
    # The explicit zeros count in the average, so the implicit ones must (and no ceil-mode window
    # may reach past the padding, where the two would clip differently).
    if int(node.attrs.get("count_include_pad", 0)) != 1 or int(node.attrs.get("ceil_mode", 0)) or _fill_value(m) != 0:
        return None
    return _within_kernel(node, _merged_pads(m, "AveragePool"))


def max_pool_pads(m: Match) -> list[int] | None:
    node = m.node("MaxPool")
    dtype = m.dtype("x")
    if dtype is None or int(node.attrs.get("ceil_mode", 0)):
        return None
    lowest = -np.inf if dtype.kind == "f" else (np.iinfo(dtype).min if dtype.kind in "iu" else None)
    fill = _fill_value(m)
    if lowest is None or fill is None or fill != lowest:
        return None
    if any(d != 1 for d in node.attrs.get("dilations") or ()):
        return None
    return _within_kernel(node, _merged_pads(m, "MaxPool"))


def _padded(op_type: str, pads_of):
    def rewrite(op, m: Match):
        node = m.node(op_type)
        attrs = {**node.attrs, "pads": pads_of(m)}
        inputs = [m.x] + ([m.w, m.b] if op_type == "Conv" else [])
        return getattr(op, op_type)(*inputs, **attrs)

    return rewrite


@register_pass
class FoldPadIntoConv(RewritePass):
    name = "fold-pad-into-conv"
    description = "Fold a constant zero Pad of the spatial axes into the following Conv's (or pool's) pads"
    opt_level = 2
    needs_shapes = True
    rules = (
        Rule(pad_conv, _padded("Conv", conv_pads), _checked(conv_pads), name="conv"),
        Rule(pad_average_pool, _padded("AveragePool", average_pool_pads), _checked(average_pool_pads),
             name="average_pool"),
        Rule(pad_max_pool, _padded("MaxPool", max_pool_pads), _checked(max_pool_pads), name="max_pool"),
    )
