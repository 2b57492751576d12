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

Where the activation comes from a MatMul by a constant weight through per-channel ops (the FFN's
MatMul, bias Add and GELU), the few channels that still set the range after smoothing are
duplicated instead: the first MatMul computes channel j m_j times (its weight column repeated),
the smoothing Mul divides each copy by m_j more, and the reading MatMul's weight row is repeated
for each copy. Exact, a few percent more channels and no new node; the copies' range falls m_j
times (outlier channel splitting, Zhao et al. 2019). Taken where it measures 10% less error.

With `options["smooth_splits"]`, the channels that still set the range elsewhere (after a
LayerNorm that also feeds a residual, after attention) can also be split off: computed in float
(a Gather of those channels, a small MatMul by their weight rows, an Add after the quantized
product), where that measures another 30% less error.

Conv channels are equalized the same way (cross-layer equalization, Nagel et al. 2019, with the
measured choice above instead of the weight ranges alone): where a Conv's output reaches Convs
(group 1) only through ops that commute with a positive per-channel scale (Relu, LeakyRelu,
MaxPool), 1/s goes into the producing Conv's weights and bias, which are quantized per output
channel and so lose nothing by it: free, no node added. A large-range channel then stops setting
the per-tensor scale of the activation between them. Clip (ReLU6) does not commute with a scale
and stops it.

Exact in float arithmetic (the rewrite changes rounding only), so a model smoothed and not
quantized computes what it did. Needs calibration data; without it, does nothing. MatMuls named in
`options["quantize_exclude"]` are left alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass

DEFAULT_ALPHAS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
# A Mul costs a pass over the activation: taken only when the error falls below this share. On
# all-MiniLM-L6 int8-dynamic, 24 Muls cost 4% of the quantized model's time; at 0.8 the attention
# outputs and the Q/K/V inputs took Muls (errors 0.35-0.6x) that moved the embedding min cosine by
# under 0.001, at 0.3 only the FFN inputs do (0.1-0.2x): 0.9972 with 13 Muls instead of 0.9980
# with 23, and the speed of onnxruntime's quantize_dynamic.
MIN_GAIN_FOR_MUL = 0.3
# Splitting channels off costs a Gather, a small MatMul and an Add: taken over the best smoothing
# only when it cuts the error to this share again.
MIN_GAIN_FOR_SPLIT = 0.7
# Opt-in (`options["smooth_splits"] = (4, 8, 16)`): on all-MiniLM-L6 (int8-dynamic, embedding min
# cosine over 50 inputs) splits everywhere took 0.9921 to 0.998-0.999, but at 0.55x fp32 instead of
# 0.51x; what they gained came from the FFN inputs, which duplication (below) now serves for free.
DEFAULT_SPLITS = ()
# Duplicating channels costs only their share of the two MatMuls: tried by default (channel counts
# in `options["smooth_duplicates"]`, () for none), taken when it
# cuts the error to this share. On all-MiniLM-L6 the FFN2 inputs (after GELU) are where it counts:
# float splits there alone took the embedding min cosine from 0.992 to 0.998.
DUPLICATED_CHANNELS = (4, 8, 16)
MIN_GAIN_FOR_DUPLICATES = 0.9
# At most this share of extra channels, and copies per channel, so the MatMuls grow by little.
MAX_DUPLICATED_SHARE = 0.05
MAX_COPIES = 8
# Channel counts rounded up to a multiple of this (see _copies).
CHANNEL_ALIGNMENT = 16
# Ops that act on each channel alone (a constant second input, if any, broadcast along the last
# axis): channels duplicated before them are duplicated after them.
PER_CHANNEL_OPS = frozenset("""
    Relu LeakyRelu Elu Selu Celu ThresholdedRelu HardSigmoid HardSwish Sigmoid Tanh Softplus Softsign
    Mish Gelu FastGelu BiasGelu QuickGelu Erf Abs Neg Clip Add Sub Mul Div
""".split())
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
        # A MatMul's inputs share a type: a float32 weight says A is float32 where inference did
        # not (a contrib op's output).
        if not isinstance(t, gs.Variable) or (t.dtype is not None and np.dtype(t.dtype) != np.float32) or id(t) in outputs:
            continue
        readers = [n for n in t.outputs if n.inputs and n.inputs[0] is t and _weight(n) is not None and n.name not in excluded]
        if readers and len({_weight(n).shape[0] for n in readers}) == 1:
            found.append((t, readers))
    return found


