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

With `options["smooth_splits"]`, the few channels that still set the range after smoothing can also
be split off: computed in float (a Gather of those channels, a small MatMul by their weight rows,
an Add after the quantized product), where that measures another 30% less error.

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
# Splitting channels off costs a Gather, a small MatMul and an Add: taken over the best smoothing
# only when it cuts the error to this share again.
MIN_GAIN_FOR_SPLIT = 0.7
# Opt-in (`options["smooth_splits"] = (4, 8, 16)`): on all-MiniLM-L6 (int8-dynamic, embedding min
# cosine over 50 inputs) splits took 0.9921 to 0.998-0.999, but at 0.55x fp32 instead of 0.51x
# (onnxruntime's quantize_dynamic: 0.49x); choosing the fewest that meet a budget is the search's
# job, not yet done.
DEFAULT_SPLITS = ()
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


def _output_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, outliers: np.ndarray) -> float:
    """Relative squared error of x @ w for every w, quantized after smoothing by s, with the
    `outliers` channels computed in float beside the quantized product."""
    from graphopt.calibration import weight_int8

    xs = x / s
    xs[:, outliers] = 0.0
    xq = _fake_quantized_activation(xs)
    error = reference = 0.0
    for w in weights:
        ws = w * s[:, None]
        ws[outliers] = 0.0
        q, scale = weight_int8(ws, axis=1)
        y = x @ w
        approx = xq @ (q.astype(np.float32) * scale) + x[:, outliers] @ w[outliers]
        error += float(np.sum(np.square(y - approx)))
        reference += float(np.sum(np.square(y)))
    return error / reference if reference else 0.0


def _best_scales(stats, weights: list[np.ndarray], alphas, needs_mul: bool, splits) -> tuple[np.ndarray, np.ndarray] | None:
    """(smoothing scales, channels to compute in float) with the least measured error, or None
    where nothing beats plain quantization by enough to pay for its nodes."""
    x = stats.rows.astype(np.float32)
    a = stats.abs_max
    w = np.max([np.abs(v).max(axis=1) for v in weights], axis=0)
    none = np.zeros(0, np.int64)
    baseline = _output_error(x, weights, np.ones(a.shape, np.float32), none)
    best, best_error = None, baseline * (MIN_GAIN_FOR_MUL if needs_mul else 1.0)
    for alpha in (None, *alphas):
        if alpha is None:
            s = np.ones(a.shape, np.float32)
        else:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                s = np.where((a > 0) & (w > 0), a**alpha / w ** (1 - alpha), 1.0)
            s = np.clip(s, *SCALE_LIMITS).astype(np.float32)
        # The channels that still set the per-tensor range after smoothing, largest first.
        order = np.argsort(-(a / s), kind="stable")
        for k in (0, *(splits if needs_mul else ())):
            if alpha is None and k == 0:
                continue
            outliers = np.sort(order[:k])
            error = _output_error(x, weights, s, outliers)
            if error < best_error * (1.0 if k == 0 else MIN_GAIN_FOR_SPLIT):
                best, best_error = (s, outliers), error
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
        splits = tuple(ctx.options.get("smooth_splits", DEFAULT_SPLITS))
        folded = multiplied = split = 0
        for t, readers in groups:
            stats = measured.get(t.name)
            if stats is None or stats.rows is None or not len(stats.rows):
                continue
            norm = _folds_into_layernorm(t, readers)
            weights = [_weight(n) for n in readers]
            chosen = _best_scales(stats, weights, alphas, needs_mul=norm is None, splits=splits)
            if chosen is None:
                continue
            s, outliers = chosen
            for node, value in zip(readers, weights):
                smoothed_w = value * s[:, None]
                smoothed_w[outliers] = 0.0
                node.inputs[1] = ir.make_constant(ctx.fresh_name(f"{node.inputs[1].name}_smoothed"), smoothed_w.astype(np.float32))
            if norm is not None:
                norm.inputs[1] = ir.make_constant(ctx.fresh_name(f"{norm.inputs[1].name}_smoothed"),
                                                  (ir.constant_value(norm.inputs[1]) / s).astype(np.float32))
                if len(norm.inputs) > 2 and not norm.inputs[2].is_empty():
                    norm.inputs[2] = ir.make_constant(ctx.fresh_name(f"{norm.inputs[2].name}_smoothed"),
                                                      (ir.constant_value(norm.inputs[2]) / s).astype(np.float32))
                folded += 1
                continue
            inverse = (1.0 / s).astype(np.float32)
            inverse[outliers] = 0.0
            smoothed = gs.Variable(ctx.fresh_name(f"{t.name}_smoothed"), dtype=t.dtype, shape=t.shape)
            graph.nodes.append(gs.Node("Mul", name=ctx.fresh_name(f"{t.name}_smooth"),
                                       inputs=[t, ir.make_constant(ctx.fresh_name(f"{t.name}_inverse_smoothing"), inverse)],
                                       outputs=[smoothed]))
            for node in readers:
                node.inputs[0] = smoothed
            multiplied += 1
            if len(outliers):
                _split_off(graph, ctx, t, readers, weights, outliers)
                split += 1
        if folded or multiplied:
            ir.toposort(graph)
        return PassResult(bool(folded or multiplied), {"into_layernorm": folded, "with_mul": multiplied, "outliers_split_off": split})


def _split_off(graph, ctx, t, readers, weights, outliers) -> None:
    """The `outliers` channels of t, times their weight rows, in float beside each reader: added
    after the reader's bias Add when it has one (which then still fuses into the quantized kernel)."""
    picked = gs.Variable(ctx.fresh_name(f"{t.name}_outliers"), dtype=t.dtype)
    graph.nodes.append(gs.Node("Gather", name=ctx.fresh_name(f"{t.name}_outlier_channels"), attrs={"axis": -1},
                               inputs=[t, ir.make_constant(ctx.fresh_name(f"{t.name}_outlier_index"), outliers.astype(np.int64))],
                               outputs=[picked]))
    keep = set(ctx.options.get("quantize_exclude", ()))
    for node, value in zip(readers, weights):
        partial = gs.Variable(ctx.fresh_name(f"{node.name}_outlier_part"), dtype=t.dtype)
        name = ctx.fresh_name(f"{node.name}_outlier_matmul")
        graph.nodes.append(gs.Node("MatMul", name=name, outputs=[partial],
                                   inputs=[picked, ir.make_constant(ctx.fresh_name(f"{node.name}_outlier_rows"), value[outliers].astype(np.float32))]))
        keep.add(name)  # a few channels in float is the point: no quantization pass takes it
        out = node.outputs[0]
        after = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == "Add" and ir.constant_value(
            next((i for i in out.outputs[0].inputs if i is not out), None)) is not None else node
        result = after.outputs[0]
        joined = gs.Variable(ctx.fresh_name(f"{result.name}_without_outliers"), dtype=result.dtype, shape=result.shape)
        after.outputs[0] = joined
        graph.nodes.append(gs.Node("Add", name=ctx.fresh_name(f"{node.name}_with_outliers"), inputs=[joined, partial], outputs=[result]))
    ctx.options["quantize_exclude"] = frozenset(keep)
