"""Each cleanup and folding pass on real-shaped graphs, checked for numerical equivalence in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import F, const, copy, make_model, op_types, optimize_checked
from onnx import helper

from graphopt import export


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


# ---------------------------------------------------------------------------------------------
# No-op elimination


def test_identity_dropout_and_same_type_cast_are_removed():
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Dropout", ["a"], ["b"]),
            helper.make_node("Cast", ["b"], ["c"], to=F),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    out, report = optimize_checked(model, passes=["eliminate-noop", "dce"])
    assert op_types(out) == ["Relu"]
    assert out.graph.node[0].input[0] == "x"


def test_noops_that_change_something_stay():
    model = make_model(
        [
            helper.make_node("Cast", ["x"], ["c"], to=onnx.TensorProto.DOUBLE),
            helper.make_node("Dropout", ["x", "ratio", "train"], ["d", "mask"]),
            helper.make_node("Cast", ["mask"], ["m"], to=F),
        ],
        [vi("x", [2, 3])],
        [vi("c", [2, 3], onnx.TensorProto.DOUBLE), vi("m", [2, 3])],
        [const("ratio", np.array(0.0, np.float32)), const("train", np.array(False))],
    )
    out, _ = optimize_checked(model, passes=["eliminate-noop", "dce"])
    # The mask output is read, so Dropout stays; Cast to double is a real conversion.
    assert sorted(op_types(out)) == ["Cast", "Cast", "Dropout"]


def test_shape_preserving_layout_ops_are_removed():
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "same"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 2]),
            helper.make_node("Pad", ["t", "zeros"], ["p"]),
            helper.make_node("Slice", ["p", "starts", "ends", "axes"], ["s"]),
            helper.make_node("Expand", ["s", "same"], ["e"]),
            helper.make_node("Sigmoid", ["e"], ["y"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [2, 3, 4])],
        [
            const("same", np.array([2, 3, 4], np.int64)),
            const("zeros", np.zeros(6, np.int64)),
            const("starts", np.array([0, -3], np.int64)),
            const("ends", np.array([2**62, 100], np.int64)),
            const("axes", np.array([0, 1], np.int64)),
        ],
    )
    out, _ = optimize_checked(model, passes=["eliminate-noop", "dce"])
    assert op_types(out) == ["Sigmoid"]


def test_partial_slice_and_real_reshape_stay():
    model = make_model(
        [
            helper.make_node("Slice", ["x", "starts", "ends"], ["s"]),
            helper.make_node("Reshape", ["s", "shape"], ["y"]),
        ],
        [vi("x", [4, 6])],
        [vi("y", [6, 3])],
        [const("starts", np.array([1], np.int64)), const("ends", np.array([4], np.int64)), const("shape", np.array([6, 3], np.int64))],
    )
    out, _ = optimize_checked(model, passes=["eliminate-noop", "dce"])
    assert op_types(out) == ["Slice", "Reshape"]


def test_graph_output_keeps_its_name_when_its_producer_goes():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        [vi("x", [3])],
        [vi("y", [3])],
    )
    out, _ = optimize_checked(model, passes=["eliminate-noop", "dce"])
    assert op_types(out) == ["Relu"]
    assert out.graph.node[0].output[0] == "y" and out.graph.output[0].name == "y"


def test_identity_from_input_to_output_stays():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    out, _ = optimize_checked(model, passes=["eliminate-noop", "dce"])
    assert op_types(out) == ["Identity"]


# ---------------------------------------------------------------------------------------------
# Transpose / Reshape merging


def test_transposes_compose_and_cancel():
    model = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),  # NCHW -> NHWC
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),  # back: cancels
            helper.make_node("Transpose", ["t2"], ["t3"], perm=[1, 0, 2, 3]),
            helper.make_node("Transpose", ["t3"], ["t4"], perm=[0, 1, 3, 2]),  # composes
            helper.make_node("Relu", ["t4"], ["y"]),
        ],
        [vi("x", [2, 3, 4, 5])],
        [vi("y", [3, 2, 5, 4])],
    )
    out, _ = optimize_checked(model, passes=["merge-transpose", "dce"])
    assert op_types(out) == ["Transpose", "Relu"]
    assert list(out.graph.node[0].attribute[0].ints) == [1, 0, 3, 2]


def test_reshape_chain_merges_unless_target_copies_a_dim():
    model = make_model(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("Reshape", ["f", "s1"], ["r1"]),
            helper.make_node("Reshape", ["r1", "s_zero"], ["y"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [6, 4])],
        [const("s1", np.array([6, 4], np.int64)), const("s_zero", np.array([0, -1], np.int64))],
    )
    out, _ = optimize_checked(model, passes=["merge-reshape", "dce"])
    # Flatten->Reshape([6,4]) merges; Reshape([0,-1]) copies dim 0 of its input, so it must not skip.
    assert op_types(out) == ["Reshape", "Reshape"]
    assert out.graph.node[0].input[0] == "x"


def _two_slices(second_axes, *, shared=False, first_axes=(1,)):
    """x [4, 10, 6] -> Slice(axes first_axes) -> Slice(axes second_axes) -> y (+ a second reader of the first)."""
    inits = [
        const("s1", np.array([2] * len(first_axes), np.int64)), const("e1", np.array([9] * len(first_axes), np.int64)),
        const("a1", np.array(first_axes, np.int64)),
        const("s2", np.array([1], np.int64)), const("e2", np.array([-1], np.int64)),
        const("a2", np.array(second_axes, np.int64)), const("st2", np.array([2], np.int64)),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "s1", "e1", "a1"], ["t"]),
        helper.make_node("Slice", ["t", "s2", "e2", "a2", "st2"], ["y"]),
    ]
    outputs = [vi("y", [None, None, None])]
    if shared:
        nodes.append(helper.make_node("Relu", ["t"], ["z"]))
        outputs.append(vi("z", [None, None, None]))
    return make_model(nodes, [vi("x", [4, 10, 6])], outputs, inits)


def test_slices_of_different_axes_merge_into_one():
    for axes in ([-1], [0]):
        out, _ = optimize_checked(_two_slices(axes), passes=["merge-slice"])
        assert op_types(out) == ["Slice"], axes
        assert out.graph.node[0].input[0] == "x"


def test_slices_do_not_merge_on_one_axis_or_when_the_first_is_shared():
    for model in (_two_slices([1]), _two_slices([-2]), _two_slices([2], shared=True)):
        out, _ = optimize_checked(model, passes=["merge-slice"])
        assert op_types(out).count("Slice") == 2


# ---------------------------------------------------------------------------------------------
# CSE and DCE


def test_cse_merges_duplicate_branches_and_constants():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("MatMul", ["x", "w2"], ["b"]),  # w2 holds the same bytes as w1
            helper.make_node("Relu", ["a"], ["ra"]),
            helper.make_node("Relu", ["b"], ["rb"]),
            helper.make_node("Add", ["ra", "rb"], ["y"]),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 4])],
        [const("w1", w), const("w2", w.copy())],
    )
    out, report = optimize_checked(model, passes=["cse", "dce"])
    assert op_types(out) == ["MatMul", "Relu", "Add"]
    assert len(out.graph.initializer) == 1


def test_cse_leaves_random_ops_apart():
    model = make_model(
        [
            helper.make_node("RandomUniformLike", ["x"], ["a"], seed=1.0),
            helper.make_node("RandomUniformLike", ["x"], ["b"], seed=1.0),
            helper.make_node("Sub", ["a", "b"], ["y"]),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 4])],
    )
    from graphopt.optimize import optimize

    out, _ = optimize(model, passes=["cse", "dce"])
    assert op_types(out).count("RandomUniformLike") == 2


def test_dce_removes_dead_branches_and_their_weights():
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["dead"]),
            helper.make_node("Relu", ["dead"], ["dead2"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 4])],
        [const("w", np.ones((4, 4), np.float32))],
    )
    out, _ = optimize_checked(model, passes=["dce"])
    assert op_types(out) == ["Relu"]
    assert len(out.graph.initializer) == 0


# ---------------------------------------------------------------------------------------------
# Constant and shape folding


def test_constant_subgraph_is_folded():
    model = make_model(
        [
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", F, [3], [1.0, 2.0, 3.0])),
            helper.make_node("Mul", ["c", "two"], ["c2"]),
            helper.make_node("Sqrt", ["c2"], ["c3"]),
            helper.make_node("Add", ["x", "c3"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [const("two", np.array(2.0, np.float32))],
    )
    out, report = optimize_checked(model)
    assert op_types(out) == ["Add"]
    folded = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer))
    np.testing.assert_allclose(folded, np.sqrt([2.0, 4.0, 6.0]), rtol=1e-6)


def test_fold_declines_results_that_blow_up_the_file():
    model = make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", F, [1], [1.0])),
            helper.make_node("Add", ["x", "big"], ["y"]),
        ],
        [vi("x", [1024, 1024])],
        [vi("y", [1024, 1024])],
        [const("shape", np.array([1024, 1024], np.int64))],
    )
    out, _ = optimize_checked(model)
    assert "ConstantOfShape" in op_types(out)
    assert export.approx_nbytes(out) < 100_000
    out_small_limit, _ = optimize_checked(model, options={"fold_size_limit": 8 << 20})
    assert "ConstantOfShape" not in op_types(out_small_limit)


def test_folded_graph_output_keeps_its_name():
    model = make_model(
        [helper.make_node("Neg", ["c"], ["k"]), helper.make_node("Relu", ["x"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2]), vi("k", [2])],
        [const("c", np.array([1.0, -2.0], np.float32))],
    )
    out, _ = optimize_checked(model)
    assert [o.name for o in out.graph.output] == ["y", "k"]
    assert "Neg" not in op_types(out)


def _shape_chain(batch):
    """torch's head split: Reshape(x, Concat(Shape(x)[0], Shape(x)[1], 2, 4))."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
        helper.make_node("Unsqueeze", ["d0", "ax0"], ["u0"]),
        helper.make_node("Unsqueeze", ["d1", "ax0"], ["u1"]),
        helper.make_node("Concat", ["u0", "u1", "heads"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1, 3]),
    ]
    inits = [
        const("i0", np.array(0, np.int64)),
        const("i1", np.array(1, np.int64)),
        const("ax0", np.array([0], np.int64)),
        const("heads", np.array([2, 4], np.int64)),
    ]
    return make_model(nodes, [vi("x", [batch, 16, 8])], [vi("y", [batch, 2, 16, 4])], inits)


