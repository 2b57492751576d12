"""convert-fp16 / convert-bf16: float32 compute moved to the half-width dtype where the target is faster.

onnxruntime's CPU provider (x86_64 build) has no fp16 or bf16 kernels for MatMul, Conv, Add or
Relu. It still loads an fp16 model (its InsertCastTransformer runs such nodes in fp32 between
Casts), so fp16 results are compared in onnxruntime; a bf16 model it refuses, and that one is
checked with onnx.checker (full) and run with onnx.reference.ReferenceEvaluator, against fp32
from onnxruntime.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphopt.models as zoo
import graphopt.passes.quantize.float16  # noqa: F401
from graphopt import loading, targets
from graphopt.optimize import optimize
from graphopt.pass_manager import PassContext, create_pass

F = TensorProto.FLOAT
LOW = {"convert-fp16": TensorProto.FLOAT16, "convert-bf16": TensorProto.BFLOAT16}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def _convert(model, target="cuda", pass_name="convert-fp16", **options):
    converted, report = optimize(_copy(model), target=target, passes=[pass_name], options=options)
    (record,) = [p for p in report.passes if p.name == pass_name]
    return converted, record


def _run_pass(model, target, pass_name="convert-fp16", **options):
    """The pass's own PassResult (the report keeps stats only of passes that changed the model)."""
    ir_model = loading.from_proto(_copy(model))
    ctx = PassContext(model=ir_model, target=targets.get(target), options=options)
    return create_pass(pass_name).run(ir_model.graph, ctx)


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _check_valid(original: onnx.ModelProto, converted: onnx.ModelProto) -> dict[str, int]:
    """Full checker, the interface unchanged, no Cast round trip, one Cast per (tensor, dtype)."""
    onnx.checker.check_model(converted, full_check=True)
    onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    sig = lambda vs: [(v.name, v.type.tensor_type.elem_type) for v in vs]  # noqa: E731
    assert sig(converted.graph.input) == sig(original.graph.input)
    assert sig(converted.graph.output) == sig(original.graph.output)
    types = _dtypes(converted)
    producers = {o: n for n in converted.graph.node for o in n.output}
    seen = collections.Counter()
    for node in converted.graph.node:
        if node.op_type != "Cast":
            continue
        to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
        seen[(node.input[0], to)] += 1
        before = producers.get(node.input[0])
        if before is not None and before.op_type == "Cast":
            assert types.get(before.input[0]) != to, f"Cast round trip {before.input[0]} -> {node.input[0]} -> {node.output[0]}"
    assert all(count == 1 for count in seen.values()), [k for k, c in seen.items() if c > 1]
    return types


