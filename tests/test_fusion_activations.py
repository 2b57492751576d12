"""fuse-activations and fuse-activations-contrib: decomposed GELU, HardSwish, HardSigmoid, SiLU and
Mish, hand-built in every order exporters write them and as torch.onnx exports them.

Every positive test checks the op histogram changed as claimed, that the result still computes what
the original did in onnxruntime (api.optimize verifies), and that onnxruntime's own session
optimizer (ORT_ENABLE_ALL, CPU) makes at least as many fused ops of graphopt's output as of the
original: graphopt must never block a fusion onnxruntime would have done.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import tempfile
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import make_model
from onnx import TensorProto, helper, numpy_helper

from graphopt import api, targets

F, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
_NP = {F: np.float32, F16: np.float16, F64: np.float64}
MS = "com.microsoft"
SHAPE = [2, 5, 16]
BOTH = ("fuse-activations", "fuse-activations-contrib")


class G:
    """A tiny graph builder: unique names, one float input `x` (and optionally `z`)."""

    def __init__(self, opset=20, dtype=F, shape=SHAPE, second_input=False):
        self.opset, self.dtype, self.np, self.shape, self.in_shape = opset, dtype, _NP[dtype], list(shape), list(shape)
        self.nodes, self.inits, self.n, self.extra_outputs = [], [], 0, []
        self.input_names = ["x", "z"] if second_input else ["x"]

    def c(self, value, dtype=None):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.np), name))
        return name

    def op(self, op_type, *inputs, domain=None, **attrs):
        self.n += 1
        out = f"{op_type.lower()}{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self.n}", domain=domain, **attrs))
        return out

    def bias(self, x, size=None):
        """x + a constant 1-D bias over the last axis (what a Linear's bias leaves)."""
        size = size or self.shape[-1]
        return self.op("Add", x, self.c(np.random.default_rng(1).normal(0.0, 0.5, size)))

    def linear(self, x):
        """MatMul by constant weights + bias (onnxruntime fuses it into Gemm)."""
        w = self.c(np.random.default_rng(0).normal(0.0, 0.3, (self.shape[-1], self.shape[-1])))
        return self.bias(self.op("MatMul", x, w))

    def dynamic_linear(self, x):
        """MatMul of two activations + bias (onnxruntime keeps the MatMul, fuses the bias into BiasGelu)."""
        self.shape = self.shape[:-1] + [self.shape[-2]]
        return self.bias(self.op("MatMul", x, self.op("Transpose", x, perm=[0, 2, 1])))

    def output(self, *names):
        self.extra_outputs += names

    def model(self, y, out_shape=None):
        inputs = [helper.make_tensor_value_info(n, self.dtype, self.in_shape) for n in self.input_names]
        outs = [helper.make_tensor_value_info(n, self.dtype, self.shape) for n in [y] + self.extra_outputs]
        outs[0] = helper.make_tensor_value_info(y, self.dtype, out_shape or self.shape)
        domains = {MS: 1} if any(n.domain == MS for n in self.nodes) else None
        return make_model(self.nodes, inputs, outs, self.inits, opset=self.opset, ir_version=9, domains=domains)


# ---------------------------------------------------------------------------------------------
# The forms


def erf_gelu(g, x, order="legacy", scale="div", *, half=0.5, one=1.0, sqrt2=math.sqrt(2.0), other=None):
    """x * 0.5 * (1 + erf(x / sqrt2)); `other` replaces x in the outer product."""
    s = g.op("Div", x, g.c(sqrt2)) if scale == "div" else g.op("Mul", x, g.c(1.0 / sqrt2))
    e = g.op("Add", g.op("Erf", s), g.c(one))
    y = other or x
    if order == "legacy":  # torch.onnx TorchScript: (x * (1 + erf)) * 0.5
        return g.op("Mul", g.op("Mul", y, e), g.c(half))
    if order == "half_x":  # 0.5 * x * (1 + erf)
        return g.op("Mul", g.op("Mul", g.c(half), y), e)
    if order == "x_half":  # x * 0.5 * (1 + erf)
        return g.op("Mul", g.op("Mul", y, g.c(half)), e)
    return g.op("Mul", y, g.op("Mul", g.c(half), e))  # "dynamo": x * (0.5 * (1 + erf))


def tanh_gelu(g, x, order="legacy", cube="mul", *, coeff=0.044715, k=math.sqrt(2.0 / math.pi), half=0.5):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    x3 = g.op("Pow", x, g.c(3.0)) if cube == "pow" else g.op("Mul", x, g.op("Mul", x, x))
    inner = g.op("Add", x, g.op("Mul", g.c(coeff), x3))
    t = g.op("Add", g.op("Tanh", g.op("Mul", g.c(k), inner)), g.c(1.0))
    if order == "legacy":  # torch TorchScript: 0.5 * (x * (1 + tanh))
        return g.op("Mul", g.c(half), g.op("Mul", x, t))
    if order == "x_half":
        return g.op("Mul", g.op("Mul", x, g.c(half)), t)
    return g.op("Mul", x, g.op("Mul", g.c(half), t))  # "dynamo"


def clip06(g, x, bounds="inputs", *, three=3.0, high=6.0):
    a = g.op("Add", x, g.c(three))
    if bounds == "attrs":  # Clip-6 (opsets 6-10)
        return g.op("Clip", a, min=0.0, max=high)
    return g.op("Clip", a, g.c(0.0), g.c(high))


def hard_sigmoid_clip(g, x, scale="div", bounds="inputs", **kw):
    c = clip06(g, x, bounds, **kw)
    return g.op("Div", c, g.c(6.0)) if scale == "div" else g.op("Mul", c, g.c(1.0 / 6.0))


def hard_swish_clip(g, x, scale="div", bounds="inputs", *, divisor=6.0, **kw):
    """x * Clip(x + 3, 0, 6) / 6 (torch's x * relu6(x + 3) / 6, paddle's hard_swish)."""
    p = g.op("Mul", x, clip06(g, x, bounds, **kw))
    return g.op("Div", p, g.c(divisor)) if scale == "div" else g.op("Mul", p, g.c(1.0 / divisor))


def hard_swish_inner(g, x):
    """x * (Clip(x + 3, 0, 6) / 6)."""
    return g.op("Mul", x, hard_sigmoid_clip(g, x))


def hard_swish_hsig(g, x, alpha=1.0 / 6.0):
    return g.op("Mul", x, g.op("HardSigmoid", x, alpha=alpha, beta=0.5))


def silu(g, x, alpha=None):
    arg = x if alpha is None else g.op("Mul", x, g.c(alpha))
    return g.op("Mul", x, g.op("Sigmoid", arg))


def mish(g, x):
    return g.op("Mul", x, g.op("Tanh", g.op("Softplus", x)))


# ---------------------------------------------------------------------------------------------
# Running and checking


def ops(model) -> Counter:
    """Op histogram ("domain:Op" outside the default domain), Constant nodes left out."""
    return Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                   for n in model.graph.node if n.op_type != "Constant")