def test_shape_arithmetic_folds_when_static():
    out, _ = optimize_checked(_shape_chain(3))
    assert op_types(out) == ["Reshape", "Transpose"]
    shape = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == out.graph.node[0].input[1]))
    assert shape.tolist() == [3, 16, 2, 4]


def test_shape_arithmetic_stays_symbolic_for_dynamic_dims():
    from graphopt import verify

    model = _shape_chain("batch")
    out, _ = optimize_checked(model, inputs=verify.make_inputs(model, dim_values={"batch": 5}))
    # The batch dim must still be taken at run time: Reshape's 0 copies it from the input; the
    # static seq dim (16) and the head split are folded into the constant target.
    assert op_types(out) == ["Reshape", "Transpose"]
    target = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == out.graph.node[0].input[1]))
    assert target.tolist() == [0, 16, 2, 4]
    for batch in (1, 2, 5):
        fidelity = verify.verify(model, out, inputs=verify.make_inputs(model, dim_values={"batch": batch}))
        assert fidelity.ok


# ---------------------------------------------------------------------------------------------
# Subgraphs, overridable inputs, old IR


def _if_model():
    """An If whose branches read outer values (one of them through an outer Identity)."""
    then_body = helper.make_graph(
        [
            helper.make_node("Identity", ["outer_id"], ["t0"]),
            helper.make_node("Add", ["t0", "k"], ["t1"]),
            helper.make_node("Mul", ["k", "two"], ["k2"]),  # all-constant: foldable inside the branch
            helper.make_node("Add", ["t1", "k2"], ["then_out"]),
        ],
        "then",
        [],
        [vi("then_out", [2, 3])],
    )
    else_body = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_out"])],  # outer value straight to the output
        "else",
        [],
        [vi("else_out", [2, 3])],
    )
    return make_model(
        [
            helper.make_node("Identity", ["x"], ["outer_id"]),
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_body, else_branch=else_body),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [const("zero", np.array(0.0, np.float32)), const("k", np.ones((2, 3), np.float32)), const("two", np.array(2.0, np.float32))],
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_passes_recurse_into_if_branches_and_keep_outer_references(sign):
    from graphopt import verify

    model = _if_model()
    x = {"x": sign * np.abs(np.random.default_rng(0).standard_normal((2, 3))).astype(np.float32)}
    out, _ = optimize_checked(model, inputs=x)
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in if_node.attribute}
    then_ops = [n.op_type for n in branches["then_branch"].node]
    # The outer Identity is gone (the branch now reads x), the constant Mul folded, and the else
    # branch's Identity of an outer value stays: a subgraph output must be produced inside it.
    assert "Identity" not in op_types(out)
    assert then_ops == ["Add", "Add"]
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
    assert verify.verify(model, out, inputs=x).ok