# Ops that commute with a positive per-channel scale on axis 1: f(x / s) = f(x) / s.
SCALE_COMMUTING_OPS = ("Relu", "LeakyRelu", "MaxPool")


def _conv_weight(node: gs.Node) -> np.ndarray | None:
    """A Conv's constant float weight as [C_in, C_out, taps], for a Conv of group 1."""
    if node.op != "Conv" or (node.domain and node.domain not in ir.DEFAULT_DOMAINS) or int(node.attrs.get("group", 1)) != 1:
        return None
    w = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32 or w.ndim < 3:
        return None
    return np.ascontiguousarray(np.swapaxes(w.reshape(w.shape[0], w.shape[1], -1), 0, 1))


def _conv_groups(graph: gs.Graph, excluded) -> list[tuple[gs.Variable, list[gs.Node], gs.Node]]:
    """(activation, the Convs reading it, the Conv whose output channels it carries through
    scale-commuting ops), where 1/s can go into that Conv: every tensor between read only by the
    chain, the activation read only by the Convs."""
    outputs = {id(t) for t in graph.outputs}
    found = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Variable) or id(t) in outputs or not t.outputs:
            continue
        readers = list(t.outputs)
        if not all(n.op == "Conv" and n.inputs[0] is t and _conv_weight(n) is not None and n.name not in excluded for n in readers):
            continue
        if len({_conv_weight(n).shape[0] for n in readers}) != 1:
            continue
        current, node = t, ir.producer(t)
        while node is not None and node.op in SCALE_COMMUTING_OPS and len(node.outputs) == 1 and not (node.domain and node.domain not in ir.DEFAULT_DOMAINS):
            if node.op == "LeakyRelu" and float(node.attrs.get("alpha", 0.01)) < 0:
                break
            current = node.inputs[0]
            if len(current.outputs) != 1 or id(current) in outputs:
                node = None
                break
            node = ir.producer(current)
        if node is None or node.op != "Conv" or (node.domain and node.domain not in ir.DEFAULT_DOMAINS) or node.outputs[0] is not current:
            continue
        w = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = ir.constant_value(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if w is None or w.dtype != np.float32 or w.shape[0] != _conv_weight(readers[0]).shape[0] or (
                len(node.inputs) > 2 and not node.inputs[2].is_empty() and bias is None):
            continue
        if len(node.inputs[1].outputs) != 1 or (bias is not None and len(node.inputs[2].outputs) != 1):
            continue  # a weight shared with another node must keep its value there
        found.append((t, readers, node))
    return found


def _equalize_convs(ctx, readers: list[gs.Node], producer: gs.Node, s: np.ndarray) -> None:
    """The producer's output channel j divided by s_j, the readers' input channel j multiplied by it."""
    w = ir.constant_value(producer.inputs[1])
    producer.inputs[1] = ir.make_constant(ctx.fresh_name(f"{producer.inputs[1].name}_equalized"),
                                          (w / s.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32))
    if len(producer.inputs) > 2 and not producer.inputs[2].is_empty():
        producer.inputs[2] = ir.make_constant(ctx.fresh_name(f"{producer.inputs[2].name}_equalized"),
                                              (ir.constant_value(producer.inputs[2]) / s).astype(np.float32))
    for node in readers:
        v = ir.constant_value(node.inputs[1])
        node.inputs[1] = ir.make_constant(ctx.fresh_name(f"{node.inputs[1].name}_equalized"),
                                          (v * s.reshape(1, -1, *[1] * (v.ndim - 2))).astype(np.float32))


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


def _output_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, outliers: np.ndarray, copies: np.ndarray | None = None) -> float:
    """Relative squared error of x @ w for every w, quantized after smoothing by s, with the
    `outliers` channels computed in float beside the quantized product, or (given `copies`, the
    copies of each channel) with every channel quantized as `copies` equal parts."""
    from graphopt.calibration import weight_int8

    xs = x / s
    if copies is None:
        xs[:, outliers] = 0.0
        xq = _fake_quantized_activation(xs)
    else:
        # The copies of a channel quantize alike and read equal weight rows: one times their count.
        xq = _fake_quantized_activation(xs / copies) * copies
    error = reference = 0.0
    for w in weights:
        # [K, N], or a Conv's [K, N, taps]: one scale per N, over K and the taps.
        ws = w * s.reshape(-1, *[1] * (w.ndim - 1))
        if copies is None:
            ws[outliers] = 0.0
        q, scale = weight_int8(ws, axis=1)
        scale = scale.reshape(-1, *[1] * (w.ndim - 2))
        flat = w.reshape(len(w), -1)
        y = x @ flat
        approx = xq @ (q.astype(np.float32) * scale).reshape(len(w), -1)
        if copies is None:
            approx += x[:, outliers] @ flat[outliers]
        error += float(np.sum(np.square(y - approx)))
        reference += float(np.sum(np.square(y)))
    return error / reference if reference else 0.0


