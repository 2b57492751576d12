"""Attention heads as channel groups (graphopt/analysis/channels.py) and their pruning (passes/sparsity.py).

A head whose value projection is zero contributes exactly nothing to the output projection, so
removing it must leave the outputs equal to the zeroed model's. On the attention forms torch's
exporters write (TorchScript eager and SDPA, dynamo eager, dynamo SDPA in the trained MiniLM of the
benchmarks) and on graphopt's fused com.microsoft Attention, that checks every slice of a head
group: the Q/K/V columns and biases at the same head, the output projection's rows, num_heads and
every Reshape target that counts heads."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import calibration, export, loading, models
from graphopt.analysis import shapes
from graphopt.analysis.channels import channel_groups
from graphopt.optimize import optimize_model
from graphopt.passes import sparsity

RNG = np.random.default_rng(0)


def _optimized(proto: onnx.ModelProto, level: int):
    model, _ = optimize_model(proto, target="x86_64", opt_level=level)
    shapes.infer_shapes(model)
    return model


def _head_groups(model):
    groups, refused = channel_groups(model.graph)
    return [g for g in groups if g.head_size > 1], refused


def _run(proto: onnx.ModelProto, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _zero_heads(group, dead: list[int]) -> None:
    """Zero the producers' columns (Q, K and V, weights and biases) of the dead heads: V's zero
    block makes the head's output zero whatever Q and K give."""
    for s in group.slices:
        if s.role != "producer":
            continue
        values = np.array(s.constant.values)
        moved = np.moveaxis(values, s.axis, 0)
        for h in dead:
            moved[s.offset + h * s.block : s.offset + (h + 1) * s.block] = 0
        s.constant.values = np.ascontiguousarray(np.moveaxis(moved, 0, s.axis))


class _Names:
    def __init__(self):
        self.count = 0

    def __call__(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"


def _check_dead_heads_go_exactly(model, feeds, layers: int, fused: bool) -> None:
    heads, refused = _head_groups(model)
    assert len(heads) == layers, [r.to_dict() for r in refused]
    assert all((g.producers[0].op == "Attention") == fused for g in heads)
    dead = [0, heads[0].channels - 1] if heads[0].channels > 2 else [0]
    for g in heads:
        _zero_heads(g, dead)
    zeroed = _run(export.to_proto(model), feeds)
    kept = [np.setdiff1d(np.arange(g.channels), dead) for g in heads]
    sparsity._apply(model.graph, heads, kept, _Names())
    pruned_proto = export.to_proto(model)
    onnx.checker.check_model(pruned_proto)
    pruned = _run(pruned_proto, feeds)
    for a, b in zip(zeroed, pruned):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))
    # Really smaller: each projection lost the dead heads' columns.
    for g, k in zip(heads, kept):
        w = g.slices[0].constant.values
        assert w.shape[g.slices[0].axis] in (len(k) * g.head_size, 3 * len(k) * g.head_size)


@pytest.mark.parametrize("name", ["torch_legacy_bert", "torch_sdpa_minilm", "torch_dynamo_bert"])
@pytest.mark.parametrize("level", [2, 3])
def test_dead_heads_go_exactly_on_real_exports(name, level):
    from real_models import zoo

    try:
        real = zoo.load(name)
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    feeds = real.feeds[0] if isinstance(real.feeds, list) else real.feeds
    layers = sum(n.op_type == "Softmax" for n in real.model.graph.node)
    model = _optimized(real.model, level)
    fused = any(n.op == "Attention" for n in model.graph.nodes)
    assert fused == (level == 3 and name != "torch_dynamo_bert") or level == 3  # -O3 may fuse any of them
    _check_dead_heads_go_exactly(model, feeds, layers, fused)


