"""INT4 weight-only: MatMul (+ bias Add) by a constant float32 weight [K, N] -> com.microsoft
MatMulNBits (bits=4), the weight quantized in blocks of `int4_block_size` (32, 64, 128) along K,
one float32 scale (and, asymmetric, one 4-bit zero point) per block and output column.

What it is for: models whose time goes to reading weights (transformer projections at small
batch) or whose size is the problem: 4 bits a weight, plus a scale per block, is 1/6 (block 32)
to 1/7.5 (block 128) of float32's bytes. The activation stays float: onnxruntime dequantizes the
weight block by block inside the kernel.
Blocks rather than one scale per column because a column of a trained projection holds a few
weights far larger than the rest; 16 levels for all of K would round most of it to zero.

Scales come from each block's min/max. With calibration data (and `int4_data_aware`, the default)
each block instead takes the clip ratio (1.0 down to 0.7 of its range) that minimizes the output
error it causes, sum_k E[x_k^2] (w_k - deq(q(w_k)))^2, E[x_k^2] measured on the MatMul's input:
where a few input channels carry large activations (transformers have them), the rows they read
matter more than the others, and min/max treats every row alike.

Options: int4_block_size (32), int4_symmetric (False: asymmetric, uint4 zero points packed two to a
byte; True: no zero points, onnxruntime's default 8), int4_data_aware (True), int4_accuracy_level
(MatMulNBits' accuracy_level; unset: float32 arithmetic), quantize_exclude (node names kept float).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pass_manager import PassContext, PassResult, register_pass
from graphopt.passes.quantize.matmul_weights import bias_fits, bias_follows, matmul, matmul_bias, weight_ok
from graphopt.patterns import Match, RewritePass, Rule

BITS = 4
DEFAULT_BLOCK_SIZE = 32
# Searched only with data: without activations to weigh rows by, a clipped range trades the
# largest weights' error for the small ones', and the largest are what the output depends on.
CLIP_RATIOS = tuple(np.linspace(1.0, 0.7, 16))
# Output columns quantized at a time: bounds the temporaries of the ratio search.
_COLUMNS_PER_STEP = 1024
# Where the pass leaves E[x^2] per activation for its rewrites, for the length of one run.
_MEAN_SQUARES = "int4_mean_squares"


def _weight_ok(m: Match) -> bool:
    rank = m.rank("x")
    # MatMulNBits reads A as [..., K]: a vector input has no row to multiply.
    return weight_ok(m) and rank is not None and rank >= 2


def bias_applies(m: Match) -> bool:
    return _weight_ok(m) and bias_fits(m)


def plain_applies(m: Match) -> bool:
    return _weight_ok(m) and not bias_follows(m)


@functools.cache
def _bias_input() -> bool:
    # Newer onnxruntimes take the bias in the kernel; an older one gets the Add kept after it.
    from graphopt.targets import capabilities as caps

    return any(any(i.name == "bias" for i in schema.inputs) for schema in caps.runtime_schemas().get(("com.microsoft", "MatMulNBits"), ()))


def _block_size(ctx: PassContext) -> int:
    block = ctx.options.get("int4_block_size", DEFAULT_BLOCK_SIZE)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 16 or block & (block - 1):
        raise GraphoptError(f"int4_block_size must be a power of two of at least 16 (32, 64, 128), not {block!r}")
    return int(block)


def _range(blocks: np.ndarray, ratio: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block, the block's range shrunk by `ratio`; scales as float32 holds them."""
    if symmetric:
        lo, hi = blocks.min(-1), blocks.max(-1)
        # -8..7: the negative side has one level more, so the larger magnitude need not be clipped.
        scale = np.maximum(-lo / 8, hi / 7) * ratio
        zero = np.full(scale.shape, 8.0)
    else:
        # The range holds 0, so the zero point is a level (0 exact, and within 0..15).
        lo, hi = np.minimum(blocks.min(-1), 0) * ratio, np.maximum(blocks.max(-1), 0) * ratio
        scale = (hi - lo) / 15
        zero = np.clip(np.round(-lo / np.where(scale > 0, scale, 1)), 0, 15)
    scale = np.where(scale > 0, scale, 1).astype(np.float32).astype(np.float64)
    return scale, zero


def _levels(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 15)