def ort_ops(model) -> Counter:
    """The op histogram of what onnxruntime's session optimizer (ORT_ENABLE_ALL, CPU) makes of it."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 4
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return ops(onnx.load(options.optimized_model_filepath))


def _fused(key: str) -> bool:
    return key.startswith(f"{MS}:") or key in ("Gelu", "HardSwish", "HardSigmoid", "Mish", "Swish")


def assert_no_fusion_lost(original, optimized):
    """onnxruntime makes at least as many fused ops of each kind of graphopt's output as of the
    original, and no more nodes in all (a MatMul + Add it would make a Gemm stays fusable)."""
    before, after = ort_ops(original), ort_ops(optimized)
    for key in before:
        if _fused(key):
            assert after[key] >= before[key], (key, before, after)
    assert sum(after.values()) <= sum(before.values()), (before, after)
    return before, after


def inputs_for(model):
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]
        dtype = _NP[i.type.tensor_type.elem_type]
        feeds[i.name] = np.asarray(rng.standard_normal(shape) * 3.0, dtype=dtype)  # -9..9: every piece of Clip/HardSigmoid
    return feeds


def optimize(model, passes=BOTH, target="x86_64", tol=1e-4):
    result = api.optimize(model, passes=list(passes), target=target, verify=True, inputs=inputs_for(model), rtol=tol, atol=tol)
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    return result.model, {p.name: dict(p.stats) for p in result.report.passes}


def assert_fused(model, want: dict, passes=BOTH, target="x86_64", tol=1e-4, check_ort=True):
    """The pass(es) leave exactly the histogram `want` (Constant nodes aside) and verify."""
    optimized, stats = optimize(model, passes, target, tol)
    assert ops(optimized) == Counter(want), (ops(model), ops(optimized), stats)
    if check_ort:
        assert_no_fusion_lost(model, optimized)
    return optimized, stats


def assert_unchanged(model, passes=BOTH, target="x86_64"):
    optimized, stats = optimize(model, passes, target)
    assert ops(optimized) == ops(model), stats
    assert not any(stats.get(p) for p in passes), stats
    return optimized


def node(model, op_type):
    (found,) = [n for n in model.graph.node if n.op_type == op_type]
    return found, {a.name: helper.get_attribute_value(a) for a in found.attribute}


# ---------------------------------------------------------------------------------------------
# fuse-activations: GELU to the standard Gelu (opset 20)


@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("order", ["legacy", "half_x", "x_half", "dynamo"])
def test_erf_gelu_every_order_becomes_standard_gelu(order, scale):
    g = G(opset=20)
    model = g.model(erf_gelu(g, "x", order, scale))
    optimized, stats = assert_fused(model, {"Gelu": 1}, passes=["fuse-activations"])
    gelu, attrs = node(optimized, "Gelu")
    assert gelu.domain == "" and "approximate" not in attrs and list(gelu.input) == ["x"]
    assert stats["fuse-activations"] == {"gelu": 1}


@pytest.mark.parametrize("cube", ["pow", "mul"])
@pytest.mark.parametrize("order", ["legacy", "x_half", "dynamo"])
def test_tanh_gelu_every_order_becomes_standard_gelu_tanh(order, cube):
    g = G(opset=20)
    model = g.model(tanh_gelu(g, "x", order, cube))
    optimized, stats = assert_fused(model, {"Gelu": 1}, passes=["fuse-activations"])
    assert node(optimized, "Gelu")[1] == {"approximate": b"tanh"}
    assert stats["fuse-activations"] == {"gelu_tanh": 1}


def test_constants_of_shape_1_and_float16():
    g = G(opset=20)
    s = g.op("Div", "x", g.c([math.sqrt(2.0)]))
    e = g.op("Add", g.op("Erf", s), g.c([1.0]))
    assert_fused(g.model(g.op("Mul", g.op("Mul", "x", e), g.c([0.5]))), {"Gelu": 1})
    g = G(opset=20, dtype=F16)
    # float16 GELU runs in float16 (the original) and in float with casts (Gelu): a few ulp apart
    assert_fused(g.model(erf_gelu(g, "x", "dynamo")), {"Gelu": 1}, tol=1e-2, check_ort=False)
    g = G(opset=20, dtype=F16)
    assert_fused(g.model(tanh_gelu(g, "x", "dynamo", "pow")), {"Gelu": 1}, tol=1e-2, check_ort=False)


def test_a_shape_1_constant_that_broadcasts_a_scalar_x_is_left_alone():
    g = G(opset=20, shape=[])
    s = g.op("Div", "x", g.c([math.sqrt(2.0)]))
    e = g.op("Add", g.op("Erf", s), g.c(1.0))
    y = g.op("Mul", g.op("Mul", "x", e), g.c(0.5))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", F, [])], [helper.make_tensor_value_info(y, F, [1])],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    assert_unchanged(model)


def test_gelu_after_linear_several_times():
    g = G(opset=20)
    x = "x"
    for _ in range(3):
        x = erf_gelu(g, g.linear(x), "dynamo")
    assert_fused(g.model(x), {"MatMul": 3, "Add": 3, "Gelu": 3}, passes=["fuse-activations"])


# ---------------------------------------------------------------------------------------------
# fuse-activations: HardSwish, HardSigmoid, SiLU, Mish


@pytest.mark.parametrize("opset", [14, 17])
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_clip_hard_swish_becomes_hard_swish(scale, opset):
    g = G(opset=opset)
    optimized, stats = assert_fused(g.model(hard_swish_clip(g, "x", scale)), {"HardSwish": 1})
    assert stats["fuse-activations"] == {"hard_swish": 1}
    assert list(node(optimized, "HardSwish")[0].input) == ["x"]


def test_hard_sigmoid_hard_swish_becomes_hard_swish():
    g = G(opset=14)
    assert_fused(g.model(hard_swish_hsig(g, "x")), {"HardSwish": 1})


def test_inner_division_goes_through_hard_sigmoid_to_hard_swish():
    g = G(opset=14)
    _, stats = assert_fused(g.model(hard_swish_inner(g, "x")), {"HardSwish": 1})
    assert stats["fuse-activations"] == {"hard_sigmoid": 1, "hard_swish": 1}


def test_below_opset_14_hard_swish_becomes_x_times_hard_sigmoid():
    g = G(opset=13)
    optimized, _ = assert_fused(g.model(hard_swish_clip(g, "x")), {"Mul": 1, "HardSigmoid": 1})
    assert node(optimized, "HardSigmoid")[1] == pytest.approx({"alpha": 1.0 / 6.0, "beta": 0.5})
    # Clip-6 with its bounds as attributes (torch's relu6 at opset 10)
    g = G(opset=10)
    assert_fused(g.model(hard_swish_clip(g, "x", "mul", "attrs")), {"Mul": 1, "HardSigmoid": 1})
    g = G(opset=13)
    assert_unchanged(g.model(hard_swish_hsig(g, "x")))  # already as short as it gets


@pytest.mark.parametrize("bounds,opset", [("inputs", 13), ("attrs", 10)])
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_clip_hard_sigmoid_becomes_hard_sigmoid(scale, bounds, opset):
    g = G(opset=opset)
    optimized, stats = assert_fused(g.model(hard_sigmoid_clip(g, "x", scale, bounds)), {"HardSigmoid": 1})
    assert node(optimized, "HardSigmoid")[1] == pytest.approx({"alpha": 1.0 / 6.0, "beta": 0.5})
    assert stats["fuse-activations"] == {"hard_sigmoid": 1}


def test_hard_sigmoid_after_gemm_lets_onnxruntime_fuse_them():
    g = G(opset=17, shape=[10, 16])
    g.inits.append(numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (16, 16)).astype(np.float32), "w"))
    y = hard_sigmoid_clip(g, g.bias(g.op("MatMul", "x", "w")))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", F, [10, 16])],
                              [helper.make_tensor_value_info(y, F, [10, 16])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    optimized, _ = assert_fused(model, {"MatMul": 1, "Add": 1, "HardSigmoid": 1})
    assert ort_ops(optimized) == {f"{MS}:FusedGemm": 1}


def test_silu_stays_for_onnxruntime_which_fuses_it_into_quick_gelu():
    for opset in (17, 24):
        for alpha in (None, 1.702):
            g = G(opset=opset)
            model = g.model(silu(g, g.bias("x"), alpha))
            assert_unchanged(model)
            assert ort_ops(model)[f"{MS}:QuickGelu"] == 1
    # A standard Swish is not fused back: onnxruntime inlines it into Cast, Mul, Sigmoid, Mul.
    g = G(opset=24)
    assert ort_ops(g.model(g.op("Swish", "x")))[f"{MS}:QuickGelu"] == 0


def test_silu_becomes_swish_for_the_generic_target_at_opset_24():
    g = G(opset=24)
    optimized, stats = assert_fused(g.model(silu(g, "x")), {"Swish": 1}, target="generic", check_ort=False)
    assert node(optimized, "Swish")[1] == {} and stats["fuse-activations"] == {"swish": 1}
    g = G(opset=24)
    optimized, _ = assert_fused(g.model(silu(g, "x", 1.702)), {"Swish": 1}, target="generic", check_ort=False)
    assert node(optimized, "Swish")[1] == {"alpha": pytest.approx(1.702)}
    g = G(opset=23)
    assert_unchanged(g.model(silu(g, "x")), target="generic")


def test_mish_becomes_mish_from_opset_18():
    g = G(opset=18)
    _, stats = assert_fused(g.model(mish(g, g.bias("x"))), {"Add": 1, "Mish": 1})
    assert stats["fuse-activations"] == {"mish": 1}
    g = G(opset=17)
    assert_unchanged(g.model(mish(g, "x")))


# ---------------------------------------------------------------------------------------------
# fuse-activations-contrib: com.microsoft Gelu and FastGelu below opset 20


@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("order", ["legacy", "half_x", "x_half", "dynamo"])
def test_opset_17_erf_gelu_is_left_by_the_standard_pass_and_becomes_contrib_gelu(order, scale):
    g = G(opset=17)
    model = g.model(erf_gelu(g, "x", order, scale))
    assert_unchanged(model, passes=["fuse-activations"])
    optimized, stats = assert_fused(model, {f"{MS}:Gelu": 1})
    assert stats == {"fuse-activations": {}, "fuse-activations-contrib": {"gelu": 1}, "dce": {}}
    assert node(optimized, "Gelu")[0].domain == MS


@pytest.mark.parametrize("cube", ["pow", "mul"])
@pytest.mark.parametrize("order", ["legacy", "x_half", "dynamo"])
def test_opset_17_tanh_gelu_becomes_fast_gelu(order, cube):
    g = G(opset=17)
    _, stats = assert_fused(g.model(tanh_gelu(g, "x", order, cube)), {f"{MS}:FastGelu": 1})
    assert stats["fuse-activations-contrib"] == {"fast_gelu": 1}


def test_contrib_pass_leaves_opset_20_to_the_standard_one():
    for build in (erf_gelu, tanh_gelu):
        g = G(opset=20)
        assert_unchanged(g.model(build(g, "x", "dynamo")), passes=["fuse-activations-contrib"])


def test_generic_target_never_gets_contrib_ops():
    for build in (erf_gelu, tanh_gelu):
        g = G(opset=17)
        optimized = assert_unchanged(g.model(build(g, "x", "dynamo")), target="generic")
        assert not any(n.domain for n in optimized.graph.node)
    generic = targets.get("generic")
    assert not any(generic.can_emit(op, MS, 17) for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu"))


def test_float64_is_left_alone():
    # onnxruntime's CPU HardSigmoid and Gelu kernels take float only: a float64 HardSwish would not run.
    g = G(opset=17, dtype=F64)
    assert_unchanged(g.model(hard_swish_clip(g, "x")))
    g = G(opset=17, dtype=F64)
    assert_unchanged(g.model(tanh_gelu(g, "x")))


# ---------------------------------------------------------------------------------------------
# Preceding bias Add and MatMul: graphopt's output never blocks onnxruntime's BiasGelu / Gemm /
# FusedMatMul fusions


PRECEDING = {"none": lambda g: "x", "bias": lambda g: g.bias("x"), "linear": lambda g: g.linear("x"),
             "dynamic_linear": lambda g: g.dynamic_linear("x")}


@pytest.mark.parametrize("before", list(PRECEDING))
@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("form", ["erf_legacy", "erf_dynamo", "tanh_legacy", "tanh_dynamo"])
def test_onnxruntime_fuses_at_least_as_much_of_the_output(form, opset, before):
    g = G(opset=opset)
    kind, order = form.split("_")
    x = PRECEDING[before](g)
    y = erf_gelu(g, x, order) if kind == "erf" else tanh_gelu(g, x, order, "pow" if order == "dynamo" else "mul")
    model = g.model(y)
    optimized, _ = optimize(model)
    fused = {(17, "erf"): f"{MS}:Gelu", (17, "tanh"): f"{MS}:FastGelu"}.get((opset, kind), "Gelu")
    assert ops(optimized)[fused] == 1, ops(optimized)
    original_ort, optimized_ort = assert_no_fusion_lost(model, optimized)
    if before in ("bias", "dynamic_linear"):
        # The bias Add goes into the GELU as onnxruntime fuses it: BiasGelu after erf GELU (standard
        # or contrib), FastGelu with a bias input after tanh GELU.
        want = f"{MS}:BiasGelu" if kind == "erf" else f"{MS}:FastGelu"
        assert optimized_ort[want] == 1 and optimized_ort["Add"] == 0, optimized_ort
    if before == "linear":
        assert optimized_ort["Gemm"] == 1, optimized_ort  # MatMul + bias still fused
    if before == "dynamic_linear":
        assert optimized_ort[f"{MS}:FusedMatMul"] == 1, optimized_ort


def test_what_onnxruntime_fuses_itself():
    """Why there is no BiasGelu or QuickGelu rule: onnxruntime's session optimizer does both on the
    original; it fuses the torch-legacy erf GELU too, but not the dynamo order (fuse-activations'
    and -contrib's gain)."""
    g = G(opset=17)
    assert ort_ops(g.model(erf_gelu(g, g.bias("x"), "legacy"))) == {f"{MS}:BiasGelu": 1}
    g = G(opset=17)
    assert ort_ops(g.model(g.op("Gelu", g.bias("x"), domain=MS))) == {f"{MS}:BiasGelu": 1}
    g = G(opset=20)
    assert ort_ops(g.model(g.op("Gelu", g.bias("x")))) == {f"{MS}:BiasGelu": 1}
    g = G(opset=17)
    assert ort_ops(g.model(silu(g, "x"))) == {f"{MS}:QuickGelu": 1}
    g = G(opset=17)
    assert ort_ops(g.model(silu(g, "x", 1.702))) == {f"{MS}:QuickGelu": 1}
    g = G(opset=17)
    assert ort_ops(g.model(erf_gelu(g, "x", "dynamo")))[f"{MS}:Gelu"] == 0


@pytest.mark.parametrize("alpha", [1.0, 1.702])
def test_onnxruntime_quick_gelu_is_x_times_sigmoid_of_alpha_x(alpha):
    """The kernel onnxruntime fuses SiLU into (alpha 1.0) computes x * sigmoid(alpha * x)."""
    nodes = [helper.make_node("QuickGelu", ["x"], ["y"], domain=MS, alpha=alpha)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, SHAPE)], [helper.make_tensor_value_info("y", F, SHAPE)],
                       opset=17, domains={MS: 1})
    x = inputs_for(model)["x"]
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = x.astype(np.float64) / (1.0 + np.exp(-alpha * x.astype(np.float64)))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Negative cases


