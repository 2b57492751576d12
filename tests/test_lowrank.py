"""lowrank-split (passes/lowrank.py): splits only weights that are really of low rank, stays within
its tolerance in onnxruntime, weighs by the activations when it has calibration data, and asks
the cost model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import F, const, copy, make_model
from onnx import helper, numpy_helper

from graphopt import calibration, export, verify
from graphopt.errors import GraphoptError
from graphopt.optimize import optimize_model

K = N = 256


def _low_rank(rank: int, k: int = K, n: int = N, noise: float = 1e-5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(k * rank)
    return (w + noise * rng.standard_normal((k, n))).astype(np.float32)


def _full_rank(k: int = K, n: int = N, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def _matmul(w: np.ndarray, x_shape, name: str = "proj") -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name=name)],
                      [helper.make_tensor_value_info("x", F, list(x_shape))],
                      [helper.make_tensor_value_info("y", F, [*x_shape[:-1], w.shape[1]])], [const("w", w)])


def _split(proto: onnx.ModelProto, **kwargs):
    """The optimized model and the pass's record."""
    model, report = optimize_model(copy(proto), passes=["lowrank-split"], **kwargs)
    record = next(r for r in report.passes if r.name == "lowrank-split")
    optimized = export.to_proto(model)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized, record


def _relative_error(original, optimized, feeds) -> float:
    y0, y = verify.run(original, feeds)["y"], verify.run(optimized, feeds)["y"]
    return float(np.linalg.norm(y - y0) / np.linalg.norm(y0))


def _weights(proto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_a_rank_8_weight_splits_at_rank_8_within_tolerance():
    proto = _matmul(_low_rank(8), [64, K])
    optimized, record = _split(proto)
    assert record.stats == {"split": 1, "parameters_before": K * N, "parameters_after": 8 * (K + N)}, record.stats
    assert [n.op_type for n in optimized.graph.node] == ["MatMul", "MatMul"]
    assert sorted(w.shape for w in _weights(optimized).values()) == [(8, N), (K, 8)]
    assert sum(w.size for w in _weights(optimized).values()) < K * N
    [decision] = record.decisions
    assert decision.kept and decision.after_s < decision.before_s and "rank 8 of 256" in decision.reason, decision
    x = np.random.default_rng(2).standard_normal((64, K)).astype(np.float32)
    assert _relative_error(proto, optimized, {"x": x}) < 1e-3


def test_the_tolerance_sets_the_rank():
    # Singular values 1, 1/2, 1/4, ...: a loose tolerance keeps few of them, a tight one more.
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((K, K)))
    v, _ = np.linalg.qr(rng.standard_normal((N, N)))
    w = ((u * 0.7 ** np.arange(K)) @ v.T).astype(np.float32)
    proto = _matmul(w, [64, K])
    ranks = {}
    for tolerance in (0.3, 1e-3):
        optimized, record = _split(proto, options={"lowrank_tolerance": tolerance, "cost": False})
        ranks[tolerance] = record.stats["parameters_after"] // (K + N)
        x = rng.standard_normal((64, K)).astype(np.float32)
        # The weight's error bounds the output's on isotropic inputs only loosely: twice the tolerance.
        assert _relative_error(proto, optimized, {"x": x}) < 2 * tolerance
    assert ranks[0.3] < ranks[1e-3], ranks
    assert all(r % 8 == 0 for r in ranks.values()), ranks