def _quantize(w: np.ndarray, block: int, symmetric: bool, mean_squares: np.ndarray | None):
    """(levels [N, n_blocks, block] in 0..15, scales [N, n_blocks], zero points [N, n_blocks]) of w [K, N]."""
    k, n = w.shape
    n_blocks = -(-k // block)
    # Padding rows are zeros (exact at every scale) that no activation reads: weight 0.
    padded = np.zeros((n_blocks * block, n), np.float64)
    padded[:k] = w
    weight = np.zeros(n_blocks * block)
    weight[:k] = 1.0 if mean_squares is None else mean_squares
    weight = weight.reshape(n_blocks, block)
    ratios = CLIP_RATIOS if mean_squares is not None else (1.0,)
    levels = np.empty((n, n_blocks, block), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    zeros = np.empty((n, n_blocks), np.uint8)
    for start in range(0, n, _COLUMNS_PER_STEP):
        blocks = padded[:, start : start + _COLUMNS_PER_STEP].T.reshape(-1, n_blocks, block)
        best = None
        for ratio in ratios:
            scale, zero = _range(blocks, ratio, symmetric)
            error = ((((_levels(blocks, scale, zero) - zero[..., None]) * scale[..., None] - blocks) ** 2) * weight).sum(-1)
            if best is None:
                best = [error, scale, zero]
                continue
            # Strictly better only: a tie keeps the larger range (ratio 1.0 first).
            better = error < best[0]
            best = [np.where(better, error, best[0]), np.where(better, scale, best[1]), np.where(better, zero, best[2])]
        _, scale, zero = best
        end = start + blocks.shape[0]
        levels[start:end] = _levels(blocks, scale, zero)
        scales[start:end], zeros[start:end] = scale, zero
    return levels, scales, zeros


def _pack(values: np.ndarray) -> np.ndarray:
    """4-bit values two to a byte along the last axis, the first in the low nibble (odd: a 0 appended)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _quantized(op, m: Match, bias):
    ctx = m.ctx
    w = m.value("w")
    k, n = w.shape
    block = _block_size(ctx)
    symmetric = bool(ctx.options.get("int4_symmetric", False))
    mean_squares = ctx.options.get(_MEAN_SQUARES, {}).get(m.x.name)
    levels, scales, zeros = _quantize(w, block, symmetric, mean_squares)
    inputs = [m.x, op.constant(_pack(levels), f"{m.w.name}_int4"), op.constant(scales, f"{m.w.name}_scales"),
              None if symmetric else op.constant(_pack(zeros), f"{m.w.name}_zero_points")]
    fused_bias = bias is not None and _bias_input()
    if fused_bias:
        inputs += [None, bias]  # g_idx (deprecated) omitted
    attrs = {"K": k, "N": n, "bits": BITS, "block_size": block}
    if ctx.options.get("int4_accuracy_level") is not None:
        attrs["accuracy_level"] = int(ctx.options["int4_accuracy_level"])
    y = op.MatMulNBits(*inputs, _domain="com.microsoft", **attrs)
    return op.Add(y, bias) if bias is not None and not fused_bias else y


def with_bias(op, m: Match):
    return _quantized(op, m, m.b)


def without_bias(op, m: Match):
    return _quantized(op, m, None)


def _activations(model: onnx.ModelProto, excluded) -> list[str]:
    """The inputs of the MatMuls the rules may take (a float activation times a float32 matrix), to
    measure E[x^2] of: one list for a run of the pass and for an accuracy search's candidates."""
    from graphopt import calibration

    activations = set(calibration.default_tensors(model))
    weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    return list(dict.fromkeys(
        n.input[0] for n in model.graph.node
        if n.op_type == "MatMul" and n.domain in ir.DEFAULT_DOMAINS and n.name not in excluded and len(n.input) == 2
        and n.input[1] in weights and n.input[0] in activations))


_EMITS = [("MatMulNBits", "com.microsoft")]


@register_pass
class QuantizeInt4(RewritePass):
    name = "quantize-int4"
    description = "INT4 weight-only: MatMul (+ bias) by a constant weight -> com.microsoft MatMulNBits, block-wise 4-bit weights"
    needs_shapes = True
    # The nodes an accuracy search may keep float, one at a time (graphopt/accuracy.py).
    layer_ops = ("MatMul",)
    rules = (
        Rule(matmul_bias, with_bias, bias_applies, name="with_bias", emits=_EMITS),
        Rule(matmul, without_bias, plain_applies, name="without_bias", emits=_EMITS),
    )

    def run(self, graph, ctx: PassContext) -> PassResult:
        _block_size(ctx)  # a bad option fails before anything changes
        data_aware = ctx.calibration_data is not None and ctx.options.get("int4_data_aware", True)
        # Measured on the main graph only: a body's values are no outputs onnxruntime can add.
        given = ctx.options.get(_MEAN_SQUARES)  # measured once by an accuracy search
        if data_aware and given is None and ctx.is_main_graph and all(ctx.can_emit(op, domain) for op, domain in _EMITS):
            from graphopt import export

            model = export.to_proto(ctx.model)
            names = _activations(model, ctx.options.get("quantize_exclude", ()))
            if names:
                ctx.options[_MEAN_SQUARES] = _mean_squares(model, ctx.calibration_data, names, ctx.options)
        try:
            return super().run(graph, ctx)
        finally:
            if given is None:
                ctx.options.pop(_MEAN_SQUARES, None)

    def measurements(self, fp32, data, options: dict, target: str | None = None) -> dict:
        """E[x^2] of every MatMul input the rules may take, once for all of an accuracy search's candidates."""
        if not options.get("int4_data_aware", True):
            return {}
        names = _activations(fp32, options.get("quantize_exclude", ()))
        return {_MEAN_SQUARES: _mean_squares(fp32, data, names, options)} if names else {}


def _mean_squares(fp32, data, names, options) -> dict:
    from graphopt import calibration

    measured = calibration.channel_statistics(fp32, data, names, threads=options.get("threads") or 2)
    return {name: m.mean_square for name, m in measured.items()}
