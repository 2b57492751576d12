"""SmoothQuant-style smoothing before INT8: move the range of outlier activation channels into
the weights that read them, X W = (X / s) (diag(s) W), so that one per-tensor activation scale
fits every channel.

Why: transformer activations (LayerNorm outputs, the FFN's GELU output) carry a few channels 10-100x
larger than the rest; a per-tensor int8 scale (static Q/DQ, or DynamicQuantizeMatMul's per-call
range) set by those channels leaves the others a handful of levels. Weights are quantized per output
column, so scaling their rows by s costs them less. s_j = max|x_j|^alpha / max|w_j|^(1 - alpha).

Which alpha, and whether at all, is measured per activation, not assumed: on rows of the activation
sampled from the calibration data, the MatMuls' output error with uint8 per-tensor activations and
int8 per-column weights, for no smoothing and alpha 0.25, 0.5, 0.75 (`options["smooth_alphas"]`).
On all-MiniLM-L6 the LayerNorm outputs gain from smoothing and the GELU outputs lose: a fixed
alpha made the model worse there, the measured choice better.

Where 1/s goes: into the LayerNormalization's scale and bias when the normalized tensor is read only
by the smoothed MatMuls (free); otherwise into one Mul before them (an elementwise pass over the
activation, shared by every MatMul that reads it), taken only where it cuts the error by
`MIN_GAIN_FOR_MUL`.

Exact in float arithmetic (the rewrite changes rounding only), so a model smoothed and not
quantized computes what it did. Needs calibration data; without it, does nothing. MatMuls named in
`options["quantize_exclude"]` are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass

DEFAULT_ALPHAS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
# A Mul costs a pass over the activation: taken only when the error falls below this share.
MIN_GAIN_FOR_MUL = 0.8
# Rows of each activation kept to measure errors on (bounded memory: rows x channels floats).
SAMPLED_ROWS = 256
# Keeps s finite and the smoothed weights representable when a channel is (nearly) always zero.
SCALE_LIMITS = (1e-4, 1e4)


def _weight(node: gs.Node) -> np.ndarray | None:
    if node.op != "MatMul" or (node.domain and node.domain not in ir.DEFAULT_DOMAINS) or len(node.inputs) != 2:
        return None
    w = ir.constant_value(node.inputs[1])
    return w if w is not None and w.dtype == np.float32 and w.ndim == 2 else None


def _groups(graph: gs.Graph, excluded) -> list[tuple[gs.Variable, list[gs.Node]]]:
    """Each float activation with the MatMuls by a constant weight that read it as their input A."""
    outputs = {id(t) for t in graph.outputs}
    found = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Variable) or t.dtype is None or np.dtype(t.dtype) != np.float32 or id(t) in outputs:
            continue
        readers = [n for n in t.outputs if n.inputs and n.inputs[0] is t and _weight(n) is not None and n.name not in excluded]
        if readers and len({_weight(n).shape[0] for n in readers}) == 1:
            found.append((t, readers))
    return found


def _folds_into_layernorm(t: gs.Variable, readers: list[gs.Node]) -> gs.Node | None:
    """The LayerNormalization producing `t`, if 1/s can go into its scale and bias."""
    producer = ir.producer(t)
    if producer is None or producer.op != "LayerNormalization" or (producer.domain and producer.domain not in ir.DEFAULT_DOMAINS):
        return None
    if producer.outputs[0] is not t or len(t.outputs) != len(readers) or int(producer.attrs.get("axis", -1)) not in (-1, len(t.shape or []) - 1):
        return None
    scale = ir.constant_value(producer.inputs[1]) if len(producer.inputs) > 1 else None
    bias = ir.constant_value(producer.inputs[2]) if len(producer.inputs) > 2 and not producer.inputs[2].is_empty() else None
    k = _weight(readers[0]).shape[0]
    if scale is None or scale.shape != (k,) or (bias is not None and bias.shape != (k,)):
        return None
    if len(producer.inputs[1].outputs) != 1 or (bias is not None and len(producer.inputs[2].outputs) != 1):
        return None  # a scale shared with another node must keep its value there
    return producer


def _fake_quantized_activation(x: np.ndarray) -> np.ndarray:
    """uint8, asymmetric, one scale for the tensor: what DynamicQuantizeMatMul and x86 Q/DQ do."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _output_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> float:
    """Relative squared error of x @ w for every w, quantized after smoothing by s."""
    from graphopt.calibration import weight_int8

    xq = _fake_quantized_activation(x / s)
    error = reference = 0.0
    for w in weights:
        q, scale = weight_int8(w * s[:, None], axis=1)
        y = x @ w
        error += float(np.sum(np.square(y - xq @ (q.astype(np.float32) * scale))))
        reference += float(np.sum(np.square(y)))
    return error / reference if reference else 0.0


