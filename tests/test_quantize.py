"""quantize-int8: static INT8 in QDQ form, calibrated on real data, that onnxruntime runs as integer kernels."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphopt.models as zoo
from graphopt import calibration, export
from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.optimize import optimize_model


def _digits():
    feeds, labels = zoo.eval_data("digits_cnn")
    return zoo.load("digits_cnn"), feeds["input"], labels


def _quantized(proto, data, target="x86_64", method="percentile", gate=False):
    # Without the measured gate unless asked: these tests are about what quantization writes, and
    # their models are too small to run faster in int8.
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    model, report = optimize_model(work, target=target, opt_level=2, quantize="int8", calibration_data=data,
                                   options={"calibration_method": method, "quantize_gate": gate})
    return export.to_proto(model), report


def _ort_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """The kernels onnxruntime actually runs (its optimized graph at ORT_ENABLE_ALL)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _accuracy(model, x, labels) -> float:
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return float((out.argmax(1) == labels).mean())


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "moving_average"])
def test_digits_cnn_keeps_its_accuracy_and_runs_integer_kernels(method, tmp_path):
    proto, x, labels = _digits()
    data = calibration.from_arrays({"input": x[:128]}, proto)
    quantized, report = _quantized(proto, data, method=method)
    stats = next(p for p in report.passes if p.name == "quantize-int8").stats
    assert stats["quantized_weights"] == 3 and stats["int32_biases"] == 3
    held_out = slice(200, None)  # samples the calibration did not see
    fp32, int8 = _accuracy(proto, x[held_out], labels[held_out]), _accuracy(quantized, x[held_out], labels[held_out])
    assert int8 >= fp32 - 0.01, (method, fp32, int8)
    ops = _ort_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1 and ops["Conv"] == 0


def test_the_gate_keeps_fp32_where_int8_measures_slower():
    from graphopt import targets

    if targets.get("x86_64").variant != "host":
        pytest.skip("not an x86_64 machine: no host target to measure")
    proto, x, _ = _digits()
    quantized, report = _quantized(proto, calibration.from_arrays({"input": x[:32]}, proto), gate=True)
    assert not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    (decision,) = next(p for p in report.passes if p.name == "quantize-int8").decisions
    # digits_cnn runs in ~10 us: Q/DQ conversions cost more than int8 arithmetic saves (1.6x slower).
    assert not decision.kept and decision.after_s > decision.before_s and "stays fp32" in decision.reason
    # A target that is not this machine cannot be measured here: the quantized model is kept.
    arm, report = _quantized(proto, calibration.from_arrays({"input": x[:32]}, proto), target="arm64", gate=True)
    assert any(n.op_type == "QuantizeLinear" for n in arm.graph.node)


def _block(opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 8
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32), n) for n in ("w1", "w2")]
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), n) for n in ("b1", "b2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Conv", ["hr", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["y"], ["yr"], name="relu2"),
        helper.make_node("Add", ["yr", "hr"], ["s"], name="residual"),
        helper.make_node("Sigmoid", ["s"], ["out"], name="head"),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _block_data(proto):
    x = np.random.default_rng(1).standard_normal((16, 8, 16, 16)).astype(np.float32)
    return calibration.from_arrays({"x": x}, proto)


def test_signedness_follows_the_target():
    proto = _block()
    for target, dtype in (("x86_64", np.uint8), ("arm64", np.int8)):
        quantized, _ = _quantized(proto, _block_data(proto), target=target)
        inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
        activation_zero_points = [inits[n.input[2]] for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
        assert activation_zero_points and all(z.dtype == dtype for z in activation_zero_points), target
        weights = [inits[n.input[0]] for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        assert {w.dtype for w in weights} == {np.dtype(np.int8), np.dtype(np.int32)}  # int8 weights, int32 biases


def test_the_residual_add_stays_integer_and_outputs_stay_float(tmp_path):
    proto = _block()
    quantized, _ = _quantized(proto, _block_data(proto))
    ops = _ort_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["Relu"] == 0  # the Relus fold into the Q
    assert [o.name for o in quantized.graph.output] == ["out"]
    assert quantized.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(7).standard_normal((1, 8, 16, 16)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    a, b = run(proto).ravel(), run(quantized).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_an_old_opset_is_converted_for_per_channel_qdq_and_the_report_says_so():
    proto = _block(opset=12)
    quantized, report = _quantized(proto, _block_data(proto))
    assert next(i.version for i in quantized.opset_import if i.domain in ("", "ai.onnx")) == 13
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    assert report.notes == ["converted the model from opset 12 to 13 for per-channel Q/DQ"]


def test_the_pass_alone_refuses_an_old_opset():
    proto = _block(opset=12)
    with pytest.raises(GraphoptError, match="needs opset >= 13 .* model is opset 12"):
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        optimize_model(work, target="x86_64", passes=["quantize-int8"], calibration_data=_block_data(proto))



def test_quantizing_needs_calibration_data():
    with pytest.raises(GraphoptError, match="needs calibration data"):
        _quantized(_block(), None)


def test_run_quantize_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    proto, x, _ = _digits()
    data = tmp_path / "cal.npz"
    np.savez(data, input=x[:64])
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--quantize", "int8", "--calibration", str(data), "-o", str(out),
                                      "--no-quantize-gate"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "quantize-int8" in result.output and "calibration batch of" in result.output
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node) >= 3
    # A budget no quantized layer meets: the search keeps every layer float, and says so.
    strict = tmp_path / "strict.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--quantize", "int8", "--calibration", str(data), "-o", str(strict),
                                      "--accuracy-budget", "cos=0.99999999", "--no-quantize-gate"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "3 kept float" in result.output and "no quantized layer fits the budget cos=0.99999999" in result.output
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(strict).graph.node)
    # With the gate (the default) on this machine, digits_cnn stays fp32 and the report says why.
    gated = tmp_path / "gated.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--quantize", "int8", "--calibration", str(data), "-o", str(gated)],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    from graphopt import targets

    if targets.get("x86_64").variant == "host":
        assert "declined" in result.output and not any(n.op_type == "QuantizeLinear" for n in onnx.load(gated).graph.node)


def test_run_quantize_refuses_bad_options(tmp_path):
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--quantize", "int8", "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2 and "--quantize needs --calibration" in result.output
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--calibration", "random:4", "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2 and "add --quantize int8" in result.output
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--quantize", "int8", "--calibration", "random:4",
                                      "--accuracy-budget", "acc=0.9", "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2 and "cos=VALUE" in result.output and "top1=VALUE" in result.output


def test_random_calibration_warns():
    proto, _, _ = _digits()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = calibration.random_data(proto, 8)
    assert any("not be representative" in str(w.message) for w in caught)
    quantized, _ = _quantized(proto, data)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)


