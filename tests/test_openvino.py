"""graphopt's QDQ output is portable: OpenVINO (which reads ONNX) loads it, computes what
onnxruntime computes, and runs its quantized layers on integer kernels (issue 16, part 7)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

import graphopt.models as zoo
from graphopt import calibration, export, verify
from graphopt.optimize import optimize_model

ov = pytest.importorskip("openvino")


def _runtime_precisions(compiled) -> collections.Counter:
    counts = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[(layer, precision)] += 1
    return counts


@pytest.mark.parametrize("name", ["digits_cnn", "mobilenetv2"])
def test_openvino_runs_graphopt_int8_on_integer_kernels(name, tmp_path):
    proto = zoo.load(name)
    input_name = proto.graph.input[0].name
    if name == "digits_cnn":
        x = zoo.eval_data(name)[0][input_name]
        calib, held_out = x[:32], x[200:204]
    else:
        rng = np.random.default_rng(0)
        calib = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
        held_out = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    model, report = optimize_model(onnx.load_from_string(proto.SerializeToString()), quantize="int8",
                                   calibration_data=calibration.from_arrays({input_name: calib}, proto), options={"quantize_gate": False})
    path = tmp_path / "int8.onnx"
    export.save(model, path)
    layers = sum(1 for n in model.graph.nodes if n.op in ("Conv", "Gemm", "MatMul") and n.inputs[1].inputs
                 and n.inputs[1].inputs[0].op == "DequantizeLinear")
    assert layers >= 3
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": 1})
    precisions = _runtime_precisions(compiled)
    integer = sum(n for (layer, precision), n in precisions.items()
                  if layer in ("Convolution", "GroupConvolution", "FullyConnected", "MatMul") and precision in ("u8", "i8"))
    # Every quantized layer on an integer kernel (OpenVINO may fuse a depthwise conv into the next).
    assert integer >= layers * 0.9, precisions
    for i in range(len(held_out)):
        feed = {input_name: held_out[i : i + 1]}
        expected = next(iter(verify.run(path, feed).values())).ravel()
        got = np.asarray(compiled(feed)[0]).ravel()
        cosine = float(expected @ got / np.linalg.norm(expected) / np.linalg.norm(got))
        assert cosine > 0.999 and expected.argmax() == got.argmax()
