"""Accuracy budgets, per-layer sensitivity and the search that keeps sensitive layers float
(graphopt/accuracy.py), serially and on Ray (graphopt/executor.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import accuracy, calibration, export
from graphopt.accuracy import Budget
from graphopt.errors import GraphoptError, VerificationError
from graphopt.optimize import optimize_model


def _chain(outlier_scale: float = 300.0) -> onnx.ModelProto:
    """x -> MatMul w1 -> Relu -> MatMul w2 -> Relu -> MatMul w3 -> y. w1's first output column is
    `outlier_scale` times the others, so the tensor between w1 and w2 has one huge channel: a
    per-tensor activation scale there rounds every other channel to a few levels."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 32)).astype(np.float32) / 6
    w1[:, 0] *= outlier_scale
    w2 = rng.standard_normal((32, 32)).astype(np.float32) / 6
    w2[0, :] /= outlier_scale  # the model's function stays well scaled
    w3 = rng.standard_normal((32, 16)).astype(np.float32) / 6
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="w1_matmul"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="w2_matmul"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="w3_matmul"),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(proto, n=24, seed=1):
    x = np.random.default_rng(seed).standard_normal((n, 8, 32)).astype(np.float32)
    return calibration.from_arrays({"x": x}, proto)


def _search(quantize, budget, executor=None, sensitivity=False):
    proto = _chain()
    data = _data(proto)
    fp32, _ = optimize_model(onnx.load_from_string(proto.SerializeToString()), opt_level=0, passes=["dce"])
    reference = export.to_proto(fp32)
    accuracy.name_nodes_uniquely(reference.graph.node)
    return accuracy.search(reference, quantize, target="x86_64", options={}, calibration_data=data, budget=Budget.parse(budget),
                           executor=executor, force_sensitivity=sensitivity)


# ---------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("text, kind, value", [("cos=0.99", "cos", 0.99), ("rel=0.05", "rel", 0.05), ("top1=0", "top1", 0.0),
                                                (" COS = 0.5", "cos", 0.5)])
