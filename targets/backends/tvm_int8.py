"""Integer compute for graphopt's QDQ models under TVM.

TVM's Relax ONNX frontend imports QDQ as it reads: dequantize to float32, a float32 conv2d or
matmul, quantize again; the integers only travel between layers and the arithmetic stays float
(../shared/notes/tvm-0.27.md). This rewrite finds, in the imported Relax module,

    conv2d(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0))     (W_q a constant)
    matmul(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0))

with per-tensor activation parameters and symmetric (per-tensor or per-output-channel) weights,
and computes it in integers:

    acc = conv2d(pad(x_q, value=z_x), W_q, out_dtype=int32)       # u8 x s8 -> s32
    y   = float32(acc - z_x * sum(W_q over the reduced axes)) * (s_x * s_w)

The activation's zero point is folded into a per-channel constant, which holds only where every
reduced element is a real input: a padded convolution is padded explicitly with z_x (the
quantized zero) first, so the constant is exact at the borders too. The requantize that follows
(graphopt's QuantizeLinear after the layer, or the float ops up to it) is left to TVM's fusion.
With a u8 activation and s8 weights the accumulation is the shape of x86's VNNI `vpdpbusd`
(MetaSchedule's `dot_16x4_vnni`, chosen from the target's +avx512vnni) and arm64's sdot/udot;
anything else (an activation with per-channel parameters, asymmetric weights, float16 scales)
stays as the frontend imported it.

Written here, not taken from TVM: its QNN dialect, which did this for Relay, has no Relax
counterpart in 0.27, and the MatMulInteger converter widens both operands to int32 before the
matmul (no 8-bit arithmetic left to vectorize).
"""

from __future__ import annotations

import numpy as np


def lower_qdq(mod):
    """The module with every matched dequantize -> conv2d/matmul pair computed in integers."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    x_q, w_q = wildcard(), is_const()
    x_scale, x_zero, w_scale, w_zero = is_const(), is_const(), is_const(), is_const()
    dq_x = is_op("relax.dequantize")(x_q, x_scale, x_zero)
    dq_w = is_op("relax.dequantize")(w_q, w_scale, w_zero)
    # Gemm(transB=1) imports as matmul(x, permute_dims(W)).
    dq_w_transposed = is_op("relax.permute_dims")(dq_w)
    pattern = is_op("relax.nn.conv2d")(dq_x, dq_w) | is_op("relax.matmul")(dq_x, dq_w | dq_w_transposed)

    def rewrite(expr, matches):
        operands = _integer_operands(matches[x_q], matches[w_q], matches[x_scale], matches[x_zero], matches[w_scale],
                                     matches[w_zero], matches[dq_x], matches[dq_w], expr)
        if operands is None:
            return expr
        if dq_w_transposed in matches:
            operands = _transposed(operands, matches[dq_w_transposed])
            if operands is None:
                return expr
        new = (_integer_conv2d if expr.op.name == "relax.nn.conv2d" else _integer_matmul)(expr, matches[x_q], *operands)
        return expr if new is None else new

    out = relax.transform.Normalize()(mod)
    for name, func in list(out.functions.items()):
        if isinstance(func, relax.Function):
            out[name] = rewrite_call(pattern, rewrite, func)
    return out


def integer_layers(mod) -> int:
    """How many conv2d/matmul calls of the module compute on 8-bit integers."""
    import tvm
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in ("relax.nn.conv2d", "relax.matmul"):
            if str(expr.args[0].ty.dtype) in ("uint8", "int8") and str(expr.ty.dtype) == "int32":
                found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return len(found)



def _array(const) -> np.ndarray:
    return const.value.numpy()


def _integer_operands(x_q, w_q, x_scale, x_zero, w_scale, w_zero, dq_x, dq_w, call):
    """(weights int8, activation zero point, activation scale, weight scales, weight axis) where
    the pair is one this rewrite computes exactly; None otherwise."""
    x_dtype = str(x_q.ty.dtype)
    if x_dtype not in ("uint8", "int8") or str(w_q.value.dtype) != "int8":
        return None
    if str(x_scale.value.dtype) != "float32" or str(w_scale.value.dtype) != "float32" or str(call.ty.dtype) != "float32":
        return None
    sx, zx, sw, zw = _array(x_scale), _array(x_zero), _array(w_scale), _array(w_zero)
    if sx.size != 1 or zx.size != 1 or np.any(zw != 0):
        return None  # per-channel activations, asymmetric weights: the float path
    weights = _array(w_q)
    axis = int(dq_w.attrs.axis) % weights.ndim if sw.size > 1 else None
    return weights, int(zx.reshape(())), float(sx.reshape(())), sw.astype(np.float32).reshape(-1), axis


def _transposed(operands, permute):
    weights, zero, scale, w_scales, w_axis = operands
    if weights.ndim != 2:
        return None
    axes = [int(a) for a in permute.attrs.axes] if permute.attrs.axes is not None else [1, 0]
    if axes != [1, 0]:
        return weights, zero, scale, w_scales, w_axis
    return np.ascontiguousarray(weights.T), zero, scale, w_scales, None if w_axis is None else 1 - w_axis


def _integer_conv2d(call, x_q, weights, zero, scale, w_scales, w_axis):
    from tvm import relax

    attrs = call.attrs
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW":
        return None
    if w_axis not in (None, 0):
        return None  # per-channel weights along an axis that is not the output channels
    groups = int(attrs.groups)
    padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
    x = x_q
    if zero != 0 and any(padding):
        # The float conv pads with 0.0, which is z_x in the quantized domain.
        top, left, bottom, right = padding
        x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zero))
        padding = [0, 0, 0, 0]
    acc = relax.op.nn.conv2d(x, relax.const(weights, "int8"), strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                             groups=groups, data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")
    out_channels = weights.shape[0]
    if zero != 0:
        # Each output channel reduces its group's input channels and the kernel window.
        correction = zero * weights.astype(np.int64).sum(axis=(1, 2, 3))
        acc = relax.op.subtract(acc, relax.const(correction.astype(np.int32).reshape(1, out_channels, 1, 1), "int32"))
    scales = np.broadcast_to(np.float32(scale) * w_scales, (out_channels,)).astype(np.float32)
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scales.reshape(1, out_channels, 1, 1), "float32"))


def _integer_matmul(call, x_q, weights, zero, scale, w_scales, w_axis):
    from tvm import relax

    if weights.ndim != 2:
        return None  # batched constant weights: rare, left float
    if w_axis not in (None, 1):
        return None  # per-channel weights must scale the output columns
    acc = relax.op.matmul(x_q, relax.const(weights, "int8"), out_dtype="int32")
    columns = weights.shape[1]
    if zero != 0:
        correction = zero * weights.astype(np.int64).sum(axis=0)
        acc = relax.op.subtract(acc, relax.const(correction.astype(np.int32), "int32"))
    scales = np.broadcast_to(np.float32(scale) * w_scales, (columns,)).astype(np.float32)
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scales, "float32"))
