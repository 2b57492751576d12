"""fuse-layernorm: decomposed layer normalization as torch, tf2onnx and paddle2onnx export it."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from helpers import copy, make_model, op_types
from onnx import TensorProto, helper, numpy_helper

from graphopt import export, loading, models, pipelines, verify
from graphopt.optimize import optimize
from graphopt.pass_manager import PassContext, PassManager, Sequential, create_pass

F, F16, F64, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64
_NP = {F: np.float32, F16: np.float16, F64: np.float64}
DECOMPOSED = {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Reciprocal", "Mul", "Add", "Neg"}
SHAPE = [2, 5, 16]


class G:
    """A tiny graph builder: unique tensor names, initializers, one float input `x`."""

    def __init__(self, dtype=F, shape=SHAPE, opset=17, seed=0):
        self.dtype, self.np, self.shape, self.opset = dtype, _NP[dtype], list(shape), opset
        self.nodes, self.inits, self.outputs, self.n = [], [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, value, dtype=None):
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.np), name))
        return name

    def op(self, op_type, inputs, output=None, **attrs):
        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out

    def reduce_mean(self, x, axes=(-1,)):
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(list(axes), np.int64)], keepdims=1)
        return self.op("ReduceMean", [x], axes=list(axes), keepdims=1)

    def output(self, name, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, self.dtype, shape or self.shape))

    def model(self, input_shape=None):
        inputs = [helper.make_tensor_value_info("x", self.dtype, input_shape or self.shape)]
        return make_model(self.nodes, inputs, self.outputs, self.inits, opset=self.opset)


def torch_ln(g: G, x="x", *, axes=(-1,), affine=True, pow_dtype=None, eps=1e-5, out="y"):
    """torch.onnx (legacy and dynamo) / paddle2onnx: Pow 2 and Div."""
    norm_shape = g.shape[len(g.shape) - len(axes) :]
    mean = g.reduce_mean(x, axes)
    d = g.op("Sub", [x, mean])
    sq = g.op("Pow", [d, g.const(2.0, pow_dtype or g.np)])
    var = g.reduce_mean(sq, axes)
    s = g.op("Sqrt", [g.op("Add", [var, g.const(eps)])])
    if not affine:
        return g.op("Div", [d, s], output=out)
    n = g.op("Div", [d, s])
    gamma = g.const(g.rng.normal(1.0, 0.1, norm_shape))
    beta = g.const(g.rng.normal(0.0, 0.1, norm_shape))
    return g.op("Add", [g.op("Mul", [n, gamma]), beta], output=out)


def tf_ln(g: G, x="x", *, eps=1e-3, out="y"):
    """tf2onnx: SquaredDifference as Sub + Mul(d, d) (its own Sub), Reciprocal(Sqrt), operands swapped."""
    h = g.shape[-1]
    mean = g.reduce_mean(x)
    d_var = g.op("Sub", [x, mean])
    var = g.reduce_mean(g.op("Mul", [d_var, d_var]))
    rstd = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [g.const(np.array([eps])), var])])])
    d = g.op("Sub", [x, mean])
    n = g.op("Mul", [rstd, d])
    y = g.op("Mul", [g.const(g.rng.normal(1.0, 0.1, [h])), n])
    return g.op("Add", [g.const(g.rng.normal(0.0, 0.1, [h])), y], output=out)


def keras_ln(g: G, x="x", *, eps=1e-3, center=True, out="y"):
    """tf2onnx of Keras LayerNormalization: x * inv + (beta - mean * inv), inv = rsqrt(var + eps) * gamma."""
    h = g.shape[-1]
    mean = g.reduce_mean(x)
    d = g.op("Sub", [x, mean])
    var = g.reduce_mean(g.op("Mul", [d, d]))
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps)])])])
    inv = g.op("Mul", [inv, g.const(g.rng.normal(1.0, 0.1, [h]))])
    p = g.op("Mul", [x, inv])
    q = g.op("Mul", [mean, inv])
    if center:
        return g.op("Add", [p, g.op("Sub", [g.const(g.rng.normal(0.0, 0.1, [h])), q])], output=out)
    return g.op("Add", [p, g.op("Neg", [q])], output=out)


def fuse(model: onnx.ModelProto, passes=("fuse-layernorm", "dce")) -> onnx.ModelProto:
    optimized, _ = optimize(copy(model), passes=list(passes))
    onnx.checker.check_model(optimized, full_check=True)
    return optimized


def assert_same(original, optimized, dtype=F, tol=1e-4, seeds=(0, 1, 2)):
    shape = [d.dim_value or 3 for d in original.graph.input[0].type.tensor_type.shape.dim]
    assert [o.name for o in optimized.graph.output] == [o.name for o in original.graph.output]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(shape) * 3.0 + 1.5).astype(_NP[dtype])
        want = verify.run(original, {"x": x})
        got = verify.run(optimized, {"x": x})
        for name, value in want.items():
            np.testing.assert_allclose(got[name].astype(np.float64), value.astype(np.float64), rtol=tol, atol=tol)


def assert_fused(original, *, count=1, dtype=F, tol=1e-4):
    optimized = fuse(original)
    ops = op_types(optimized)
    assert ops.count("LayerNormalization") == count, ops
    assert not DECOMPOSED & set(ops), ops
    assert_same(original, optimized, dtype, tol)
    return optimized


def ln_nodes(model):
    return [n for n in model.graph.node if n.op_type == "LayerNormalization"]


# ---------------------------------------------------------------------------------------------
# Positive cases


def test_torch_div_form():
    g = G()
    torch_ln(g)
    g.output("y")
    out = assert_fused(g.model())
    (node,) = ln_nodes(out)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1
    assert attrs["epsilon"] == pytest.approx(1e-5)
    assert "stash_type" not in attrs
    assert list(node.output) == ["y"] and node.input[0] == "x"


def test_torch_opset18_axes_as_input():
    g = G(opset=18)
    torch_ln(g)
    g.output("y")
    assert_fused(g.model())


def test_tf_mul_square_reciprocal_and_swapped_operands():
    g = G()
    tf_ln(g)
    g.output("y")
    out = assert_fused(g.model())
    attrs = {a.name: helper.get_attribute_value(a) for a in ln_nodes(out)[0].attribute}
    assert attrs["epsilon"] == pytest.approx(1e-3)


def test_keras_batch_normalization_form():
    g = G()
    keras_ln(g)
    g.output("y")
    assert_fused(g.model())


def test_keras_batch_normalization_form_without_center():
    g = G()
    keras_ln(g, center=False)
    g.output("y")
    out = assert_fused(g.model())
    assert len(ln_nodes(out)[0].input) == 2  # no bias


def test_no_affine_gets_unit_scale_and_no_bias():
    g = G()
    torch_ln(g, affine=False)
    g.output("y")
    out = assert_fused(g.model())
    node = ln_nodes(out)[0]
    assert len(node.input) == 2
    scale = next(i for i in out.graph.initializer if i.name == node.input[1])
    np.testing.assert_array_equal(numpy_helper.to_array(scale), np.ones([16], np.float32))


def test_fp16():
    g = G(dtype=F16)
    tf_ln(g)  # Mul(d, d): ORT's CPU Pow has no float16 kernel
    g.output("y")
    out = assert_fused(g.model(), dtype=F16, tol=1e-2)
    assert out.graph.output[0].type.tensor_type.elem_type == F16


def test_double_with_paddle_style_pow_exponent():
    g = G(dtype=F64)
    torch_ln(g, pow_dtype=np.float32)
    g.output("y")
    assert_fused(g.model(), dtype=F64)


def test_float32_pow_exponent_given_as_double():
    g = G()
    torch_ln(g, pow_dtype=np.float64)
    g.output("y")
    assert_fused(g.model())


def test_last_two_axes():
    g = G(shape=[2, 3, 4, 8])
    torch_ln(g, axes=(2, 3))
    g.output("y")
    out = assert_fused(g.model())
    attrs = {a.name: helper.get_attribute_value(a) for a in ln_nodes(out)[0].attribute}
    assert attrs["axis"] == -2


def test_ones_prefixed_gamma_is_reshaped():
    g = G()
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(2.0)]))
    n = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])])
    y = g.op("Mul", [n, g.const(g.rng.normal(1.0, 0.1, [1, 1, 16]))])
    g.op("Add", [g.const(g.rng.normal(0.0, 0.1, [1, 16])), y], output="y")
    g.output("y")
    assert_fused(g.model())


def test_gamma_over_other_axes_stays_outside():
    g = G()
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(2.0)]))
    n = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])])
    g.op("Mul", [n, g.const(g.rng.normal(1.0, 0.1, [5, 1]))], output="y")  # varies over axis 1
    g.output("y")
    out = fuse(g.model())
    assert op_types(out) == ["LayerNormalization", "Mul"]
    assert_same(g.model(), out)


def test_graph_output_final_tensor_keeps_name_and_chain_fuses():
    g = G()
    a = torch_ln(g, out="a")
    a = g.op("Relu", [a])
    b = tf_ln(g, a, out="b")
    keras_ln(g, b, out="c")
    g.output("b")
    g.output("c")
    out = fuse(g.model())
    assert op_types(out).count("LayerNormalization") == 3
    assert not DECOMPOSED & set(op_types(out))
    assert_same(g.model(), out)


def test_runs_directly_through_pass_manager():
    g = G()
    torch_ln(g)
    g.output("y")
    model = loading.from_proto(copy(g.model()))
    records = PassManager(Sequential([create_pass("fuse-layernorm"), create_pass("dce")])).run(PassContext(model=model))
    assert records[0].changed and records[0].stats["fused"] == 1
    out = export.to_proto(model)
    onnx.checker.check_model(out)
    assert op_types(out) == ["LayerNormalization"]
    assert_same(g.model(), out)


def test_symbolic_batch_and_sequence():
    g = G()
    torch_ln(g)
    g.output("y", ["batch", "seq", 16])
    assert_fused(g.model(["batch", "seq", 16]))


def test_symbolic_normalized_dim_without_affine_is_skipped():
    g = G()
    torch_ln(g, affine=False)
    g.output("y", [2, 5, "h"])
    assert_untouched(g.model([2, 5, "h"]))


def test_gamma_and_eps_from_constant_nodes():
    g = G(opset=18)
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    two = g.op("Constant", [], value=numpy_helper.from_array(np.array(2.0, np.float32)))
    eps = g.op("Constant", [], value=numpy_helper.from_array(np.array(1e-6, np.float32)))
    gamma = g.op("Constant", [], value=numpy_helper.from_array(g.rng.normal(1.0, 0.1, [16]).astype(np.float32)))
    var = g.reduce_mean(g.op("Pow", [d, two]))
    n = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, eps])])])
    g.op("Mul", [gamma, n], output="y")
    g.output("y")
    out = fuse(g.model())
    assert op_types(out).count("LayerNormalization") == 1
    assert not DECOMPOSED & set(op_types(out))
    assert_same(g.model(), out)


def test_inside_an_if_branch():
    body = G()
    torch_ln(body, out="then_y")
    then_graph = helper.make_graph(
        body.nodes, "then", [], [helper.make_tensor_value_info("then_y", F, SHAPE)], initializer=body.inits
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_y"])], "else", [], [helper.make_tensor_value_info("else_y", F, SHAPE)]
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", F, SHAPE)],
        [helper.make_tensor_value_info("y", F, SHAPE)],
        [numpy_helper.from_array(np.array(-1e9, np.float32), "zero")],
    )
    out = fuse(model)
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    then_ops = [n.op_type for n in next(a.g for a in if_node.attribute if a.name == "then_branch").node]
    assert then_ops == ["LayerNormalization"]
    assert_same(model, out)


def test_many_layer_norms_are_all_fused_quickly():
    g = G(shape=[1, 4, 8])
    x = "x"
    for i in range(300):
        x = torch_ln(g, x, out=f"ln{i}")
    g.output(x)
    model = g.model()
    start = time.perf_counter()
    out = fuse(model, passes=("fuse-layernorm",))
    assert time.perf_counter() - start < 30
    assert op_types(out) == ["LayerNormalization"] * 300
    assert_same(model, out, seeds=(0,))


# ---------------------------------------------------------------------------------------------
# Negative cases: the graph is left as it was


def assert_untouched(model):
    out = fuse(model)
    assert "LayerNormalization" not in op_types(out)
    assert sorted(op_types(out)) == sorted(op_types(model))


def test_mean_used_elsewhere():
    g = G()
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(2.0)]))
    n = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])])
    y = g.op("Add", [n, g.op("Mul", [mean, g.const(0.5)])], output="y")  # the mean is reused
    g.output(y)
    assert_untouched(g.model())


def test_reduction_over_non_last_axis():
    g = G()
    torch_ln(g, axes=(1,), affine=False)
    g.output("y")
    assert_untouched(g.model())


def test_non_contiguous_axes():
    g = G(shape=[2, 3, 4, 8])
    torch_ln(g, axes=(1, 3), affine=False)
    g.output("y")
    assert_untouched(g.model())


def test_opset_16_model_is_left_alone():
    g = G(opset=16)
    torch_ln(g)
    g.output("y")
    assert_untouched(g.model())


@pytest.mark.parametrize("which", ["var", "std", "mean"])
def test_intermediate_graph_output(which):
    g = G()
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(2.0)]))
    std = g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])
    g.op("Div", [d, std], output="y")
    g.output("y")
    g.output({"var": var, "std": std, "mean": mean}[which], [2, 5, 1])
    assert_untouched(g.model())


def test_pow_other_than_two():
    g = G()
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(3.0)]))
    g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, g.const(1e-5)])])], output="y")
    g.output("y")
    assert_untouched(g.model())


def test_eps_not_a_constant():
    g = G()
    mean = g.reduce_mean("x")
    d = g.op("Sub", ["x", mean])
    var = g.reduce_mean(g.op("Pow", [d, g.const(2.0)]))
    eps = g.op("Abs", [g.reduce_mean(mean)])
    g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, eps])])], output="y")
    g.output("y")
    assert_untouched(g.model())


# ---------------------------------------------------------------------------------------------
# Zoo


def test_bert_tiny_layer_norms_fused_at_O2():
    original = models.load("bert_tiny")
    assert sum(n.op_type == "ReduceMean" for n in original.graph.node) == 10  # 5 decomposed LayerNorms
    optimized, report = optimize(copy(original), opt_level=2)
    ops = op_types(optimized)
    assert ops.count("LayerNormalization") == 5, "fuse-layernorm missing from the -O2 pipeline?"
    assert not {"ReduceMean", "Pow", "Sqrt"} & set(ops)
    onnx.checker.check_model(optimized, full_check=True)
    assert verify.verify(copy(original), optimized).ok


# ---------------------------------------------------------------------------------------------
# RMS normalization and the affine part after a normalization


def rms(g: G, x="x", *, reciprocal=False, eps=1e-6, out="y"):
    """LLaMA/T5 as torch exports it: x * rsqrt(mean(x^2) + eps) * weight (rsqrt: Reciprocal(Sqrt))."""
    var = g.reduce_mean(g.op("Pow", [x, g.const(2.0)]))
    std = g.op("Sqrt", [g.op("Add", [var, g.const(eps)])])
    n = g.op("Mul", [x, g.op("Reciprocal", [std])]) if reciprocal else g.op("Div", [x, std])
    return g.op("Mul", [n, g.const(g.rng.normal(1.0, 0.1, [g.shape[-1]]))], output=out)


@pytest.mark.parametrize("reciprocal", [False, True])
def test_rms_norm_fuses_at_opset_23_with_its_weight(reciprocal):
    g = G(opset=23)
    g.output(rms(g, reciprocal=reciprocal))
    optimized = fuse(g.model())
    assert op_types(optimized) == ["RMSNormalization"]
    weight = numpy_helper.to_array(next(i for i in optimized.graph.initializer if i.name == optimized.graph.node[0].input[1]))
    assert not np.allclose(weight, 1.0)  # the Mul by weight went into the scale
    assert_same(g.model(), optimized)


def test_rms_norm_before_opset_23_is_left_alone():
    g = G(opset=18)
    g.output(rms(g))
    assert op_types(fuse(g.model())) == op_types(g.model())


def test_scale_and_shift_after_an_exported_layer_normalization_are_absorbed():
    """An exporter's own LayerNormalization followed by * s + c (a folded affine layer)."""
    g = G()
    h = g.shape[-1]
    ln = g.op("LayerNormalization", ["x", g.const(g.rng.normal(1, 0.1, [h])), g.const(g.rng.normal(0, 0.1, [h]))], axis=-1)
    y = g.op("Add", [g.op("Mul", [ln, g.const(g.rng.normal(1, 0.1, [h]))]), g.const(g.rng.normal(0, 0.1, [1, 1, h]))], output="y")
    g.output(y)
    optimized = fuse(g.model())
    assert op_types(optimized) == ["LayerNormalization"]
    assert_same(g.model(), optimized)