def test_dead_heads_go_exactly_in_the_fused_attention_of_the_zoo_encoder():
    proto = models.load("bert_tiny")
    model = _optimized(proto, 3)
    assert sum(n.op == "Attention" for n in model.graph.nodes) == 2
    ids = RNG.integers(100, 900, (1, 16)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    _check_dead_heads_go_exactly(model, feeds, 2, fused=True)
    assert [n.attrs["num_heads"] for n in model.graph.nodes if n.op == "Attention"] == [1, 1]  # of 2


def _attention(softmax_axis: int = -1, mask: np.ndarray | None = None, seq: int = 5, hidden: int = 16, heads: int = 4) -> onnx.ModelProto:
    """Decomposed self-attention with a fixed head-split target [1, seq, heads, d] and merge [1, seq, hidden]."""
    d = hidden // heads
    nodes, inits = [], [numpy_helper.from_array(np.array([1, seq, heads, d], np.int64), "split_shape"),
                        numpy_helper.from_array(np.array([1, seq, hidden], np.int64), "merge_shape"),
                        numpy_helper.from_array(np.array(d**-0.5, np.float32), "scale")]
    for name in ("q", "k", "v"):
        inits += [numpy_helper.from_array(RNG.standard_normal((hidden, hidden)).astype(np.float32), f"w_{name}"),
                  numpy_helper.from_array(RNG.standard_normal(hidden).astype(np.float32), f"b_{name}")]
        nodes += [helper.make_node("MatMul", ["x", f"w_{name}"], [f"{name}_mm"], name=f"{name}_matmul"),
                  helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [f"{name}_proj"], name=f"{name}_bias"),
                  helper.make_node("Reshape", [f"{name}_proj", "split_shape"], [f"{name}_heads"], name=f"{name}_split"),
                  helper.make_node("Transpose", [f"{name}_heads"], [f"{name}_t"], perm=[0, 2, 1, 3], name=f"{name}_transpose")]
    nodes += [helper.make_node("Transpose", ["k_t"], ["k_tt"], perm=[0, 1, 3, 2], name="k_transpose_keys"),
              helper.make_node("MatMul", ["q_t", "k_tt"], ["scores_raw"], name="scores_matmul"),
              helper.make_node("Mul", ["scores_raw", "scale"], ["scores_scaled"], name="scale_mul")]
    scores = "scores_scaled"
    if mask is not None:
        inits.append(numpy_helper.from_array(mask.astype(np.float32), "mask"))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["scores_masked"], name="mask_add"))
        scores = "scores_masked"
    inits += [numpy_helper.from_array(RNG.standard_normal((hidden, hidden)).astype(np.float32), "w_o"),
              numpy_helper.from_array(RNG.standard_normal((hidden, 8)).astype(np.float32), "w_head")]
    nodes += [helper.make_node("Softmax", [scores], ["probs"], axis=softmax_axis, name="softmax"),
              helper.make_node("MatMul", ["probs", "v_t"], ["context"], name="context_matmul"),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3], name="context_transpose"),
              helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "w_o"], ["attended"], name="o_matmul"),
              helper.make_node("Relu", ["attended"], ["hidden_out"], name="relu"),
              helper.make_node("MatMul", ["hidden_out", "w_head"], ["y"], name="head_matmul")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _groups_of(proto):
    model = loading.from_proto(proto)
    shapes.infer_shapes(model)
    return model, *_head_groups(model)


def test_constant_head_split_and_merge_targets_are_rewritten_and_dead_heads_go_exactly():
    proto = _attention(mask=np.where(RNG.random((1, 1, 5, 5)) < 0.2, -1e4, 0.0))
    model, heads, _ = _groups_of(proto)
    assert [(sorted(p.name for p in g.producers), g.channels, g.head_size, [c.name for c in g.consumers]) for g in heads] == [
        (["k_matmul", "q_matmul", "v_matmul"], 4, 4, ["o_matmul"])]
    assert sorted((n.name, i, per) for n, i, per in heads[0].head_shapes) == [("k_split", 2, 1), ("merge", 2, 4), ("q_split", 2, 1), ("v_split", 2, 1)]
    _check_dead_heads_go_exactly(model, {"x": RNG.standard_normal((1, 5, 16)).astype(np.float32)}, 1, fused=False)


def test_a_softmax_over_the_heads_is_refused_by_name():
    _, heads, refused = _groups_of(_attention(softmax_axis=1))
    assert not heads
    assert [(r.node, r.reason) for r in refused if "q_matmul" in r.producers] == [("softmax", "Softmax over an axis other than the keys")]


def test_a_mask_that_differs_per_head_is_refused_by_name():
    _, heads, refused = _groups_of(_attention(mask=RNG.standard_normal((1, 4, 5, 5))))
    assert not heads
    assert [r.node for r in refused if "q_matmul" in r.producers] == ["mask_add"]


def test_prune_channels_removes_heads_and_ffn_neurons_of_the_zoo_encoder_and_it_still_runs():
    proto = models.load("bert_tiny")
    data = calibration.random_data(proto, 8)
    model, report = optimize_model(proto, target="x86_64", opt_level=3, calibration_data=data, options={"prune": "flops=0.3"})
    pruned = {g["producers"][0]: (g["channels"], g["kept"]) for g in report.pruning["groups"]}
    attention = [n for n in model.graph.nodes if n.op == "Attention"]
    assert len(attention) == 2
    assert [n.attrs["num_heads"] for n in attention] == [pruned[n.name][1] for n in attention]
    assert report.pruning["flops_after"] <= 0.7 * report.pruning["flops_before"] * 1.05
    ids = RNG.integers(100, 900, (1, 16)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    outputs = _run(export.to_proto(model), feeds)
    assert all(np.isfinite(o).all() for o in outputs)
