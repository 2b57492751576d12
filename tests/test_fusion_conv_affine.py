"""fold-conv-affine: per-channel Add/Mul after a Conv into its bias and weights (paddle2onnx's bias form)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F, const, make_model, op_types, optimize_checked
from onnx import helper

RNG = np.random.default_rng(0)


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def _conv_then(op: str, shape, *, bias=False, extra_use=False, batch="n"):
    conv_inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, ["c", "k"], ["y"])]
    outputs = [vi("y", [batch, 4, 6, 6])]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["c"], ["z"]))
        outputs.append(vi("z", [batch, 4, 6, 6]))
    inits = [const("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             const("k", (RNG.standard_normal(shape) + 1.5).astype(np.float32))]
    if bias:
        inits.append(const("b", RNG.standard_normal(4).astype(np.float32)))
    return make_model(nodes, [vi("x", [batch, 3, 6, 6])], outputs, inits)


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1,), ()])
@pytest.mark.parametrize("bias", [False, True])
def test_per_channel_constants_fold_into_the_conv(op, shape, bias):
    out, report = optimize_checked(_conv_then(op, shape, bias=bias), passes=["fold-conv-affine"])
    assert op_types(out) == ["Conv"]
    stats = next(r for r in report.passes if r.name == "fold-conv-affine").stats
    assert stats == {"biases" if op == "Add" else "scales": 1}


@pytest.mark.parametrize("shape", [(1, 1, 6, 6), (1, 4, 6, 1), (2, 4, 1, 1)])
def test_a_constant_varying_along_another_axis_stays(shape):
    out, _ = optimize_checked(_conv_then("Add", shape, batch=2), passes=["fold-conv-affine"])
    assert op_types(out) == ["Conv", "Add"]


def test_a_conv_output_read_elsewhere_stays():
    out, _ = optimize_checked(_conv_then("Mul", (1, 4, 1, 1), extra_use=True), passes=["fold-conv-affine"])
    assert sorted(op_types(out)) == ["Conv", "Mul", "Relu"]


def test_paddle_detector_biases_fold():
    """rapidocr's PaddleOCR detector (paddle2onnx) writes its Conv biases as Adds: they fold."""
    from real_models import zoo

    from graphopt.optimize import optimize

    try:
        real = zoo.load("rapidocr_det")
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    _, report = optimize(real.model, opt_level=2)
    stats = next(r for r in report.passes if r.name == "fold-conv-affine").stats
    assert stats.get("biases", 0) >= 70
