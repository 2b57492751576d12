"""smooth-activations (passes/quantize/smooth.py): exact in float, applied only where it lowers the
quantized error, and what makes a transformer-like layer quantize well."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import calibration, export, verify
from graphopt.optimize import optimize_model

K, N = 64, 32


def _model(first: str, outlier: float = 60.0) -> onnx.ModelProto:
    """x -> (LayerNormalization | Relu) -> MatMul w -> y, where channel 3 of the activation the
    MatMul reads is `outlier` times the others (LayerNorm: through its scale; Relu: through x)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    if first == "layernorm":
        gamma = np.ones(K, np.float32)
        gamma[3] = outlier
        inits += [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.full(K, 0.1, np.float32), "beta")]
        head = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="norm", axis=-1)
    else:
        head = helper.make_node("Relu", ["x"], ["h"], name="relu")
    graph = helper.make_graph(
        [head, helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, N])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(first: str, n: int = 12, outlier: float = 60.0, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 16, K)).astype(np.float32)
    if first == "relu":
        x[..., 3] = np.abs(x[..., 3]) * outlier
    return x


def _smoothed(proto, x):
    data = calibration.from_arrays({"x": x}, proto)
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["smooth-activations"], calibration_data=data)
    record = next(r for r in report.passes if r.name == "smooth-activations")
    return export.to_proto(model), record.stats


@pytest.mark.parametrize("first, where", [("layernorm", "into_layernorm"), ("relu", "with_mul")])
def test_smoothing_is_exact_in_float_and_goes_where_it_can(first, where):
    proto = _model(first)
    x = _inputs(first)
    smoothed, stats = _smoothed(proto, x)
    assert stats.get(where) == 1, stats
    ops = [n.op_type for n in smoothed.graph.node]
    assert ops.count("Mul") == (1 if where == "with_mul" else 0)
    for i in range(3):
        feed = {"x": x[i : i + 1]}
        np.testing.assert_allclose(verify.run(smoothed, feed)["y"], verify.run(proto, feed)["y"], rtol=1e-4, atol=1e-4)


def _dynamic_error(proto, x, keep_outliers: bool = False, keep=frozenset()) -> float:
    keep = frozenset(keep) | {n.name for n in proto.graph.node if keep_outliers and n.name.endswith("_outlier_matmul")}
    model, _ = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["quantize-int8-dynamic"], options={"quantize_exclude": keep})
    quantized = export.to_proto(model)
    errors = []
    for i in range(len(x)):
        feed = {"x": x[i : i + 1]}
        y0, y = verify.run(proto, feed)["y"], verify.run(quantized, feed)["y"]
        errors.append(np.linalg.norm(y - y0) / np.linalg.norm(y0))
    return float(np.mean(errors))


@pytest.mark.parametrize("first", ["layernorm", "relu"])
def test_smoothing_lowers_the_dynamic_int8_error(first):
    proto = _model(first)
    x = _inputs(first)
    smoothed, _ = _smoothed(proto, x[:8])
    held_out = _inputs(first, n=6, seed=7)
    before, after = _dynamic_error(proto, held_out), _dynamic_error(smoothed, held_out)
    assert after < 0.7 * before, (before, after)


def test_even_channels_are_left_alone():
    proto = _model("relu")
    x = np.abs(np.random.default_rng(2).standard_normal((8, 16, K))).astype(np.float32)  # no outlier channel
    smoothed, stats = _smoothed(proto, x)
    assert not stats and [n.op_type for n in smoothed.graph.node] == ["Relu", "MatMul"]


def test_without_data_nothing_changes():
    proto = _model("layernorm")
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["smooth-activations"])
    assert not next(r for r in report.passes if r.name == "smooth-activations").changed


def test_excluded_matmul_is_not_smoothed():
    proto = _model("relu")
    data = calibration.from_arrays({"x": _inputs("relu")}, proto)
    model, _ = optimize_model(proto, passes=["smooth-activations"], calibration_data=data, options={"quantize_exclude": {"proj"}})
    assert [n.op for n in model.graph.nodes] == ["Relu", "MatMul"]