@pytest.mark.parametrize("wrong", [dict(half=0.6), dict(one=1.1), dict(sqrt2=1.4142), dict(sqrt2=2.0)])
def test_wrong_erf_constants(wrong):
    for opset in (17, 20):
        g = G(opset=opset)
        assert_unchanged(g.model(erf_gelu(g, "x", "dynamo", **wrong)))


@pytest.mark.parametrize("wrong", [dict(half=0.6), dict(coeff=0.05), dict(k=0.8)])
def test_wrong_tanh_constants(wrong):
    for opset in (17, 20):
        g = G(opset=opset)
        assert_unchanged(g.model(tanh_gelu(g, "x", "dynamo", "pow", **wrong)))
    g = G(opset=20)
    x3 = g.op("Pow", "x", g.c(2.0))  # a square, not a cube
    t = g.op("Add", g.op("Tanh", g.op("Mul", g.c(math.sqrt(2 / math.pi)), g.op("Add", "x", g.op("Mul", g.c(0.044715), x3)))), g.c(1.0))
    assert_unchanged(g.model(g.op("Mul", "x", g.op("Mul", g.c(0.5), t))))


@pytest.mark.parametrize("wrong", [dict(three=2.0), dict(high=5.0), dict(divisor=5.0)])
def test_wrong_hard_swish_constants(wrong):
    g = G(opset=14)
    assert_unchanged(g.model(hard_swish_clip(g, "x", **wrong)))


