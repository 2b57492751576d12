"""Tests for graphopt.verify on tiny hand-built models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import GraphoptError
from graphopt.verify import (
    DEFAULT_DIM,
    Fidelity,
    compare,
    latency_ms,
    load_inputs,
    make_inputs,
    run,
    verify,
)

OPSET = 17


def _model(nodes, inputs, outputs, initializers=(), ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    # Pinned: onnx's default IR version can be newer than the installed onnxruntime accepts.
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _relu_model():
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )


def _add_const_model(c: float):
    return _model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(c, dtype=np.float32), "c")],
    )


def _embedding_model():
    emb = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    return _model(
        [
            # The Cast makes the ids reach Gather through a chain, as exported models often do.
            helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
            helper.make_node("Gather", ["emb", "ids32"], ["h"], axis=0),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
            helper.make_node("Mul", ["h", "m3"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")],
    )


# --- compare / verify ---------------------------------------------------------------------------


def test_identical_models_are_ok():
    model = _relu_model()
    fid = verify(model, model)
    assert fid.ok
    (out,) = fid.outputs
    assert out.name == "y"
    assert out.max_abs_error == 0.0
    assert out.max_rel_error == 0.0
    assert out.cosine_similarity == 1.0
    assert out.mismatched == 0
    assert out.within_tolerance
    assert out.top1_agreement is not None  # [2, 3] float is classifier-like


def test_perturbed_model_fails_with_the_perturbation_as_error():
    fid = verify(_add_const_model(0.0), _add_const_model(0.1))
    assert not fid.ok
    out = fid.worst()
    assert out.max_abs_error == pytest.approx(0.1, rel=1e-5)
    assert out.mismatched > 0
    assert not out.within_tolerance
    assert out.cosine_similarity < 1.0


def test_small_perturbation_within_tolerance():
    fid = verify(_add_const_model(0.0), _add_const_model(1e-5))
    assert fid.ok
    assert 0 < fid.outputs[0].max_abs_error < 1e-4


def test_top1_agreement():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 10)).astype(np.float32)
    assert compare({"p": logits}, {"p": logits.copy()}).outputs[0].top1_agreement == 1.0

    changed = logits.copy()
    row0 = changed[0]
    row0[np.argmin(row0)] = row0.max() + 1.0  # a new winner in row 0 only
    out = compare({"p": logits}, {"p": changed}).outputs[0]
    assert out.top1_agreement == pytest.approx(0.75)
    assert not out.within_tolerance


@pytest.mark.parametrize("shape", [(2, 3, 10), (8,), (4, 1)])
def test_top1_is_none_for_non_classifier_outputs(shape):
    x = np.ones(shape, dtype=np.float32)
    assert compare({"p": x}, {"p": x}).outputs[0].top1_agreement is None


def test_top1_for_rows_with_singleton_middle_dims():
    x = np.random.default_rng(0).standard_normal((3, 1, 1, 5)).astype(np.float32)
    assert compare({"p": x}, {"p": x}).outputs[0].top1_agreement == 1.0


def test_integer_outputs_compare_exactly():
    ref = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert compare({"i": ref}, {"i": ref.copy()}).ok

    cand = ref.copy()
    cand[1, 2] += 1
    # A loose float tolerance must not let an off-by-one index through.
    fid = compare({"i": ref}, {"i": cand}, rtol=0.5, atol=10.0)
    out = fid.outputs[0]
    assert not fid.ok
    assert out.mismatched == 1
    assert out.max_abs_error == 1.0
    assert out.top1_agreement is None
    assert 0.9 < out.cosine_similarity < 1.0


def test_integer_model_output_via_run():
    model = _model(
        [helper.make_node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 10])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [4])],
    )
    fid = verify(model, model)
    assert fid.ok and fid.outputs[0].mismatched == 0


def test_bool_outputs_compare_exactly():
    a = np.array([True, False, True])
    out = compare({"b": a}, {"b": ~a}).outputs[0]
    assert out.mismatched == 3 and not out.within_tolerance


def test_missing_output_and_shape_mismatch_are_inf():
    x = np.zeros((2, 3), dtype=np.float32)
    fid = compare({"a": x, "b": x}, {"b": np.zeros((3, 2), dtype=np.float32)})
    assert not fid.ok
    a, b = fid.outputs
    assert a.name == "a" and a.max_abs_error == float("inf") and a.mismatched == 6 and "missing" in a.note
    assert b.max_abs_error == float("inf") and not b.within_tolerance and "shape" in b.note


def test_dtype_change_is_not_ok():
    x = np.ones((2, 2), dtype=np.float32)
    out = compare({"y": x}, {"y": x.astype(np.float16)}).outputs[0]
    assert not out.within_tolerance and "dtype" in out.note
    assert out.max_abs_error == 0.0


def test_nan_and_inf_semantics():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    assert compare({"y": ref}, {"y": ref.copy()}).ok

    cand = ref.copy()
    cand[1] = 1e30  # a huge finite value is still not +inf
    out = compare({"y": ref}, {"y": cand}).outputs[0]
    assert out.mismatched == 1 and out.max_abs_error == float("inf")

    cand = ref.copy()
    cand[0] = 0.0
    assert compare({"y": ref}, {"y": cand}).outputs[0].mismatched == 1


def test_relative_error_with_zero_reference_stays_bounded():
    ref = np.array([0.0, 100.0], dtype=np.float32)
    cand = np.array([1e-5, 100.0], dtype=np.float32)
    out = compare({"y": ref}, {"y": cand}).outputs[0]
    # eps = 1e-6 * 100, so the zero element gives 1e-5 / 1e-4, not 1e-5 / 1e-6.
    assert out.max_rel_error == pytest.approx(0.1, rel=1e-3)


def test_to_dict_is_strict_json():
    x = np.zeros((2, 3), dtype=np.float32)
    fid = compare({"a": x, "b": x}, {"b": x})
    d = fid.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["ok"] is False
    assert back["worst"] == "a"
    assert back["outputs"][0]["max_abs_error"] == "inf"
    assert back["outputs"][1]["max_abs_error"] == 0.0


def test_worst_prefers_failing_outputs():
    x = np.ones((5,), dtype=np.float32)
    fid = compare({"good": x, "bad": x}, {"good": x + 1e-6, "bad": x + 1.0})
    assert fid.worst().name == "bad"
    with pytest.raises(GraphoptError):
        Fidelity(outputs=[], ok=True).worst()


# --- make_inputs ---------------------------------------------------------------------------------


def test_make_inputs_bounds_gather_indices_and_runs():
    model = _embedding_model()
    feeds = make_inputs(model, dim_values={"seq": 16})
    ids = feeds["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (1, 16)
    assert ids.min() >= 0 and ids.max() < 50
    assert ids.max() >= 10  # the bound came from the embedding, not the [0, 10) fallback
    out = run(model, feeds)
    assert out["y"].shape == (1, 16, 8)


def test_make_inputs_mask_is_zero_one_with_a_one_per_row():
    feeds = make_inputs(_embedding_model(), dim_values={"batch": 4, "seq": 16}, seed=3)
    mask = feeds["attention_mask"]
    assert mask.dtype == np.int64
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert (mask.sum(axis=-1) >= 1).all()


def test_make_inputs_symbolic_dims():
    model = _embedding_model()
    default = make_inputs(model)
    assert default["input_ids"].shape == (1, DEFAULT_DIM)
    # A dim shared by two inputs gets one size in both.
    assert default["attention_mask"].shape == default["input_ids"].shape

    assert make_inputs(model, batch=2)["input_ids"].shape == (2, DEFAULT_DIM)
    sized = make_inputs(model, dim_values={"batch": 3, "seq": 5})
    assert sized["input_ids"].shape == (3, 5) and sized["attention_mask"].shape == (3, 5)
    assert run(model, sized)["y"].shape == (3, 5, 8)


def test_make_inputs_is_deterministic_per_seed():
    model = _relu_model()
    a, b, c = make_inputs(model, seed=1), make_inputs(model, seed=1), make_inputs(model, seed=2)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    assert a["x"].dtype == np.float32


def test_make_inputs_other_integers_and_bools():
    model = _model(
        [
            helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["flag"], ["ff"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["kf", "ff"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("k", TensorProto.INT32, [64]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, [64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
    )
    feeds = make_inputs(model)
    assert feeds["k"].dtype == np.int32 and 0 <= feeds["k"].min() and feeds["k"].max() < 10
    assert feeds["flag"].dtype == np.bool_
    run(model, feeds)


def test_make_inputs_fp16():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])],
    )
    feeds = make_inputs(model)
    assert feeds["x"].dtype == np.float16
    assert verify(model, model).ok


def test_initializer_backed_input_gets_no_feed():
    model = _model(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.ones(3, dtype=np.float32), "bias")],
        ir_version=8,
    )
    feeds = make_inputs(model)
    assert list(feeds) == ["x"]
    np.testing.assert_allclose(run(model, feeds)["y"], feeds["x"] + 1.0)


@pytest.mark.parametrize("elem_type", [TensorProto.BFLOAT16])
def test_make_inputs_unsupported_types_fail_clearly(elem_type):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("s", elem_type, [2])],
        [helper.make_tensor_value_info("y", elem_type, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(GraphoptError, match="'s'"):
        make_inputs(model)


# --- load_inputs ---------------------------------------------------------------------------------


def test_load_inputs_roundtrip_and_missing_name(tmp_path):
    model = _embedding_model()
    feeds = make_inputs(model)
    full = tmp_path / "full.npz"
    np.savez(full, **feeds)
    loaded = load_inputs(full, model)
    assert set(loaded) == set(feeds)
    np.testing.assert_array_equal(loaded["input_ids"], feeds["input_ids"])

    partial = tmp_path / "partial.npz"
    np.savez(partial, input_ids=feeds["input_ids"])
    with pytest.raises(GraphoptError, match="attention_mask"):
        load_inputs(partial, model)


def test_load_inputs_wrong_dtype_rank_or_name(tmp_path):
    model = _relu_model()
    cases = {
        "dtype": {"x": np.zeros((2, 3), dtype=np.float64)},
        "rank": {"x": np.zeros((6,), dtype=np.float32)},
        "size": {"x": np.zeros((2, 4), dtype=np.float32)},
        "unknown": {"x": np.zeros((2, 3), dtype=np.float32), "z": np.zeros(1)},
    }
    for label, arrays in cases.items():
        path = tmp_path / f"{label}.npz"
        np.savez(path, **arrays)
        with pytest.raises(GraphoptError, match="'z'" if label == "unknown" else "'x'"):
            load_inputs(path, model)


def test_load_inputs_rejects_npy_and_missing_file(tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(GraphoptError, match="npz"):
        load_inputs(npy)
    with pytest.raises(GraphoptError, match="no such file"):
        load_inputs(tmp_path / "nope.npz")


# --- run / latency -------------------------------------------------------------------------------


def test_run_accepts_a_path(tmp_path):
    model = _relu_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feeds = make_inputs(str(path))
    np.testing.assert_array_equal(run(str(path), feeds)["y"], np.maximum(feeds["x"], 0))
    assert verify(str(path), model).ok


def test_run_session_error_is_one_line():
    model = _relu_model()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(GraphoptError) as info:
        run(model, {"x": np.zeros((2, 3), dtype=np.float32)})
    assert "\n" not in str(info.value)


def test_run_bad_feed_is_graphopt_error():
    with pytest.raises(GraphoptError):
        run(_relu_model(), {"x": np.zeros((2, 3), dtype=np.float64)})


def test_latency_ms_is_positive():
    model = _relu_model()
    ms = latency_ms(model, make_inputs(model), warmup=1, runs=3)
    assert ms > 0.0
    assert latency_ms(model, make_inputs(model), warmup=0, runs=1, optimized_by_ort=False) > 0.0
