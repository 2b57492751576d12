"""QDQ under TVM in integers (targets/backends/tvm_int8.py): which layers are rewritten, that the
integer module computes what the float QDQ graph does (padding with a zero point included), and
that what it does not understand stays float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import models, runtime, targets
from graphopt.targets.backends import tvm as tvm_backend

pytest.importorskip("tvm", reason="the tvm extra is not installed")

from graphopt.targets.backends.tvm_int8 import integer_layers  # noqa: E402


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _qdq_layer(op: str, *, x_zero: int, w_zero=0, per_channel=True, pads=(1, 1, 1, 1), x_dtype=np.uint8) -> onnx.ModelProto:
    """x -> Q -> DQ -> op(DQ(W_q), bias) with the weight quantized symmetric (or not); a float output."""
    rng = np.random.default_rng(1)
    if op == "Conv":
        shape_x, w = [1, 6, 9, 9], rng.integers(-127, 128, (8, 6, 3, 3))
        out_shape = [1, 8, 9 + pads[0] + pads[2] - 2, 9 + pads[1] + pads[3] - 2]
        w_axis = 0
    elif op == "Gemm":
        shape_x, w, out_shape, w_axis = [3, 12], rng.integers(-127, 128, (5, 12)), [3, 5], 0  # transB: W is [N, K]
    else:
        shape_x, w, out_shape, w_axis = [2, 4, 12], rng.integers(-127, 128, (12, 5)), [2, 4, 5], 1
    channels = w.shape[w_axis]
    w_scale = (rng.uniform(0.001, 0.01, channels) if per_channel else np.array(0.004)).astype(np.float32)
    w_zero_point = np.full(w_scale.shape, w_zero, np.int8)
    inits = [_init("x_scale", np.float32(0.05)), _init("x_zero", x_dtype(x_zero)), _init("w_q", w.astype(np.int8)),
             _init("w_scale", w_scale), _init("w_zero", w_zero_point), _init("bias", rng.standard_normal(channels).astype(np.float32))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=w_axis)]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["y"], pads=list(pads), kernel_shape=[3, 3]))
    elif op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x_dq", "w_dq", "bias"], ["y"], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _float_reference(proto, feeds):
    """onnxruntime with no graph rewrites: QDQ computed as written, in float."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _built(proto, tmp_path):
    library = tmp_path / "m.so"
    manifest = tvm_backend.build(proto, tvm_backend.for_tvm(targets.get("x86_64")), None, library)
    return manifest, runtime.load(library)


@pytest.mark.parametrize(("op", "x_zero", "pads"), [("Conv", 0, (1, 1, 1, 1)), ("Conv", 131, (1, 1, 1, 1)), ("Conv", 77, (0, 2, 1, 0)),
                                                    ("Conv", 90, (0, 0, 0, 0)), ("Gemm", 120, None), ("MatMul", 64, None)])
def test_a_qdq_layer_computes_in_integers_what_the_float_graph_computes(tmp_path, op, x_zero, pads):
    proto = _qdq_layer(op, x_zero=x_zero, **({"pads": pads} if pads else {}))
    x = np.random.default_rng(2).uniform(-4, 8, [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    manifest, library = _built(proto, tmp_path)
    assert manifest["integer_layers"] == 1
    got, expected = library({"x": x})["y"], _float_reference(proto, {"x": x})
    # Integer accumulation is exact; only the float scaling rounds differently.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_rewritten_module_has_no_float_weights_left_for_the_layer():
    from tvm import relax

    mod = tvm_backend.relax_module(_qdq_layer("Conv", x_zero=131))
    text = mod.script()
    assert 'out_dtype="int32"' in text and "R.dequantize(metadata" not in text
    assert integer_layers(relax.transform.LegalizeOps()(mod)) == 0  # what it counts is the Relax op, before lowering to TIR
    assert integer_layers(mod) == 1


@pytest.mark.parametrize("kind", ["asymmetric weights", "int8 weights with a uint8 zero point"])
def test_what_the_rewrite_does_not_handle_stays_float_and_correct(tmp_path, kind):
    proto = _qdq_layer("Conv", x_zero=100, w_zero=3) if kind == "asymmetric weights" else _qdq_layer("Conv", x_zero=0)
    if kind != "asymmetric weights":
        # Weights stored as uint8 (onnxruntime's u8u8): no u8 x s8 accumulation for them.
        w = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w_q")).astype(np.int16) + 128
        for init in proto.graph.initializer:
            if init.name == "w_q":
                init.CopyFrom(_init("w_q", w.astype(np.uint8)))
            if init.name == "w_zero":
                init.CopyFrom(_init("w_zero", np.full(8, 128, np.uint8)))
    x = np.random.default_rng(3).uniform(-2, 6, (1, 6, 9, 9)).astype(np.float32)
    manifest, library = _built(proto, tmp_path)
    assert manifest["integer_layers"] == 0
    np.testing.assert_allclose(library({"x": x})["y"], _float_reference(proto, {"x": x}), rtol=1e-5, atol=1e-4)


def test_run_quantized_for_tvm_compiles_integer_layers_and_verifies(cli, tmp_path):
    """graphopt's own static INT8 of the trained digits model, through the CLI: every Conv/Gemm it
    quantized runs in integers, and the library verifies against the original within the budget."""
    feeds, _ = models.eval_data("digits_cnn")
    np.savez(tmp_path / "calib.npz", input=feeds["input"][:64])
    out = tmp_path / "digits_int8.so"
    proc = cli("run", "zoo:digits_cnn", "--backend", "tvm", "--dim", "batch=1", "--quantize", "int8", "--calibration", tmp_path / "calib.npz",
               "--no-quantize-gate", "-o", out, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    quantized = [layer for layer in report["quantization"]["layers"] if not layer["kept_float"]]
    assert report["backend"]["verified"] and report["backend"]["integer_layers"] >= 2
    assert report["backend"]["integer_layers"] <= len(quantized)
    assert "layers in 8-bit integer arithmetic" in proc.stdout
    library = runtime.load(out)
    x = feeds["input"][:1]
    reference = ort.InferenceSession(models.load("digits_cnn").SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert library({"input": x})["output"].argmax() == reference.argmax()
