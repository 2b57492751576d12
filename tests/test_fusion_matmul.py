"""fuse-gemm, fold-scale-into-weights, fold-pad-into-conv (passes/fusion/matmul.py): on small graphs
built by hand and on what torch's exporters write (TorchScript, dynamo=False; and dynamo=True)."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import F, I64, const, make_model, op_types, optimize_checked
from onnx import TensorProto, helper

from graphopt import api

RNG = np.random.default_rng(0)


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def make(nodes, inputs, outputs, initializers=(), **kwargs):
    """make_model, with the shapes of outputs given as vi(name, None) filled in by shape inference."""
    graph = helper.make_graph(nodes, "test", inputs, [onnx.ValueInfoProto(name=o.name) for o in outputs],
                              initializer=list(initializers))
    opset = kwargs.get("opset", 17)
    inferred = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    known = {v.name: v for v in inferred.graph.output}
    typed = [o if o.type.tensor_type.HasField("shape") else known[o.name] for o in outputs]
    return make_model(nodes, inputs, typed, initializers, **kwargs)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def stats(report, name):
    return next(r for r in report.passes if r.name == name).stats


def attrs(model, op_type):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------------
# fuse-gemm


def _matmul_add(bias_shape, *, x_shape=(4, 8), bias_first=False, weight_input=False, output_too=False):
    add_inputs = ["b", "t"] if bias_first else ["t", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", add_inputs, ["y"])]
    inputs = [vi("x", list(x_shape))] + ([vi("w", [8, 6])] if weight_input else [])
    outputs = [vi("y", None)] + ([vi("t", None)] if output_too else [])
    inits = ([] if weight_input else [const("w", rand(8, 6))]) + [const("b", rand(*bias_shape))]
    return make(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (4, 6), (4, 1), (), (1,), (1, 1)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_a_2d_matmul_and_a_bias_become_a_gemm(bias_shape, bias_first):
    out, report = optimize_checked(_matmul_add(bias_shape, bias_first=bias_first), passes=["fuse-gemm"])
    assert op_types(out) == ["Gemm"]
    assert stats(report, "fuse-gemm") == {"matmul_add": 1}


def test_a_symbolic_row_count_takes_a_per_column_bias():
    out, _ = optimize_checked(_matmul_add((6,), x_shape=("n", 8)), passes=["fuse-gemm"])
    assert op_types(out) == ["Gemm"]


@pytest.mark.parametrize(
    "case",
    [
        dict(bias_shape=(6,), weight_input=True),  # the weight is computed at run time
        dict(bias_shape=(6,), x_shape=(2, 4, 8)),  # a 3-D MatMul: onnxruntime's own business
        dict(bias_shape=(4, 6), x_shape=(1, 8)),  # the bias broadcasts the product over 4 rows
        dict(bias_shape=(1, 1, 6)),  # the bias adds an axis
        dict(bias_shape=(4, 6), x_shape=("n", 8)),  # n could be 1: then the bias broadcasts the rows
        dict(bias_shape=(6,), output_too=True),  # the product is also a graph output
    ],
)
def test_matmul_adds_gemm_cannot_express_stay(case):
    out, report = optimize_checked(_matmul_add(**case), passes=["fuse-gemm"])
    assert sorted(op_types(out)) == ["Add", "MatMul"]
    assert stats(report, "fuse-gemm") == {}


@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("shift_shape", [(6,), (1, 6), (4, 1), (4, 6)])
def test_a_constant_add_after_a_gemm_merges_into_its_c(with_c, shift_shape):
    nodes = [helper.make_node("Gemm", ["x", "w"] + (["c"] if with_c else []), ["t"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Add", ["t", "d"], ["y"])]
    inits = [const("w", rand(6, 8)), const("d", rand(*shift_shape))] + ([const("c", rand(6))] if with_c else [])
    out, report = optimize_checked(make(nodes, [vi("x", [4, 8])], [vi("y", [4, 6])], inits), passes=["fuse-gemm"])
    assert op_types(out) == ["Gemm"]
    assert stats(report, "fuse-gemm") == {"bias_add": 1}
    assert attrs(out, "Gemm")["beta"] == 1.0 and attrs(out, "Gemm")["alpha"] == 0.5


def test_a_shift_that_broadcasts_a_gemm_up_stays():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "d"], ["y"])]
    model = make(nodes, [vi("x", [1, 8])], [vi("y", [3, 6])], [const("w", rand(8, 6)), const("d", rand(3, 6))])
    out, _ = optimize_checked(model, passes=["fuse-gemm"])
    assert op_types(out) == ["Gemm", "Add"]


def test_transposes_fold_into_trans_a_and_trans_b():
    nodes = [
        helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
        helper.make_node("Transpose", ["b"], ["bt"]),  # no perm: reversed axes
        helper.make_node("Gemm", ["at", "bt", "c"], ["y"], transB=1, alpha=1.5),
    ]
    model = make(nodes, [vi("a", [8, 4]), vi("b", [8, 6])], [vi("y", [4, 6])], [const("c", rand(6))])
    out, report = optimize_checked(model, passes=["fuse-gemm"])
    assert op_types(out) == ["Gemm"]
    assert stats(report, "fuse-gemm") == {"transposes": 1}
    assert attrs(out, "Gemm") == {"transA": 1, "transB": 0, "alpha": 1.5}


def test_a_transposed_constant_weight_is_fold_constants_job():
    """MatMul(x, Transpose(W)) needs no rule here: fold-constants stores W^T as the weight."""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["t"]),
             helper.make_node("Add", ["t", "b"], ["y"])]
    model = make(nodes, [vi("x", ["n", 8])], [vi("y", None)], [const("w", rand(6, 8)), const("b", rand(6))])
    out, report = optimize_checked(model, passes=["fold-constants", "fuse-gemm"])
    assert op_types(out) == ["Gemm"]
    assert stats(report, "fold-constants") == {"folded_nodes": 1}


def test_a_transpose_read_twice_by_one_gemm_stays():
    """Gemm(t, t), t = Transpose(a): binding B to t while the Transpose is removed would orphan B."""
    nodes = [helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]), helper.make_node("Gemm", ["t", "t"], ["y"])]
    model = make(nodes, [vi("a", [5, 5])], [vi("y", [5, 5])])
    out, _ = optimize_checked(model, passes=["fuse-gemm"])
    assert op_types(out) == ["Transpose", "Gemm"]


@pytest.mark.parametrize("pass_name", ["fuse-gemm", "fold-scale-into-weights", "fold-pad-into-conv"])
def test_an_if_branch_leaves_outer_values_alone(pass_name):
    """Inside a branch, the outer MatMul's (Pad's) result is an opaque value: the Add (Mul, Conv)
    in the branch does not reach across the boundary; the same pattern whole inside the branch
    (the else branch) is rewritten."""
    if pass_name == "fold-pad-into-conv":
        producer = lambda out: helper.make_node("Pad", ["x", "pads"], [out])  # noqa: E731
        consumer = lambda src, out: helper.make_node("Conv", [src, "w"], [out])  # noqa: E731
        inits = [const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), const("w", rand(4, 3, 3, 3))]
        x_shape, out_shape = [1, 3, 6, 6], [1, 4, 6, 6]
    else:
        # The branch's MatMul has a weight of its own: one the outer MatMul shares is left alone.
        producer = lambda out: helper.make_node("MatMul", ["x", "w" if out == "t" else "w2"], [out])  # noqa: E731
        op = "Add" if pass_name == "fuse-gemm" else "Mul"
        consumer = lambda src, out: helper.make_node(op, [src, "b"], [out])  # noqa: E731
        inits = [const("w", rand(8, 6)), const("w2", rand(8, 6)), const("b", rand(6))]
        x_shape, out_shape = [4, 8], [4, 6]
    outer = [producer("t")]
    then = helper.make_graph([consumer("t", "o")], "then", [], [vi("o", out_shape)])
    other = helper.make_graph([producer("t2"), consumer("t2", "o2")], "else", [], [vi("o2", out_shape)])
    nodes = outer + [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    model = make(nodes, [vi("x", x_shape), vi("cond", [], TensorProto.BOOL)], [vi("y", out_shape)], inits)
    for cond in (True, False):
        feeds = {"x": rand(*x_shape), "cond": np.array(cond)}
        out, report = optimize_checked(model, passes=[pass_name], inputs=feeds)
        assert op_types(out) == op_types(model)  # the outer MatMul/Pad and the If
        assert sum(stats(report, pass_name).values()) == 1  # the else branch's own pattern only
        branches = {a.name: a.g for a in out.graph.node[-1].attribute}
        assert len(branches["then_branch"].node) == 1 and len(branches["else_branch"].node) == 1


# ---------------------------------------------------------------------------------------------
# fold-scale-into-weights


def _after(op, scale, *, producer="MatMul", x_shape=(2, 4, 8), trans_b=0, bias=None, shared=False, weight_input=False,
           dtype=np.float32, weight=None):
    w = weight if weight is not None else rand(*((6, 8) if trans_b else (8, 6)), dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    kwargs = dict(transB=trans_b, alpha=0.75, beta=1.25) if producer == "Gemm" else {}
    nodes = [helper.make_node(producer, ["x", "w"] + (["c"] if bias is not None else []), ["t"], **kwargs),
             helper.make_node(op, ["t", "s"], ["y"])]
    outputs = [vi("y", None, elem)]
    if shared:  # a second MatMul reads the same weight
        nodes.append(helper.make_node(producer, ["x", "w"], ["z"], **kwargs))
        outputs.append(vi("z", None, elem))
    inits = [const("s", np.asarray(scale, dtype))] + ([] if weight_input else [const("w", w)])
    if bias is not None:
        inits.append(const("c", rand(*bias, dtype=dtype)))
    inputs = [vi("x", list(x_shape), elem)] + ([vi("w", list(w.shape), elem)] if weight_input else [])
    return make(nodes, inputs, outputs, inits)


SCALES = {"scalar": 0.125, "one": [3.0], "columns": np.linspace(0.5, 2, 6), "row": [np.linspace(0.5, 2, 6)]}


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_a_scale_after_a_matmul_folds_into_its_weight(op, scale):
    out, report = optimize_checked(_after(op, SCALES[scale]), passes=["fold-scale-into-weights"])
    assert op_types(out) == ["MatMul"]
    assert stats(report, "fold-scale-into-weights") == {"after_matmul": 1}


def test_a_rank_3_scale_after_a_rank_3_matmul_folds():
    out, _ = optimize_checked(_after("Mul", np.linspace(0.5, 2, 6).reshape(1, 1, 6)), passes=["fold-scale-into-weights"])
    assert op_types(out) == ["MatMul"]


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, (6,), (4, 1), ()])
@pytest.mark.parametrize("scale", ["scalar", "columns"])
def test_a_scale_after_a_gemm_folds_into_its_weight_and_bias(op, trans_b, bias, scale):
    model = _after(op, SCALES[scale], producer="Gemm", x_shape=(4, 8), trans_b=trans_b, bias=bias)
    out, report = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Gemm"]
    assert stats(report, "fold-scale-into-weights") == {"after_gemm": 1}
    assert attrs(out, "Gemm") == {"transB": trans_b, "alpha": 0.75, "beta": 1.25}


@pytest.mark.parametrize(
    "case",
    [
        dict(scale=np.linspace(0.5, 2, 4).reshape(4, 1)),  # a per-row scale: not W's to carry
        dict(scale=np.ones((3, 1, 6)), x_shape=(4, 8)),  # broadcasts the product to another axis
        dict(scale=0.5, weight_input=True),  # the weight is computed at run time
        dict(op="Div", scale=[1.0, 2.0, 0.0, 1.0, 1.0, 1.0]),  # a division by zero stays one
        dict(scale=np.float16(4096), dtype=np.float16, weight=np.full((8, 6), 30, np.float16)),  # W * s overflows float16
    ],
)
def test_scales_that_do_not_fold_stay(case):
    op = case.pop("op", "Mul")
    out, report = optimize_checked(_after(op, case.pop("scale"), **case), passes=["fold-scale-into-weights"],
                                   inputs={"x": np.full(case.get("x_shape", (2, 4, 8)), 1e-3, case.get("dtype", np.float32))}
                                   if "weight" in case else None)
    assert sorted(op_types(out)) == sorted(["MatMul", op])
    assert stats(report, "fold-scale-into-weights") == {}


def test_a_weight_another_matmul_reads_is_left_alone():
    model = _after("Mul", 0.5, shared=True)
    out, report = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert sorted(op_types(out)) == ["MatMul", "MatMul", "Mul"]
    weight = next(i for i in out.graph.initializer if i.name == "w")
    assert np.array_equal(onnx.numpy_helper.to_array(weight), onnx.numpy_helper.to_array(model.graph.initializer[1]))


def test_a_product_that_is_a_graph_output_keeps_its_mul():
    model = _after("Mul", 0.5)
    model.graph.output.append(vi("t", None))
    out, _ = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert sorted(op_types(out)) == ["MatMul", "Mul"]


def _before(consumer, op, scale, *, x_shape, w, trans_a=0, trans_b=0, group=1, bias=None):
    kwargs = {}
    if consumer == "Gemm":
        kwargs = dict(transA=trans_a, transB=trans_b, alpha=0.5)
    elif consumer == "Conv":
        kwargs = dict(pads=[1, 1, 1, 1], group=group)
    inputs = ["xs", "w"] + (["b"] if bias is not None else [])
    nodes = [helper.make_node(op, ["x", "s"], ["xs"]), helper.make_node(consumer, inputs, ["y"], **kwargs)]
    inits = [const("s", np.asarray(scale, np.float32)), const("w", w)] + ([const("b", bias)] if bias is not None else [])
    return make(nodes, [vi("x", list(x_shape))], [vi("y", None)], inits)


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("scale", [0.125, np.linspace(0.5, 2, 8), np.linspace(0.5, 2, 8).reshape(1, 1, 8)], ids=["scalar", "k", "k3d"])
def test_a_scale_before_a_matmul_folds_into_the_weight_rows(op, scale):
    out, report = optimize_checked(_before("MatMul", op, scale, x_shape=(2, 4, 8), w=rand(8, 6)), passes=["fold-scale-into-weights"])
    assert op_types(out) == ["MatMul"]
    assert stats(report, "fold-scale-into-weights") == {"before_matmul": 1}


@pytest.mark.parametrize("consumer", ["MatMul", "Gemm", "Conv"])
def test_a_scale_that_broadcasts_the_input_up_stays(consumer):
    """x of one column (channel) times an 8-vector is 8 columns wide: no weight row takes that."""
    if consumer == "Conv":
        model = _before("Conv", "Mul", np.linspace(0.5, 2, 4).reshape(1, 4, 1, 1), x_shape=(1, 1, 6, 6), w=rand(6, 4, 3, 3))
    else:
        model = _before(consumer, "Mul", np.linspace(0.5, 2, 8), x_shape=(4, 1), w=rand(8, 6))
    out, _ = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Mul", consumer]


def test_a_per_row_scale_before_a_matmul_stays():
    out, _ = optimize_checked(_before("MatMul", "Mul", np.linspace(0.5, 2, 4).reshape(4, 1), x_shape=(2, 4, 8), w=rand(8, 6)),
                              passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Mul", "MatMul"]


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("per_k", [False, True])
def test_a_scale_before_a_gemm_folds_along_k(trans_a, trans_b, per_k):
    x_shape = (8, 4) if trans_a else (4, 8)
    scale = np.linspace(0.5, 2, 8).reshape((8, 1) if trans_a else (1, 8)) if per_k else 3.0
    w = rand(6, 8) if trans_b else rand(8, 6)
    model = _before("Gemm", "Mul", scale, x_shape=x_shape, w=w, trans_a=trans_a, trans_b=trans_b, bias=rand(6))
    out, report = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Gemm"]
    assert stats(report, "fold-scale-into-weights") == {"before_gemm": 1}


def test_a_per_row_scale_before_a_gemm_stays():
    model = _before("Gemm", "Mul", np.linspace(0.5, 2, 4).reshape(4, 1), x_shape=(4, 8), w=rand(8, 6))
    out, _ = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Mul", "Gemm"]


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("scale", [0.25, np.linspace(0.5, 2, 4).reshape(1, 4, 1, 1), np.linspace(0.5, 2, 4).reshape(4, 1, 1)],
                         ids=["scalar", "channels", "channels3d"])
def test_a_scale_before_a_zero_padded_conv_folds_into_its_weight(op, group, scale):
    model = _before("Conv", op, scale, x_shape=(1, 4, 6, 6), w=rand(6, 4 // group, 3, 3), group=group, bias=rand(6))
    out, report = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Conv"]
    assert stats(report, "fold-scale-into-weights") == {"before_conv": 1}


def test_a_spatial_scale_before_a_conv_stays():
    model = _before("Conv", "Mul", rand(1, 1, 6, 6) + 2, x_shape=(1, 4, 6, 6), w=rand(6, 4, 3, 3))
    out, _ = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == ["Mul", "Conv"]


@pytest.mark.parametrize("consumer", ["MatMul", "Conv"])
def test_an_activations_closing_scale_stays(consumer):
    """GELU's (x * (1 + erf(x / sqrt2))) * 0.5 and HardSwish's x * Clip(x + 3, 0, 6) / 6 end in a
    constant scale of a product: folding it into the next weight would unmake the activation that
    fuse-activations and onnxruntime (Gelu, BiasGelu) recognize."""
    if consumer == "MatMul":
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["p"]),
                 helper.make_node("Mul", ["p", "s"], ["xs"]), helper.make_node("MatMul", ["xs", "w"], ["y"])]
        inits = [const("sqrt2", np.array(2**0.5, np.float32)), const("one", np.array(1, np.float32)),
                 const("s", np.array(0.5, np.float32)), const("w", rand(8, 6))]
        x_shape, op = [2, 4, 8], "Mul"
    else:
        nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
                 helper.make_node("Mul", ["x", "c"], ["p"]), helper.make_node("Div", ["p", "six"], ["xs"]),
                 helper.make_node("Conv", ["xs", "w"], ["y"], pads=[1, 1, 1, 1])]
        inits = [const("three", np.array(3, np.float32)), const("zero", np.array(0, np.float32)),
                 const("six", np.array(6, np.float32)), const("w", rand(4, 3, 3, 3))]
        x_shape, op = [1, 3, 6, 6], "Div"
    model = make(nodes, [vi("x", x_shape)], [vi("y", None)], inits)
    out, report = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert op_types(out) == op_types(model)
    assert stats(report, "fold-scale-into-weights") == {}, op


def test_a_per_channel_mul_after_a_conv_is_fold_conv_affines():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    model = make(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", None)],
                       [const("w", rand(4, 3, 3, 3)), const("s", rand(1, 4, 1, 1))])
    _, report = optimize_checked(model, passes=["fold-scale-into-weights"])
    assert stats(report, "fold-scale-into-weights") == {}


# ---------------------------------------------------------------------------------------------
# fold-pad-into-conv


def _pad_then(consumer, pads, *, fill=None, mode="constant", consumer_attrs=None, opset=17, axes=None, x_shape=(1, 3, 9, 9),
              pads_input=False):
    consumer_attrs = dict(consumer_attrs or {})
    if consumer != "Conv":
        consumer_attrs.setdefault("kernel_shape", [3, 3])
    inits, inputs = [], [vi("x", list(x_shape))]
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], mode=mode, pads=pads, **({} if fill is None else {"value": fill}))
    else:
        names = ["x", "pads", "" if fill is None else "fill"] + (["axes"] if axes is not None else [])
        while names[-1] == "":
            names.pop()
        pad = helper.make_node("Pad", names, ["p"], mode=mode)
        if pads_input:
            inputs.append(helper.make_tensor_value_info("pads", I64, [len(pads)]))
        else:
            inits.append(const("pads", np.array(pads, np.int64)))
        if fill is not None:
            inits.append(const("fill", np.array(fill, np.float32)))
        if axes is not None:
            inits.append(const("axes", np.array(axes, np.int64)))
    nodes = [pad]
    if consumer == "Conv":
        nodes.append(helper.make_node("Conv", ["p", "w", "b"], ["y"], **consumer_attrs))
        inits += [const("w", rand(4, 3, 3, 3)), const("b", rand(4))]
    else:
        nodes.append(helper.make_node(consumer, ["p"], ["y"], **consumer_attrs))
    return make(nodes, inputs, [vi("y", None)], inits, opset=opset)


def _pads_run(model, **kwargs):
    return optimize_checked(model, passes=["fold-pad-into-conv"], **kwargs)


@pytest.mark.parametrize(
    "pads, conv_attrs, want",
    [
        ([0, 0, 1, 1, 0, 0, 1, 1], {}, [1, 1, 1, 1]),
        # tf "SAME" with stride 2: one more row and column at the end
        ([0, 0, 0, 0, 0, 0, 1, 1], dict(strides=[2, 2]), [0, 0, 1, 1]),
        ([0, 0, 2, 0, 0, 0, 1, 3], dict(pads=[1, 1, 0, 0], dilations=[2, 1]), [3, 1, 1, 3]),
    ],
)
def test_a_zero_pad_folds_into_the_conv_pads(pads, conv_attrs, want):
    out, report = _pads_run(_pad_then("Conv", pads, consumer_attrs=conv_attrs))
    assert op_types(out) == ["Conv"]
    assert stats(report, "fold-pad-into-conv") == {"conv": 1}
    assert attrs(out, "Conv")["pads"] == want


@pytest.mark.parametrize("form", ["explicit_zero", "opset10", "axes"])
def test_every_pad_form_folds(form):
    if form == "explicit_zero":
        model = _pad_then("Conv", [0, 0, 1, 0, 0, 0, 0, 1], fill=0.0)
    elif form == "opset10":
        model = _pad_then("Conv", [0, 0, 1, 0, 0, 0, 0, 1], opset=10)
    else:
        model = _pad_then("Conv", [1, 0, 0, 1], axes=[2, -1], opset=18)
    out, _ = _pads_run(model)
    assert op_types(out) == ["Conv"] and attrs(out, "Conv")["pads"] == [1, 0, 0, 1]


def test_a_zero_pad_folds_into_an_average_pool_that_counts_padding():
    out, report = _pads_run(_pad_then("AveragePool", [0, 0, 1, 0, 0, 0, 2, 1], consumer_attrs=dict(count_include_pad=1, pads=[1, 1, 0, 0])))
    assert op_types(out) == ["AveragePool"] and attrs(out, "AveragePool")["pads"] == [2, 1, 2, 1]
    assert stats(report, "fold-pad-into-conv") == {"average_pool": 1}


def test_a_minus_infinity_pad_folds_into_a_max_pool():
    out, report = _pads_run(_pad_then("MaxPool", [0, 0, 1, 0, 0, 0, 2, 1], fill=-np.inf, consumer_attrs=dict(strides=[2, 2])))
    assert op_types(out) == ["MaxPool"] and attrs(out, "MaxPool")["pads"] == [1, 0, 2, 1]
    assert stats(report, "fold-pad-into-conv") == {"max_pool": 1}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: _pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), id="reflect"),
        pytest.param(lambda: _pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1], mode="edge"), id="edge"),
        pytest.param(lambda: _pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1], fill=1.0), id="non_zero_value"),
        pytest.param(lambda: _pad_then("Conv", [0, 1, 1, 1, 0, 0, 1, 1], x_shape=(1, 2, 9, 9)), id="channel_axis"),
        pytest.param(lambda: _pad_then("Conv", [1, 0, 1, 1, 0, 0, 1, 1], x_shape=(1, 3, 9, 9)), id="batch_axis"),
        pytest.param(lambda: _pad_then("Conv", [0, 0, -1, 1, 0, 0, 1, 1]), id="negative"),
        pytest.param(lambda: _pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1], consumer_attrs=dict(auto_pad="SAME_UPPER")), id="auto_pad"),
        pytest.param(lambda: _pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1], pads_input=True), id="pads_at_run_time"),
        pytest.param(lambda: _pad_then("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1]), id="average_pool_excluding_pads"),
        pytest.param(lambda: _pad_then("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], consumer_attrs=dict(count_include_pad=1, ceil_mode=1)),
                     id="average_pool_ceil_mode"),
        pytest.param(lambda: _pad_then("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1]), id="max_pool_zero_pad"),
        pytest.param(lambda: _pad_then("AveragePool", [0, 0, 2, 0, 0, 0, 0, 0], consumer_attrs=dict(count_include_pad=1, pads=[1, 0, 0, 0])),
                     id="average_pool_pads_reaching_the_kernel"),
        pytest.param(lambda: _pad_then("MaxPool", [0, 0, 3, 0, 0, 0, 0, 0], fill=-np.inf), id="max_pool_padding_only_window"),
    ],
)
def test_pads_that_do_not_fold_stay(model):
    built = model()
    feeds = None
    if any(i.name == "pads" for i in built.graph.input):
        feeds = {"x": rand(1, 3, 9, 9), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    out, report = _pads_run(built, inputs=feeds)
    assert op_types(out)[0] == "Pad"
    assert stats(report, "fold-pad-into-conv") == {}


# ---------------------------------------------------------------------------------------------
# What torch's exporters write


def _export(module, shape, dynamo: bool) -> onnx.ModelProto:
    from real_models import zoo

    with zoo._torch_session() as torch:
        net = module(torch).eval()
        example = (torch.rand(*shape),)
        if dynamo:
            return torch.onnx.export(net, example, dynamo=True, verbose=False).model_proto
        return zoo._export_legacy(torch, net, example, {})


def _linear_plus(torch):  # x @ W + b on 2-D x: MatMul + Add from both exporters
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x @ self.w + self.b

    return Net()


def _linear_times(torch):  # nn.Linear then * a per-feature constant: Gemm + Mul
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 6)
            self.register_buffer("k", torch.rand(6) + 0.5)

        def forward(self, x):
            return self.linear(x) * self.k

    return Net()


def _linear_over(torch):  # bias-free Linear / sqrt(d), the attention scale of some exports
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 6, bias=False)

        def forward(self, x):
            return self.linear(x) / 8**0.5

    return Net()


def _padded_conv(torch):  # tf-"SAME"-like asymmetric zero pad before a stride-2 conv, and F.pad
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pad = torch.nn.ZeroPad2d((0, 1, 0, 1))
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.conv2 = torch.nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv2(torch.nn.functional.pad(self.conv(self.pad(x)), (1, 2, 0, 1)))

    return Net()


@functools.cache
def _exported(name: str, shape: tuple, dynamo: bool) -> bytes:
    pytest.importorskip("torch")
    return _export(globals()[name], shape, dynamo).SerializeToString()


def _real(name, shape, dynamo):
    return onnx.load_from_string(_exported(name, shape, dynamo))


def _histogram(model):
    counts = {}
    for op in op_types(model):
        counts[op] = counts.get(op, 0) + 1
    return counts


EXPORTERS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_torch_matmul_plus_bias_becomes_a_gemm(dynamo):
    model = _real("_linear_plus", (3, 8), dynamo)
    assert _histogram(model) == {"MatMul": 1, "Add": 1}
    result = api.optimize(model, passes=["fuse-gemm"], verify=True, rtol=1e-5, atol=1e-6)
    assert op_types(result.model) == ["Gemm"]
    assert stats(result.report, "fuse-gemm") == {"matmul_add": 1}


# (module, input shape, exporter): the histogram it writes, the rule that folds its scale.
SCALED_EXPORTS = [
    ("_linear_times", (3, 8), "legacy", {"Gemm": 1, "Mul": 1}, "after_gemm"),
    ("_linear_times", (3, 8), "dynamo", {"Gemm": 1, "Mul": 1}, "after_gemm"),
    # a bias-free Linear on 2-D input: MatMul from TorchScript (the divisor a Constant node), Gemm from dynamo
    ("_linear_over", (3, 8), "legacy", {"MatMul": 1, "Constant": 1, "Div": 1}, "after_matmul"),
    ("_linear_over", (3, 8), "dynamo", {"Gemm": 1, "Div": 1}, "after_gemm"),
    ("_linear_over", (2, 5, 8), "legacy", {"MatMul": 1, "Constant": 1, "Div": 1}, "after_matmul"),
    ("_linear_over", (2, 5, 8), "dynamo", {"MatMul": 1, "Div": 1}, "after_matmul"),
]


@pytest.mark.parametrize("module, shape, exporter, before, rule", SCALED_EXPORTS,
                         ids=[f"{m[1:]}-{len(s)}d-{e}" for m, s, e, _, _ in SCALED_EXPORTS])
def test_torch_scales_fold_into_the_linear_weight(module, shape, exporter, before, rule):
    model = _real(module, shape, exporter == "dynamo")
    assert _histogram(model) == before
    result = api.optimize(model, passes=["fold-scale-into-weights"], verify=True, rtol=1e-5, atol=1e-6)
    assert _histogram(result.model) == {"Gemm" if "Gemm" in before else "MatMul": 1}
    assert stats(result.report, "fold-scale-into-weights") == {rule: 1}


def test_torch_legacy_pads_fold_into_the_convs():
    """The TorchScript exporter computes ZeroPad2d's and F.pad's pads at run time; once folded,
    both Pads (one asymmetric, before a stride-2 conv) become Conv pads."""
    model = _real("_padded_conv", (1, 3, 9, 9), False)
    assert _histogram(model)["Pad"] == 2
    result = api.optimize(model, passes=["constant-to-initializer", "fold-constants", "fold-pad-into-conv"], verify=True, rtol=1e-5, atol=1e-6)
    assert _histogram(result.model) == {"Conv": 2}
    assert stats(result.report, "fold-pad-into-conv") == {"conv": 2}
    pads = [[a.ints for a in n.attribute if a.name == "pads"][0] for n in result.model.graph.node]
    assert [list(p) for p in pads] == [[0, 0, 1, 1], [0, 1, 1, 2]]


def test_torch_dynamo_folds_pads_into_convs_itself():
    """Why the pass does nothing for dynamo exports: the exporter already wrote Conv pads."""
    model = _real("_padded_conv", (1, 3, 9, 9), True)
    assert "Pad" not in op_types(model)
    result = api.optimize(model, passes=["fold-pad-into-conv"], verify=True)
    assert stats(result.report, "fold-pad-into-conv") == {}


@pytest.mark.parametrize("name", ["magika", "rapidocr_cls"])
def test_tf2onnx_and_paddle2onnx_dense_layers_become_gemms(name):
    """magika's Keras Dense (tf2onnx) and the PaddleOCR classifier's fc (paddle2onnx) are 2-D
    MatMul + Add."""
    from real_models import zoo

    try:
        real = zoo.load(name)
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    entry = zoo.ENTRIES[name]
    result = api.optimize(real.model, passes=["fuse-gemm"], inputs=real.feeds, rtol=entry.rtol, atol=entry.atol)
    assert stats(result.report, "fuse-gemm") == {"matmul_add": 1}
    assert _histogram(result.model).get("Gemm", 0) == _histogram(real.model).get("Gemm", 0) + 1


# ---------------------------------------------------------------------------------------------
# Why there is no FusedMatMul pass


@pytest.mark.parametrize("form", ["transpose", "scale"])
def test_onnxruntime_fuses_transposes_and_scales_into_fused_matmul_itself(form, tmp_path):
    """A pass writing com.microsoft FusedMatMul would duplicate onnxruntime's own session-time
    fusions (TransposeMatMul and MatMulScale), which produce it from the plain graph."""
    if form == "transpose":
        nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]), helper.make_node("MatMul", ["at", "b"], ["y"])]
        inits = []
    else:
        nodes = [helper.make_node("MatMul", ["a", "b"], ["t"]), helper.make_node("Mul", ["t", "s"], ["y"])]
        inits = [const("s", np.array(0.125, np.float32))]
    model = make(nodes, [vi("a", [2, 4, 4]), vi("b", [2, 4, 4])], [vi("y", None)], inits)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [(n.op_type, n.domain) for n in fused.graph.node] == [("FusedMatMul", "com.microsoft")]
