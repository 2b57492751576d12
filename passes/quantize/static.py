"""Static INT8 quantization in QDQ form: QuantizeLinear/DequantizeLinear pairs that onnxruntime
turns into integer kernels (QLinearConv, QGemm/MatMulInteger-class, QLinearAdd, ...).

What is quantized, and why only that:
* Conv, Gemm, MatMul with a constant weight: their inputs and outputs get a Q/DQ pair; weights are
  stored int8, symmetric, one scale per output channel (per-tensor scales collapse PP-OCR: a
  channel's range can be 38x the median's, see ../shared/notes/quantization-peers.md); a bias
  becomes int32 with scale = input scale x weight scale, as the integer kernels accumulate it.
* An activation right after one of them (Relu, or Clip to [0, 6]) is absorbed: the pair goes on
  its output, whose range starts at 0, and onnxruntime drops the Relu into the Q (ReluQuantFusion).
* A residual Add of two quantized tensors, and MaxPool/AveragePool/GlobalAveragePool/Flatten/
  Reshape between quantized ops, so a ResNet block stays integer from one Conv to the next
  instead of paying a dequantize-requantize round trip at every op (which is what makes peers'
  int8 models no faster than fp32). MaxPool, Flatten and Reshape keep their input's scale, so
  onnxruntime drops their pair.
Everything else stays float. Tensors read by a subgraph, graph outputs and graph inputs fed by
the user stay float too (a graph output keeps its name and dtype).

Kept only where it pays: when the target is this machine (x86_64:host), the quantized model is
timed against fp32 in onnxruntime (interleaved, on the first calibration batch) and dropped unless
it is faster; the decision and both times are in the report (`options={"quantize_gate": False}`
skips it). For another target it cannot be measured here, and the model is kept.

Bias correction (`options["bias_correction"]`, on by default with calibration data): each layer's
measured output-mean shift from its rounded weights and quantized input goes into its bias (see
_correct_biases). digits_cnn: held-out accuracy 0.972 -> 0.976 (fp32 0.980). PP-OCRv6's recognizer
(200 rendered words, fp32 char/word 0.991/0.970), on an AVX2 host: with 8-bit weights (whose
saturation there adds error) 0.984/0.905 -> 0.990/0.955; with 7-bit weights 0.991/0.960 ->
0.992/0.965.

Weights are symmetric int8 in [-127, 127], or [-63, 63] where the target's int8 dot product
saturates (`Hardware.int8_weight_bits`: x86 without VNNI).

Activations are per-tensor, with the target's signedness (`Hardware.int8_signedness`): u8s8
(x86 VNNI/AMX: uint8 asymmetric activations x int8 weights) or s8s8 (arm64, TensorRT: int8
symmetric, or asymmetric with zero point -128 for a tensor that is never negative). Ranges come
from graphopt.calibration on `ctx.calibration_data` with `ctx.options["calibration_method"]`
(default percentile). Per-channel Q/DQ needs opset 13: an older model is refused with a one-line
error saying how to convert it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
ABSORBED_ACTIVATIONS = ("Relu", "Clip")
# Ops between quantized ops that onnxruntime runs on int8 (the pair around them is dropped or
# they have a QLinear kernel), so quantizing them keeps a chain integer.
PASS_THROUGH_OPS = ("MaxPool", "Flatten", "Reshape")  # output keeps its input's scale
INTEGER_OPS = ("Add", "AveragePool", "GlobalAveragePool")
MIN_OPSET = 13
DEFAULT_METHOD = "percentile"  # entropy clipped digits_cnn by 1.2 points; the CLI default too


def _float_tensor(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Variable) and t.dtype is not None and np.dtype(t.dtype) == np.float32


def _relu_like(node: gs.Node) -> bool:
    if node.op == "Relu":
        return True
    if node.op == "Clip" and len(node.inputs) >= 2:
        low = ir.constant_value(node.inputs[1])
        return low is not None and low.size == 1 and float(low.reshape(-1)[0]) == 0.0
    return False


class _Plan:
    """Which tensors get a Q/DQ pair, and which take another tensor's scale."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.tensors: dict[int, gs.Variable] = {}
        self.same_scale_as: dict[int, gs.Variable] = {}
        self.weighted: list[gs.Node] = []
        outputs = {id(t) for t in graph.outputs}
        subgraph_reads = {id(t) for node in graph.nodes for sub in ir.subgraphs_of(node) for t in _outer_reads(sub)}
        self.blocked = outputs | subgraph_reads

    def add(self, t: gs.Tensor) -> bool:
        if not _float_tensor(t) or id(t) in self.blocked:
            return False
        self.tensors[id(t)] = t
        return True