def test_quantize_int8_dynamic_smooths_first_when_it_has_data():
    proto = _model("relu")
    data = calibration.from_arrays({"x": _inputs("relu", n=24)}, proto)
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), quantize="int8-dynamic", calibration_data=data,
                                   accuracy_budget="cos=0.9")
    assert [r.name for r in report.passes if r.changed][:1] == ["smooth-activations"]
    assert [n.op for n in model.graph.nodes] == ["Relu", "Mul", "DynamicQuantizeMatMul"]
    _, plain = optimize_model(onnx.load_from_string(proto.SerializeToString()), quantize="int8-dynamic", calibration_data=data,
                              accuracy_budget="cos=0.9", options={"smooth": False})
    assert "smooth-activations" not in [r.name for r in plain.passes]


def test_split_off_outlier_channels_are_exact_and_stay_float():
    proto = _model("relu", outlier=400.0)
    x = _inputs("relu", outlier=400.0)
    data = calibration.from_arrays({"x": x[:8]}, proto)
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["smooth-activations"], calibration_data=data,
                                   options={"smooth_splits": (1, 4)})
    stats = next(r for r in report.passes if r.name == "smooth-activations").stats
    assert stats.get("outliers_split_off") == 1, stats
    split = export.to_proto(model)
    gather = next(n for n in split.graph.node if n.op_type == "Gather")
    index = next(t for t in split.graph.initializer if t.name == gather.input[1])
    assert 3 in numpy_helper.to_array(index)  # the outlier channel is computed in float
    feed = {"x": x[9:10]}
    np.testing.assert_allclose(verify.run(split, feed)["y"], verify.run(proto, feed)["y"], rtol=1e-4, atol=1e-3)
    # Quantization leaves the split-off MatMul float, and the error falls below smoothing's alone.
    quantized, _ = optimize_model(split, passes=["quantize-int8-dynamic"], options={"quantize_exclude": frozenset(
        n.name for n in split.graph.node if n.name.endswith("_outlier_matmul"))})
    assert [n.op for n in quantized.graph.nodes].count("MatMul") == 1
    smoothed, _ = _smoothed(proto, x[:8])
    held_out = _inputs("relu", n=6, seed=7, outlier=400.0)
    assert _dynamic_error(split, held_out, keep_outliers=True) < _dynamic_error(smoothed, held_out)