def _ort_cpu(model: onnx.ModelProto):
    """An onnxruntime CPU session, or None when it refuses the model (no kernel for the dtype)."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - NOT_IMPLEMENTED: no fp16/bf16 kernel on this provider
        return None


def _run(model: onnx.ModelProto, feeds) -> tuple[list[np.ndarray], str]:
    session = _ort_cpu(model)
    if session is not None:
        return session.run(None, feeds), "onnxruntime"
    return [np.asarray(o, np.float32) for o in ReferenceEvaluator(model).run(None, feeds)], "reference"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _chain(opset=18) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 16)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "beta"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Softmax", ["r"], ["s"], axis=-1, name="softmax"),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
        helper.make_node("ReduceMean", ["ln", "axes"], ["y"], name="mean"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", F, [4, 8])],
                              [helper.make_tensor_value_info("y", F, [4, 1]), helper.make_tensor_value_info("r", F, [4, 16])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


@pytest.mark.parametrize("target, options", [("cuda", {}), ("cuda:h100", {"float16_force": True})])
def test_chain_converts_compute_and_keeps_sensitive_ops_fp32(target, options):
    model = _chain()
    converted, record = _convert(model, target, **options)
    types = _check_valid(model, converted)
    assert record.changed and record.stats["fp16_nodes"] == 3 and record.stats["fp32_sensitive"] == 3
    fp16, fp32 = TensorProto.FLOAT16, TensorProto.FLOAT
    assert types[_node(converted, "mm").input[1]] == fp16  # the weight is an fp16 initializer
    for name in ("mm", "add", "relu"):
        assert types[_node(converted, name).output[0]] == fp16, name
    for name in ("softmax", "ln", "mean"):
        node = _node(converted, name)
        assert all(types[t] == fp32 for t in list(node.input) + list(node.output) if types.get(t) in (fp16, fp32)), name
    # One Cast in (x), one out (r, read by Softmax and the graph output 'r' alike); Softmax,
    # LayerNorm and ReduceMean share that one boundary.
    assert [n.op_type for n in converted.graph.node].count("Cast") == 2 == record.stats["casts"]
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    expected = _ort_cpu(model).run(None, {"x": x})
    got, how = _run(converted, {"x": x})
    # onnxruntime's x86_64 CPU provider has no fp16 MatMul kernel, but loads the model anyway:
    # its InsertCastTransformer computes such fp16 nodes in fp32 between Casts of its own.
    assert how == "onnxruntime"
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-2, atol=2e-3)


def test_no_change_where_the_target_is_not_faster_in_fp16():
    model = _chain()
    result = _run_pass(model, "x86_64:avx512")
    assert not result.changed and result.stats == {"skipped_not_faster": 1}
    (decision,) = result.decisions
    assert not decision.kept and "no faster than fp32" in decision.reason and "float16_force" in decision.reason
    converted, record = _convert(model, "x86_64:avx512")
    assert not record.changed and "no faster" in record.decisions[0].reason
    assert [n.op_type for n in converted.graph.node] == [n.op_type for n in model.graph.node]
    assert all(t.data_type == TensorProto.FLOAT for t in converted.graph.initializer if t.name != "axes")


def test_forced_on_x86_64_converts_only_what_its_kernels_take():
    # Forced, the peak no longer gates it, but onnxruntime's x86_64 CPU provider has no fp16
    # MatMul/Add/Relu: nothing worth converting remains, and the model still runs there.
    model = _chain()
    result = _run_pass(model, "x86_64:avx512", float16_force=True)
    assert not result.changed and result.stats["fp32_no_kernel"] == 3
    converted, _ = _convert(model, "x86_64:avx512", float16_force=True)
    assert _ort_cpu(converted) is not None


def test_excluded_nodes_stay_fp32():
    model = _chain()
    converted, record = _convert(model, "cuda", quantize_exclude=("mm",))
    types = _check_valid(model, converted)
    assert types[_node(converted, "mm").input[1]] == TensorProto.FLOAT
    # Without the MatMul next to them, Add and Relu in fp16 would only add Casts.
    assert "Cast" not in [n.op_type for n in converted.graph.node]


def test_shape_like_inputs_keep_their_dtype():
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 0.2).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.zeros(8, np.float32), "roi"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([100], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "slice_axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Resize", ["c", "roi", "scales"], ["up"], mode="nearest", name="resize"),
        helper.make_node("Relu", ["up"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
        helper.make_node("Slice", ["flat", "starts", "ends", "slice_axes"], ["y"], name="slice"),
    ]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", F, [1, 100])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    converted, record = _convert(model, "cuda")
    types = _check_valid(model, converted)
    resize, reshape, slice_ = _node(converted, "resize"), _node(converted, "reshape"), _node(converted, "slice")
    assert types[resize.input[0]] == TensorProto.FLOAT16 and types[resize.output[0]] == TensorProto.FLOAT16
    assert types[resize.input[1]] == TensorProto.FLOAT  # roi: a type variable of inputs only
    assert types[resize.input[2]] == TensorProto.FLOAT  # scales: tensor(float) in the schema
    assert types[reshape.input[1]] == TensorProto.INT64 and all(types[t] == TensorProto.INT64 for t in slice_.input[1:])
    assert types[_node(converted, "conv").input[1]] == TensorProto.FLOAT16
    x = np.random.default_rng(3).standard_normal((1, 2, 4, 4)).astype(np.float32)
    (expected,), (got,) = _ort_cpu(model).run(None, {"x": x}), _run(converted, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=5e-3)


def _if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    then_graph = helper.make_graph([helper.make_node("Add", ["mm", "one"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", F, [2, 4])],
                                   initializer=[numpy_helper.from_array(np.ones(4, np.float32), "one")])
    else_graph = helper.make_graph([helper.make_node("Relu", ["mm"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F, [2, 4])])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph, name="if"),
        helper.make_node("MatMul", ["branch", "W2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, [2, 5])],
                              initializer=[numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W"),
                                           numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_if_subgraph_stays_fp32_and_valid():
    model = _if_model()
    converted, record = _convert(model, "cuda")
    types = _check_valid(model, converted)
    assert record.stats["fp16_nodes"] == 2 and record.stats["fp32_subgraph"] == 1
    # The branches read 'mm' from the outer scope by name: it is still there, float32.
    assert types["mm"] == TensorProto.FLOAT and types["branch"] == TensorProto.FLOAT
    if_node = _node(converted, "if")
    assert helper.get_attribute_value(if_node.attribute[0]).node[0].input[0] == "mm"
    rng = np.random.default_rng(5)
    for cond in (True, False):
        feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "cond": np.array(cond)}
        (expected,), ((got,), _) = _ort_cpu(model).run(None, feeds), _run(converted, feeds)
        np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


def _resnet18_small() -> onnx.ModelProto:
    # 32x32 instead of 224x224: GlobalAveragePool makes the spatial size free, and the reference
    # evaluator's fp16 convolutions (numpy, no BLAS) would take minutes at full size.
    model = zoo.load("resnet18")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 32
    del model.graph.value_info[:]
    return model


@pytest.mark.parametrize("name, opt_level", [("bert_tiny", 0), ("bert_tiny", 2), ("resnet18", 2), ("resnet18", 0)])
def test_zoo_models_convert_and_stay_close(name, opt_level):
    if name == "bert_tiny":
        from graphopt.models.bert import BERT_TINY, example_inputs

        model, feeds = zoo.load(name), example_inputs(BERT_TINY, seed=3)
    else:
        model = _resnet18_small()
        feeds = {"input": np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    start = model
    if opt_level:
        start, _ = optimize(_copy(model), target="cuda", opt_level=opt_level)
    converted, record = _convert(start, "cuda")
    _check_valid(start, converted)
    assert record.stats["fp16_nodes"] > 0 and record.stats["fp16_constants"] > 0
    expected = _ort_cpu(model).run(None, feeds)
    got, how = _run(converted, feeds)
    cosines = [_cosine(e, g) for e, g in zip(expected, got)]
    print(f"{name} -O{opt_level} fp16 via {how}: cosine {cosines}, stats {record.stats}")
    assert min(cosines) > 0.999, cosines


def test_bf16_chain_converts_and_stays_close():
    model = _chain()
    converted, record = _convert(model, "cuda", "convert-bf16")
    types = _check_valid(model, converted)
    bf16 = TensorProto.BFLOAT16
    assert record.stats["bf16_nodes"] == 3 and record.stats["casts"] == 2
    assert types[_node(converted, "mm").input[1]] == bf16 and types[_node(converted, "relu").output[0]] == bf16
    assert types[_node(converted, "ln").input[0]] == TensorProto.FLOAT
    # onnxruntime's CPU provider has no bf16 MatMul/Add/Relu (only data movement, LayerNorm and a
    # few others): the model is refused there, and run with the reference evaluator (ml_dtypes).
    assert _ort_cpu(converted) is None
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    expected, (got, how) = _ort_cpu(model).run(None, {"x": x}), _run(converted, {"x": x})
    assert how == "reference"
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=5e-2, atol=2e-2)


def test_bf16_needs_opset_13():
    result = _run_pass(_old_chain(), "cuda", "convert-bf16")
    assert not result.changed and result.stats == {"skipped_opset": 1}


def _old_chain() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 4])],
                              initializer=[numpy_helper.from_array(np.ones((3, 4), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    return model


def test_epsilon_and_mask_constants_keep_their_reader_fp32():
    # An epsilon of 1e-12 is 0 in fp16, a -3.4e38 mask is -inf: their Add stays fp32.
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "eps"], ["a"], name="eps_add"),
        helper.make_node("Add", ["a", "mask"], ["y"], name="mask_add"),
    ]
    graph = helper.make_graph(nodes, "eps", [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 4])],
                              initializer=[numpy_helper.from_array(np.ones((3, 4), np.float32), "W"),
                                           numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
                                           numpy_helper.from_array(np.full(4, -3.4e38, np.float32), "mask")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    converted, record = _convert(model, "cuda")
    types = _check_valid(model, converted)
    assert record.stats["fp32_constant_range"] == 2
    assert types["eps"] == TensorProto.FLOAT and types["mask"] == TensorProto.FLOAT
    assert types[_node(converted, "mm").input[1]] == TensorProto.FLOAT16


def test_run_quantize_fp16_on_the_cli(tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    # x86_64 computes fp16 no faster than fp32: the model stays fp32 and the report says why.
    host = tmp_path / "host.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--quantize", "fp16", "-o", str(host)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "declined" in result.output and all(t.data_type == onnx.TensorProto.FLOAT for t in onnx.load(host).graph.initializer)
    # cuda does: the weights become fp16, the interface stays float32, and it still verifies.
    gpu = tmp_path / "cuda.onnx"
    result = CliRunner().invoke(cli, ["run", "zoo:digits_cnn", "--target", "cuda", "--quantize", "fp16", "-o", str(gpu)])
    assert result.exit_code == 0, result.output
    converted = onnx.load(gpu)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)
    assert converted.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