def test_budget_parses_each_form(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize("text", ["cos=1.5", "cos=0", "rel=-1", "top1=2", "acc=0.9", "cos", "cos=x"])
def test_budget_refuses_what_it_cannot_mean(text):
    with pytest.raises(GraphoptError, match="cos=VALUE"):
        Budget.parse(text)


def test_measures_of_known_outputs():
    y0 = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    y = np.array([[1.0, 0.1, 0.0], [0.0, 0.0, 2.0]], np.float32)  # second row's argmax flips
    m = accuracy.measures([{"y": y0}], [{"y": y}])
    cos = float((y0.ravel() @ y.ravel()) / np.linalg.norm(y0) / np.linalg.norm(y))
    assert m.min_cosine == pytest.approx(cos)
    assert m.max_relative_error == pytest.approx(np.linalg.norm(y - y0) / np.linalg.norm(y0))
    assert m.top1_disagreement == pytest.approx(0.5)
    assert m.sqnr_db == pytest.approx(10 * math.log10(5.0 / (0.01 + 8.0)))
    assert Budget.parse("top1=0.5").meets(m) and not Budget.parse("top1=0.4").meets(m)
    assert not Budget.parse("rel=0.5").meets(m) and Budget.parse("rel=2").meets(m)
    # A non-finite output is the worst there is, never a NaN that compares as "fine".
    bad = accuracy.measures([{"y": y0}], [{"y": np.full_like(y0, np.nan)}])
    assert bad.min_cosine == -1.0 and not Budget.parse("cos=0.1").meets(bad)


def test_budget_require_names_the_miss():
    y0 = {"y": np.ones(4, np.float32)}
    y = {"y": np.array([1, 1, 1, -1], np.float32)}
    with pytest.raises(VerificationError, match=r"largest relative error.* is 1, outside the budget rel=0\.1; nothing written"):
        Budget.parse("rel=0.1").require([y0], [y], "; nothing written")
    assert Budget.parse("rel=1").require([y0], [y]).max_relative_error == pytest.approx(1.0)


def test_calibration_data_head_and_tail_split_batches():
    proto = _chain()
    data = _data(proto, n=20)
    head, tail = data.head(12), data.tail(8)
    assert (len(head), len(tail)) == (12, 8)
    whole = [b["x"] for b in data]
    assert all(np.array_equal(a["x"], b) for a, b in zip(head, whole[:12]))
    assert all(np.array_equal(a["x"], b) for a, b in zip(tail, whole[12:]))
    assert head.digest() != tail.digest() and head.samples == 12


# ---------------------------------------------------------------------------------------------
# The search


def test_full_quantization_within_budget_keeps_nothing_float():
    result = _search("quantize-int8-dynamic", "cos=0.5")
    assert result.met and result.kept_float == [] and result.evaluations == 1
    assert [layer.node for layer in result.layers] == ["w1_matmul", "w2_matmul", "w3_matmul"]
    assert all(layer.alone is None for layer in result.layers)  # no sensitivity needed


def test_dynamic_search_keeps_the_layer_reading_the_outlier_float():
    # Dynamic quantization scales each activation per call, per tensor: only w2 reads the tensor
    # with the huge channel, so it alone is sensitive, and keeping it float meets the budget
    # (0.9995 holds with the 7-bit weights of a CPU without VNNI as with 8-bit ones).
    result = _search("quantize-int8-dynamic", "cos=0.9995")
    assert not Budget.parse("cos=0.9995").meets(result.full)
    assert result.met and result.kept_float == ["w2_matmul"]
    by_node = {layer.node: layer for layer in result.layers}
    assert by_node["w2_matmul"].alone.min_cosine < min(by_node["w1_matmul"].alone.min_cosine, by_node["w3_matmul"].alone.min_cosine)
    assert Budget.parse("cos=0.9995").meets(result.final)
    assert "most sensitive of 3" in by_node["w2_matmul"].why and by_node["w1_matmul"].why == ""
    assert result.evaluated_on == "8 held-out calibration batches"


def test_static_search_keeps_both_sides_of_the_outlier_tensor_float():
    # Static Q/DQ puts a pair on w1's output, which is w2's input: quantizing either one alone
    # quantizes that tensor, so both must stay float; w3 stays quantized.
    result = _search("quantize-int8", "cos=0.99")
    assert result.met
    assert set(result.kept_float) == {"w1_matmul", "w2_matmul"}
    assert "calibration_statistics" in result.measured  # collected once, for every candidate


def test_search_result_becomes_the_model_and_the_report():
    proto = _chain()
    # Unsmoothed: smoothing (tests/test_smooth.py) would fix the outlier and leave nothing to keep float.
    model, report = optimize_model(proto, quantize="int8-dynamic", calibration_data=_data(proto), accuracy_budget="cos=0.9995",
                                   options={"smooth": False})
    q = report.quantization
    assert q["kept_float"] == ["w2_matmul"] and q["met"] and q["budget"] == "cos=0.9995"
    ops = {n.name: n.op for n in model.graph.nodes}
    assert ops["w2_matmul"] == "MatMul" and "w1_matmul" not in ops and "w3_matmul" not in ops
    assert sum(op == "DynamicQuantizeMatMul" for op in ops.values()) == 2


def test_custom_metric_budget():
    calls = []

    def agreement(reference, outputs):
        calls.append(len(reference))
        return float(np.mean([np.mean(np.sign(r["y"]) == np.sign(o["y"])) for r, o in zip(reference, outputs)]))

    proto = _chain()
    _, report = optimize_model(proto, quantize="int8-dynamic", calibration_data=_data(proto),
                               accuracy_budget=Budget.custom(agreement, 0.999))
    q = report.quantization
    assert q["budget"] == "agreement>=0.999" and q["met"] and calls and calls[0] == 8
    assert q["final"]["metric"] >= 0.999


def test_no_calibration_data_evaluates_on_random_samples_and_says_so():
    proto = _chain()
    _, report = optimize_model(proto, quantize="int8-dynamic", accuracy_budget="cos=0.5")
    assert report.quantization["evaluated_on"].startswith("8 random samples") and "not representative" in report.quantization["evaluated_on"]


def test_sensitivity_and_tensor_sqnr_are_measured_when_asked():
    result = _search("quantize-int8", "cos=0.5", sensitivity=True)
    assert result.kept_float == [] and all(layer.alone is not None for layer in result.layers)
    # Every layer's output survives static quantization by name, so each has an SQNR; the last
    # one's output is the model's, whose SQNR the search measured on the whole model.
    sqnr = {layer.node: layer.tensor_sqnr_db for layer in result.layers}
    assert all(v is not None and np.isfinite(v) for v in sqnr.values())
    assert sqnr["w3_matmul"] == pytest.approx(result.full.sqnr_db)
    assert sqnr["w1_matmul"] > sqnr["w3_matmul"]  # error builds up along the chain


# ---------------------------------------------------------------------------------------------
# Ray


def test_serial_executor_is_the_default():
    from graphopt import executor

    with executor.create(None) as serial:
        assert serial.name == "serial" and serial.map(lambda shared, x: shared + x, 10, [1, 2]) == [11, 12]


def test_ray_search_decides_what_the_serial_search_decides():
    pytest.importorskip("ray")
    from graphopt.executor import RayExecutor

    serial = _search("quantize-int8-dynamic", "cos=0.9995")
    with RayExecutor("local", num_cpus=2) as executor:
        assert executor.workers == 2
        distributed = _search("quantize-int8-dynamic", "cos=0.9995", executor=executor)
    assert distributed.executor == "ray"
    assert distributed.kept_float == serial.kept_float and distributed.evaluations == serial.evaluations
    assert [layer.alone for layer in distributed.layers] == [layer.alone for layer in serial.layers]
    assert distributed.final == serial.final


# ---------------------------------------------------------------------------------------------
# The CLI


def _chain_files(tmp_path):
    model = tmp_path / "chain.onnx"
    onnx.save(_chain(), model)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((24, 8, 32)).astype(np.float32))
    return model, cal