def test_a_full_rank_weight_is_left_alone():
    w = _full_rank()
    proto = _matmul(w, [64, K])
    optimized, record = _split(proto)
    assert not record.changed and not record.stats
    assert [n.op_type for n in optimized.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(_weights(optimized)["w"], w)


def _anisotropic(rows: int, k: int, seed: int) -> np.ndarray:
    """Rows whose energy lies almost all in 6 fixed random directions."""
    basis = np.linalg.qr(np.random.default_rng(42).standard_normal((k, k)))[0]
    scales = np.full(k, 0.01)
    scales[:6] = [30, 20, 15, 10, 8, 5]
    z = np.random.default_rng(seed).standard_normal((rows, k))
    return ((z * scales) @ basis.T).astype(np.float32)


def test_activation_weighted_split_beats_plain_svd_on_held_out_data():
    k = n = 128
    proto = _matmul(_full_rank(k, n), [32, k])
    options = {"lowrank_rank": 8, "cost": False}
    plain, plain_record = _split(proto, options=options)
    data = calibration.from_arrays({"x": _anisotropic(32 * 8, k, seed=5)}, proto)
    weighted, weighted_record = _split(proto, options=options, calibration_data=data)
    assert plain_record.stats["parameters_after"] == weighted_record.stats["parameters_after"] == 8 * (k + n)
    held_out = {"x": _anisotropic(32, k, seed=6)}
    plain_error = _relative_error(proto, plain, held_out)
    weighted_error = _relative_error(proto, weighted, held_out)
    # A full-rank W loses most of its output at rank 8 of 128 where it does not know the data.
    assert plain_error > 0.5, plain_error
    assert weighted_error < 0.01 and weighted_error < plain_error / 50, (weighted_error, plain_error)


def test_the_cost_model_declines_a_tiny_matmul_and_says_so():
    # Two kernels instead of one for a 32 x 32 product of one row: the fixed cost of the second
    # outweighs the bytes saved.
    proto = _matmul(_low_rank(2, 32, 32), [1, 32])
    declined, record = _split(proto)
    assert not record.changed
    assert [n.op_type for n in declined.graph.node] == ["MatMul"]
    [decision] = record.decisions
    assert not decision.kept and decision.node == "proj" and decision.after_s >= decision.before_s, decision
    forced, forced_record = _split(proto, options={"cost": False})
    assert forced_record.stats["split"] == 1 and not forced_record.decisions
    assert [n.op_type for n in forced.graph.node] == ["MatMul", "MatMul"]


def test_gemm_with_trans_b_alpha_beta_and_bias():
    w = _low_rank(8)
    bias = np.random.default_rng(7).standard_normal(N).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "wt", "c"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)],
                       [helper.make_tensor_value_info("x", F, [64, K])], [helper.make_tensor_value_info("y", F, [64, N])],
                       [const("wt", np.ascontiguousarray(w.T)), const("c", bias)])
    optimized, record = _split(proto)
    assert record.stats["split"] == 1, record.stats
    assert [n.op_type for n in optimized.graph.node] == ["MatMul", "Gemm"]
    x = np.random.default_rng(8).standard_normal((64, K)).astype(np.float32)
    assert _relative_error(proto, optimized, {"x": x}) < 1e-3


def test_what_it_does_not_understand_stays():
    w = _low_rank(8)
    shared = make_model([helper.make_node("MatMul", ["x", "w"], ["a"], name="first"), helper.make_node("MatMul", ["x", "w"], ["b"], name="second"),
                         helper.make_node("Add", ["a", "b"], ["y"])],
                        [helper.make_tensor_value_info("x", F, [64, K])], [helper.make_tensor_value_info("y", F, [64, N])], [const("w", w)])
    transposed_a = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)],
                              [helper.make_tensor_value_info("x", F, [K, 64])], [helper.make_tensor_value_info("y", F, [64, N])], [const("w", w)])
    batched = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         [helper.make_tensor_value_info("x", F, [2, 64, K])], [helper.make_tensor_value_info("y", F, [2, 64, N])],
                         [const("w", np.stack([w, w]))])
    for proto in (shared, transposed_a, batched):
        _, record = _split(proto, options={"cost": False})
        assert not record.changed, proto.graph.node