def _outer_reads(graph: gs.Graph):
    inner = {id(t) for node in graph.nodes for t in node.outputs} | {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if id(t) not in inner:
                yield t
        for sub in ir.subgraphs_of(node):
            yield from _outer_reads(sub)


def _weight_axis(node: gs.Node) -> int | None:
    """The output-channel axis of the node's constant weight (input 1), or None if not quantizable."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    value = ir.constant_value(w)
    if value is None or value.dtype != np.float32:
        return None
    if node.op == "Conv":
        return 0 if value.ndim >= 3 else None
    if node.op == "Gemm":
        if value.ndim != 2 or node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return None
        return 0 if node.attrs.get("transB", 0) else 1
    return 1 if value.ndim == 2 else None  # MatMul by [K, N]


def plan(graph: gs.Graph, exclude: frozenset[str] | set[str] = frozenset()) -> _Plan:
    """What to quantize; nodes named in `exclude` stay float (an accuracy search chose them)."""
    p = _Plan(graph)
    for node in graph.nodes:
        if (node.op not in WEIGHTED_OPS or (node.domain and node.domain not in ir.DEFAULT_DOMAINS) or _weight_axis(node) is None
                or node.name in exclude):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if not _float_tensor(x) or not _float_tensor(y):
            continue
        after = y.outputs[0] if len(y.outputs) == 1 and id(y) not in p.blocked else None
        out = after.outputs[0] if after is not None and _relu_like(after) else y
        if p.add(x):
            p.weighted.append(node)
            p.add(out)
    # Ops that keep a chain integer, once both sides of them are quantized anyway.
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if (node.op not in PASS_THROUGH_OPS + INTEGER_OPS or (node.domain and node.domain not in ir.DEFAULT_DOMAINS)
                    or not node.outputs or id(node.outputs[0]) in p.tensors or node.name in exclude):
                continue
            acts = [t for t in node.inputs if isinstance(t, gs.Variable)]
            if not acts or not all(id(t) in p.tensors for t in acts):
                continue
            out = node.outputs[0]
            if node.op == "Add" and (len(acts) != 2 or any(ir.static_shape(t) != ir.static_shape(out) for t in acts)):
                continue
            if node.op == "Add" and len(out.outputs) == 1 and id(out) not in p.blocked and _relu_like(out.outputs[0]):
                # The pair after the Relu, as after a Conv: onnxruntime drops the Relu into the Q
                # and still runs QLinearAdd; OpenVINO fuses Add and Relu into the Conv before them
                # (a pair between Add and Relu kept ResNet-18 there 8% slower than NNCF's INT8).
                out = out.outputs[0].outputs[0]
                if id(out) in p.tensors:
                    continue
            if p.add(out):
                if node.op in PASS_THROUGH_OPS:
                    p.same_scale_as[id(out)] = acts[0]
                changed = True
    return p


@register_pass
class QuantizeStaticInt8(Pass):
    name = "quantize-int8"
    description = "Static INT8 in QDQ form: Conv/Gemm/MatMul (per-channel int8 weights, int32 bias) and the ops between them, ranges from calibration data"
    # Opt-in: it needs calibration data and changes numerics beyond float tolerance.
    subgraphs = False
    # The nodes an accuracy search may keep float, one at a time (graphopt/accuracy.py).
    layer_ops = WEIGHTED_OPS

    def measurements(self, fp32, data, options: dict, target: str | None = None) -> dict:
        """What the pass measures on calibration data, once for all of an accuracy search's
        candidates: every candidate quantizes a subset of the same tensors, with the same scales."""
        from graphopt import calibration, targets

        stats = calibration.collect(fp32, data, cache_dir=options.get("calibration_cache"))
        measured = {"calibration_statistics": stats}
        if options.get("bias_correction", True):
            inputs = _weighted_inputs(fp32)
            hardware = getattr(targets.get(target), "hardware", None) if target else None
            params = _activation_params(stats, inputs, options.get("calibration_method", DEFAULT_METHOD),
                                        hardware.int8_signedness if hardware is not None else "s8s8")
            measured[_INPUT_MEANS] = _input_means(fp32, data, inputs, params, options)
        return measured

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.opset < MIN_OPSET:
            # Per-tensor weight scales instead would be valid but collapse accuracy (see above),
            # and raising the opset rewrites other ops' semantics: the user decides.
            raise GraphoptError(f"quantize-int8 needs opset >= {MIN_OPSET} for per-channel Q/DQ, and the model is opset {ctx.opset}; "
                                "convert it first (onnx.version_converter.convert_version(model, 13))")
        data = ctx.calibration_data
        known = ctx.options.get("calibration_statistics")  # collected once by an accuracy search
        if data is None and known is None:
            raise GraphoptError("quantize-int8 needs calibration data (--calibration FILE|FOLDER, or calibration_data=...)")
        ctx.analysis("shapes")
        p = plan(graph, frozenset(ctx.options.get("quantize_exclude", ())))
        if not p.weighted:
            return PassResult(False)
        from graphopt import calibration, export

        method = ctx.options.get("calibration_method", DEFAULT_METHOD)
        measured = [t for t in p.tensors.values() if id(t) not in p.same_scale_as]
        fp32 = export.to_proto(ctx.model)
        if known is not None and {t.name for t in measured} <= set(known.tensors):
            stats = known
        else:
            stats = calibration.collect(fp32, data, [t.name for t in measured], cache_dir=ctx.options.get("calibration_cache"))
        hardware = getattr(ctx.target, "hardware", None)
        signedness = hardware.int8_signedness if hardware is not None else "s8s8"
        values = _activation_params(stats, {t.name: 0 for t in measured}, method, signedness)
        params: dict[int, tuple[gs.Constant, gs.Constant]] = {}
        for t in measured:
            if t.name in values:
                scale, zero = values[t.name]
                params[id(t)] = (ir.make_constant(ctx.fresh_name(f"{t.name}_scale"), scale),
                                 ir.make_constant(ctx.fresh_name(f"{t.name}_zero_point"), zero))
        for tid, source in p.same_scale_as.items():
            if id(source) in params:
                params[tid] = params[id(source)]
        quantized = [node for node in p.weighted if id(node.inputs[0]) in params]
        corrected = 0
        if data is not None and ctx.options.get("bias_correction", True):
            corrected = _correct_biases(quantized, fp32, data, {n.inputs[0].name: values[n.inputs[0].name] for n in quantized}, ctx)
        weights = biases = 0
        for node in quantized:
            weights += 1
            biases += _quantize_weights(node, params[id(node.inputs[0])][0], ctx)
        pairs = 0
        for t in p.tensors.values():
            if id(t) in params:
                _insert_pair(graph, t, *params[id(t)], ctx)
                pairs += 1
        ir.toposort(graph)
        gate = pairs and data is not None and ctx.options.get("quantize_gate", True)
        decision = _measured(fp32, export.to_proto(ctx.model), data, ctx) if gate else None
        if decision is not None and not decision.kept:
            from graphopt import loading

            restored = loading.from_proto(fp32)
            ctx.model.graph, ctx.model.input_defaults = restored.graph, restored.input_defaults
            ctx.analyses.invalidate()
            return PassResult(False, {}, [decision])
        return PassResult(bool(pairs), {"quantized_weights": weights, "int32_biases": biases, "qdq_pairs": pairs,
                                        "biases_corrected": corrected, f"method_{method}": 1}, [decision] if decision else [])


def _activation_params(stats, names, method: str, signedness: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (scale, zero point)} of each named tensor's per-tensor int8 pair, from its range."""
    from graphopt import calibration

    params = {}
    for name in names:
        r = stats.range(name, method) if name in stats.tensors else None
        if r is not None:
            params[name] = calibration.activation_int8(r[0], r[1], signedness)
    return params


# Bias correction: each quantized layer's rounding of its weights, and the rounding and clipping
# of its input, shift the mean of every output channel by
#     E[W x] - E[W_q Q(x)] = W E[x] - W_q E[Q(x)]     (summed over a Conv's kernel taps),
# a systematic error that the next layers carry forward and that per-channel noise does not
# average away (Nagel et al. 2019, "Data-Free Quantization", section 4.2; the empirical variant).
# The shift is added to the layer's bias before the bias is quantized. Both means are measured on
# the fp32 model's activations, so each layer corrects its own error only and the corrections do
# not compound; a Conv's padding is not modelled (border pixels see fewer taps).
_INPUT_MEANS = "bias_correction_means"


def _weighted_inputs(model) -> dict[str, int]:
    """{input tensor: channel axis} of every Conv/Gemm/MatMul by a constant weight in the model."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return {n.input[0]: 1 if n.op_type == "Conv" else -1 for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and n.domain in ("", "ai.onnx") and len(n.input) > 1 and n.input[1] in constants}


def _input_means(fp32, data, axes: dict[str, int], params, options) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (E[x], E[Q(x)]) per input channel} on the calibration data, for tensors with a pair."""
    from graphopt import calibration

    names = [n for n in axes if n in params]
    if not names:
        return {}
    stats = calibration.channel_statistics(fp32, data, names, axis={n: axes[n] for n in names}, quantized=params,
                                           threads=options.get("threads") or 2)
    return {n: (m.mean, m.quantized_mean) for n, m in stats.items()}


def _correct_biases(nodes: list[gs.Node], fp32, data, params, ctx: PassContext) -> int:
    """Adds each node's measured output-mean shift to its float bias (see above); the count corrected."""
    from graphopt.calibration import int8_weight_levels, weight_int8

    known = ctx.options.get(_INPUT_MEANS) or {}
    wanted = {n.inputs[0].name: 1 if n.op == "Conv" else -1 for n in nodes}
    if not set(wanted) <= set(known):
        known = _input_means(fp32, data, wanted, params, ctx.options)
    corrected = 0
    for node in nodes:
        means = known.get(node.inputs[0].name)
        if means is None:
            continue
        w = ir.constant_value(node.inputs[1]).astype(np.float64)
        axis = _weight_axis(node)
        q, scale = weight_int8(w, axis, int8_weight_levels(ctx.target))
        shape = [1] * w.ndim
        shape[axis] = -1
        w_q = q.astype(np.float64) * scale.astype(np.float64).reshape(shape)
        shift = _output_mean(node, w, means[0]) - _output_mean(node, w_q, means[1])
        if shift is not None and np.all(np.isfinite(shift)) and ir.add_to_bias(node, shift, ctx.fresh_name):
            corrected += 1
    return corrected


def _output_mean(node: gs.Node, w: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """E[y] per output channel of the node without its bias, given E[x] per input channel."""
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        out_channels, in_per_group = w.shape[0], w.shape[1]
        if input_mean.size != groups * in_per_group:
            return None
        taps = w.reshape(groups, out_channels // groups, in_per_group, -1).sum(axis=-1)
        return np.einsum("goi,gi->go", taps, input_mean.reshape(groups, in_per_group)).reshape(-1)
    matrix = w.T if node.op == "Gemm" and node.attrs.get("transB", 0) else w  # [K, N]
    return input_mean @ matrix if input_mean.size == matrix.shape[0] else None


# The int8 model must be at least this much faster than fp32, measured, to be kept: below it, the
# Q/DQ conversions around small kernels cost what the integer arithmetic saves (digits_cnn: 1.6x slower).
KEEP_BELOW_RATIO = 0.97
GATE_ROUNDS = 15


def _measured(fp32, int8, data, ctx: PassContext):
    """Whether the quantized model is faster than fp32, measured in onnxruntime on this machine
    (interleaved, medians) when the target is this machine; None when it cannot be measured here."""
    import statistics
    import time

    from graphopt import export, verify
    from graphopt.pass_manager import CostDecision

    target = ctx.target
    if target is None or target.variant != "host" or export.approx_nbytes(int8) > export.PROTOBUF_LIMIT_BYTES:
        return None
    import onnxruntime as ort

    feeds = next(iter(data))
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = [verify._session(model, 1, level) for model in (fp32, int8)]
    times: list[list[float]] = [[], []]
    for _ in range(2):
        for sess in sessions:
            sess.run(None, feeds)
    for r in range(GATE_ROUNDS):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    before, after = statistics.median(times[0]), statistics.median(times[1])
    kept = after < KEEP_BELOW_RATIO * before
    verdict = "kept" if kept else "not faster: the model stays fp32"
    return CostDecision("int8", "<model>", kept, before, after,
                        f"measured on this machine ({target.full_name}, 1 thread): {before * 1e3:.3f} ms fp32 -> {after * 1e3:.3f} ms int8, {verdict}")


def _insert_pair(graph: gs.Graph, t: gs.Variable, scale: gs.Constant, zero: gs.Constant, ctx: PassContext) -> None:
    readers = list(t.outputs)
    q = gs.Variable(ctx.fresh_name(f"{t.name}_quantized"), dtype=zero.values.dtype, shape=t.shape)
    dq = gs.Variable(ctx.fresh_name(f"{t.name}_dequantized"), dtype=t.dtype, shape=t.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", name=ctx.fresh_name(f"{t.name}_QuantizeLinear"), inputs=[t, scale, zero], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", name=ctx.fresh_name(f"{t.name}_DequantizeLinear"), inputs=[q, scale, zero], outputs=[dq]))
    for reader in readers:
        for i, x in enumerate(reader.inputs):
            if x is t:
                reader.inputs[i] = dq


def _quantize_weights(node: gs.Node, x_scale: gs.Constant, ctx: PassContext) -> int:
    """int8 per-channel weight behind a DequantizeLinear; an int32 bias when its scale allows. Returns 1 if the bias became int32."""
    from graphopt.calibration import int8_weight_levels, weight_int8

    axis = _weight_axis(node)
    w_tensor = node.inputs[1]
    q, w_scale = weight_int8(ir.constant_value(w_tensor), axis, int8_weight_levels(ctx.target))
    node.inputs[1] = _dequantized(q, w_scale, np.zeros(w_scale.shape, np.int8), axis, w_tensor.name, ctx)
    w_scale = w_scale.astype(np.float64)
    bias_index = 2
    if len(node.inputs) <= bias_index or node.inputs[bias_index].is_empty():
        return 0
    b = ir.constant_value(node.inputs[bias_index])
    if b is None or b.ndim != 1 or b.size != w_scale.size or (node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0):
        return 0
    b_scale = float(x_scale.values) * w_scale
    q_bias = np.round(b.astype(np.float64) / b_scale)
    if np.abs(q_bias).max(initial=0) >= 2**31 - 1:
        return 0  # a float bias is still right, only not fused into the integer kernel
    node.inputs[bias_index] = _dequantized(q_bias.astype(np.int32), b_scale.astype(np.float32),
                                           np.zeros(b.size, np.int32), 0, node.inputs[bias_index].name, ctx)
    return 1


def _dequantized(values, scale, zero, axis, base, ctx) -> gs.Variable:
    graph = ctx.graph
    out = gs.Variable(ctx.fresh_name(f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
    graph.nodes.append(gs.Node(
        "DequantizeLinear", name=ctx.fresh_name(f"{base}_DequantizeLinear"),
        inputs=[ir.make_constant(ctx.fresh_name(f"{base}_quantized"), values), ir.make_constant(ctx.fresh_name(f"{base}_scale"), scale),
                ir.make_constant(ctx.fresh_name(f"{base}_zero_point"), zero)],
        outputs=[out], attrs={"axis": axis},
    ))
    return out