def test_wrong_hard_sigmoid_constants():
    g = G(opset=14)
    assert_unchanged(g.model(hard_swish_hsig(g, "x", alpha=0.2)))
    g = G(opset=14)
    assert_unchanged(g.model(hard_sigmoid_clip(g, "x", three=2.5)))


def test_x_in_one_place_and_another_tensor_in_the_other():
    g = G(opset=20, second_input=True)
    assert_unchanged(g.model(erf_gelu(g, "x", "legacy", other="z")))
    g = G(opset=20, second_input=True)
    assert_unchanged(g.model(g.op("Mul", "z", g.op("Sigmoid", "x"))), target="generic")
    g = G(opset=18, second_input=True)
    assert_unchanged(g.model(g.op("Mul", "z", g.op("Tanh", g.op("Softplus", "x")))))
    g = G(opset=14, second_input=True)
    assert_unchanged(g.model(g.op("Div", g.op("Mul", "z", clip06(g, "x")), g.c(6.0))))


def test_an_intermediate_read_elsewhere_or_a_graph_output():
    # 1 + erf(...) also read by another node
    g = G(opset=20)
    y = erf_gelu(g, "x", "dynamo")
    add = next(n.output[0] for n in g.nodes if n.op_type == "Add")
    g.output(g.op("Neg", add))
    assert_unchanged(g.model(y))
    # the Erf output is a graph output
    g = G(opset=17)
    y = erf_gelu(g, "x", "legacy")
    g.output(next(n.output[0] for n in g.nodes if n.op_type == "Erf"))
    assert_unchanged(g.model(y))
    # the Clip output of a HardSwish is a graph output
    g = G(opset=14)
    y = hard_swish_clip(g, "x")
    g.output(next(n.output[0] for n in g.nodes if n.op_type == "Clip"))
    assert_unchanged(g.model(y))