def _best_scales(stats, weights: list[np.ndarray], alphas, needs_mul: bool) -> np.ndarray | None:
    """The smoothing scales with the least measured error, or None where no smoothing beats none."""
    x = stats.rows.astype(np.float32)
    a = stats.abs_max
    w = np.max([np.abs(v).max(axis=1) for v in weights], axis=0)
    baseline = _output_error(x, weights, np.ones(a.shape, np.float32))
    best, best_error = None, baseline * (MIN_GAIN_FOR_MUL if needs_mul else 1.0)
    for alpha in alphas:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = np.where((a > 0) & (w > 0), a**alpha / w ** (1 - alpha), 1.0)
        s = np.clip(s, *SCALE_LIMITS).astype(np.float32)
        error = _output_error(x, weights, s)
        if error < best_error:
            best, best_error = s, error
    return best


@register_pass
class SmoothActivations(Pass):
    name = "smooth-activations"
    description = "SmoothQuant-style: divide outlier activation channels by s, multiply the MatMul weight rows reading them by s (before INT8)"
    subgraphs = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        data = ctx.calibration_data
        if data is None:
            return PassResult(False)
        groups = _groups(graph, ctx.options.get("quantize_exclude", ()))
        if not groups:
            return PassResult(False)
        from graphopt import calibration, export

        measured = calibration.channel_statistics(export.to_proto(ctx.model), data, [t.name for t, _ in groups],
                                                  threads=ctx.options.get("threads") or 2, rows=SAMPLED_ROWS)
        alphas = tuple(ctx.options.get("smooth_alphas", DEFAULT_ALPHAS))
        folded = multiplied = 0
        for t, readers in groups:
            stats = measured.get(t.name)
            if stats is None or stats.rows is None or not len(stats.rows):
                continue
            norm = _folds_into_layernorm(t, readers)
            weights = [_weight(n) for n in readers]
            s = _best_scales(stats, weights, alphas, needs_mul=norm is None)
            if s is None:
                continue
            for node, value in zip(readers, weights):
                node.inputs[1] = ir.make_constant(ctx.fresh_name(f"{node.inputs[1].name}_smoothed"), (value * s[:, None]).astype(np.float32))
            if norm is not None:
                norm.inputs[1] = ir.make_constant(ctx.fresh_name(f"{norm.inputs[1].name}_smoothed"),
                                                  (ir.constant_value(norm.inputs[1]) / s).astype(np.float32))
                if len(norm.inputs) > 2 and not norm.inputs[2].is_empty():
                    norm.inputs[2] = ir.make_constant(ctx.fresh_name(f"{norm.inputs[2].name}_smoothed"),
                                                      (ir.constant_value(norm.inputs[2]) / s).astype(np.float32))
                folded += 1
                continue
            smoothed = gs.Variable(ctx.fresh_name(f"{t.name}_smoothed"), dtype=t.dtype, shape=t.shape)
            graph.nodes.append(gs.Node("Mul", name=ctx.fresh_name(f"{t.name}_smooth"),
                                       inputs=[t, ir.make_constant(ctx.fresh_name(f"{t.name}_inverse_smoothing"), (1.0 / s).astype(np.float32))],
                                       outputs=[smoothed]))
            for node in readers:
                node.inputs[0] = smoothed
            multiplied += 1
        if folded or multiplied:
            ir.toposort(graph)
        return PassResult(bool(folded or multiplied), {"into_layernorm": folded, "with_mul": multiplied})
