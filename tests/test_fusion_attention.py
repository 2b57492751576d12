"""fuse-attention: BERT self-attention as torch's exporters write it -> com.microsoft Attention."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import copy, make_model, op_types, optimize_checked
from onnx import TensorProto, helper, numpy_helper

from graphopt.optimize import optimize

F, I64 = TensorProto.FLOAT, TensorProto.INT64
FINFO_MIN = float(np.finfo(np.float32).min)
BERT_MODELS = {"torch_legacy_bert": 2, "torch_sdpa_minilm": 2, "torch_dynamo_bert": 2}
PASSES = ["fuse-attention", "cse", "dce"]


def attention_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Attention" and n.domain == "com.microsoft" for n in model.graph.node)


# ---------------------------------------------------------------------------------------------
# A hand-built layer: x [B,S,D] and attention_mask [B,S] int64 in, the merged heads out.

D, N, H = 16, 2, 8


def layer(*, scale="div_after", k_form="direct", bias_first=False, mask="legacy", scale_value=None,
          intermediate_output=False, opset=17, seed=0, nan_guard=None):
    rng = np.random.default_rng(seed)
    nodes, inits, counter = [], [], [0]

    def name(base):
        counter[0] += 1
        return f"{base}_{counter[0]}"

    def const(value, dtype=np.float32):
        n = name("c")
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(op_type, inputs, **attrs):
        out = name(op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [out], name=name(op_type), **attrs))
        return out

    # The GatherND mask is what a dynamo export of transformers 5 becomes once batch and sequence
    # are bound (2 x 6 here): shapes static, Reshape targets with -1 for the heads.
    static = mask == "gathernd"
    split = const([2, 6, -1, H] if static else [0, -1, N, H], np.int64)

    def project():
        mm = op("MatMul", ["x", const(rng.standard_normal((D, D)) * 0.3)])
        bias = const(rng.standard_normal(D) * 0.1)
        return op("Add", [bias, mm] if bias_first else [mm, bias])

    q, k, v = project(), project(), project()
    qh = op("Transpose", [op("Reshape", [q, split])], perm=[0, 2, 1, 3])
    if k_form == "direct":
        kt = op("Transpose", [op("Reshape", [k, split])], perm=[0, 2, 3, 1])
    else:
        kt = op("Transpose", [op("Transpose", [op("Reshape", [k, split])], perm=[0, 2, 1, 3])], perm=[0, 1, 3, 2])
    vh = op("Transpose", [op("Reshape", [v, split])], perm=[0, 2, 1, 3])
    if scale == "mul_before":
        factor = const(scale_value if scale_value is not None else H ** -0.25)
        scores = op("MatMul", [op("Mul", [qh, factor]), op("Mul", [kt, factor])])
    else:
        scores = op("MatMul", [qh, kt])
        if scale == "div_after":
            scores = op("Div", [scores, const(scale_value if scale_value is not None else np.sqrt(H))])
        elif scale == "mul_after":
            scores = op("Mul", [const(scale_value if scale_value is not None else 1 / np.sqrt(H)), scores])
    if mask != "none":
        unsqueezed = op("Unsqueeze", ["attention_mask", const([1, 2], np.int64)])
        if mask == "gathernd":
            indices = np.stack(np.meshgrid(np.arange(2), np.arange(6), indexing="ij"), axis=-1).reshape(2, 1, 1, 6, 2)
            kept = op("GatherND", [op("Cast", ["attention_mask"], to=TensorProto.BOOL), const(indices, np.int64)])
            kept = op("And", [const(np.ones((1, 1, 6, 1), bool), np.bool_), kept])
            additive = op("Where", [kept, const(0.0), const(FINFO_MIN)])
        elif mask == "sdpa":
            shape = op("Concat", [op("Shape", ["attention_mask"], start=0, end=1), const([1], np.int64),
                                  op("Shape", ["attention_mask"], start=1, end=2), op("Shape", ["attention_mask"], start=1, end=2)],
                       axis=0)
            inv = op("Sub", [const(1.0), op("Cast", [op("Expand", [unsqueezed, shape])], to=F)])
            additive = op("Where", [op("Cast", [inv], to=TensorProto.BOOL), const(FINFO_MIN), inv])
        else:
            one = {"wrong_one": 2.0}.get(mask, 1.0)
            big = {"positive": 1.0e4, "small": -10.0}.get(mask, FINFO_MIN)
            inv = op("Sub", [const(one), op("Cast", [unsqueezed], to=F)])
            additive = op("Mul", [inv, const(big)])
        scores = op("Add", [scores, additive])
    probs = op("Softmax", [scores], axis=-1)
    if nan_guard is not None:  # transformers 5: Where(IsNaN(p), 0, p)
        probs = op("Where", [op("IsNaN", [probs]), const(nan_guard), probs])
    context = op("Transpose", [op("MatMul", [probs, vh])], perm=[0, 2, 1, 3])
    merged = op("Reshape", [context, const([2, 6, -1] if static else [0, 0, D], np.int64)])
    out = op("MatMul", [merged, const(rng.standard_normal((D, D)) * 0.3)])
    outputs = [helper.make_tensor_value_info(out, F, ["batch", "sequence", D])]
    if intermediate_output:
        outputs.append(helper.make_tensor_value_info(probs, F, ["batch", N, "sequence", "sequence"]))
    batch, sequence = (2, 6) if static else ("batch", "sequence")
    if static:
        outputs = [helper.make_tensor_value_info(out, F, [2, 6, D])]
    inputs = [helper.make_tensor_value_info("x", F, [batch, sequence, D])]
    if mask != "none":
        inputs.append(helper.make_tensor_value_info("attention_mask", I64, [batch, sequence]))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def feeds(mask=True, batch=2, sequence=6):
    rng = np.random.default_rng(1)
    out = {"x": rng.standard_normal((batch, sequence, D)).astype(np.float32)}
    if mask:
        am = np.ones((batch, sequence), np.int64)
        am[1, sequence - 2:] = 0  # a padded row: the mask matters
        out["attention_mask"] = am
    return out


def fused(model, *, inputs, target="x86_64", **kwargs):
    return optimize_checked(model, passes=PASSES, target=target, inputs=inputs, **kwargs)


@pytest.mark.parametrize("scale", ["div_after", "mul_after", "mul_before"])
@pytest.mark.parametrize("k_form", ["direct", "two_transposes"])
@pytest.mark.parametrize("bias_first", [False, True])
def test_single_layer_fuses(scale, k_form, bias_first):
    model = layer(scale=scale, k_form=k_form, bias_first=bias_first)
    optimized, report = fused(model, inputs=feeds())
    assert attention_count(optimized) == 1
    assert set(op_types(optimized)) == {"Cast", "Attention", "MatMul"}
    node = next(n for n in optimized.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == N and "scale" not in attrs
    assert attrs["mask_filter_value"] == pytest.approx(FINFO_MIN)
    mask_cast = next(n for n in optimized.graph.node if n.op_type == "Cast")
    assert list(mask_cast.input) == ["attention_mask"] and helper.get_attribute_value(mask_cast.attribute[0]) == TensorProto.INT32


@pytest.mark.parametrize("scale,value,expected", [("div_after", 3.0, 1 / 3.0), ("mul_after", 0.2, 0.2), ("mul_before", 0.5, 0.25)])
def test_other_scale_becomes_attribute(scale, value, expected):
    optimized, _ = fused(layer(scale=scale, scale_value=value), inputs=feeds())
    node = next(n for n in optimized.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["scale"] == pytest.approx(expected, rel=1e-6)


def test_unscaled_and_unmasked_layer_fuses_without_mask_index():
    model = layer(scale="none", mask="none")
    optimized, _ = fused(model, inputs=feeds(mask=False))
    node = next(n for n in optimized.graph.node if n.op_type == "Attention")
    assert len(node.input) == 3
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["scale"] == pytest.approx(1.0)


def test_sdpa_where_mask_fuses():
    optimized, _ = fused(layer(scale="mul_before", mask="sdpa"), inputs=feeds())
    assert attention_count(optimized) == 1


@pytest.mark.parametrize("mask", ["wrong_one", "positive", "small"])
def test_unproven_mask_stays_unfused(mask):
    model = layer(mask=mask)
    optimized, _ = fused(model, inputs=feeds())
    assert attention_count(optimized) == 0 and "Softmax" in op_types(optimized)


def test_intermediate_graph_output_stays_unfused():
    optimized, _ = fused(layer(intermediate_output=True), inputs=feeds())
    assert attention_count(optimized) == 0


def test_generic_target_leaves_attention_standard():
    optimized, _ = fused(layer(), inputs=feeds(), target="generic")
    assert attention_count(optimized) == 0 and "Softmax" in op_types(optimized)


def test_fully_masked_row_matches_original():
    """mask_filter_value is the model's own finfo.min: a row with every key masked gives the
    original's uniform weights (onnxruntime's default -10000 would not)."""
    model = layer()
    inputs = feeds()
    inputs["attention_mask"][1, :] = 0
    fused(model, inputs=inputs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The real exports (tests/real_models/ATTENTION_FORMS.md)


@pytest.fixture(scope="module")
def zoo_models():
    zoo = pytest.importorskip("real_models.zoo")
    cache = {}

    def get(name):
        if name not in cache:
            try:
                real = zoo.load(name)
            except zoo.ModelUnavailable as missing:
                pytest.skip(str(missing))
            # Attention fusion runs after -O2 (fold-shapes makes the Reshape targets constant).
            o2, _ = optimize(copy(real.model), opt_level=2)
            cache[name] = (real, o2)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(BERT_MODELS))
def test_zoo_bert_fully_fused(zoo_models, name):
    real, o2 = zoo_models(name)
    optimized, report = optimize_checked(o2, passes=PASSES, inputs=real.feeds, rtol=1e-4, atol=1e-5)
    assert attention_count(optimized) == BERT_MODELS[name]
    assert "Softmax" not in op_types(optimized)
    # and against the original export, not only the -O2 model
    from graphopt import verify

    assert verify.verify(real.model, optimized, inputs=real.feeds, rtol=1e-4, atol=1e-5).ok


@pytest.mark.parametrize("name", list(BERT_MODELS))
def test_zoo_bert_O3_fuses(zoo_models, name):
    real, _ = zoo_models(name)
    optimized, _ = optimize_checked(real.model, opt_level=3, inputs=real.feeds, rtol=1e-4, atol=1e-5)
    assert attention_count(optimized) == BERT_MODELS[name]


@pytest.mark.parametrize("name", list(BERT_MODELS))
def test_zoo_bert_generic_target_unfused(zoo_models, name):
    real, o2 = zoo_models(name)
    optimized, _ = optimize(copy(o2), passes=PASSES, target="generic")
    assert attention_count(optimized) == 0 and op_types(optimized).count("Softmax") == BERT_MODELS[name]


def _ort_optimized(model: onnx.ModelProto, tmp_path, tag: str) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    path = tmp_path / f"{tag}.ort.onnx"
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("name", list(BERT_MODELS))
def test_ort_keeps_attention_and_still_fuses(zoo_models, name, tmp_path):
    real, o2 = zoo_models(name)
    optimized, _ = optimize(copy(o2), passes=PASSES)
    after = _ort_optimized(optimized, tmp_path, "fused")
    assert after["Attention"] == BERT_MODELS[name]
    # Compared with the -O2 model this pass starts from: what -O2 itself does to onnxruntime's
    # own fusions (value_info with fewer symbolic dims, scales folded into weights) is not this pass's.
    before = _ort_optimized(o2, tmp_path, "baseline")
    for ops in ({"SkipLayerNormalization"}, {"Gelu", "BiasGelu", "FastGelu"}):
        assert sum(after[o] for o in ops) >= sum(before[o] for o in ops), (ops, after, before)


def test_dynamo_sdpa_flattened_key_transpose_fuses():
    """Not in the zoo: dynamo + SDPA writes kT as Reshape(Transpose(Reshape(kh, [-1,S,d]), [0,2,1]), [B,N,d,S])."""
    export = pytest.importorskip("real_models.transformers_export")
    pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    model = export.bert_encoder_proto("dynamo", "sdpa", layers=2, hidden=64, heads=4, intermediate=128)
    inputs = export.bert_feeds(batch=2, sequence=16, vocab=1000)
    o2, _ = optimize(copy(model), opt_level=2)
    optimized, _ = optimize_checked(o2, passes=PASSES, inputs=inputs, rtol=1e-4, atol=1e-5)
    assert attention_count(optimized) == 2 and "Softmax" not in op_types(optimized)


def test_generic_target_at_opset_23_writes_the_standard_attention():
    optimized, _ = fused(layer(scale="div_after", mask="none", opset=23), inputs=feeds(mask=False), target="generic")
    ops = op_types(optimized)
    assert ops.count("Attention") == 1 and attention_count(optimized) == 0 and "Softmax" not in ops
    node = next(n for n in optimized.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "" and attrs["q_num_heads"] == attrs["kv_num_heads"] == N and "scale" not in attrs


def test_standard_attention_needs_a_mask_onnxruntime_can_read():
    """[B,1,1,S] broadcasts by the spec, but onnxruntime's Attention-23 kernel does not broadcast the
    query axis: that layer stays decomposed on the generic target, and the contrib op is preferred
    wherever the target runs it."""
    optimized, _ = fused(layer(opset=23), inputs=feeds(), target="generic")
    assert "Attention" not in op_types(optimized)
    optimized, _ = fused(layer(opset=23), inputs=feeds(), target="x86_64")
    assert attention_count(optimized) == 1


@pytest.mark.parametrize("nan_guard", [None, 0.0])
def test_transformers_5_dynamo_mask_with_bound_dims_fuses(nan_guard):
    """all-MiniLM-L6 as torch 2.11's dynamo exporter writes transformers 5's SDPA, dims bound:
    Where(And(all-true, GatherND(Bool(mask), (b, s) indices)), 0, finfo.min), Reshape targets
    [B, S, -1, H], and the softmax's NaN guard Where(IsNaN(p), 0, p)."""
    optimized, _ = fused(layer(scale="mul_before", mask="gathernd", nan_guard=nan_guard), inputs=feeds())
    assert attention_count(optimized) == 1 and "Softmax" not in op_types(optimized)


def test_a_nan_guard_that_fills_something_else_stays_unfused():
    optimized, _ = fused(layer(scale="mul_before", mask="gathernd", nan_guard=1.0), inputs=feeds())
    assert attention_count(optimized) == 0