def test_a_non_constant_half_is_left_alone():
    g = G(opset=20, second_input=True)
    s = g.op("Div", "x", g.c(math.sqrt(2.0)))
    e = g.op("Add", g.op("Erf", s), g.c(1.0))
    assert_unchanged(g.model(g.op("Mul", g.op("Mul", "x", e), "z")))


def test_no_standard_gelu_before_opset_20():
    assert not targets.get("x86_64").can_emit("Gelu", "", 19)
    g = G(opset=19)
    assert_unchanged(g.model(erf_gelu(g, "x", "dynamo")), passes=["fuse-activations"])


# ---------------------------------------------------------------------------------------------
# torch.onnx exports (TorchScript exporter at opsets 14/17/20, dynamo at 18 and its default, 20)


@contextlib.contextmanager
def _quiet_torch():
    torch = pytest.importorskip("torch")
    logger = logging.getLogger("torch.onnx")
    level, threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield torch
    finally:
        logger.setLevel(level)
        torch.set_num_threads(threads)


def _module(torch, activation: str):
    from torch import nn

    class Relu6HardSwish(nn.Module):
        def forward(self, x):
            return x * nn.functional.relu6(x + 3) / 6

    act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
           "hardsigmoid": nn.Hardsigmoid(), "mish": nn.Mish(), "relu6_hardswish": Relu6HardSwish()}[activation]
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), act).eval()