def test_initializer_that_is_also_an_input_stays_overridable():
    from graphopt import verify

    model = make_model(
        [helper.make_node("Mul", ["scale", "two"], ["s2"]), helper.make_node("Mul", ["x", "s2"], ["y"])],
        [vi("x", [3]), vi("scale", [3])],
        [vi("y", [3])],
        [const("scale", np.ones(3, np.float32)), const("two", np.array(2.0, np.float32))],
    )
    out, _ = optimize_checked(model)
    assert [i.name for i in out.graph.input] == ["x", "scale"]
    assert op_types(out) == ["Mul", "Mul"]
    feed = {"x": np.ones(3, np.float32), "scale": np.full(3, 5.0, np.float32)}
    assert np.allclose(verify.run(out, feed)["y"], 10.0)
    folded, _ = optimize_checked(model, fold_input_defaults=True)
    assert op_types(folded) == ["Mul"] and [i.name for i in folded.graph.input] == ["x"]


def test_ir3_model_keeps_initializers_listed_as_inputs():
    model = make_model(
        [helper.make_node("Add", ["w", "w"], ["w2"]), helper.make_node("Mul", ["x", "w2"], ["y"])],
        [vi("x", [3]), vi("w", [3])],
        [vi("y", [3])],
        [const("w", np.arange(3, dtype=np.float32))],
        opset=9,
        ir_version=3,
    )
    out, _ = optimize_checked(model)
    assert out.ir_version == 3
    assert op_types(out) == ["Mul"]
    inputs = {i.name for i in out.graph.input}
    assert all(init.name in inputs for init in out.graph.initializer)


