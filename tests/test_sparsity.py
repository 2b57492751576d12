"""Channel groups (graphopt/analysis/channels.py) and channel pruning (passes/sparsity.py).

The topology tests give some channels all-zero producer weights and biases ("dead" channels: after
a Relu they are exactly zero): removing them must leave the outputs equal, which checks that every
slice of every group (producers, BatchNormalization, depthwise, concat offsets, flatten blocks,
residual partners) was cut at the same channels. The trained digits model checks the real case."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import accuracy, calibration, export, loading, models
from graphopt.analysis import shapes
from graphopt.analysis.channels import channel_groups
from graphopt.optimize import optimize_model

RNG = np.random.default_rng(0)


class _Net:
    """A small NCHW graph under construction: conv/relu/... appended, weights random."""

    def __init__(self, channels=4, size=6):
        self.nodes, self.inits = [], []
        self.shape = [1, channels, size, size]
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array, name):
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, x, cin, cout, k=3, group=1, dead=()):
        w = RNG.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3
        b = RNG.standard_normal(cout).astype(np.float32) * 0.1
        w[list(dead)] = 0
        b[list(dead)] = 0
        out = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, self.const(w, f"{out}.weight"), self.const(b, f"{out}.bias")], [out], pads=[k // 2] * 4, group=group,
                                           kernel_shape=[k, k], name=out))
        return out

    def op(self, op, *inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def model(self, output, out_shape, opset=17):
        graph = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _groups(proto):
    model = loading.from_proto(proto)
    shapes.infer_shapes(model)
    return channel_groups(model.graph)


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _prune(proto, fraction, **options):
    model, report = optimize_model(proto, passes=["prune-channels"], options={"prune": f"flops={fraction}", **options})
    return export.to_proto(model), report


def _weights(proto):
    return {i.name: list(i.dims) for i in proto.graph.initializer}


def _check_dead_channels_go_and_outputs_stay(proto, expect_shapes: dict):
    x = RNG.standard_normal([d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    before = _run(proto, x)
    pruned, report = _prune(proto, 0.95, prune_min_keep=0.5)
    dims = _weights(pruned)
    for name, shape in expect_shapes.items():
        assert dims[name] == shape, (name, dims[name])
    np.testing.assert_allclose(_run(pruned, x), before, rtol=1e-5, atol=1e-5)
    return pruned, report


def test_a_chain_of_convs_is_one_group_per_producer_and_dead_channels_go_exactly():
    net = _Net()
    a = net.op("Relu", net.conv("x", 4, 8, dead=(1, 3, 5, 6)))
    a = net.op("MaxPool", a, kernel_shape=[2, 2], strides=[2, 2])
    out = net.conv(a, 8, 4)
    proto = net.model(out, [1, 4, 3, 3])
    groups, refused = _groups(proto)
    assert [g.channels for g in groups] == [8] and [r.reason for r in refused] == ["the channels reach a graph output"]
    _check_dead_channels_go_and_outputs_stay(proto, {"conv1.weight": [4, 4, 3, 3], "conv1.bias": [4], "conv4.weight": [4, 4, 3, 3]})


def test_batchnorm_and_per_channel_constants_are_cut_with_their_channels():
    net = _Net()
    c = net.conv("x", 4, 6, dead=(0, 2, 4))
    bn = net.op("BatchNormalization", c, net.const(RNG.uniform(0.5, 2, 6), "bn.scale"), net.const(np.zeros(6), "bn.bias"),
                net.const(np.zeros(6), "bn.mean"), net.const(np.ones(6) * 2, "bn.var"), epsilon=1e-5)
    scaled = net.op("Mul", net.op("Relu", bn), net.const(RNG.uniform(0.5, 2, (6, 1, 1)), "channel_scale"))
    out = net.conv(scaled, 6, 3)
    proto = net.model(out, [1, 3, 6, 6])
    groups, _ = _groups(proto)
    assert len(groups) == 1 and {s.node.op for s in groups[0].slices} == {"Conv", "BatchNormalization", "Mul"}
    _check_dead_channels_go_and_outputs_stay(proto, {"conv1.weight": [3, 4, 3, 3], "bn.var": [3], "channel_scale": [3, 1, 1],
                                                     "conv5.weight": [3, 3, 3, 3]})


def test_a_residual_add_ties_both_producers_into_one_group():
    net = _Net()
    first = net.op("Relu", net.conv("x", 4, 8, dead=(1, 2, 5, 7)))
    second = net.op("Relu", net.conv(first, 8, 8, dead=(1, 2, 5, 7)))  # a block: conv -> relu, then + its input
    joined = net.op("Relu", net.op("Add", first, second))
    out = net.conv(joined, 8, 2)
    proto = net.model(out, [1, 2, 6, 6])
    groups, _ = _groups(proto)
    tied = [g for g in groups if len(g.producers) == 2]
    assert len(tied) == 1 and tied[0].channels == 8 and len(tied[0].consumers) == 2  # the block's conv and the last one
    _check_dead_channels_go_and_outputs_stay(proto, {"conv1.weight": [4, 4, 3, 3], "conv3.weight": [4, 4, 3, 3], "conv7.weight": [2, 4, 3, 3]})


def test_a_residual_add_of_the_graph_input_is_refused_by_name():
    net = _Net(channels=4)
    c = net.conv("x", 4, 4)
    out = net.conv(net.op("Add", c, "x"), 4, 2)
    groups, refused = _groups(net.model(out, [1, 2, 6, 6]))
    assert not [g for g in groups if g.producers[0].name == "conv1"]
    assert any(r.producers == ("conv1",) and r.node == "add2" and "no prunable layer" in r.reason for r in refused)


def test_depthwise_convs_carry_the_channels_through_and_lose_their_groups():
    net = _Net()
    expand = net.op("Relu", net.conv("x", 4, 8, k=1, dead=(0, 3, 5, 6)))
    depthwise = net.op("Relu", net.conv(expand, 8, 8, group=8, dead=(0, 3, 5, 6)))
    out = net.conv(depthwise, 8, 4, k=1)
    proto = net.model(out, [1, 4, 6, 6])
    groups, _ = _groups(proto)
    group = next(g for g in groups if g.producers[0].name == "conv1")
    assert [n.name for n in group.depthwise] == ["conv3"]
    # The depthwise conv's own output channels are not a producer of their own (group > 1).
    assert all(g.producers[0].name != "conv3" for g in groups)
    pruned, _ = _check_dead_channels_go_and_outputs_stay(proto, {"conv1.weight": [4, 4, 1, 1], "conv3.weight": [4, 1, 3, 3],
                                                                 "conv5.weight": [4, 4, 1, 1]})
    depthwise_node = next(n for n in pruned.graph.node if n.name == "conv3")
    assert [a.i for a in depthwise_node.attribute if a.name == "group"] == [4]


def test_a_grouped_conv_is_refused_by_name():
    net = _Net()
    c = net.op("Relu", net.conv("x", 4, 8))
    out = net.conv(c, 8, 4, group=2)
    groups, refused = _groups(net.model(out, [1, 4, 6, 6]))
    assert any(r.node == "conv3" and "grouped Conv (group=2)" in r.reason for r in refused)
    assert not [g for g in groups if g.producers[0].name == "conv1"]


def test_concat_places_each_producer_at_its_offset_in_the_reader():
    net = _Net()
    left = net.op("Relu", net.conv("x", 4, 4, dead=(1, 2)))
    right = net.op("Relu", net.conv("x", 4, 6, dead=(0, 3, 5)))
    joined = net.op("Concat", left, right, axis=1)
    out = net.conv(joined, 10, 3)
    proto = net.model(out, [1, 3, 6, 6])
    groups, _ = _groups(proto)
    offsets = sorted((g.channels, s.offset) for g in groups for s in g.slices if s.role == "consumer")
    assert offsets == [(4, 0), (6, 4)]
    _check_dead_channels_go_and_outputs_stay(proto, {"conv1.weight": [2, 4, 3, 3], "conv3.weight": [3, 4, 3, 3], "conv6.weight": [3, 5, 3, 3]})


def test_flatten_into_a_gemm_removes_each_channels_block_of_features():
    net = _Net(size=4)
    c = net.op("Relu", net.conv("x", 4, 5, dead=(1, 3)))
    flat = net.op("Flatten", c, axis=1)
    fc = net.op("Gemm", flat, net.const(RNG.standard_normal((7, 80)) * 0.1, "fc.weight"), net.const(np.zeros(7), "fc.bias"), transB=1)
    proto = net.model(fc, [1, 7])
    groups, _ = _groups(proto)
    block = [s for g in groups for s in g.slices if s.role == "consumer"]
    assert [(s.block, s.axis) for s in block] == [(16, 1)]
    _check_dead_channels_go_and_outputs_stay(proto, {"conv1.weight": [3, 4, 3, 3], "fc.weight": [7, 48]})


def test_a_transformer_ffn_prunes_its_hidden_neurons_through_a_decomposed_gelu():
    """MatMul [batch, seq, 16] @ [16, 32] + bias -> x * 0.5 * (1 + erf(x / sqrt 2)) -> MatMul @ [32, 16]:
    the hidden features are the last axis, and GELU's x * (...) ties two tensors of the same group."""
    w1 = RNG.standard_normal((16, 32)).astype(np.float32)
    b1 = RNG.standard_normal(32).astype(np.float32)
    dead = [0, 3, 4, 9, 10, 17, 20, 21, 22, 25, 28, 31, 5, 6, 7, 8]
    w1[:, dead] = 0
    b1[dead] = 0
    inits = [numpy_helper.from_array(w1, "ffn.w1"), numpy_helper.from_array(b1, "ffn.b1"),
             numpy_helper.from_array(RNG.standard_normal((32, 16)).astype(np.float32), "ffn.w2"),
             numpy_helper.from_array(np.float32(np.sqrt(2)), "sqrt2"), numpy_helper.from_array(np.float32(1), "one"),
             numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [helper.make_node("MatMul", ["x", "ffn.w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "ffn.b1"], ["h"], name="bias1"),
             helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"), helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="plus_one"), helper.make_node("Mul", ["h", "e1"], ["g0"], name="gelu_mul"),
             helper.make_node("Mul", ["g0", "half"], ["g"], name="half_mul"), helper.make_node("MatMul", ["g", "ffn.w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 16])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    groups, _ = _groups(proto)
    assert [(g.producers[0].name, g.channels, [c.name for c in g.consumers]) for g in groups] == [("fc1", 32, ["fc2"])]
    _check_dead_channels_go_and_outputs_stay(proto, {"ffn.w1": [16, 16], "ffn.b1": [16], "ffn.w2": [16, 16]})


def test_attention_heads_that_reach_a_graph_output_are_refused_with_both_projections():
    """Q and K projections split into heads whose scores are a graph output: removing a head would
    change what the model returns, so the head analysis refuses the layer, naming its projections."""
    seq, hidden, heads = 5, 16, 4
    nodes, inits = [], []
    for name in ("q", "k"):
        inits.append(numpy_helper.from_array(RNG.standard_normal((hidden, hidden)).astype(np.float32), f"w_{name}"))
        nodes += [helper.make_node("MatMul", ["x", f"w_{name}"], [f"{name}_proj"], name=f"{name}_matmul"),
                  helper.make_node("Reshape", [f"{name}_proj", "heads_shape"], [f"{name}_heads"], name=f"{name}_reshape"),
                  helper.make_node("Transpose", [f"{name}_heads"], [f"{name}_t"], perm=[0, 2, 1, 3], name=f"{name}_transpose")]
    inits.append(numpy_helper.from_array(np.array([1, seq, heads, hidden // heads], np.int64), "heads_shape"))
    nodes += [helper.make_node("Transpose", ["k_t"], ["k_tt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q_t", "k_tt"], ["scores"], name="scores_matmul")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, heads, seq, seq])], inits)
    groups, refused = _groups(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not groups
    assert [(sorted(r.producers), r.node, r.reason) for r in refused] == [(["k_matmul", "q_matmul"], "scores_matmul", "attention heads reach a graph output")]


def test_a_shared_weight_is_refused():
    net = _Net()
    c = net.conv("x", 4, 4)
    # The same weight in a Conv whose channels go where the analysis does not follow (Softmax).
    net.nodes.append(helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["twin"], pads=[1] * 4, kernel_shape=[3, 3], name="twin"))
    out = net.op("Add", net.conv(net.op("Relu", c), 4, 4), net.op("Softmax", "twin", axis=1))
    groups, refused = _groups(net.model(out, [1, 4, 6, 6]))
    assert not [g for g in groups if g.producers[0].name in ("conv1", "twin")]
    assert any("shared with a node outside the group" in r.reason for r in refused)


# ---------------------------------------------------------------------------------------------
# The trained digits model


def _digits():
    from graphopt.models.digits import _split

    x_train, x_test, _, y_test = _split()
    return x_train, x_test, y_test


def _accuracy(proto, x, y):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(axis=1) == y).mean())


def test_digits_at_30_percent_fewer_flops_stays_within_a_point_of_accuracy():
    x_train, x_test, y_test = _digits()
    base, _ = optimize_model(models.load("digits_cnn"), opt_level=2)
    fp32 = export.to_proto(base)
    data = calibration.from_arrays({"input": x_train[:512]}, fp32, batch_size=64)
    work = onnx.ModelProto()
    work.CopyFrom(fp32)
    model, report = optimize_model(work, passes=["prune-channels"], calibration_data=data, options={"prune": "flops=0.3"})
    pruned = export.to_proto(model)
    p = report.pruning
    assert p["flops_after"] <= 0.7 * p["flops_before"] and p["searched"] and p["refitted"] >= 1
    params = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    assert params(pruned) < 0.8 * params(fp32)
    assert _accuracy(pruned, x_test, y_test) >= _accuracy(fp32, x_test, y_test) - 0.01
    # Without the refit, the same channels cost far more accuracy: the reconstruction is real work.
    work.CopyFrom(fp32)
    unfitted, _ = optimize_model(work, passes=["prune-channels"], calibration_data=data, options={"prune": "flops=0.3", "prune_reconstruct": False})
    assert _accuracy(export.to_proto(unfitted), x_test, y_test) < _accuracy(pruned, x_test, y_test)


def test_cli_prune_reports_what_it_removed_and_refuses_a_bad_goal(cli, tmp_path):
    x_train, _, _ = _digits()
    # 512 samples: the refit fits 384 of them (the rest judge the search); with 192 the pruned
    # model misses the default budget cos=0.99 on the held-out batch the CLI checks.
    np.savez(tmp_path / "calib.npz", input=x_train[:512])
    out = tmp_path / "pruned.onnx"
    proc = cli("run", "zoo:digits_cnn", "--prune", "flops=0.3", "--calibration", tmp_path / "calib.npz", "-o", out, "--report", tmp_path / "r.json",
               "--measure-stages")
    assert proc.returncode == 0, proc.stderr
    assert "pruned" in proc.stdout and "channel groups left whole" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    # Each family is a stage: FLOPs, parameters, the prediction and the measured time after it.
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["original", "-O2", "prune-channels"] and "stages (ratios to the original)" in proc.stdout
    # All of the model's FLOPs, activations and pooling too (the goal counts Conv/Gemm/MatMul): a little over 0.7.
    assert stages[2]["flops"] <= 0.75 * stages[1]["flops"] and stages[2]["parameters"] < stages[1]["parameters"]
    assert all(s["measured_median_ms"] > 0 and s["predicted_s"] > 0 for s in stages)
    assert report["pruning"]["flops_after"] <= 0.7 * report["pruning"]["flops_before"]
    assert report["pruning"]["refused"][0]["reason"] == "the channels reach a graph output"
    bad = cli("run", "zoo:digits_cnn", "--prune", "flops=1.5", "-o", tmp_path / "bad.onnx")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 1 and "--prune takes flops=FRACTION" in errors[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_prune_budget_removes_the_most_flops_the_accuracy_budget_allows_on_unseen_data():
    x_train, x_test, _ = _digits()
    base, _ = optimize_model(models.load("digits_cnn"), opt_level=2)
    fp32 = export.to_proto(base)
    data = calibration.from_arrays({"input": x_train[:512]}, fp32, batch_size=64)
    reference = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x_test})[0]
    results = {}
    for budget in ("cos=0.99", "cos=0.95", "cos=0.99999"):
        work = onnx.ModelProto()
        work.CopyFrom(fp32)
        model, report = optimize_model(work, passes=["prune-channels"], calibration_data=data, options={"prune": "budget"}, accuracy_budget=budget)
        results[budget] = (export.to_proto(model), report.pruning)
    strict, loose, impossible = (results[b][1] for b in ("cos=0.99", "cos=0.95", "cos=0.99999"))
    assert strict["budget_met"] and loose["budget_met"] and not impossible["budget_met"] and not impossible["groups"]
    assert loose["flops_after"] < strict["flops_after"] < 0.8 * strict["flops_before"]
    # The budget was measured on held-out calibration batches; it holds on the test set too (64-sample batches).
    for budget, floor in (("cos=0.99", 0.985), ("cos=0.95", 0.94)):
        pruned = ort.InferenceSession(results[budget][0].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x_test})[0]
        batches = range(0, len(x_test) - 63, 64)
        m = accuracy.measures([{"y": reference[i:i + 64]} for i in batches], [{"y": pruned[i:i + 64]} for i in batches])
        assert m.min_cosine >= floor, (budget, m)


def test_cli_prune_budget_needs_calibration_data(cli, tmp_path):
    proc = cli("run", "zoo:digits_cnn", "--prune", "budget", "-o", tmp_path / "p.onnx")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "--calibration" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("name,level", [("resnet18", 2), ("mobilenetv2", 2), ("digits_cnn", 2), ("bert_tiny", 3)])
def test_one_groups_pruned_inputs_cut_from_the_originals_are_what_the_pruned_model_computes(name, level):
    """The sensitivity search cuts the readers' pruned inputs out of the original activations
    instead of running each probe's model: residual, depthwise, Flatten and attention-head groups."""
    from graphopt.passes import sparsity

    base, _ = optimize_model(models.load(name), opt_level=level)
    proto = export.to_proto(base)
    data = calibration.random_data(proto, 2)
    groups, _ = channel_groups(base.graph)
    readers = sparsity._distinct(n for g in groups for n in g.consumers)
    original = sparsity._run(proto, data, [n.inputs[0].name for n in readers], 2)
    cut_groups = 0
    for index in range(len(groups)):
        model = loading.from_proto(proto)
        shapes.infer_shapes(model)
        fresh, _ = channel_groups(model.graph)
        group = fresh[index]
        keep = np.arange(group.channels)[1::2]
        sparsity._apply(model.graph, [group], [keep], lambda base: base + "_cut")
        touched = sparsity._distinct(group.consumers)
        cut = sparsity._sliced_inputs([(group, keep)], touched, original)
        if cut is None:
            # Only where a reader's output flows back into the group (a residual stream).
            assert name == "resnet18" or len(group.producers) > 1, group.name
            continue
        ran = sparsity._run(export.to_proto(model), data, [n.inputs[0].name for n in touched], 2)
        for reader in touched:
            np.testing.assert_allclose(cut[reader.inputs[0].name], ran[reader.inputs[0].name], rtol=1e-4, atol=1e-5)
        cut_groups += 1
    assert cut_groups >= min(2, len(groups))