# ---------------------------------------------------------------------------------------------
# quantize-int8-dynamic


def _bert_outputs(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_dynamic_int8_quantizes_bert_matmuls_and_attention():
    from graphopt.models.bert import BERT_TINY, example_inputs

    proto = zoo.load("bert_tiny")
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    model, report = optimize_model(work, target="x86_64", opt_level=3, quantize="int8-dynamic")
    quantized = export.to_proto(model)
    stats = next(p for p in report.passes if p.name == "quantize-int8-dynamic").stats
    assert stats["attention"] == BERT_TINY.layers and stats["with_bias"] >= 2 * BERT_TINY.layers
    ops = collections.Counter((n.domain, n.op_type) for n in quantized.graph.node)
    assert ops[("com.microsoft", "QAttention")] == BERT_TINY.layers and ops[("com.microsoft", "DynamicQuantizeMatMul")] >= 2 * BERT_TINY.layers
    assert ops[("", "MatMul")] == 0
    feeds = example_inputs(BERT_TINY, seed=3)
    for a, b in zip(_bert_outputs(proto, feeds), _bert_outputs(quantized, feeds)):
        a, b = a.ravel(), b.ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.98


def test_dynamic_int8_emits_nothing_a_target_cannot_run():
    work = zoo.load("bert_tiny")
    model, _ = optimize_model(work, target="generic", opt_level=3, quantize="int8-dynamic")
    assert not any(n.domain == "com.microsoft" for n in model.graph.nodes)


def test_run_int8_dynamic_needs_no_calibration(tmp_path):
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:bert_tiny", "-O3", "--quantize", "int8-dynamic", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert any(n.op_type == "DynamicQuantizeMatMul" for n in onnx.load(out).graph.node)


def _embedding_model(rows: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, 32)).astype(np.float32) * rng.uniform(0.1, 3.0, (rows, 1)).astype(np.float32)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0), helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")],
        "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 10])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10, 8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_quantizes_embedding_tables_per_row():
    proto = _embedding_model(1000)
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["quantize-int8-dynamic"])
    record = next(r for r in report.passes if r.name == "quantize-int8-dynamic")
    assert record.stats == {"embedding": 1, "without_bias": 1}
    quantized = export.to_proto(model)
    tables = [t for t in quantized.graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [1000, 32]]
    assert len(tables) == 1
    assert export.approx_nbytes(quantized) < 0.35 * export.approx_nbytes(proto)
    ids = np.array([[0, 5, 999, 17, 17, 400, 3, 2, 1, 998]], np.int64)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got)) > 0.999
    # A small lookup (two token types) is left float, and so is an excluded one.
    small, _ = optimize_model(_embedding_model(2), passes=["quantize-int8-dynamic"])
    assert [n.op for n in small.graph.nodes][0] == "Gather" and "Cast" not in [n.op for n in small.graph.nodes]
    kept, _ = optimize_model(_embedding_model(1000), passes=["quantize-int8-dynamic"], options={"quantize_exclude": {"embed"}})
    assert "Cast" not in [n.op for n in kept.graph.nodes]


