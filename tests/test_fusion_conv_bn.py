"""fold-conv-bn on the Conv -> BatchNormalization shapes exporters emit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F, const, make_model, op_types, optimize_checked
from onnx import helper

RNG = np.random.default_rng(0)


def _bn_params(c, prefix="bn"):
    return [
        const(f"{prefix}.gamma", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
        const(f"{prefix}.beta", RNG.standard_normal(c).astype(np.float32)),
        const(f"{prefix}.mean", RNG.standard_normal(c).astype(np.float32)),
        const(f"{prefix}.var", RNG.uniform(0.1, 2.0, c).astype(np.float32)),
    ]


def _conv_bn(*, bias=False, group=1, rank=2, extra_use=False, bn_is_output=False):
    cin, cout = 4, 8
    spatial = [6] * rank
    kernel = [3] * rank
    inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [
        helper.make_node("Conv", inputs, ["c"], group=group, pads=[1] * (2 * rank)),
        helper.make_node("BatchNormalization", ["c", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["n"], epsilon=1e-3),
    ]
    outputs = [helper.make_tensor_value_info("n" if bn_is_output else "y", F, [1, cout] + spatial)]
    if not bn_is_output:
        nodes.append(helper.make_node("Relu", ["n"], ["y"]))
    if extra_use:
        nodes.append(helper.make_node("Sigmoid", ["c"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", F, [1, cout] + spatial))
    inits = [const("w", RNG.standard_normal([cout, cin // group] + kernel).astype(np.float32))] + _bn_params(cout)
    if bias:
        inits.append(const("b", RNG.standard_normal(cout).astype(np.float32)))
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, cin] + spatial)], outputs, inits)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group,rank", [(1, 2), (4, 2), (2, 1), (1, 3)])
def test_batchnorm_folds_into_conv(bias, group, rank):
    out, _ = optimize_checked(_conv_bn(bias=bias, group=group, rank=rank), passes=["fold-conv-bn", "dce"])
    assert op_types(out) == ["Conv", "Relu"]
    assert len(out.graph.node[0].input) == 3  # the folded bias


def test_batchnorm_output_that_is_a_graph_output_keeps_its_name():
    out, _ = optimize_checked(_conv_bn(bn_is_output=True), passes=["fold-conv-bn", "dce"])
    assert op_types(out) == ["Conv"] and out.graph.node[0].output[0] == "n"


def test_conv_output_read_elsewhere_is_not_folded():
    out, _ = optimize_checked(_conv_bn(extra_use=True), passes=["fold-conv-bn", "dce"])
    assert "BatchNormalization" in op_types(out)


def test_weights_that_are_inputs_are_not_folded():
    model = _conv_bn()
    # Make the weight an overridable graph input: its value is not known at compile time.
    model.graph.input.append(helper.make_tensor_value_info("w", F, [8, 4, 3, 3]))
    out, _ = optimize_checked(model, passes=["fold-conv-bn", "dce"])
    assert "BatchNormalization" in op_types(out)


def test_zoo_resnet18_has_no_batchnorm_left():
    from graphopt import models

    out, report = optimize_checked(models.load("resnet18"), opt_level=2, rtol=1e-4, atol=1e-4)
    assert "BatchNormalization" not in op_types(out)
    assert report.after.nodes == report.before.nodes - 20


def _gemm_bn(*, trans_b=0, bias="vector", gemm_beta=1.0):
    k, n = 5, 6
    w = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = ["x", "w"] + ([] if bias is None else ["b"])
    inits = [const("w", w)] + _bn_params(n)
    if bias == "vector":
        inits.append(const("b", RNG.standard_normal(n).astype(np.float32)))
    elif bias == "matrix":
        inits.append(const("b", RNG.standard_normal((3, n)).astype(np.float32)))
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], transB=trans_b, beta=gemm_beta),
        helper.make_node("BatchNormalization", ["g", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["y"], epsilon=1e-3),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [3, k])], [helper.make_tensor_value_info("y", F, [3, n])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias,gemm_beta", [(None, 1.0), ("vector", 1.0), ("vector", 0.5), ("matrix", 2.0)])
def test_batchnorm_folds_into_gemm(trans_b, bias, gemm_beta):
    optimized, report = optimize_checked(_gemm_bn(trans_b=trans_b, bias=bias, gemm_beta=gemm_beta), passes=["fold-conv-bn"])
    assert op_types(optimized) == ["Gemm"]


def test_torch_linear_batchnorm1d_folds():
    """BatchNorm1d after a Linear, as torch's TorchScript exporter writes it: Gemm then BatchNormalization."""
    torch = pytest.importorskip("torch")
    import io

    import onnx

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6)).eval()
    with torch.no_grad():
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.randn(3, 5),), buffer, dynamo=False, opset_version=17, input_names=["x"])
    model = onnx.load_from_string(buffer.getvalue())
    assert "BatchNormalization" in op_types(model)
    optimized, _ = optimize_checked(model)
    assert "BatchNormalization" not in op_types(optimized) and op_types(optimized).count("Gemm") == 1