def test_a_transformer_shaped_activation_with_calibration_data():
    # [batch, seq, K] with symbolic sizes, as torch exports a Linear; leading axes are rows. The
    # Relu makes the activation one the calibration run has to fetch, not a fed input.
    proto = make_model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")],
                       [helper.make_tensor_value_info("x", F, ["batch", "seq", K])],
                       [helper.make_tensor_value_info("y", F, ["batch", "seq", N])], [const("w", _low_rank(8))])
    x = np.random.default_rng(9).standard_normal((6, 5, K)).astype(np.float32)
    data = calibration.from_arrays({"x": x}, proto, batch_size=2)
    optimized, record = _split(proto, calibration_data=data)
    assert record.stats["split"] == 1 and record.stats["parameters_after"] == 8 * (K + N), record.stats
    [decision] = record.decisions
    assert decision.kept and "on the calibration activations" in decision.reason, decision
    feeds = {"x": np.random.default_rng(10).standard_normal((3, 7, K)).astype(np.float32)}
    assert _relative_error(proto, optimized, feeds) < 1e-3
    assert verify.run(optimized, feeds)["y"].shape == (3, 7, N)


def test_graphopt_run_passes_lowrank_split(cli, tmp_path):
    source, out, report = tmp_path / "m.onnx", tmp_path / "m.opt.onnx", tmp_path / "report.json"
    onnx.save_model(_matmul(_low_rank(8), [64, K]), str(source))
    # The split is lossy by design (within lowrank_tolerance): run's elementwise check needs room.
    proc = cli("run", source, "--passes", "lowrank-split", "--rtol", "1e-2", "--atol", "1e-2", "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["MatMul", "MatMul"]
    record = next(r for r in json.loads(report.read_text())["passes"] if r["name"] == "lowrank-split")
    assert record["stats"]["split"] == 1, record


def _conv(w: np.ndarray, x_shape, y_shape, bias: np.ndarray | None = None, **attrs) -> onnx.ModelProto:
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    initializers = [const("w", w)] + ([const("b", bias)] if bias is not None else [])
    return make_model([helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
                      [helper.make_tensor_value_info("x", F, list(x_shape))],
                      [helper.make_tensor_value_info("y", F, list(y_shape))], initializers)


def _low_rank_conv(rank: int, out: int, channels: int, k: int = 3, seed: int = 0) -> np.ndarray:
    return _low_rank(rank, channels * k * k, out, seed=seed).T.reshape(out, channels, k, k).copy()


def test_a_low_rank_conv_becomes_a_narrow_conv_then_a_1x1_conv():
    w = _low_rank_conv(8, out=64, channels=32)
    bias = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    proto = _conv(w, [2, 32, 17, 17], [2, 64, 9, 9], bias, pads=[1, 1, 1, 1], strides=[2, 2], dilations=[1, 1], kernel_shape=[3, 3])
    optimized, record = _split(proto, options={"cost": False})
    assert record.stats["split"] == 1 and record.stats["parameters_after"] == 8 * (32 * 9 + 64), record.stats
    first, second = optimized.graph.node
    weights = _weights(optimized)
    assert weights[first.input[1]].shape == (8, 32, 3, 3) and weights[second.input[1]].shape == (64, 8, 1, 1)
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    assert attrs(first)["strides"] == [2, 2] and attrs(first)["pads"] == [1, 1, 1, 1]
    assert attrs(second)["kernel_shape"] == [1, 1] and "strides" not in attrs(second) and second.input[2] == "b"
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 32, 17, 17)).astype(np.float32)}
    assert verify.run(optimized, feeds)["y"].shape == (2, 64, 9, 9)
    assert _relative_error(proto, optimized, feeds) < 1e-3