def test_run_prints_the_layers_kept_float_and_reports_them(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from graphopt.cli import cli

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model, cal = _chain_files(tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["run", str(model), "--quantize", "int8-dynamic", "--calibration", str(cal), "--accuracy-budget",
                                      "cos=0.9995", "--no-smooth", "-o", str(out), "--report", str(report)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console may be narrow: lines wrap anywhere
    assert "1 kept float" in text and "w2_matmul" in text
    q = json.loads(report.read_text())["quantization"]
    assert "most sensitive of 3" in q["layers"][1]["why"]
    assert q["kept_float"] == ["w2_matmul"] and {layer["node"] for layer in q["layers"]} == {"w1_matmul", "w2_matmul", "w3_matmul"}
    assert [n.op_type for n in onnx.load(out).graph.node].count("DynamicQuantizeMatMul") == 2


def test_run_with_ray_decides_like_the_serial_run(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import json

    from click.testing import CliRunner

    from graphopt.cli import cli

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model, cal = _chain_files(tmp_path)
    reports = {}
    for how in ("serial", "ray"):
        report = tmp_path / f"{how}.json"
        extra = ["--ray", "local"] if how == "ray" else []
        result = CliRunner().invoke(cli, ["run", str(model), "--quantize", "int8", "--calibration", str(cal), "--no-quantize-gate",
                                          "--accuracy-budget", "cos=0.99", "-o", str(tmp_path / f"{how}.onnx"), "--report", str(report)] + extra)
        assert result.exit_code == 0, result.output
        reports[how] = json.loads(report.read_text())["quantization"]
    assert reports["ray"]["executor"] == "ray" and reports["serial"]["executor"] == "serial"
    assert reports["ray"]["kept_float"] == reports["serial"]["kept_float"] and reports["serial"]["kept_float"]
    assert reports["ray"]["layers"] == reports["serial"]["layers"]


def test_ray_without_quantize_is_refused(tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--ray", "local", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "--ray runs the accuracy search of --quantize" in result.output


def test_quantize_report_writes_the_plot_and_the_figures(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from graphopt.cli import cli

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model, cal = _chain_files(tmp_path)
    png, figures = tmp_path / "layers.png", tmp_path / "layers.json"
    result = CliRunner().invoke(cli, ["quantize-report", str(model), "--calibration", str(cal), "--plot", str(png), "--json", str(figures)],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = json.loads(figures.read_text())
    # Every layer measured alone, even those the budget did not need.
    assert len(q["layers"]) == 3 and all(layer["alone"] is not None for layer in q["layers"])
    text = " ".join(result.output.split())
    assert "w3_matmul" in text and "SQNR" in text
    bad = CliRunner().invoke(cli, ["quantize-report", str(model), "--calibration", str(cal), "--plot", str(tmp_path / "no" / "x.png")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_candidates_keep_shapes_the_export_leaves_out():
    # A MatMul behind a com.microsoft op: a reloaded model's shape inference cannot say its input's
    # rank, which int4's rule needs; the search hands over what the optimized graph knew.
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft"), helper.make_node("MatMul", ["g", "w"], ["y"], name="proj")],
        "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    job = accuracy.Job(proto.SerializeToString(), "quantize-int4", "x86_64", {}, [], [], Budget.parse("cos=0.9"))
    assert [n.op_type for n in accuracy.quantized(job).graph.node] == ["Gelu", "MatMul"]  # rank unknown: declined
    job.shapes = {"g": (np.float32, ["batch", 8, 64])}
    assert [n.op_type for n in accuracy.quantized(job).graph.node] == ["Gelu", "MatMulNBits"]
