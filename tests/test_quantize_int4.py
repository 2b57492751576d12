"""quantize-int4: weight-only INT4, MatMul (+ bias) by a constant -> com.microsoft MatMulNBits."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.models as zoo
import graphopt.passes.quantize.int4 as int4
from graphopt import calibration
from graphopt.errors import GraphoptError
from graphopt.optimize import optimize

from helpers import copy, make_model

F = TensorProto.FLOAT
S = 8


def _linear(k: int, n: int, bias: bool = True, seed: int = 0, layers: int = 1) -> onnx.ModelProto:
    """x [1, S, k] through `layers` MatMuls by [k, n] (then [n, n]) constants, each + bias if asked."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        rows = k if i == 0 else n
        inits.append(numpy_helper.from_array(rng.normal(size=(rows, n)).astype(np.float32), f"w{i}"))
        out = f"y{i}" if not bias else f"mm{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"matmul{i}"))
        if bias:
            inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [out, f"b{i}"], [f"y{i}"], name=f"add{i}"))
        prev = f"y{i}"
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, S, k])],
                      [helper.make_tensor_value_info(prev, F, [1, S, n])], inits)


def _int4(model, **kwargs):
    data = kwargs.pop("calibration_data", None)
    target = kwargs.pop("target", "x86_64")
    quantized, report = optimize(copy(model), passes=["quantize-int4"], options=kwargs, calibration_data=data, target=target)
    onnx.checker.check_model(quantized)
    return quantized, next(p for p in report.passes if p.name == "quantize-int4").stats


def _run(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _dequantized(model, node) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node computes with, unpacked from its initializers by the spec."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    blocks = -(-k // block)
    packed = inits[node.input[1]]
    assert attrs["bits"] == 4 and packed.dtype == np.uint8 and packed.shape == (n, blocks, block // 2)
    levels = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float64)
    scales = inits[node.input[2]].astype(np.float64).reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]]
        assert zp.dtype == np.uint8 and zp.shape == (n, -(-blocks // 2))
        zeros = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float64)
    else:
        zeros = np.full((n, blocks), 8.0)
    w = (levels - zeros[..., None]) * scales[..., None]
    return w.reshape(n, blocks * block)[:, :k].T, np.repeat(scales, block, axis=1)[:, :k].T


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_becomes_matmulnbits_that_matches_its_dequantized_weight(block, symmetric, bias):
    k, n = 200, 48  # 200 is no multiple of any block size: the last block is padded
    model = _linear(k, n, bias=bias)
    quantized, stats = _int4(model, int4_block_size=block, int4_symmetric=symmetric)
    assert stats == {"with_bias" if bias else "without_bias": 1}
    ops = _ops(quantized)
    assert ops["MatMulNBits"] == 1 and ops["MatMul"] == 0
    (node,) = [nd for nd in quantized.graph.node if nd.op_type == "MatMulNBits"]
    assert node.domain == "com.microsoft"
    assert (len(node.input) > 3 and node.input[3] != "") is not symmetric  # zero points only when asymmetric
    if bias and int4._bias_input():
        assert ops["Add"] == 0 and node.input[5] == "b0"
    else:
        assert ops["Add"] == int(bias)

    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    deq, step = _dequantized(quantized, node)
    # Min/max scales clip nothing: every weight is within half a step of its level.
    assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-5) + 1e-7)

    x = np.random.default_rng(1).normal(size=(1, S, k)).astype(np.float32)
    b = numpy_helper.to_array(model.graph.initializer[1]) if bias else 0.0
    y, reference = _run(quantized, x), x.astype(np.float64) @ deq + b
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    fp32 = _run(model, x)
    relative = np.linalg.norm(y - fp32) / np.linalg.norm(fp32)
    # Gaussian weights, 16 levels over a block's range: measured 0.080 (block 32) to 0.100 (128).
    assert relative < {32: 0.09, 64: 0.105, 128: 0.115}[block], relative


@pytest.mark.parametrize("block", [32, 128])
def test_weight_bytes_shrink_to_about_a_seventh(block):
    k = n = 256
    quantized, _ = _int4(_linear(k, n, bias=False), int4_block_size=block)
    nbytes = sum(numpy_helper.to_array(t).nbytes for t in quantized.graph.initializer)
    blocks = k // block
    # Half a byte a weight, a float32 scale and half a byte of zero point per block.
    assert nbytes == n * k // 2 + n * blocks * 4 + n * -(-blocks // 2)
    ratio = nbytes / (k * n * 4)
    assert ratio < {32: 0.17, 128: 0.14}[block], ratio


def _outlier_activations(k: int, samples: int, seed: int = 2) -> np.ndarray:
    # A few input channels 30x larger than the rest, as in transformer hidden states.
    rng = np.random.default_rng(seed)
    gain = np.ones(k, np.float32)
    gain[rng.choice(k, 4, replace=False)] = 30.0
    return (rng.normal(size=(samples, S, k)) * gain).astype(np.float32)


@pytest.mark.parametrize("symmetric", [False, True])
def test_data_aware_scales_lower_the_output_error(symmetric):
    k, n = 200, 48
    model = _linear(k, n)
    x = _outlier_activations(k, 48)
    data = calibration.from_arrays({"x": x[:32]}, model)
    plain, _ = _int4(model, int4_symmetric=symmetric)
    aware, _ = _int4(model, int4_symmetric=symmetric, calibration_data=data)
    switched_off, _ = _int4(model, int4_symmetric=symmetric, calibration_data=data, int4_data_aware=False)
    assert list(switched_off.graph.initializer) == list(plain.graph.initializer)  # min/max scales, as without data

    def error(q):
        return np.mean([np.mean((_run(q, x[i : i + 1]) - _run(model, x[i : i + 1])) ** 2) for i in range(32, 48)])

    # On held-out samples: measured about 0.25x of plain's error.
    assert error(aware) < 0.6 * error(plain), (error(aware), error(plain))


