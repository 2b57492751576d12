"""The pattern-rewrite API (graphopt.patterns): what a match guarantees, and the driver."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F, const, make_model, op_types, optimize_checked
from onnx import helper

from graphopt import export, loading
from graphopt.pass_manager import PassContext, PassManager, _REGISTRY, _SOURCES
from graphopt.patterns import Match, RewritePass, Rule


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def _run(rules, model):
    """Run a RewritePass of `rules` on a copy of `model`; returns (proto, stats)."""

    class Rules(RewritePass):
        name = "test-rules"
        description = "rules under test"

    Rules.rules = tuple(rules)
    m = loading.from_proto(model)
    ctx = PassContext(model=m)
    ctx.analysis("shapes")
    records = PassManager(Rules()).run(ctx)
    return export.to_proto(m), records[0].stats


def _mul_add(op, x, s, b):
    return op.Add(op.Mul(x, s), b)


def _as_fma(op, m: Match):
    # A stand-in rewrite with an observable result: Mul then Add become one Sum of two terms.
    return op.Sum(op.Mul(m.x, m.s), m.b)


def _relu_of_mul_add(order_add, order_mul, extra=None):
    mul_in = ["x", "s"] if order_mul else ["s", "x"]
    add_in = ["t", "b"] if order_add else ["b", "t"]
    nodes = [helper.make_node("Mul", mul_in, ["t"]), helper.make_node("Add", add_in, ["y"])]
    outputs = [vi("y", [2, 3])]
    if extra:
        nodes.append(helper.make_node("Relu", ["t"], ["z"]))
        outputs.append(vi("z", [2, 3]))
    inits = [const("s", np.full((2, 3), 2.0, np.float32)), const("b", np.ones((2, 3), np.float32))]
    return make_model(nodes, [vi("x", [2, 3])], outputs, inits)


@pytest.mark.parametrize("order_add", [True, False])
@pytest.mark.parametrize("order_mul", [True, False])
def test_commutative_inputs_match_in_either_order(order_add, order_mul):
    out, stats = _run([Rule(_mul_add, _as_fma, lambda m: m.is_constant("s", "b"))], _relu_of_mul_add(order_add, order_mul))
    assert stats == {"_mul_add": 1}
    assert sorted(op_types(out)) == ["Mul", "Sum"]


def test_an_interior_value_read_elsewhere_is_no_match():
    out, stats = _run([Rule(_mul_add, _as_fma)], _relu_of_mul_add(True, True, extra=True))
    assert stats == {} and sorted(op_types(out)) == ["Add", "Mul", "Relu"]


def test_a_failing_check_or_a_declined_rewrite_changes_nothing():
    model = _relu_of_mul_add(True, True)
    assert _run([Rule(_mul_add, _as_fma, lambda m: False)], model)[1] == {}
    out, stats = _run([Rule(_mul_add, lambda op, m: None)], model)
    assert stats == {} and op_types(out) == ["Mul", "Add"]


def test_a_value_bound_twice_must_be_the_same_tensor():
    def square(op, x):
        return op.Mul(x, x)

    nodes = [helper.make_node("Mul", ["x", "x"], ["y"]), helper.make_node("Mul", ["x", "w"], ["z"])]
    model = make_model(nodes, [vi("x", [3]), vi("w", [3])], [vi("y", [3]), vi("z", [3])])
    out, stats = _run([Rule(square, lambda op, m: op.Pow(m.x, op.constant(np.array(2.0, np.float32))))], model)
    assert stats == {"square": 1}
    assert sorted(op_types(out)) == ["Mul", "Pow"]


def test_optional_inputs_and_alternatives():
    def add_bias(op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def gemm_form(op, x, w, c, b):  # another exporter's spelling of the same thing
        return op.Add(op.Gemm(x, w, op.optional(c)), b)

    seen = []
    rule = Rule([add_bias, gemm_form], lambda op, m: seen.append(sorted(k for k, v in m.values.items() if v is not None)))
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 4])],
        [const("w", np.ones((3, 4), np.float32)), const("b", np.ones(4, np.float32))],
    )
    _run([rule], model)
    assert seen == [["b", "w", "x"]]  # the Gemm form matched, with its optional C absent


def test_either_and_optional_ops_describe_several_forms_in_one_function():
    """Forms with different roots (Div, or Mul by a Reciprocal), an optional op (a scale that may be
    absent), and a value written two ways: every combination matches, the fullest form first."""

    def normalized(op, x, s, gamma):
        scaled = op.optional(op.Mul(op.either(op.Div(x, s), op.Mul(x, op.Reciprocal(s))), gamma))
        return op.Identity(scaled)

    rule = Rule(normalized, lambda op, m: op.Neg(m.x), name="normalized")
    assert rule.root_ops == {"Identity"} and len(rule.roots) == 4
    seen = []

    def record(op, m):
        seen.append((m.gamma is not None, sorted(label for label, _ in m.matched)))
        return op.Neg(m.x)

    forms = {
        "div": [helper.make_node("Div", ["x", "s"], ["n"]), helper.make_node("Identity", ["n"], ["y"])],
        "recip_scaled": [
            helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["r", "x"], ["n"]),
            helper.make_node("Mul", ["g", "n"], ["t"]), helper.make_node("Identity", ["t"], ["y"]),
        ],
    }
    for nodes in forms.values():
        model = make_model(nodes, [vi("x", [3]), vi("s", [3]), vi("g", [3])], [vi("y", [3])])
        out, stats = _run([Rule(normalized, record)], model)
        assert stats == {"normalized": 1} and op_types(out) == ["Neg"]
    assert seen == [(False, ["Div", "Identity"]), (True, ["Identity", "Mul", "Mul", "Reciprocal"])]

    roots = Rule(lambda op, x: op.either(op.Relu(x), op.Sigmoid(x)), lambda op, m: op.Neg(m.x))
    assert roots.root_ops == {"Relu", "Sigmoid"}


def test_the_readers_of_a_rewrite_result_match_what_it_created():
    """Relu(Neg(Neg(x))): the Relu matches Relu(Identity(x)) only once the inner rewrite made the
    Identity; rules of one pass compose like that in one run."""

    rules = [
        Rule(lambda op, x: op.Relu(op.Identity(x)), lambda op, m: op.Sigmoid(m.x), name="relu_of_identity"),
        Rule(lambda op, x: op.Neg(op.Neg(x)), lambda op, m: op.Identity(m.x), name="double_neg"),
    ]
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Relu", ["b"], ["y"])]
    out, stats = _run(rules, make_model(nodes, [vi("x", [3])], [vi("y", [3])]))
    assert stats == {"double_neg": 1, "relu_of_identity": 1}
    assert op_types(out) == ["Sigmoid"]


def test_what_a_rewrite_creates_is_matched_in_the_same_run():
    def double_neg(op, x):
        return op.Neg(op.Neg(x))

    # Neg(Neg(Neg(Neg(x)))) -> Identity(Identity(x))-like chain: two rewrites, one run.
    nodes = [helper.make_node("Neg", [a], [b]) for a, b in (("x", "a"), ("a", "b"), ("b", "c"), ("c", "y"))]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    out, stats = _run([Rule(double_neg, lambda op, m: op.Identity(m.x))], model)
    assert stats == {"double_neg": 2}
    assert op_types(out) == ["Identity", "Identity"]


def test_a_subgraph_does_not_match_across_its_boundary():
    """Inside an If body, an outer Neg is an opaque value: Neg(outer Neg) is no Neg(Neg(x))."""

    def double_neg(op, x):
        return op.Neg(op.Neg(x))

    body = helper.make_graph([helper.make_node("Neg", ["a"], ["o"])], "then", [], [vi("o", [3])])
    other = helper.make_graph([helper.make_node("Identity", ["a"], ["o2"])], "else", [], [vi("o2", [3])])
    nodes = [
        helper.make_node("Neg", ["x"], ["a"]),
        helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other),
    ]
    model = make_model(nodes, [vi("x", [3]), helper.make_tensor_value_info("c", 9, [])], [vi("y", [3])])
    out, stats = _run([Rule(double_neg, lambda op, m: op.Identity(m.x))], model)
    assert stats == {}


def test_fold_conv_bn_is_a_rewrite_pass_and_still_folds():
    from graphopt.passes.fusion.conv_bn import FoldConvBatchNorm

    assert issubclass(FoldConvBatchNorm, RewritePass)
    assert _REGISTRY["fold-conv-bn"] is FoldConvBatchNorm and _SOURCES["fold-conv-bn"] == "built-in"
    x = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["y"]),
        ],
        [vi("x", [1, 2, 5, 5])], [vi("y", [1, 3, 3, 3])],
        [const("w", x.standard_normal((3, 2, 3, 3)).astype(np.float32))]
        + [const(n, np.abs(x.standard_normal(3)).astype(np.float32) + 0.5) for n in ("g", "be", "mu", "var")],
    )
    out, report = optimize_checked(model, passes=["fold-conv-bn"])
    assert op_types(out) == ["Conv"]
    assert next(r for r in report.passes if r.name == "fold-conv-bn").stats == {"folded": 1}


def test_an_interior_value_that_is_a_graph_output_is_no_match():
    model = _relu_of_mul_add(True, True)
    model.graph.output.append(vi("t", [2, 3]))  # the Mul's result is also an output of the model
    out, stats = _run([Rule(_mul_add, _as_fma)], model)
    assert stats == {} and op_types(out) == ["Mul", "Add"]


def _normalize(op, x, eps):
    """A pattern that reads one op twice: d = x - mean(x) feeds both the variance and the division."""
    mean = op.ReduceMean(x)
    d = op.Sub(x, mean)
    var = op.ReduceMean(op.Mul(d, d))
    return op.Div(d, op.Sqrt(op.Add(var, eps)))


def _normalize_model(extra_read=False):
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["y"]),
    ]
    outputs = [vi("y", [2, 4])]
    if extra_read:
        nodes.append(helper.make_node("Relu", ["d"], ["z"]))
        outputs.append(vi("z", [2, 4]))
    return make_model(nodes, [vi("x", [2, 4])], outputs, [const("eps", np.array(1e-5, np.float32))], opset=17)


def test_an_op_read_twice_inside_the_pattern_is_one_node():
    rule = Rule(_normalize, lambda op, m: op.LayerNormalization(m.x, op.constant(np.ones(4, np.float32)), axis=-1, epsilon=1e-5))
    out, stats = _run([rule], _normalize_model())
    assert stats == {"_normalize": 1} and op_types(out) == ["LayerNormalization"]
    # Read once more outside the pattern, the shared op cannot go: no match.
    out, stats = _run([rule], _normalize_model(extra_read=True))
    assert stats == {} and "Div" in op_types(out)


def test_an_omitted_attribute_matches_its_schema_default_and_checks_can_ask_the_target():
    nodes = [helper.make_node("HardSigmoid", ["x"], ["y"])]  # alpha omitted: 0.2 by the schema
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    asked = []

    def check(m):
        asked.append((m.can_emit("HardSwish"), m.can_emit("NoSuchOp", "com.microsoft")))
        return True

    rule = Rule(lambda op, x: op.HardSigmoid(x, alpha=0.2, beta=0.5), lambda op, m: op.Relu(m.x), check, name="hs")
    out, stats = _run([rule], model)
    assert stats == {"hs": 1} and asked == [(True, False)]
    wrong = Rule(lambda op, x: op.HardSigmoid(x, alpha=1 / 6), lambda op, m: op.Relu(m.x), name="hs")
    assert _run([wrong], model)[1] == {}


def test_a_value_the_rewrite_would_lose_is_no_binding():
    """Gemm(t, t), t = Transpose(a): matching Gemm(Transpose(a), b) would bind b to the output of
    the Transpose the rewrite removes."""
    nodes = [helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]), helper.make_node("Gemm", ["t", "t"], ["y"])]
    model = make_model(nodes, [vi("a", [3, 3])], [vi("y", [3, 3])])
    rule = Rule(lambda op, a, b: op.Gemm(op.Transpose(a), b), lambda op, m: op.Gemm(m.a, m.b, transA=1), name="t")
    assert _run([rule], model)[1] == {}


def test_what_a_rewrite_replaced_no_longer_counts_as_a_reader():
    """Two rules on one node's two inputs: after the first replaced the node, the second matches the
    new node although the replaced one (removed at the end) still reads the same input."""
    nodes = [
        helper.make_node("Transpose", ["a"], ["ta"], perm=[1, 0]),
        helper.make_node("Transpose", ["b"], ["tb"], perm=[1, 0]),
        helper.make_node("Gemm", ["ta", "tb"], ["y"]),
    ]
    model = make_model(nodes, [vi("a", [3, 3]), vi("b", [3, 3])], [vi("y", [3, 3])])
    rules = [
        Rule(lambda op, a, b: op.Gemm(op.Transpose(a), b, transA=0), lambda op, m: op.Gemm(m.a, m.b, transA=1), name="a"),
        Rule(lambda op, a, b: op.Gemm(a, op.Transpose(b), transB=0), lambda op, m: op.Gemm(m.a, m.b, transA=m.node("Gemm").attrs.get("transA", 0), transB=1), name="b"),
    ]
    out, stats = _run(rules, model)
    assert stats == {"a": 1, "b": 1} and op_types(out) == ["Gemm"]


def test_a_parameter_may_not_shadow_a_match_helper():
    with pytest.raises(TypeError, match="shadow"):
        Rule(lambda op, value: op.Relu(value), lambda op, m: None)