def test_a_scale_over_another_axis_or_a_used_mean_output_is_not_absorbed():
    g = G()
    h = g.shape[-1]
    ln = g.op("LayerNormalization", ["x", g.const(np.ones(h))], axis=-1)
    g.output(g.op("Mul", [ln, g.const(g.rng.normal(1, 0.1, [g.shape[1], 1]))], output="y"))
    assert op_types(fuse(g.model())) == ["LayerNormalization", "Mul"]


# ---------------------------------------------------------------------------------------------
# fuse-skip-layernorm (-O3, onnxruntime's com.microsoft SkipLayerNormalization)


def _residual_ln(g: G, *, bias=True, skip_shape=None):
    h = g.shape[-1]
    x = g.op("Add", ["x", g.const(g.rng.normal(0, 0.1, [h]))]) if bias else "x"
    summed = g.op("Add", ["skip", x])
    ln = g.op("LayerNormalization", [summed, g.const(g.rng.normal(1, 0.1, [h])), g.const(g.rng.normal(0, 0.1, [h]))], axis=-1, output="y")
    g.output(ln)
    inputs = [helper.make_tensor_value_info("x", g.dtype, g.shape), helper.make_tensor_value_info("skip", g.dtype, skip_shape or g.shape)]
    return make_model(g.nodes, inputs, g.outputs, g.inits, opset=g.opset)