class _Choice(NamedTuple):
    scales: np.ndarray
    float_channels: np.ndarray  # computed in float beside the quantized MatMul (smooth_splits)
    copies: np.ndarray | None  # copies of each channel (duplicated), or None


def _copies(ranges: np.ndarray, outliers: np.ndarray) -> np.ndarray | None:
    """Copies of each channel so that the `outliers` fall to the range of the others, or None
    where that needs more than the allowed extra channels."""
    rest = np.delete(ranges, outliers)
    if not len(rest) or rest.max() <= 0:
        return None
    copies = np.ones(ranges.shape, np.int64)
    copies[outliers] = np.clip(np.ceil(ranges[outliers] / rest.max()), 1, MAX_COPIES)
    extra = int(copies.sum()) - len(copies)
    if not 0 < extra <= MAX_DUPLICATED_SHARE * len(copies):
        return None
    # Round the channel count up to what the integer GEMM kernels block K by (an odd K was 10%
    # slower in onnxruntime's DynamicQuantizeMatMul): the spare copies go to the largest channels.
    spare = -(len(copies) + extra) % CHANNEL_ALIGNMENT
    largest = outliers[np.argsort(-ranges[outliers] / copies[outliers], kind="stable")]
    for i in range(spare):
        copies[largest[i % len(largest)]] += 1
    return copies


def _best_scales(stats, weights: list[np.ndarray], alphas, needs_mul: bool, splits, duplicates=()) -> _Choice | None:
    """The smoothing (and channels split off or duplicated) with the least measured error, or
    None where nothing beats plain quantization by enough to pay for its nodes."""
    x = stats.rows.astype(np.float32)
    a = stats.abs_max
    w = np.max([np.abs(v).reshape(len(v), -1).max(axis=1) for v in weights], axis=0)
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
        candidates = [(0, None)] + [(k, "float") for k in (splits if needs_mul else ())]
        candidates += [(k, "copies") for k in duplicates]
        for k, how in candidates:
            if alpha is None and k == 0:
                continue
            outliers = np.sort(order[:k])
            copies = _copies(a / s, outliers) if how == "copies" else None
            if how == "copies" and copies is None:
                continue
            error = _output_error(x, weights, s, outliers if how == "float" else none, copies)
            gain = {None: 1.0, "float": MIN_GAIN_FOR_SPLIT, "copies": MIN_GAIN_FOR_DUPLICATES}[how]
            if error < best_error * gain:
                best, best_error = _Choice(s, outliers if how == "float" else none, copies), error
    return best


def _per_channel_chain(graph: gs.Graph, t: gs.Variable, readers: list[gs.Node]) -> tuple[gs.Node, list[gs.Node]] | None:
    """(MatMul by a constant [K, C] weight, the per-channel nodes from its output to t), where
    duplicating t's channels is a matter of constants: every tensor between read only by the
    chain, t read only by `readers`, each node's constants scalars or [C] along the last axis."""
    if len(t.outputs) != len(readers):
        return None
    channels = _weight(readers[0]).shape[0]
    outputs = {id(o) for o in graph.outputs}
    chain, current = [], t
    while True:
        node = ir.producer(current)
        if node is None or len(node.outputs) != 1 or (current is not t and (
                len(current.outputs) != 1 or current.outputs[0] is not chain[0] or id(current) in outputs)):
            return None
        if node.op == "MatMul" and _weight(node) is not None:
            return (node, chain) if _weight(node).shape[1] == channels else None
        if node.op not in PER_CHANNEL_OPS or (node.domain and node.domain not in (*ir.DEFAULT_DOMAINS, "com.microsoft")):
            return None
        variables = [i for i in node.inputs if not i.is_empty() and ir.constant_value(i) is None]
        if len(variables) != 1:
            return None
        for i in node.inputs:
            value = ir.constant_value(i) if not i.is_empty() else None
            if value is not None and value.size != 1 and not (value.shape[-1] == channels and value.size == channels):
                return None
        chain.insert(0, node)
        current = variables[0]