def _three_projections() -> onnx.ModelProto:
    """x read by three MatMuls with bias (Q, K, V) and one without: a transformer's projections."""
    rng = np.random.default_rng(5)
    inits, nodes, outputs = [], [], []
    for name in ("q", "k", "v", "plain"):
        inits.append(numpy_helper.from_array((rng.standard_normal((48, 32)) / 7).astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w_{name}"], [f"{name}_mm" if name != "plain" else name], name=f"proj_{name}"))
        if name != "plain":
            inits.append(numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), f"b_{name}"))
            nodes.append(helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [name], name=f"bias_{name}"))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 8, 32]))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 48])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_int8_quantizes_a_shared_activation_once(monkeypatch):
    from graphopt.passes.quantize import dynamic

    proto = _three_projections()
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["quantize-int8-dynamic"])
    shared = export.to_proto(model)
    ops = collections.Counter(n.op_type for n in shared.graph.node)
    assert ops == {"DynamicQuantizeLinear": 1, "MatMulIntegerToFloat": 4}, ops
    assert next(p for p in report.passes if p.name == "quantize-int8-dynamic").stats["activations_quantized_once"] == 1
    # The same arithmetic as one DynamicQuantizeMatMul per reader.
    monkeypatch.setattr(dynamic, "_share_activation_quantization", lambda graph, ctx: 0)
    separate, _ = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["quantize-int8-dynamic"])
    separate = export.to_proto(separate)
    assert collections.Counter(n.op_type for n in separate.graph.node) == {"DynamicQuantizeMatMul": 4}
    feed = {"x": np.random.default_rng(6).standard_normal((2, 8, 48)).astype(np.float32)}
    for a, b, ref in zip(_bert_outputs(shared, feed), _bert_outputs(separate, feed), _bert_outputs(proto, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert np.linalg.norm(a - ref) < 0.02 * np.linalg.norm(ref)


def _biased_layer(kind: str) -> onnx.ModelProto:
    """One layer whose int8 weights round with a systematic per-channel error: each output
    channel has one weight 100x the rest, so its scale leaves the rest a few levels; x >= 0."""
    rng = np.random.default_rng(3)
    if kind == "conv_without_bias":
        w = (rng.standard_normal((16, 16, 3, 3)) * 0.01).astype(np.float32)
        w[:, 0, 1, 1] = 1.0
        node = helper.make_node("Conv", ["h", "w"], ["y"], name="layer", pads=[1, 1, 1, 1])
        inits, shape, extra = [numpy_helper.from_array(w, "w")], [1, 16, 8, 8], []
    else:
        w = (rng.standard_normal((64, 16)) * 0.01).astype(np.float32)
        w[0] = 1.0
        node = helper.make_node("MatMul", ["h", "w"], ["z"], name="layer")
        extra = [helper.make_node("Add", ["z", "b"], ["y"], name="bias")]
        inits, shape = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(16, 0.1, np.float32), "b")], [1, 8, 64]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="relu"), node, *extra], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["conv_without_bias", "matmul_add"])
def test_bias_correction_removes_the_mean_shift_of_rounded_weights(kind):
    proto = _biased_layer(kind)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(4).standard_normal((32, *shape[1:])) + 0.5).astype(np.float32)
    data = calibration.from_arrays({"x": x}, proto)
    shifts = {}
    for corrected in (False, True):
        work = onnx.load_from_string(proto.SerializeToString())
        model, report = optimize_model(work, target="x86_64", quantize="int8", calibration_data=data,
                                       options={"quantize_gate": False, "bias_correction": corrected, "smooth": False, "calibration_method": "minmax"})
        stats = next(p for p in report.passes if p.name == "quantize-int8").stats
        assert stats["biases_corrected"] == (1 if corrected else 0), stats
        quantized = export.to_proto(model)
        sess = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (proto, quantized)]
        # Measured on the calibration samples with minmax ranges, so that no output is clipped: a
        # clipped output pair shifts the mean too, which is the next layer's to correct.
        error = np.concatenate([sess[1].run(None, {"x": x[i : i + 1]})[0] - sess[0].run(None, {"x": x[i : i + 1]})[0]
                                for i in range(len(x))])
        channel_axis = 1 if kind == "conv_without_bias" else -1
        shifts[corrected] = float(np.abs(np.moveaxis(error, channel_axis, 0).reshape(16, -1).mean(axis=1)).mean())
    assert shifts[True] < 0.3 * shifts[False], shifts


@pytest.mark.parametrize("variant, levels", [("avx2", 63), ("avx512", 63), ("avx512-vnni", 127), ("arm64", 127)])
def test_weights_are_7_bit_where_the_int8_dot_product_saturates(variant, levels):
    # Without VNNI, onnxruntime's u8s8 kernels add pairs of products in int16 with saturation.
    proto = _three_projections()
    target = "arm64" if variant == "arm64" else f"x86_64:{variant}"
    model, _ = optimize_model(onnx.load_from_string(proto.SerializeToString()), target=target, passes=["quantize-int8-dynamic"])
    static, _ = _quantized(_block(), _block_data(_block()), target=target)  # Conv weights, [out, in, kh, kw]
    for quantized, rank in ((export.to_proto(model), 2), (static, 4)):
        weights = [numpy_helper.to_array(t) for t in quantized.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == rank]
        assert weights and all(int(np.abs(w.astype(np.int32)).max()) == levels for w in weights)