def test_a_conv_split_weighs_the_receptive_fields_of_its_calibration_inputs():
    # A full-rank conv whose input only ever lives in 2 of its 16 channels: the plain SVD of the
    # weight needs a high rank, the activation-weighted one sees that 2 x 9 directions suffice.
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((64, 16, 3, 3)) / 12).astype(np.float32)
    proto = _conv(w, ["n", 16, 12, 12], ["n", 64, 12, 12], pads=[1, 1, 1, 1])
    live = np.zeros((1, 16, 1, 1), np.float32)
    live[:, :2] = 1.0
    x = (rng.standard_normal((16, 16, 12, 12)) * live).astype(np.float32)
    data = calibration.from_arrays({"x": x}, proto, batch_size=4)
    plain, plain_record = _split(proto, options={"lowrank_tolerance": 0.05, "cost": False})
    weighted, record = _split(proto, calibration_data=data, options={"lowrank_tolerance": 0.05, "cost": False})
    assert not plain_record.changed and record.stats["split"] == 1, (plain_record.stats, record.stats)
    held_out = {"x": (rng.standard_normal((3, 16, 12, 12)) * live).astype(np.float32)}
    assert _relative_error(proto, weighted, held_out) < 0.05


def _resnet18_split_with(weight_of_shape):
    """zoo:resnet18 with its first 256 -> 256 3 x 3 Conv given weight_of_shape(out, channels), split on
    x86_64 at 5%: (optimized, record, relative output error on a random image)."""
    from graphopt import loading, models

    proto = models.load("resnet18")
    graph = loading.from_proto(proto).graph
    target = next(n for n in graph.nodes if n.op == "Conv" and n.inputs[1].values.shape[1:] == (256, 3, 3)).inputs[1].name
    weights = {t.name: t for t in proto.graph.initializer}
    shape = tuple(weights[target].dims)
    weights[target].CopyFrom(numpy_helper.from_array(weight_of_shape(shape[0], shape[1]), target))
    optimized, record = _split(proto, target="x86_64", options={"lowrank_tolerance": 0.05})
    feeds = {proto.graph.input[0].name: np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    name = proto.graph.output[0].name
    y0, y = verify.run(proto, feeds)[name], verify.run(optimized, feeds)[name]
    return optimized, record, float(np.linalg.norm(y - y0) / np.linalg.norm(y0))


def test_on_a_real_resnet_only_the_conv_that_is_of_low_rank_splits_and_where_it_pays():
    _, record, error = _resnet18_split_with(lambda out, channels: _low_rank_conv(16, out, channels, seed=5))
    assert record.stats["split"] == 1 and record.stats["left whole (rank too high for the tolerance)"] >= 10, record.stats
    kept = [d for d in record.decisions if d.kept]
    assert len(kept) == 1 and kept[0].after_s < kept[0].before_s and "rank 16" in kept[0].reason, record.decisions
    assert error < 1e-3


def _tucker_conv(r_in: int, r_out: int, out: int, channels: int, k: int = 3, noise: float = 1e-5, seed: int = 0) -> np.ndarray:
    """A k x k weight of multilinear ranks (r_out, r_in) in its output and input channels."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((r_out, r_in, k, k))
    u_out, u_in = rng.standard_normal((out, r_out)), rng.standard_normal((channels, r_in))
    w = np.einsum("or,rsij,cs->ocij", u_out, core, u_in) / np.sqrt(channels * k * k * r_in * r_out)
    return (w + noise * rng.standard_normal(w.shape) * np.abs(w).mean()).astype(np.float32)


def test_a_conv_of_low_rank_in_both_channel_modes_becomes_a_tucker_2_chain():
    # Of multilinear rank 16 in C and O: the two-conv split needs rank 16 on (C k k + O) per
    # position, Tucker-2 only C 16 + 16 16 k k + O 16, so "auto" takes Tucker-2. Strided and
    # padded: the first 1 x 1 runs before the padding.
    w = _tucker_conv(16, 16, out=128, channels=96)
    bias = np.random.default_rng(2).standard_normal(128).astype(np.float32)
    proto = _conv(w, [2, 96, 15, 15], [2, 128, 8, 8], bias, pads=[1, 1, 1, 1], strides=[2, 2], kernel_shape=[3, 3])
    optimized, record = _split(proto, options={"cost": False})
    assert record.stats["split"] == 1 and record.stats["tucker2"] == 1, record.stats
    assert record.stats["parameters_after"] == 96 * 16 + 16 * 16 * 9 + 128 * 16, record.stats
    first, core, last = optimized.graph.node
    weights = _weights(optimized)
    assert [weights[n.input[1]].shape for n in (first, core, last)] == [(16, 96, 1, 1), (16, 16, 3, 3), (128, 16, 1, 1)]
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    assert "pads" not in attrs(first) and attrs(core)["strides"] == [2, 2] and attrs(core)["pads"] == [1, 1, 1, 1]
    assert attrs(last)["kernel_shape"] == [1, 1] and last.input[2] == "b" and last.output == ["y"]
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 96, 15, 15)).astype(np.float32)}
    assert _relative_error(proto, optimized, feeds) < 1e-3
    split_only, split_record = _split(proto, options={"cost": False, "lowrank_conv_form": "split"})
    assert "tucker2" not in split_record.stats and [n.op_type for n in split_only.graph.node] == ["Conv", "Conv"], split_record.stats


def test_tucker_2_is_not_forced_on_a_conv_whose_input_channels_are_all_needed():
    # Low rank only across its outputs: the input-channel projection cannot drop any channel
    # within the tolerance, so "tucker" leaves it whole and "auto" takes the two-conv split.
    w = _low_rank_conv(8, out=64, channels=32)
    proto = _conv(w, [1, 32, 12, 12], [1, 64, 12, 12], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    tucker, tucker_record = _split(proto, options={"cost": False, "lowrank_conv_form": "tucker"})
    assert not tucker_record.changed and [n.op_type for n in tucker.graph.node] == ["Conv"], tucker_record.stats
    auto, auto_record = _split(proto, options={"cost": False})
    assert auto_record.stats["split"] == 1 and "tucker2" not in auto_record.stats, auto_record.stats


def test_a_tucker_2_split_weighs_its_calibration_inputs():
    # A full-rank weight whose input lives in 4 of 64 channels: the weight alone admits no
    # Tucker-2 form within 5%; the activations say 4 input directions carry everything.
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    proto = _conv(w, ["n", 64, 10, 10], ["n", 64, 10, 10], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    mixing = rng.standard_normal((4, 64)).astype(np.float32)

    def inputs(count: int) -> np.ndarray:
        return np.einsum("nlhw,lc->nchw", rng.standard_normal((count, 4, 10, 10)), mixing).astype(np.float32)

    data = calibration.from_arrays({"x": inputs(16)}, proto, batch_size=4)
    options = {"lowrank_tolerance": 0.05, "cost": False, "lowrank_conv_form": "tucker"}
    plain, plain_record = _split(proto, options=options)
    weighted, record = _split(proto, calibration_data=data, options=options)
    assert not plain_record.changed and record.stats["tucker2"] == 1, (plain_record.stats, record.stats)
    assert _weights(weighted)[weighted.graph.node[0].input[1]].shape[0] < 64
    assert _relative_error(proto, weighted, {"x": inputs(3)}) < 0.05


def test_an_unknown_conv_form_is_refused_by_name():
    proto = _conv(_tucker_conv(16, 16, out=64, channels=64), [1, 64, 8, 8], [1, 64, 8, 8], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    with pytest.raises(GraphoptError, match="lowrank_conv_form 'cp'"):
        _split(proto, options={"lowrank_conv_form": "cp"})


def test_on_a_real_resnet_the_cost_model_keeps_tucker_2_where_it_pays():
    _, record, error = _resnet18_split_with(lambda out, channels: _tucker_conv(32, 32, out, channels, seed=5))
    assert record.stats["tucker2"] == 1 and record.stats["split"] == 1, record.stats
    kept = [d for d in record.decisions if d.kept]
    assert len(kept) == 1 and kept[0].after_s < kept[0].before_s and "Tucker-2 ranks 32 in of 256, 32 out" in kept[0].reason, record.decisions
    assert error < 1e-3
