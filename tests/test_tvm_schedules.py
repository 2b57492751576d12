"""graphopt's written MetaSchedule spaces (targets/backends/tvm_schedules.py): which convolutions
they take, and that a library tuned in them and compiled from the database computes what the
model does, in float32 and in integers (VNNI)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import runtime, targets
from graphopt.targets.backends import tvm as tvm_backend

pytest.importorskip("tvm", reason="the tvm extra is not installed")

from graphopt.targets.backends import tvm_schedules, tvm_tuning  # noqa: E402


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _float_block(groups: int = 1, out_channels: int = 32) -> onnx.ModelProto:
    """Conv 3x3 + bias + Relu, then Conv 1x1 with a residual Add and Relu: ResNet's block shape."""
    rng = np.random.default_rng(0)
    inits = [_init("w1", rng.standard_normal((out_channels, 16 // groups, 3, 3)).astype(np.float32) * 0.1),
             _init("b1", rng.standard_normal(out_channels).astype(np.float32)),
             _init("w2", rng.standard_normal((out_channels, out_channels, 1, 1)).astype(np.float32) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node("Add", ["c2", "r1"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 14, 14])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _int8_conv(x_zero: int = 131) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(W_q) per channel, bias) -> Relu -> Q -> DQ, 8 -> 32 channels."""
    rng = np.random.default_rng(1)
    inits = [_init("x_scale", np.float32(0.05)), _init("x_zero", np.uint8(x_zero)),
             _init("w_q", rng.integers(-127, 128, (32, 8, 3, 3)).astype(np.int8)),
             _init("w_scale", rng.uniform(0.001, 0.01, 32).astype(np.float32)), _init("w_zero", np.zeros(32, np.int8)),
             _init("bias", rng.standard_normal(32).astype(np.float32)),
             _init("y_scale", np.float32(0.1)), _init("y_zero", np.uint8(0))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "y_scale", "y_zero"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _host():
    return tvm_backend.for_tvm(targets.get("x86_64"))


def _kinds(proto, spec: dict) -> list:
    import tvm
    import tvm.s_tir.meta_schedule as ms

    tvm_tgt = tvm.target.Target(spec)
    tasks = ms.relax_integration.extract_tasks(tvm_backend.tuning_module(proto, tvm_tgt), tvm_tgt)
    return sorted((tvm_schedules.conv_kind(t.dispatched[0], tvm_tgt) or "generic") for t in tasks if "conv2d" in t.task_name)


AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4", "num-cores": 2}


def test_the_written_space_takes_plain_convolutions_and_leaves_the_rest():
    assert _kinds(_float_block(), AVX512) == ["float32", "float32"]
    # A grouped convolution is another TOPI compute; 24 output channels fill no 16-lane vector.
    assert _kinds(_float_block(groups=2), AVX512) == ["float32", "generic"]
    assert _kinds(_float_block(out_channels=24), AVX512) == ["generic", "generic"]
    # AVX2: 8 lanes, and 24 channels are three vectors.
    assert _kinds(_float_block(out_channels=24), {**AVX512, "mcpu": "x86-64-v3"}) == ["float32", "float32"]


def test_integer_convolutions_take_the_vnni_space_only_where_the_cpu_has_vnni():
    assert _kinds(_int8_conv(), {**AVX512, "mattr": ["+avx512vnni"]}) == ["int8"]
    assert _kinds(_int8_conv(), AVX512) == ["generic"]


def _tuned(proto, tmp_path, trials: int):
    db = tmp_path / "db"
    record = tvm_tuning.tune(proto, _host(), db, trials)
    library = tmp_path / "m.so"
    tvm_backend.build(proto, _host(), db, library)
    return record, runtime.load(library)


def test_float_convolutions_tuned_in_the_written_space_compute_what_the_model_does(tmp_path):
    proto = _float_block()
    record, library = _tuned(proto, tmp_path, 24)
    assert record["written_space_tasks"] == 2 and record["trials"] > 0 and record["failed_trials"] < record["trials"]
    x = np.random.default_rng(2).standard_normal((1, 16, 14, 14)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(library({"x": x})["y"], expected, rtol=1e-4, atol=1e-4)


def test_integer_convolutions_tuned_with_vnni_compute_what_the_qdq_graph_does(cli, tmp_path):
    """Tuned and compiled by the CLI, each in its own process: replaying the database's integer
    traces needs graphopt's VNNI intrinsic registered where nothing was tuned."""
    host = tvm_backend.tvm_target(_host())
    if "+avx512vnni" not in host.get("mattr", []):
        pytest.skip("this CPU has no AVX-512 VNNI")
    proto = _int8_conv()
    model, db, out = tmp_path / "qdq.onnx", tmp_path / "db", tmp_path / "qdq.so"
    onnx.save(proto, model)
    tuned = cli("tune", model, "--trials", "16", "--db", db, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    assert "1 convolutions in graphopt's written space" in tuned.stdout, tuned.stdout
    built = cli("run", model, "--backend", "tvm", "--db", db, "-o", out, timeout=600)
    assert built.returncode == 0, built.stderr
    x = np.random.default_rng(3).uniform(-4, 8, (1, 8, 10, 10)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = runtime.load(out)({"x": x})["y"]
    # The accumulation is exact; the float rescale may round a value to the neighbouring step.
    assert np.abs(got - expected).max() <= 0.1 + 1e-6 and np.mean(got != expected) < 0.01