def test_other_domains_are_left_alone():
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"),
            helper.make_node("Relu", ["g"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        domains={"com.microsoft": 1},
    )
    out, _ = optimize_checked(model)
    assert op_types(out) == ["Gelu", "Relu"]
    assert {o.domain for o in out.opset_import} == {"", "com.microsoft"}


# ---------------------------------------------------------------------------------------------
# Whole pipelines on zoo models


@pytest.mark.parametrize("name", ["bert_tiny", "resnet18", "mobilenetv2", "digits_cnn"])
@pytest.mark.parametrize("target", ["x86_64", "arm64", "cuda"])
def test_o3_pipeline_keeps_zoo_models_equivalent(name, target):
    from graphopt import models

    model = models.load(name)
    out, report = optimize_checked(model, opt_level=3, target=target, rtol=1e-4, atol=1e-4)
    assert report.after.nodes <= report.before.nodes


def test_bert_tiny_shape_arithmetic_is_gone():
    from graphopt import models

    out, _ = optimize_checked(models.load("bert_tiny"), opt_level=2)
    ops = op_types(out)
    assert "Shape" not in ops and "Concat" not in ops and "Identity" not in ops


def test_digits_accuracy_is_unchanged():
    from graphopt import models, verify

    model = models.load("digits_cnn")
    feed, labels = models.eval_data("digits_cnn")
    out, _ = optimize_checked(model, opt_level=3)
    before = verify.run(model, feed)["output"].argmax(1)
    after = verify.run(out, feed)["output"].argmax(1)
    assert (before == after).all()
    assert (after == labels).mean() >= 0.9


@pytest.mark.parametrize(
    "name",
    ["bert_tiny", "resnet18", "mobilenetv2", "digits_cnn", pytest.param("resnet50", marks=pytest.mark.slow), pytest.param("bert_base", marks=pytest.mark.slow)],
)
def test_pipeline_is_idempotent_and_deterministic(name):
    from graphopt import models
    from graphopt.optimize import optimize

    first, _ = optimize(models.load(name), opt_level=3)
    second, _ = optimize(models.load(name), opt_level=3)
    assert first.SerializeToString() == second.SerializeToString()
    again, report = optimize(copy(first), opt_level=3)
    assert again.SerializeToString() == first.SerializeToString()
    assert not any(r.changed for r in report.passes)
