"""The roofline cost model (targets/cost.py), its calibration (targets/calibrate.py) and the rewrites
it decides (Rule(cost=True), fuse-conv-add-activation), per target."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from graphopt import api, targets
from graphopt.cli import cli
from graphopt.errors import GraphoptError
from graphopt.targets import calibrate, cost
from graphopt.targets.cost import CostModel, op_class


def _var(name, shape, dtype=np.float32):
    return gs.Variable(name, dtype=dtype, shape=shape)


def _conv(c_in=64, c_out=64, hw=56, group=1):
    x = _var("x", [1, c_in, hw, hw])
    w = gs.Constant("w", np.zeros((c_out, c_in // group, 3, 3), np.float32))
    y = _var("y", [1, c_out, hw, hw])
    return gs.Node("Conv", name="conv", inputs=[x, w], outputs=[y], attrs={"group": group, "pads": [1, 1, 1, 1]})


def _add(n=1 << 20):
    a, b, y = _var("a", [n]), _var("b", [n]), _var("y", [n])
    return gs.Node("Add", name="add", inputs=[a, b], outputs=[y])


@pytest.fixture(autouse=True)
def _no_user_calibration(tmp_path, monkeypatch):
    # A calibration this machine's user wrote must not change what the tests predict.
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))


def test_op_classes():
    assert op_class(_conv()) == "conv"
    assert op_class(_conv(group=64)) == "conv-grouped"
    assert op_class(_add()) == "elementwise"
    assert op_class(gs.Node("Reshape", inputs=[], outputs=[])) == "view"
    assert op_class(gs.Node("SkipLayerNormalization", domain="com.microsoft", inputs=[], outputs=[])) == "normalization"
    assert op_class(gs.Node("FancyOp", domain="com.example", inputs=[], outputs=[])) == "other"


def test_per_channel_broadcasts_are_their_own_class_and_gemm_shapes_are_read():
    x = _var("x", [1, 8, 4, 4])
    per_channel = gs.Node("Mul", inputs=[x, gs.Constant("s", np.ones((8, 1, 1), np.float32))], outputs=[_var("y", [1, 8, 4, 4])])
    scalar = gs.Node("Mul", inputs=[x, gs.Constant("t", np.ones((), np.float32))], outputs=[_var("z", [1, 8, 4, 4])])
    assert op_class(per_channel) == "broadcast" and op_class(scalar) == "elementwise"
    assert cost.gemm_dims(_conv(c_in=64, c_out=32)) == (64 * 9, 32)
    assert cost.gemm_dims(_conv(c_in=64, c_out=64, group=64)) == (9, 1)
    a, b = _var("a", [2, 5, 7]), gs.Constant("b", np.zeros((7, 3), np.float32))
    assert cost.gemm_dims(gs.Node("MatMul", inputs=[a, b], outputs=[_var("c", [2, 5, 3])])) == (7, 3)
    gemm = gs.Node("Gemm", inputs=[_var("p", [4, 7]), gs.Constant("q", np.zeros((3, 7), np.float32))],
                   outputs=[_var("r", [4, 3])], attrs={"transB": 1})
    assert cost.gemm_dims(gemm) == (7, 3)


def test_short_gemms_run_below_the_large_gemm_rate():
    f = cost.ClassFactors(0.8, 0.5, 1.0, half_k=16, half_n=8)
    assert f.efficiency(0, 0) == 0.8
    assert f.efficiency(16, 8) == pytest.approx(0.2)
    assert f.efficiency(4096, 4096) == pytest.approx(0.8, rel=0.01)
    model = CostModel(targets.get("x86_64:avx512"), calibration=False)
    wide, narrow = model.estimate(_conv(c_in=64, c_out=64)), model.estimate(_conv(c_in=64, c_out=4))
    # 16x fewer FLOPs, but each one slower: the narrow conv costs more than 1/16 of the wide one.
    assert narrow.compute_s > wide.compute_s / 16


def test_a_conv_is_compute_bound_and_an_add_memory_bound():
    model = CostModel(targets.get("x86_64:avx512"), calibration=False)
    conv, add = model.estimate(_conv()), model.estimate(_add())
    assert conv.bound == "compute" and conv.intensity > 50
    assert add.bound == "memory" and add.intensity < 1
    # Times follow the roofline: the conv's compute time is its FLOPs over the derated peak.
    hw = targets.get("x86_64:avx512").hardware
    assert conv.compute_s == pytest.approx(conv.flops / (hw.peak("fp32") * 1e9 * model.factors("conv").efficiency(64 * 9, 64)))
    assert add.memory_s == pytest.approx(add.bytes / (hw.memory_bandwidth_gbs * 1e9 * model.factors("elementwise").memory_efficiency))
    assert conv.seconds == pytest.approx(max(conv.compute_s, conv.memory_s) + conv.overhead_s)
    assert conv.roofline_s < conv.seconds


def test_threads_scale_compute_and_a_gpu_ignores_them():
    x86 = targets.get("x86_64:avx512")
    one, all_cores = CostModel(x86, threads=1, calibration=False), CostModel(x86, calibration=False)
    assert all_cores.threads == x86.hardware.cores
    assert one.estimate(_conv()).compute_s == pytest.approx(all_cores.estimate(_conv()).compute_s * x86.hardware.cores)
    gpu = CostModel(targets.get("cuda:a100"), threads=1, calibration=False)
    assert gpu.threads == targets.get("cuda:a100").hardware.cores
    # A newer chip is faster on the same node.
    assert CostModel(targets.get("cuda:h100"), calibration=False).estimate(_conv()).seconds < gpu.estimate(_conv()).seconds


def test_the_dtype_picks_the_peak():
    x = _var("x", [1, 64, 56, 56], np.float16)
    w = gs.Constant("w", np.zeros((64, 64, 3, 3), np.float16))
    half = gs.Node("Conv", inputs=[x, w], outputs=[_var("y", [1, 64, 56, 56], np.float16)], attrs={"pads": [1, 1, 1, 1]})
    a100 = CostModel(targets.get("cuda:a100"), calibration=False)
    assert a100.estimate(half).dtype == "fp16"
    assert a100.estimate(half).compute_s < a100.estimate(_conv()).compute_s / 10  # tensor cores


def test_no_cost_model_without_hardware():
    assert cost.for_target(targets.get("generic")) is None
    with pytest.raises(GraphoptError, match="no hardware figures"):
        CostModel(targets.get("generic"))


def test_fit_recovers_the_factors_samples_were_drawn_from():
    model = CostModel(targets.get("x86_64:avx512"), threads=1, calibration=False)
    truth = {"conv": cost.ClassFactors(0.3, 0.2, 8.0), "elementwise": cost.ClassFactors(0.2, 0.05, 3.0)}
    rng = np.random.default_rng(0)
    drawn = []
    for i in range(40):
        hw = int(rng.integers(7, 112))
        node = _conv(c_in=int(rng.choice([16, 64, 256])), c_out=int(rng.choice([16, 64, 256])), hw=hw)
        node.name = f"conv{i}"
        add = _add(int(rng.integers(1 << 10, 1 << 22)))
        add.name = f"add{i}"
        for n in (node, add):
            est = model.estimate(n)
            f = truth[est.op_class]
            seconds = max(est.flops / (model.peak(est.dtype) * f.compute_efficiency),
                          est.bytes / (model.hardware.memory_bandwidth_gbs * 1e9 * f.memory_efficiency)) + f.overhead_us * 1e-6
            drawn.append(calibrate.Sample("synthetic", est, seconds * float(rng.lognormal(0, 0.03))))
    fitted = calibrate.fit(drawn, model)
    # What the samples determine: a 3x3 conv is compute-bound, an Add memory-bound (the other
    # factor of each stays near its prior, which no sample contradicts).
    assert fitted.factors["conv"].compute_efficiency == pytest.approx(0.3, rel=0.1)
    assert fitted.factors["elementwise"].memory_efficiency == pytest.approx(0.05, rel=0.1)
    assert fitted.factors["elementwise"].overhead_us == pytest.approx(3.0, rel=0.5)


def test_calibration_files_are_checked_with_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": 1, "classes": {"conv": {"compute_efficiency": -1, "memory_efficiency": 1, "overhead_us": 1}}}))
    with pytest.raises(GraphoptError, match=r"bad.json: classes.conv: factors must be positive"):
        cost.read_calibration(bad)
    bad.write_text(json.dumps({"schema": 1, "classes": {"convolution": {}}}))
    with pytest.raises(GraphoptError, match=r"classes.convolution: unknown op class"):
        cost.read_calibration(bad)
    bad.write_text("{")
    with pytest.raises(GraphoptError, match="cannot read it"):
        cost.read_calibration(bad)


def test_x86_64_ships_a_calibration_and_the_others_say_they_have_none():
    assert CostModel(targets.get("x86_64:avx2")).calibrated.startswith("calibrated (")
    assert CostModel(targets.get("arm64")).calibrated == "uncalibrated (default factors)"


def test_calibrate_cost_writes_the_file_the_host_target_then_uses(tmp_path):
    if "host" not in targets.families()["x86_64"].variants:
        pytest.skip("not an x86_64 machine: no host variant to calibrate")
    out = cost.user_calibration_path("x86_64:host")
    result = CliRunner().invoke(cli, ["calibrate-cost", "zoo:digits_cnn", "zoo:bert_tiny", "--runs", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["target"] == "x86_64:host" and {"matmul", "normalization"} <= set(data["classes"])
    assert "zoo:bert_tiny" in data["description"]
    model = CostModel(targets.get("x86_64:host"))
    assert model.calibration.path == str(out)
    assert model.factors("matmul").compute_efficiency == data["classes"]["matmul"]["compute_efficiency"]


def test_calibrate_cost_refuses_a_target_that_is_not_this_machine():
    result = CliRunner().invoke(cli, ["calibrate-cost", "--target", "arm64"])
    assert result.exit_code != 0 and "measures this machine" in result.output


# ---------------------------------------------------------------------------------------------
# Decisions: a rewrite kept on one target and declined on another


def _residual_block() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 16
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c, c, 3, 3], rng.normal(0, 0.1, (c, c, 3, 3)).astype(np.float32).ravel())
             for n in ("w1", "w2")]
    inits.append(helper.make_tensor("b2", TensorProto.FLOAT, [c], rng.normal(0, 0.1, c).astype(np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Conv", ["hr", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["y", "x"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["out"], name="relu2"),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ops(proto):
    return [(n.domain, n.op_type) for n in proto.graph.node]


def test_conv_add_relu_is_fused_on_arm64_and_declined_on_x86_64_with_the_reason():
    arm = api.optimize(_residual_block(), target="arm64", opt_level=3)
    assert ("com.microsoft", "FusedConv") in _ops(arm.model) and ("", "Add") not in _ops(arm.model)
    assert arm.fidelity.ok
    x86 = api.optimize(_residual_block(), target="x86_64", opt_level=3)
    assert ("", "Add") in _ops(x86.model) and ("com.microsoft", "FusedConv") not in _ops(x86.model)
    decision = next(d for p in x86.report.to_dict()["passes"] if p["name"] == "fuse-conv-add-activation" for d in p["cost_decisions"])
    assert not decision["kept"] and "NCHWc" in decision["reason"] and decision["node"] == "relu2"
    kept = next(d for p in arm.report.to_dict()["passes"] if p["name"] == "fuse-conv-add-activation" for d in p["cost_decisions"])
    assert kept["kept"] and kept["after_s"] < kept["before_s"]
    # -O2 does not run it anywhere; a target without a cost model (generic) cannot emit FusedConv at all.
    assert ("com.microsoft", "FusedConv") not in _ops(api.optimize(_residual_block(), target="arm64", opt_level=2).model)
    assert ("com.microsoft", "FusedConv") not in _ops(api.optimize(_residual_block(), target="generic", opt_level=3).model)


def test_the_cost_option_off_applies_every_cost_checked_rewrite():
    from graphopt.optimize import optimize_model

    proto = _residual_block()
    model, report = optimize_model(proto, target="x86_64", opt_level=3, options={"cost": False})
    ops = [(n.domain, n.op) for n in model.graph.nodes]
    assert ("com.microsoft", "FusedConv") in ops
    assert not any(p["cost_decisions"] for p in report.to_dict()["passes"])


def test_a_broadcast_residual_is_not_fused():
    proto = _residual_block()
    proto.graph.initializer.append(helper.make_tensor("z", TensorProto.FLOAT, [16, 1, 1], np.ones(16, np.float32)))
    proto.graph.node[3].input[1] = "z"
    arm = api.optimize(proto, target="arm64", opt_level=3)
    assert ("com.microsoft", "FusedConv") not in _ops(arm.model)


def test_run_report_prints_the_decisions(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(_residual_block(), path)
    result = CliRunner().invoke(cli, ["run", str(path), "-O3", "--target", "x86_64", "-o", str(tmp_path / "o.onnx")],
                                env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "cost model decisions" in result.output and "declined" in result.output and "NCHWc" in result.output


# ---------------------------------------------------------------------------------------------
# What a user sees: inspect --target, the roofline plot, run's predicted time


def test_inspect_target_predicts_per_class_and_node_and_writes_the_plot(tmp_path):
    path, plot = tmp_path / "block.onnx", tmp_path / "roofline.png"
    onnx.save(_residual_block(), path)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--target", "arm64:neoverse-n1", "--plot", str(plot)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "predicted on arm64:neoverse-n1" in result.output and "predicted time per op class" in result.output
    assert "slowest nodes" in result.output and "conv2" in result.output
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    # One core: at the variant's 64, kernels this small are all fixed cost.
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--target", "arm64", "--threads", "1", "--json"]).output)
    predicted = data["predicted"]
    assert {n["name"] for n in predicted["nodes"]} == {"conv1", "relu1", "conv2", "residual", "relu2"}
    assert predicted["seconds"] == pytest.approx(sum(n["seconds"] for n in predicted["nodes"]))
    assert predicted["roofline_seconds"] < predicted["seconds"]
    conv = next(n for n in predicted["nodes"] if n["name"] == "conv2")
    add = next(n for n in predicted["nodes"] if n["name"] == "residual")
    assert conv["bound"] == "compute" and add["bound"] in ("memory", "overhead") and conv["intensity"] > add["intensity"]


def test_inspect_refuses_a_plot_without_target_and_a_target_without_hardware(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(_residual_block(), path)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--plot", str(tmp_path / "r.png")])
    assert result.exit_code != 0 and "--plot needs --target" in result.output
    result = CliRunner().invoke(cli, ["inspect", str(path), "--target", "generic"])
    assert result.exit_code != 0 and "no hardware figures" in result.output


def test_run_reports_the_predicted_time_before_and_after(tmp_path):
    result = api.optimize(_residual_block(), target="arm64", opt_level=3)
    p = result.report.to_dict()["predicted"]
    assert p["target"] == "arm64:neoverse-n1" and p["exact"]
    assert p["after_s"] < p["before_s"]  # the fused residual
    assert api.optimize(_residual_block(), target="generic", opt_level=3).report.predicted is None