def _skip_fused(model, target="x86_64"):
    optimized, _ = optimize(copy(model), passes=["fuse-skip-layernorm", "dce"], target=target)
    onnx.checker.check_model(optimized, full_check=True)
    return optimized


def _run_two(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
    return verify.run(model, feeds)


@pytest.mark.parametrize("bias", [True, False])
def test_residual_add_and_bias_fuse_into_skip_layer_normalization(bias):
    model = _residual_ln(G(), bias=bias)
    optimized = _skip_fused(model)
    assert op_types(optimized) == ["SkipLayerNormalization"] and optimized.graph.node[0].domain == "com.microsoft"
    assert len(optimized.graph.node[0].input) == (5 if bias else 4)
    for name, value in _run_two(model).items():
        np.testing.assert_allclose(_run_two(optimized)[name], value, rtol=1e-4, atol=1e-5)


def test_skip_layer_norm_needs_equal_shapes_and_an_onnxruntime_target():
    assert "SkipLayerNormalization" not in op_types(_skip_fused(_residual_ln(G(), skip_shape=[1, 5, 16])))
    assert "SkipLayerNormalization" not in op_types(_skip_fused(_residual_ln(G()), target="generic"))


def test_every_residual_layer_norm_of_a_torch_bert_fuses_once_its_dims_are_bound():
    """With batch and sequence bound every residual Add's operands provably have one shape (with
    them symbolic, the position embeddings' Slice hides the sequence dim from onnx's inference)."""
    real_models = pytest.importorskip("real_models.zoo")
    try:
        real = real_models.load("torch_legacy_bert")
    except real_models.ModelUnavailable as missing:
        pytest.skip(str(missing))
    from graphopt import api

    feeds = real.feeds if isinstance(real.feeds, dict) else real.feeds[0]
    batch, sequence = feeds["input_ids"].shape
    o3 = [n for n in pipelines.level_passes(3) if n not in ("cse", "dce")]
    result = api.optimize(real.model, passes=o3 + ["fuse-skip-layernorm", "cse", "dce"], dims={"batch": batch, "sequence": sequence},
                          inputs=feeds)
    ops = op_types(result.model)
    # two layers, two residual LayerNorms each; the embeddings' LayerNorm reads a sum whose last
    # term (the position embeddings, [1, S, H]) broadcasts over the batch: no skip input of one shape
    assert ops.count("SkipLayerNormalization") == 4 and ops.count("LayerNormalization") == 1
    assert result.fidelity.ok, result.fidelity.to_dict()


# ---------------------------------------------------------------------------------------------
# residual-add-as-sum (x86_64 -O2: the residual Add kept away from onnxruntime's SkipLayerNormalization)


def _session_ops(model, tmp_path) -> list[str]:
    """The op types onnxruntime's CPU session runs after its own fusions (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "session.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return op_types(onnx.load(so.optimized_model_filepath))


def test_the_residual_add_becomes_a_sum_that_onnxruntime_leaves_unfused(tmp_path):
    model = _residual_ln(G(shape=[1, 8, 16]))
    assert "SkipLayerNormalization" in _session_ops(model, tmp_path)  # what onnxruntime does to the Add
    optimized, report = optimize(copy(model), target="x86_64", opt_level=2)
    assert next(r for r in report.passes if r.name == "residual-add-as-sum").stats == {"residual_adds": 1}
    ops = op_types(optimized)
    assert ops.count("Sum") == 1 and ops.count("Add") == 1  # the bias Add stays an Add
    assert "SkipLayerNormalization" not in _session_ops(optimized, tmp_path)
    for name, value in _run_two(model).items():
        np.testing.assert_allclose(_run_two(optimized)[name], value, rtol=1e-5, atol=1e-6)


def test_the_residual_add_stays_where_it_is_read_twice_and_on_other_targets():
    g = G(shape=[1, 8, 16])
    model = _residual_ln(g, bias=False)
    summed = next(n for n in model.graph.node if n.op_type == "Add").output[0]
    model.graph.output.append(helper.make_tensor_value_info(summed, TensorProto.FLOAT, [1, 8, 16]))
    optimized, _ = optimize(copy(model), target="x86_64", opt_level=2)
    assert "Sum" not in op_types(optimized)  # the sum is an output too
    optimized, _ = optimize(copy(_residual_ln(G(shape=[1, 8, 16]))), target="generic", opt_level=3)
    assert "Sum" not in op_types(optimized)
