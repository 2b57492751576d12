"""graphopt's output never blocks a fusion onnxruntime would have done on the original.

onnxruntime optimizes every model again when it creates a session (ORT_ENABLE_ALL). For each model
of the zoo and of the real-model tier, the graph onnxruntime makes of graphopt's -O3 output (saved
with `SessionOptions.optimized_model_filepath`) has no more nodes than the graph it makes of the
original, and every kind of fused node it makes of the original it makes of graphopt's output as
often, unless graphopt fused that part into something bigger itself, or kept it from a fusion
that runs slower on purpose: a residual Sum before a LayerNormalization is a SkipLayerNormalization
avoided (passes/fusion/layer_norm.py, residual-add-as-sum), counted as that one node.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
from helpers import copy

from graphopt import ir, models
from graphopt.optimize import optimize
from real_models import zoo

# The fused ops onnxruntime's CPU session optimizer writes, and what subsumes each when graphopt
# fused the surrounding subgraph already (an Attention takes the MatMul that FusedMatMul would be).
ORT_FUSED_OPS = {
    "FusedConv": (),
    "FusedGemm": (),
    "Gemm": ("Attention", "MultiHeadAttention"),
    "FusedMatMul": ("Attention", "MultiHeadAttention"),
    "Gelu": ("BiasGelu", "FastGelu"),
    "BiasGelu": (),
    "FastGelu": (),
    "QuickGelu": (),
    "LayerNormalization": ("SkipLayerNormalization", "EmbedLayerNormalization"),
    "SimplifiedLayerNormalization": ("SkipSimplifiedLayerNormalization",),
    "SkipLayerNormalization": (),
    "SkipSimplifiedLayerNormalization": (),
    "Attention": (),
    "MultiHeadAttention": (),
    "EmbedLayerNormalization": (),
}

ZOO = ["bert_tiny", "resnet18", "mobilenetv2", "digits_cnn"]


def ort_optimized_ops(model: onnx.ModelProto, tmp_path, tag: str) -> Counter:
    path = tmp_path / f"{tag}.ort.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    saved = onnx.load(str(path), load_external_data=False)
    # Subgraphs included: inlining an If with a constant condition moves its branch into the main graph.
    nodes = list(ir.all_nodes(saved.graph))
    ops = Counter(n.op_type for n in nodes)
    norms = {i for n in nodes if n.op_type == "LayerNormalization" for i in n.input[:1]}
    avoided = sum(1 for n in nodes if n.op_type == "Sum" and len(n.input) == 2 and n.output[0] in norms)
    ops.update({"SkipLayerNormalization": avoided, "Sum": -avoided, "LayerNormalization": -avoided})
    return +ops


def assert_no_fusion_blocked(original: onnx.ModelProto, optimized: onnx.ModelProto, tmp_path) -> None:
    before = ort_optimized_ops(original, tmp_path, "original")
    after = ort_optimized_ops(optimized, tmp_path, "graphopt")
    assert sum(after.values()) <= sum(before.values()), f"onnxruntime leaves more nodes of graphopt's output: {after} vs {before}"
    for op, subsumed_by in ORT_FUSED_OPS.items():
        if after[op] < before[op] and not any(after[s] for s in subsumed_by):
            raise AssertionError(f"onnxruntime makes {before[op]} {op} of the original but {after[op]} of graphopt's output")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models(name, tmp_path):
    original = models.load(name)
    optimized, _ = optimize(copy(original), target="x86_64", opt_level=3)
    assert_no_fusion_blocked(original, optimized, tmp_path)


@pytest.mark.parametrize("name", zoo.names())
def test_real_models(name, tmp_path):
    try:
        real = zoo.load(name)
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    optimized, _ = optimize(copy(real.model), target="x86_64", opt_level=3)
    assert_no_fusion_blocked(real.model, optimized, tmp_path)