def _with_output(model, name):
    out = copy(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(name, F, None))
    return out


def test_channel_statistics_stream_per_channel():
    k = 40
    model = _linear(k, 16, layers=2)
    x = (np.random.default_rng(3).normal(size=(10, S, k)) + 0.5).astype(np.float32) * np.arange(k, dtype=np.float32)
    data = calibration.from_arrays({"x": x}, model, batch_size=1)
    stats = calibration.channel_statistics(model, data, ["x", "y0"])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats["x"].mean_square, (x64**2).mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(stats["x"].mean, x64.mean(axis=(0, 1)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["x"].abs_max, np.abs(x64).max(axis=(0, 1)), rtol=1e-6)
    hidden = np.concatenate([_run(_with_output(model, "y0"), x[i : i + 1]) for i in range(10)]).astype(np.float64)
    np.testing.assert_allclose(stats["y0"].mean_square, (hidden**2).mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(stats["y0"].abs_max, np.abs(hidden).max(axis=(0, 1)), rtol=1e-5)


def test_excluded_nodes_stay_float():
    model = _linear(64, 64, layers=2)
    quantized, stats = _int4(model, quantize_exclude={"matmul1"})
    assert stats == {"with_bias": 1}
    kept = [nd.name for nd in quantized.graph.node if nd.op_type == "MatMul"]
    assert kept == ["matmul1"] and _ops(quantized)["MatMulNBits"] == 1
    # With data too: the excluded node's activation is not even measured.
    data = calibration.from_arrays({"x": np.ones((2, S, 64), np.float32)}, model)
    quantized, _ = _int4(model, quantize_exclude={"matmul0", "matmul1"}, calibration_data=data)
    assert _ops(quantized)["MatMul"] == 2 and _ops(quantized)["MatMulNBits"] == 0


def test_nothing_is_emitted_for_a_target_without_matmulnbits():
    quantized, _ = _int4(_linear(64, 32), target="generic")
    assert _ops(quantized)["MatMul"] == 1 and not any(nd.domain == "com.microsoft" for nd in quantized.graph.node)


@pytest.mark.parametrize("block", [0, 48, 8, True, "32"])
def test_a_bad_block_size_is_refused(block):
    with pytest.raises(GraphoptError, match="int4_block_size"):
        _int4(_linear(64, 32), int4_block_size=block)


def _cosines(a, b, feeds) -> list[float]:
    def session(m):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    sa, sb = session(a), session(b)
    out = []
    for feed in feeds:
        for ya, yb in zip(sa.run(None, feed), sb.run(None, feed)):
            ya, yb = ya.ravel().astype(np.float64), yb.ravel().astype(np.float64)
            out.append(float(ya @ yb / np.linalg.norm(ya) / np.linalg.norm(yb)))
    return out


@pytest.mark.parametrize(("symmetric", "block", "with_data"), [(False, 32, False), (True, 128, True)])
def test_bert_tiny_keeps_its_outputs(symmetric, block, with_data):
    from graphopt.models.bert import BERT_TINY, example_inputs

    proto = zoo.load("bert_tiny")
    data = None
    if with_data:
        calib = [example_inputs(BERT_TINY, seed=s) for s in range(8)]
        data = calibration.from_arrays({name: np.concatenate([f[name] for f in calib]) for name in calib[0]}, proto)
    quantized, stats = _int4(proto, int4_block_size=block, int4_symmetric=symmetric, calibration_data=data)
    # Q, K, V, the attention output and both feed-forward projections of every layer.
    assert stats == {"with_bias": 6 * BERT_TINY.layers}
    assert _ops(quantized)["MatMulNBits"] == 6 * BERT_TINY.layers
    feeds = [example_inputs(BERT_TINY, seed=100 + s) for s in range(6)]
    # Measured: min cosine 0.99995 (asymmetric, block 32), 0.9999 (symmetric, block 128).
    assert min(_cosines(proto, quantized, feeds)) > 0.999


def test_run_quantize_int4_on_the_cli(tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    out = tmp_path / "bert_int4.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:bert_tiny", "--quantize", "int4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    weights = {t.name for t in model.graph.initializer}
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 12
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # only activation x activation left


def test_a_search_measures_only_the_activations_the_rules_take():
    # matmul1 multiplies two constants: nothing to observe there (calibration refuses weights), and
    # an excluded node's input is not measured either.
    model = _linear(32, 32, bias=False, layers=2)
    rng = np.random.default_rng(1)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=(4, 32)).astype(np.float32), "a"))
    model.graph.node.append(helper.make_node("MatMul", ["a", "w1"], ["const_product"], name="constant_matmul"))
    model.graph.output.append(helper.make_tensor_value_info("const_product", F, [4, 32]))
    data = calibration.from_arrays({"x": rng.normal(size=(3, S, 32)).astype(np.float32)}, model)
    measured = int4.QuantizeInt4().measurements(model, data, {})["int4_mean_squares"]
    assert sorted(measured) == ["x", "y0"]
    measured = int4.QuantizeInt4().measurements(model, data, {"quantize_exclude": {"matmul1"}})["int4_mean_squares"]
    assert sorted(measured) == ["x"]