def _ffn(outlier: float = 50.0, domain: str = "com.microsoft") -> onnx.ModelProto:
    """x -> MatMul w1 -> Add b1 -> Gelu -> MatMul w2 -> y, where channel 5 of the GELU output is
    `outlier` times the others (through w1's column): a transformer FFN's shape."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((K, 4 * K)) / 8).astype(np.float32)
    w1[:, 5] *= outlier
    w2 = (rng.standard_normal((4 * K, N)) / 8).astype(np.float32)
    b1 = np.full(4 * K, 0.05, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="ffn1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn1_bias"),
        helper.make_node("Gelu", ["hb"], ["g"], name="gelu", domain=domain),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="ffn2"),
    ]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, N])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_outlier_channels_after_a_matmul_are_duplicated_exactly():
    proto = _ffn()
    x = np.random.default_rng(4).standard_normal((12, 16, K)).astype(np.float32)
    data = calibration.from_arrays({"x": x[:8]}, proto)
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["smooth-activations"], calibration_data=data)
    stats = next(r for r in report.passes if r.name == "smooth-activations").stats
    assert stats.get("channels_duplicated") == 1, stats
    out = export.to_proto(model)
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    ffn1, ffn2 = (next(n for n in out.graph.node if n.name == name) for name in ("ffn1", "ffn2"))
    channels = weights[ffn1.input[1]].shape[1]
    assert 4 * K < channels <= 4 * K + 32 and channels % 16 == 0  # a few copies, K kept kernel-friendly
    assert weights[ffn2.input[1]].shape[0] == channels
    # Channel 5 has copies: its column of w1 appears more than once.
    w1 = weights[ffn1.input[1]]
    assert sum(np.allclose(w1[:, j], w1[:, 5]) for j in range(channels)) > 1
    assert [n.op_type for n in out.graph.node].count("Mul") == 1  # the smoothing Mul, no new node
    for i in range(8, 12):
        feed = {"x": x[i : i + 1]}
        np.testing.assert_allclose(verify.run(out, feed)["y"], verify.run(proto, feed)["y"], rtol=1e-4, atol=1e-4)
    # The copies cut the error of quantizing the MatMul after GELU below smoothing's alone (0.68x here).
    plain, _ = optimize_model(onnx.load_from_string(proto.SerializeToString()), passes=["smooth-activations"], calibration_data=data,
                              options={"smooth_duplicates": ()})
    held_out = x[8:]
    assert _dynamic_error(out, held_out, keep={"ffn1"}) < 0.8 * _dynamic_error(export.to_proto(plain), held_out, keep={"ffn1"})


def test_channels_are_not_duplicated_where_the_producer_is_read_elsewhere():
    proto = _ffn()
    proto.graph.output.append(helper.make_tensor_value_info("hb", TensorProto.FLOAT, [1, 16, 4 * K]))
    x = np.random.default_rng(4).standard_normal((8, 16, K)).astype(np.float32)
    data = calibration.from_arrays({"x": x}, proto)
    model, report = optimize_model(proto, passes=["smooth-activations"], calibration_data=data)
    stats = next(r for r in report.passes if r.name == "smooth-activations").stats
    assert not stats.get("channels_duplicated"), stats
    assert next(n for n in model.graph.nodes if n.name == "ffn1").inputs[1].shape[1] == 4 * K


def _conv_pair(between: str, outlier: float = 40.0) -> onnx.ModelProto:
    """x -> Conv a (8 -> 16, 3x3) -> `between` -> Conv b (16 -> 8, 3x3) -> y, where a's output
    channel 3 is `outlier` times the others."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)
    a[3] *= outlier
    b = (rng.standard_normal((8, 16, 3, 3)) / 8).astype(np.float32)
    inits = [numpy_helper.from_array(a, "a"), numpy_helper.from_array(np.full(16, 0.05, np.float32), "a_bias"), numpy_helper.from_array(b, "b")]
    nodes = [helper.make_node("Conv", ["x", "a", "a_bias"], ["h"], name="conv_a", pads=[1, 1, 1, 1])]
    if between == "relu_maxpool":
        nodes += [helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    else:
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
        nodes += [helper.make_node("Clip", ["h", "lo", "hi"], ["p"], name="relu6")]
    nodes.append(helper.make_node("Conv", ["p", "b"], ["y"], name="conv_b", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _static_error(proto, x, **options) -> float:
    data = calibration.from_arrays({"x": x[:8]}, proto)
    model, _ = optimize_model(onnx.load_from_string(proto.SerializeToString()), target="x86_64", quantize="int8", calibration_data=data,
                              options={"quantize_gate": False, **options})
    quantized = export.to_proto(model)
    errors = []
    for i in range(8, len(x)):
        feed = {"x": x[i : i + 1]}
        y0, y = verify.run(proto, feed)["y"], verify.run(quantized, feed)["y"]
        errors.append(np.linalg.norm(y - y0) / np.linalg.norm(y0))
    return float(np.mean(errors))


def test_conv_channels_are_equalized_exactly_and_lower_the_static_int8_error():
    proto = _conv_pair("relu_maxpool")
    x = np.random.default_rng(2).standard_normal((14, 8, 16, 16)).astype(np.float32)
    smoothed, stats = _smoothed(proto, x[:8])
    assert stats.get("convs_equalized") == 1, stats
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in proto.graph.node]  # no node added
    for i in range(8, 11):
        feed = {"x": x[i : i + 1]}
        np.testing.assert_allclose(verify.run(smoothed, feed)["y"], verify.run(proto, feed)["y"], rtol=1e-4, atol=1e-4)
    plain = _static_error(proto, x, equalize_convs=False)
    equalized = _static_error(proto, x)
    assert equalized < 0.7 * plain, (equalized, plain)


def test_a_clip_between_convs_stops_equalization():
    proto = _conv_pair("clip")
    x = np.random.default_rng(2).standard_normal((8, 8, 16, 16)).astype(np.float32)
    _, stats = _smoothed(proto, x)
    assert not stats.get("convs_equalized"), stats
