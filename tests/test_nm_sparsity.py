"""nm-sparsity: N:M semi-structured sparsity, applied where the target's sparse tensor cores make
it pay (the cost model), refused on CPU targets unless forced, marked in the model's metadata."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import calibration, export, models
from graphopt.optimize import optimize_model
from graphopt.passes.nm_sparsity import METADATA_KEY, nm_mask, parse_sparsity
from graphopt.specialize import specialize_proto


def _groups_hold(weight: np.ndarray, axis: int, kept: int, group: int) -> bool:
    moved = np.moveaxis(weight, axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)
    return bool((np.count_nonzero(grouped, axis=-1) <= kept).all())


@pytest.mark.parametrize("kept,group", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mask_keeps_the_highest_n_of_every_m_along_the_axis(kept, group, axis):
    rng = np.random.default_rng(axis)
    shape = [3, 5, 7]
    shape[axis] = 2 * group
    scores = rng.standard_normal(shape)
    mask = nm_mask(scores, axis, kept, group)
    moved_scores = np.moveaxis(scores, axis, -1).reshape(-1, group)
    moved_mask = np.moveaxis(mask, axis, -1).reshape(-1, group)
    assert (moved_mask.sum(axis=1) == kept).all()
    for s, m in zip(moved_scores, moved_mask):
        assert s[m].min() >= s[~m].max()


def test_parse_refuses_what_is_no_pattern():
    assert parse_sparsity("2:4") == (2, 4) and parse_sparsity("4:8") == (4, 8)
    for bad in ("4:2", "2", "a:b", "0:4", "2:64"):
        with pytest.raises(Exception, match="--sparsity takes N:M"):
            parse_sparsity(bad)


def _layers_model(rows: int = 2048, features: int = 1024) -> onnx.ModelProto:
    """A compute-bound MatMul (many rows), a memory-bound Gemm with transB (one row) and a Conv."""
    rng = np.random.default_rng(0)
    w_big = rng.standard_normal((features, features)).astype(np.float32)
    w_gemm = rng.standard_normal((64, features)).astype(np.float32)  # [N, K] under transB
    w_conv = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["a", "w_big"], ["y_big"], name="big_matmul"),
        helper.make_node("Gemm", ["b", "w_gemm"], ["y_gemm"], name="one_row_gemm", transB=1),
        helper.make_node("Conv", ["c", "w_conv"], ["y_conv"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "layers",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, features]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, features]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y_big", TensorProto.FLOAT, [rows, features]),
         helper.make_tensor_value_info("y_gemm", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("y_conv", TensorProto.FLOAT, [1, 16, 16, 16])],
        [numpy_helper.from_array(w_big, "w_big"), numpy_helper.from_array(w_gemm, "w_gemm"), numpy_helper.from_array(w_conv, "w_conv")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(target: str, **options):
    model, report = optimize_model(_layers_model(), target=target, passes=["nm-sparsity"], options=options)
    return export.to_proto(model), report


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _weight_of(proto: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in proto.graph.node if n.name == node_name)
    return _weights(proto)[node.input[1]]


def test_a_cpu_target_declines_and_says_no_speedup_is_expected():
    proto, report = _run("x86_64", sparsity="2:4")
    s = report.sparsity
    assert not s.get("applied") and s["considered"] == 3
    assert "no sparse tensor cores" in s["reason"] and "no speedup expected" in s["reason"]
    original = _weights(_layers_model())
    assert all(np.array_equal(original[k], v) for k, v in _weights(proto).items())
    assert METADATA_KEY not in {p.key for p in proto.metadata_props}


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_forced_sparsity_zeroes_exactly_the_pattern_on_each_layer_and_marks_it(pattern):
    kept, group = parse_sparsity(pattern)
    proto, report = _run("x86_64", sparsity=pattern, sparsity_force=True)
    marking = json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))
    assert marking["pattern"] == pattern and {m["node"] for m in marking["layers"]} == {"big_matmul", "one_row_gemm", "conv"}
    original = _layers_model()
    for m in marking["layers"]:
        w = _weight_of(proto, m["node"])
        assert w.shape == _weight_of(original, m["node"]).shape
        assert _groups_hold(w, m["axis"], kept, group)
        assert np.count_nonzero(w) == w.size * kept // group
    # The reduction axis of each op: MatMul's weight rows, Gemm transB's columns, Conv's input channels.
    assert {m["node"]: m["axis"] for m in marking["layers"]} == {"big_matmul": 0, "one_row_gemm": 1, "conv": 1}
    # The kept weights are the originals, the largest of their group.
    w0, w1 = _weight_of(original, "big_matmul"), _weight_of(proto, "big_matmul")
    assert np.array_equal(w1[w1 != 0], w0[w1 != 0])
    assert report.sparsity["applied"] == 3 and not report.sparsity["expected_speedup"]
    assert all(0 < layer["weight_error"] < 1 for layer in report.sparsity["layers"])


def test_cuda_predicts_the_sparse_tensor_core_speedup_where_the_layer_is_compute_bound():
    proto, report = _run("cuda", sparsity="2:4", sparsity_dtype="fp16")
    by_node = {d["node"]: d for p in report.to_dict()["passes"] for d in p["cost_decisions"]}
    assert by_node["big_matmul"]["kept"] and 1.2 < by_node["big_matmul"]["before_s"] / by_node["big_matmul"]["after_s"] <= 2.0
    assert not by_node["one_row_gemm"]["kept"] and "memory-bound" in by_node["one_row_gemm"]["reason"]
    assert report.sparsity["applied"] >= 1 and report.sparsity["expected_speedup"]
    assert _groups_hold(_weight_of(proto, "big_matmul"), 0, 2, 4)
    assert np.array_equal(_weight_of(proto, "one_row_gemm"), _weight_of(_layers_model(), "one_row_gemm"))


def test_cuda_declines_what_its_sparse_tensor_cores_do_not_run():
    _, fp32 = _run("cuda", sparsity="2:4")
    assert not fp32.sparsity.get("applied") and "not for fp32" in fp32.sparsity["reason"]
    _, four_of_eight = _run("cuda", sparsity="4:8", sparsity_dtype="fp16")
    assert not four_of_eight.sparsity.get("applied") and "execute 2:4, not 4:8" in four_of_eight.sparsity["reason"]


def test_activation_aware_choice_moves_held_out_outputs_less_than_magnitude_alone():
    """Channels 10x louder than the rest: a small weight on one of them matters more than a large
    weight on a quiet one, which only the calibration data can tell."""
    rng = np.random.default_rng(3)
    k, n = 64, 32
    loudness = np.where(np.arange(k) % 4 == 0, 10.0, 1.0).astype(np.float32)
    inputs = lambda rows, seed: (np.random.default_rng(seed).standard_normal((rows, k)) * loudness).astype(np.float32)  # noqa: E731
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = calibration.from_arrays({"x": inputs(256, 1)}, proto, batch_size=64)
    held_out = inputs(256, 2)

    def error(**kwargs) -> float:
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        model, _ = optimize_model(work, passes=["nm-sparsity"], options={"sparsity": "2:4", "sparsity_force": True}, **kwargs)
        sparse = export.to_proto(model)
        got = ort.InferenceSession(sparse.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": held_out})[0]
        expected = held_out @ w
        return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))

    assert error(calibration_data=data) < 0.7 * error()


def test_marked_zeros_survive_int8_quantization_of_the_weights():
    proto = _layers_model(rows=8, features=64)
    model, report = optimize_model(proto, target="x86_64", passes=["nm-sparsity"], options={"sparsity": "2:4", "sparsity_force": True},
                                   quantize="int8-dynamic")
    quantized = export.to_proto(model)
    assert report.sparsity["applied"] == 3
    int8 = [numpy_helper.to_array(t) for t in quantized.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and t.dims]
    big = [w for w in int8 if w.size == 64 * 64]
    assert big and all(np.count_nonzero(w) <= w.size // 2 for w in big)


@pytest.mark.parametrize("hidden,expect_sparse", [(384, True), (64, False)])
def test_a_real_encoder_on_cuda_fp16_gets_sparse_weights_only_where_its_width_pays(hidden, expect_sparse):
    """A torch (TorchScript exporter) BERT layer: at MiniLM's width (384, FFN 1536) the projections
    are compute-bound on an A100 in fp16 and 2:4 pays; at width 64 every product is memory-bound."""
    pytest.importorskip("transformers")
    from real_models.transformers_export import bert_encoder_proto, bert_feeds

    proto = bert_encoder_proto("legacy", layers=1, hidden=hidden, heads=hidden // 32, intermediate=4 * hidden)
    specialize_proto(proto, dims={"batch": 64, "sequence": 128})  # what --dim does: the cost model needs the shapes
    model, report = optimize_model(proto, target="cuda", opt_level=2, options={"sparsity": "2:4", "sparsity_dtype": "fp16"})
    s = report.sparsity
    if not expect_sparse:
        assert not s.get("applied") and "memory-bound" in s["reason"], s
        return
    assert s["applied"] >= 6 and s["expected_speedup"], s  # Q, K, V, O and the two FFN products
    sparse = export.to_proto(model)
    marking = json.loads(next(p.value for p in sparse.metadata_props if p.key == METADATA_KEY))
    weights = _weights(sparse)
    for m in marking["layers"]:
        assert _groups_hold(weights[m["weight"]], m["axis"], 2, 4)
    # Still a valid model that onnxruntime runs.
    outputs = ort.InferenceSession(sparse.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, bert_feeds(64, 128, 1000))
    assert all(np.isfinite(o).all() for o in outputs)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_says_plainly_that_a_cpu_gains_nothing_and_refuses_bad_patterns(tmp_path):
    out = tmp_path / "s.onnx"
    proc = _cli("run", "zoo:digits_cnn", "--sparsity", "2:4", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "2:4 sparsity not applied" in proc.stdout and "no sparse tensor cores" in proc.stdout and "--sparsity-force" in proc.stdout
    bad = _cli("run", "zoo:digits_cnn", "--sparsity", "4:2", "-o", tmp_path / "bad.onnx")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 1 and "--sparsity takes N:M" in errors[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.onnx").exists()
    alone = _cli("run", "zoo:digits_cnn", "--sparsity-force", "-o", tmp_path / "bad.onnx")
    assert alone.returncode != 0 and "--sparsity-force goes with --sparsity" in alone.stderr


def test_cli_forced_sparsity_is_judged_by_the_budget_and_reported(tmp_path):
    model = models.load("digits_cnn")
    onnx.save(model, tmp_path / "digits.onnx")
    from graphopt.models.digits import _split

    np.savez(tmp_path / "calib.npz", input=_split()[0][:128])
    common = ["run", tmp_path / "digits.onnx", "--sparsity", "2:4", "--sparsity-force", "--calibration", tmp_path / "calib.npz"]
    strict = _cli(*common, "-o", tmp_path / "strict.onnx")
    assert strict.returncode != 0 and "lossy model moved too far" in strict.stderr and not (tmp_path / "strict.onnx").exists()
    loose = _cli(*common, "--accuracy-budget", "cos=0.8", "-o", tmp_path / "loose.onnx", "--report", tmp_path / "r.json")
    assert loose.returncode == 0, loose.stderr
    assert "2:4 sparsity in 2 of 2 layers (50% of their weights zero)" in loose.stdout and "activation-weighted error" in loose.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sparsity"]["applied"] == 2 and report["sparsity"]["forced"]
