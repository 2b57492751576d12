"""flush-subnormal-weights: subnormal float weights become zero (CPUs compute with them ~100x slower)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import api

TINY = np.finfo(np.float32).tiny


def _conv(weight: np.ndarray, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    c_out, c_in = weight.shape[:2]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", dtype, [1, c_in, 4, 4])],
        [helper.make_tensor_value_info("y", dtype, [1, c_out, 4, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer))


def test_subnormal_weights_become_signed_zeros_and_normal_ones_stay():
    w = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    w.flat[0], w.flat[1], w.flat[2] = TINY / 4, -TINY / 1000, TINY  # two subnormals, then the smallest normal
    result = api.optimize(_conv(w), passes=["flush-subnormal-weights"])
    out = _weight(result.model)
    assert out.flat[0] == 0 and not np.signbit(out.flat[0])
    assert out.flat[1] == 0 and np.signbit(out.flat[1])
    assert out.flat[2] == TINY and np.array_equal(out.flat[3:], w.flat[3:])
    record = next(p for p in result.report.passes if p.name == "flush-subnormal-weights")
    assert record.stats == {"flushed": 2, "weights": 1}
    assert result.fidelity.ok


def test_float16_subnormals_are_left_alone():
    w = np.ones((2, 2, 1, 1), np.float16)
    w.flat[0] = np.float16(1e-6)  # subnormal in float16
    result = api.optimize(_conv(w, TensorProto.FLOAT16), passes=["flush-subnormal-weights"], verify=False)
    assert _weight(result.model).flat[0] == np.float16(1e-6)


def test_a_model_without_subnormals_is_unchanged():
    w = np.random.default_rng(1).standard_normal((2, 2, 1, 1)).astype(np.float32)
    result = api.optimize(_conv(w), passes=["flush-subnormal-weights"])
    assert np.array_equal(_weight(result.model), w)
    assert not next(p for p in result.report.passes if p.name == "flush-subnormal-weights").changed


def test_pp_ocr_detector_weights_are_flushed():
    from tests.real_models import zoo

    try:
        real = zoo.load("rapidocr_det")
    except zoo.ModelUnavailable as exc:
        pytest.skip(str(exc))
    result = api.optimize(real.model, target="x86_64", opt_level=2, verify=False)
    record = next(p for p in result.report.passes if p.name == "flush-subnormal-weights")
    # The PP-OCRv6 small detector rapidocr ships ships 255,958 subnormal weights in 7 tensors (see passes/fold.py).
    assert record.stats["flushed"] == 255958


def test_inspect_counts_subnormal_weights(tmp_path):
    import json

    from click.testing import CliRunner

    from graphopt.cli import cli

    w = np.ones((2, 2, 1, 1), np.float32)
    w.flat[:3] = TINY / 8
    path = tmp_path / "m.onnx"
    onnx.save(_conv(w), path)
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).output)
    assert data["subnormal_weights"] == {"values": 3, "tensors": 1}
    assert "3 subnormal weights" in CliRunner().invoke(cli, ["inspect", str(path)]).output