def _duplicate_channels(ctx, chain: tuple[gs.Node, list[gs.Node]], channel_index: np.ndarray) -> None:
    """Makes the chain compute channels `channel_index` of what it computed (some repeated)."""
    matmul, nodes = chain
    matmul.inputs[1] = ir.make_constant(ctx.fresh_name(f"{matmul.inputs[1].name}_duplicated"), _weight(matmul)[:, channel_index])
    for node in nodes:
        for i, tensor in enumerate(node.inputs):
            value = ir.constant_value(tensor) if not tensor.is_empty() else None
            if value is not None and value.size != 1:
                node.inputs[i] = ir.make_constant(ctx.fresh_name(f"{tensor.name}_duplicated"), np.ascontiguousarray(value[..., channel_index]))
    for node in (matmul, *nodes):
        out = node.outputs[0]
        if out.shape:
            out.shape = [*out.shape[:-1], len(channel_index)]


@register_pass
class SmoothActivations(Pass):
    name = "smooth-activations"
    description = "SmoothQuant-style: divide outlier activation channels by s, multiply the MatMul weight rows reading them by s (before INT8)"
    subgraphs = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        data = ctx.calibration_data
        if data is None:
            return PassResult(False)
        ctx.analysis("shapes")  # the float activations are found by their dtype
        excluded = ctx.options.get("quantize_exclude", ())
        groups = _groups(graph, excluded)
        conv_groups = _conv_groups(graph, excluded) if ctx.options.get("equalize_convs", True) else []
        if not groups and not conv_groups:
            return PassResult(False)
        for t, _ in groups:
            t.dtype = np.float32  # known now (see _groups); calibration observes typed tensors
        from graphopt import calibration, export

        axes = {t.name: -1 for t, _ in groups} | {t.name: 1 for t, _, _ in conv_groups}
        measured = calibration.channel_statistics(export.to_proto(ctx.model), data, list(axes), axis=axes,
                                                  threads=ctx.options.get("threads") or 2, rows=SAMPLED_ROWS)
        alphas = tuple(ctx.options.get("smooth_alphas", DEFAULT_ALPHAS))
        splits = tuple(ctx.options.get("smooth_splits", DEFAULT_SPLITS))
        duplicates = tuple(ctx.options.get("smooth_duplicates", DUPLICATED_CHANNELS))
        folded = multiplied = split = duplicated = equalized = 0
        for t, readers, producer in conv_groups:
            stats = measured.get(t.name)
            if stats is None or stats.rows is None or not len(stats.rows):
                continue
            chosen = _best_scales(stats, [_conv_weight(n) for n in readers], alphas, needs_mul=False, splits=(), duplicates=())
            if chosen is not None:
                _equalize_convs(ctx, readers, producer, chosen.scales)
                equalized += 1
        for t, readers in groups:
            stats = measured.get(t.name)
            if stats is None or stats.rows is None or not len(stats.rows):
                continue
            norm = _folds_into_layernorm(t, readers)
            weights = [_weight(n) for n in readers]
            chain = _per_channel_chain(graph, t, readers) if norm is None else None
            chosen = _best_scales(stats, weights, alphas, needs_mul=norm is None, splits=splits, duplicates=duplicates if chain else ())
            if chosen is None:
                continue
            s, outliers, copies = chosen
            channel_index = np.arange(len(s)) if copies is None else np.repeat(np.arange(len(s)), copies)
            for node, value in zip(readers, weights):
                smoothed_w = value * s[:, None]
                smoothed_w[outliers] = 0.0
                node.inputs[1] = ir.make_constant(ctx.fresh_name(f"{node.inputs[1].name}_smoothed"), smoothed_w[channel_index].astype(np.float32))
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
            if copies is not None:
                _duplicate_channels(ctx, chain, channel_index)
                inverse = (inverse / copies)[channel_index].astype(np.float32)
                duplicated += 1
            smoothed = gs.Variable(ctx.fresh_name(f"{t.name}_smoothed"), dtype=t.dtype, shape=t.shape)  # duplicated ones included
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
        return PassResult(bool(folded or multiplied or equalized), {"into_layernorm": folded, "with_mul": multiplied, "outliers_split_off": split,
                                                                    "channels_duplicated": duplicated, "convs_equalized": equalized})


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
