"""The model zoo (graphopt.models): every model checks, runs in onnxruntime, and looks like an export."""

from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import models
from graphopt.errors import GraphoptError

SMALL = ["resnet18", "mobilenetv2", "bert_tiny", "digits_cnn"]
LARGE = ["resnet50", "bert_base"]

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64}


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """digits_cnn trains into a throwaway cache, never the user's ~/.cache/graphopt."""
    old = os.environ.get("GRAPHOPT_CACHE_DIR")
    os.environ["GRAPHOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("graphopt-cache"))
    yield
    if old is None:
        os.environ.pop("GRAPHOPT_CACHE_DIR", None)
    else:
        os.environ["GRAPHOPT_CACHE_DIR"] = old


_built: dict[str, onnx.ModelProto] = {}


def _model(name: str) -> onnx.ModelProto:
    if name not in _built:
        _built[name] = models.load(name)
    return _built[name]


def _dims(value_info: onnx.ValueInfoProto, batch: int = 1) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else batch for d in value_info.type.tensor_type.shape.dim]


def _feed(model: onnx.ModelProto, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for vi in model.graph.input:
        dtype = _NP_TYPES[vi.type.tensor_type.elem_type]
        shape = _dims(vi, batch)
        if vi.name == "attention_mask":
            arr = np.ones(shape, dtype=dtype)
            arr[..., -2:] = 0  # some padding, so the mask arithmetic matters
        elif dtype == np.int64:
            arr = rng.integers(0, 100, size=shape, dtype=np.int64)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feed[vi.name] = arr
    return feed


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _check_and_run(name: str) -> None:
    m = _model(name)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    assert {(o.domain, o.version) for o in m.opset_import} == {("", 17)}
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique and non-empty"
    inits = [t.name for t in m.graph.initializer]
    assert len(set(inits)) == len(inits)
    batch = 3 if name == "digits_cnn" else 1
    outs = _run(m, _feed(m, batch))
    assert len(outs) == len(m.graph.output)
    for out, vi in zip(outs, m.graph.output):
        assert list(out.shape) == _dims(vi, batch), vi.name
        assert np.isfinite(out).all(), vi.name
        assert out.std() > 0, f"{vi.name} is constant"


# --- registry ----------------------------------------------------------------------------------
def test_available_lists_the_zoo():
    assert models.available() == sorted(SMALL + LARGE)


def test_unknown_name_is_a_graphopt_error():
    with pytest.raises(GraphoptError, match=r"unknown zoo model 'nope'; known: .*resnet18"):
        models.load("nope")
    with pytest.raises(GraphoptError):
        models.describe("nope")
    with pytest.raises(GraphoptError):
        models.eval_data("nope")


def test_describe_is_one_line():
    for name in models.available():
        text = models.describe(name)
        assert text and "\n" not in text


def test_eval_data_only_for_trained_models():
    for name in models.available():
        if name != "digits_cnn":
            assert models.eval_data(name) is None


# --- small models -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_small_model_checks_and_runs(name):
    _check_and_run(name)


def test_cnn_inputs_outputs_like_torchvision_export():
    for name in ("resnet18", "mobilenetv2"):
        m = _model(name)
        assert [(vi.name, _dims(vi)) for vi in m.graph.input] == [("input", [1, 3, 224, 224])]
        assert [(vi.name, _dims(vi)) for vi in m.graph.output] == [("output", [1, 1000])]
        ops = Counter(n.op_type for n in m.graph.node)
        # BatchNormalization is not folded into Conv, and every Conv is bias-free
        assert ops["BatchNormalization"] == ops["Conv"]
        assert all(len(n.input) == 2 for n in m.graph.node if n.op_type == "Conv")
        assert ops["GlobalAveragePool"] == ops["Flatten"] == ops["Gemm"] == 1
    r18 = Counter(n.op_type for n in _model("resnet18").graph.node)
    assert (r18["Conv"], r18["Relu"], r18["Add"]) == (20, 17, 8)
    assert "/layer1/layer1.0/conv1/Conv" in {n.name for n in _model("resnet18").graph.node}
    mb = _model("mobilenetv2")
    mbops = Counter(n.op_type for n in mb.graph.node)
    assert (mbops["Conv"], mbops["Clip"], mbops["Add"]) == (52, 35, 10)
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in mb.graph.node)


def test_bert_tiny_is_deterministic():
    assert models.load("bert_tiny").SerializeToString() == models.load("bert_tiny").SerializeToString()


def _producers(m: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in m.graph.node for o in n.output}


def test_bert_tiny_has_exporter_patterns():
    m = _model("bert_tiny")
    ops = Counter(n.op_type for n in m.graph.node)
    for op in ("Erf", "ReduceMean", "Softmax", "Sqrt", "Pow", "Identity", "Constant", "Cast", "Tanh"):
        assert ops[op] > 0, op
    assert ops["LayerNormalization"] == 0 and ops["Gelu"] == 0  # decomposed, as the legacy exporter emits them
    prod = _producers(m)

    def chain(reshape: onnx.NodeProto) -> bool:
        concat = prod.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat":
            return False
        for piece in concat.input:
            unsq = prod.get(piece)
            if unsq is None or unsq.op_type != "Unsqueeze":
                continue
            gather = prod.get(unsq.input[0])
            if gather is None or gather.op_type != "Gather":
                continue
            shape = prod.get(gather.input[0])
            if shape is not None and shape.op_type == "Shape":
                return True
        return False

    reshapes = [n for n in m.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(chain(r) for r in reshapes)
    assert [(vi.name, _dims(vi)) for vi in m.graph.input] == [("input_ids", [1, 16]), ("attention_mask", [1, 16])]
    assert [(vi.name, _dims(vi)) for vi in m.graph.output] == [
        ("last_hidden_state", [1, 16, 128]),
        ("pooler_output", [1, 128]),
    ]


def test_bert_attention_mask_matters():
    m = _model("bert_tiny")
    feed = _feed(m)
    full = dict(feed, attention_mask=np.ones_like(feed["attention_mask"]))
    a = _run(m, feed)[0]
    b = _run(m, full)[0]
    assert not np.allclose(a, b)


# --- digits_cnn ----------------------------------------------------------------------------------
def test_digits_cnn_accuracy_in_onnxruntime():
    feed, labels = models.eval_data("digits_cnn")
    assert feed["input"].shape[1:] == (1, 8, 8) and feed["input"].dtype == np.float32
    assert len(labels) == len(feed["input"]) == 450  # 25 % of 1797
    assert feed["input"].min() >= 0 and feed["input"].max() <= 1
    logits = _run(_model("digits_cnn"), feed)[0]
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.9, accuracy


def test_digits_cnn_is_cached():
    from graphopt.models import digits

    first = _model("digits_cnn")
    assert digits.cache_path().is_file()
    assert str(digits.cache_path()).startswith(os.environ["GRAPHOPT_CACHE_DIR"])
    t = time.perf_counter()
    again = models.load("digits_cnn")
    assert time.perf_counter() - t < 1.0
    assert again.SerializeToString() == first.SerializeToString()
    ops = [n.op_type for n in first.graph.node]
    assert ops.count("BatchNormalization") == 2
    assert first.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


# --- full-size models ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_model_checks_and_runs(name):
    try:
        _check_and_run(name)
    finally:
        _built.pop(name, None)  # free the weights (bert_base holds ~440 MB)