@functools.cache
def torch_export(activation: str, exporter: str, opset: int) -> onnx.ModelProto:
    with _quiet_torch() as torch:
        module, x = _module(torch, activation), torch.randn(*SHAPE)
        names = dict(input_names=["x"], output_names=["y"])
        if exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=opset, **names)
            return onnx.load_from_string(buffer.getvalue())
        program = torch.onnx.export(module, (x,), dynamo=True, verbose=False, opset_version=opset, **names)
        return program.model_proto


LINEAR = {"MatMul": 1, "Add": 1}
EXPORTERS = [("legacy", 14), ("legacy", 17), ("legacy", 20), ("dynamo", 18), ("dynamo", 20)]
GELU_OPS = {"Div": 1, "Erf": 1, "Add": 1, "Mul": 2}
# What torch 2.13 writes for each activation (after its Linear: MatMul + Add), and what the two passes
# make of it on x86_64. None: the export is left as it is.
EXPORTS = {
    ("gelu", "legacy", 14): (GELU_OPS, {f"{MS}:Gelu": 1}),
    ("gelu", "legacy", 17): (GELU_OPS, {f"{MS}:Gelu": 1}),
    ("gelu", "legacy", 20): ({"Gelu": 1}, None),
    ("gelu", "dynamo", 18): (GELU_OPS, {f"{MS}:Gelu": 1}),
    ("gelu", "dynamo", 20): ({"Gelu": 1}, None),
    ("gelu_tanh", "legacy", 14): ({"Mul": 6, "Add": 2, "Tanh": 1}, {f"{MS}:FastGelu": 1}),
    ("gelu_tanh", "legacy", 17): ({"Mul": 6, "Add": 2, "Tanh": 1}, {f"{MS}:FastGelu": 1}),
    ("gelu_tanh", "legacy", 20): ({"Gelu": 1}, None),
    ("gelu_tanh", "dynamo", 18): ({"Pow": 1, "Mul": 4, "Add": 2, "Tanh": 1}, {f"{MS}:FastGelu": 1}),
    ("gelu_tanh", "dynamo", 20): ({"Gelu": 1}, None),
    **{("silu", e, o): ({"Sigmoid": 1, "Mul": 1}, None) for e, o in EXPORTERS},
    **{("hardswish", e, o): ({"HardSwish": 1}, None) for e, o in EXPORTERS},
    **{("hardsigmoid", e, o): ({"HardSigmoid": 1}, None) for e, o in EXPORTERS},
    ("mish", "legacy", 14): ({"Softplus": 1, "Tanh": 1, "Mul": 1}, None),
    ("mish", "legacy", 17): ({"Softplus": 1, "Tanh": 1, "Mul": 1}, None),
    ("mish", "legacy", 20): ({"Softplus": 1, "Tanh": 1, "Mul": 1}, {"Mish": 1}),
    ("mish", "dynamo", 18): ({"Mish": 1}, None),
    ("mish", "dynamo", 20): ({"Mish": 1}, None),
    **{("relu6_hardswish", e, o): ({"Add": 1, "Clip": 1, "Mul": 1, "Div": 1}, {"HardSwish": 1})
       for e, o in EXPORTERS},
}


@pytest.mark.parametrize("activation,exporter,opset", list(EXPORTS), ids=["-".join(map(str, k)) for k in EXPORTS])
def test_torch_export(activation, exporter, opset):
    model = torch_export(activation, exporter, opset)
    written, fused = EXPORTS[activation, exporter, opset]
    linear = Counter({"Gemm": 1}) if ops(model)["Gemm"] else Counter(LINEAR)
    assert ops(model) == linear + Counter(written), ops(model)
    if fused is None:
        assert_unchanged(model)
        return
    assert_fused(model, linear + Counter(fused))
