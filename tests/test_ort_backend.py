"""onnxruntime artifacts (targets/backends/onnxruntime.py): .ort conversion, session JSON, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import api, targets
from graphopt.errors import GraphoptError
from graphopt.targets.backends import onnxruntime as ort_backend

LEVELS = set(ort.GraphOptimizationLevel.__members__)


def _conv_model() -> onnx.ModelProto:
    """Conv+Relu twice, then Reshape+MatMul: onnxruntime fuses the convs at the extended level."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal((8 * 8 * 8, 10)).astype(np.float32), "M"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "M"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _fused_conv_model() -> onnx.ModelProto:
    """A com.microsoft FusedConv: the CPU provider runs it, cuda never emits it (cuda.toml)."""
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "W")
    node = helper.make_node("FusedConv", ["x", "W"], ["y"], domain="com.microsoft", activation="Relu", name="the_fused_conv")
    graph = helper.make_graph(
        [node], "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _subgraph_model(op: str, domain: str) -> onnx.ModelProto:
    """`op` of `domain` inside the then-branch of an If: the check must walk subgraphs."""
    then_branch = helper.make_graph(
        [helper.make_node(op, ["x", "axis"], ["t"], domain=domain, name="deep_node")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0, np.int32), "axis")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="plain")], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def _single_node_model(op: str, domain: str, opset: int = 17, **attrs) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], domain=domain, name="lonely", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple]:
    """name -> (path of the .onnx, feeds): a hand-built convnet and graphopt's BERT per target."""
    folder = tmp_path_factory.mktemp("models")
    conv = folder / "conv.onnx"
    onnx.save(_conv_model(), conv)
    conv_feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    found = {"conv": (conv, conv_feeds)}
    bert_feeds = {
        "input_ids": np.random.default_rng(2).integers(0, 100, (1, 16)).astype(np.int64),
        "attention_mask": np.concatenate([np.ones((1, 12), np.int64), np.zeros((1, 4), np.int64)], axis=1),
    }
    for target in ("x86_64", "cuda"):
        path = folder / f"bert_{target}.onnx"
        api.optimize("zoo:bert_tiny", target=target, opt_level=3, verify=False).save(path)
        found[f"bert_{target}"] = (path, bert_feeds)
    return found


def _run(session: ort.InferenceSession, feeds) -> list[np.ndarray]:
    return session.run(None, feeds)


def _reference(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _op_types(path, level: str = "ORT_DISABLE_ALL") -> set[str]:
    """The op types onnxruntime executes for `path` loaded at `level` (from its profiler)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.__members__[level]
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in session.get_inputs()}
    session.run(None, feeds)
    profile = session.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    os.remove(profile)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


# ---------------------------------------------------------------------------------------------
# .ort artifacts


@pytest.mark.parametrize(
    "model_name, target_name",
    [("conv", "x86_64"), ("conv", "arm64"), ("conv", "cuda"), ("bert_x86_64", "x86_64"), ("bert_cuda", "cuda")],
)
def test_ort_artifact_computes_what_the_onnx_does(models, tmp_path, model_name, target_name):
    source, feeds = models[model_name]
    target = targets.get(target_name)
    out = tmp_path / "model.ort"
    written = ort_backend.write_artifact(source, target, "ort", out)
    json_path = tmp_path / "model.ort.session.json"
    assert written == [out, json_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ort", "model.ort.session.json"]  # no temp files
    assert out.read_bytes()[4:8] == b"ORTM"  # a flatbuffer with the ORT file identifier, not a copy of the .onnx

    expected = _run(_reference(source), feeds)
    plain = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    options = json.loads(json_path.read_text())
    assert options["format"] == "ort" and options["target"] == target.full_name
    as_json_says = ort_backend.make_session(out, options)
    for session in (plain, as_json_says):
        got = _run(session, feeds)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_the_conversion_level_depends_on_the_provider(models, tmp_path):
    source, _ = models["conv"]
    cpu_ort, gpu_ort = tmp_path / "cpu.ort", tmp_path / "gpu.ort"
    assert ort_backend.convert_to_ort(source, cpu_ort, targets.get("x86_64")) == "ORT_ENABLE_ALL"
    assert ort_backend.convert_to_ort(source, gpu_ort, targets.get("cuda")) == "ORT_ENABLE_BASIC"
    cpu_ops, gpu_ops = _op_types(cpu_ort), _op_types(gpu_ort)
    # CPU: fusions baked in, but not the machine-specific NCHWc layout (ReorderInput/ReorderOutput).
    assert "FusedConv" in cpu_ops and "Conv" not in cpu_ops
    assert not {"ReorderInput", "ReorderOutput"} & cpu_ops
    # GPU: no CPU-provider fusion baked in; the standard ops stay for the CUDA provider to place.
    assert {"Conv", "Relu"} <= gpu_ops and "FusedConv" not in gpu_ops


def test_onnxruntime_adds_nothing_to_an_ort_at_load(models, tmp_path):
    """Why the JSON says ORT_DISABLE_ALL for a .ort: a full build optimizes an ORT-format model no
    further at load, while the same level on the .onnx adds the NCHWc layout (x86_64)."""
    source, _ = models["conv"]
    out = tmp_path / "m.ort"
    ort_backend.convert_to_ort(source, out, targets.get("x86_64"))
    assert _op_types(out, "ORT_ENABLE_ALL") == _op_types(out, "ORT_DISABLE_ALL")
    if targets.get("x86_64").can_emit("ReorderInput", "com.microsoft.nchwc"):  # an x86_64 onnxruntime build
        assert {"ReorderInput", "ReorderOutput"} & _op_types(source, "ORT_ENABLE_ALL")


# ---------------------------------------------------------------------------------------------
# Session options


@pytest.mark.parametrize("name", ["x86_64", "x86_64:avx512", "arm64", "arm64:cortex-a76", "cuda", "cuda:h100"])
@pytest.mark.parametrize("fmt", ["onnx", "ort"])
def test_session_options(name, fmt):
    target = targets.get(name)
    options = ort_backend.session_options(target, fmt)
    assert json.loads(json.dumps(options)) == options
    assert options["target"] == target.full_name and options["format"] == fmt
    assert options["onnxruntime"] == ort.__version__
    assert options["inter_op_num_threads"] == 1 and options["execution_mode"] == "ORT_SEQUENTIAL"
    assert options["execution_mode"] in ort.ExecutionMode.__members__
    assert options["graph_optimization_level"] in LEVELS
    providers = [p if isinstance(p, str) else p[0] for p in options["execution_providers"]]
    if target.name == "cuda":
        assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert options["execution_providers"][0][1]["device_id"] == 0
        assert options["intra_op_num_threads"] == 0  # SMs are not host threads
        assert options["graph_optimization_level"] == ("ORT_ENABLE_EXTENDED" if fmt == "onnx" else "ORT_DISABLE_ALL")
    else:
        assert providers == ["CPUExecutionProvider"]
        assert options["intra_op_num_threads"] == target.hardware.cores
        assert options["graph_optimization_level"] == ("ORT_ENABLE_ALL" if fmt == "onnx" else "ORT_DISABLE_ALL")
    assert {"execution_providers", "intra_op_num_threads", "graph_optimization_level"} <= set(options["why"])
    assert all(isinstance(v, str) and "\n" not in v for v in options["why"].values())
    if fmt == "ort":
        assert ort_backend.conversion_level(target) in options["why"]["conversion"]


def test_threads_override_and_the_variants_cores():
    assert ort_backend.session_options(targets.get("x86_64:avx512"), "onnx")["intra_op_num_threads"] == 28
    assert ort_backend.session_options(targets.get("arm64:cortex-a76"), "onnx")["intra_op_num_threads"] == 4
    assert ort_backend.session_options(targets.get("x86_64:avx512"), "onnx", threads=3)["intra_op_num_threads"] == 3


def test_applied_session_options_and_provider_fallback(models):
    options = ort_backend.session_options(targets.get("cuda"), "onnx", threads=2)
    so, providers = ort_backend.apply_session_options(options, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers == [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    # This wheel has no CUDA provider: the session falls back to CPU alone, and says so.
    _, providers = ort_backend.apply_session_options(options, ["CPUExecutionProvider"])
    assert providers == ["CPUExecutionProvider"]
    session = ort_backend.make_session(models["conv"][0], options, ["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(GraphoptError, match="graph_optimization_level"):
        ort_backend.apply_session_options({**options, "graph_optimization_level": "ORT_ENABLE_EVERYTHING"})


def test_onnx_artifact_writes_the_model_and_its_json(models, tmp_path):
    source, feeds = models["conv"]
    out = tmp_path / "deploy.onnx"
    written = ort_backend.write_artifact(source, targets.get("x86_64"), "onnx", out)
    assert written == [out, tmp_path / "deploy.onnx.session.json"]
    assert out.read_bytes() == source.read_bytes()
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not left private by mkstemp
    options = json.loads(written[1].read_text())
    assert options["format"] == "onnx" and options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    np.testing.assert_allclose(
        _run(ort_backend.make_session(out, options), feeds)[0], _run(_reference(source), feeds)[0], rtol=1e-5, atol=1e-5
    )
    # generic: standard ONNX for runtimes graphopt does not model: the model, and no JSON.
    generic_out = tmp_path / "generic.onnx"
    assert ort_backend.write_artifact(source, targets.get("generic"), "onnx", generic_out) == [generic_out]
    assert not (tmp_path / "generic.onnx.session.json").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Refusals


def _refused(tmp_path, model_path, target_name, fmt, match) -> str:
    out = tmp_path / "out" / f"model.{fmt}"
    with pytest.raises(GraphoptError, match=match) as info:
        ort_backend.write_artifact(model_path, targets.get(target_name), fmt, out)
    message = str(info.value)
    assert "\n" not in message
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing written, no temp file
    return message


def test_refuses_an_op_cuda_does_not_run(tmp_path):
    path = tmp_path / "fused.onnx"
    onnx.save(_fused_conv_model(), path)
    assert not targets.get("cuda").can_emit("FusedConv", "com.microsoft", 17)
    for fmt in ("ort", "onnx"):
        message = _refused(tmp_path, path, "cuda", fmt, "node 'the_fused_conv'")
        assert "com.microsoft::FusedConv" in message and "cuda:a100" in message
    # The same model is fine for x86_64, whose CPU provider runs it.
    assert ort_backend.write_artifact(path, targets.get("x86_64"), "ort", tmp_path / "ok" / "m.ort")


def test_refusal_names_a_node_inside_a_subgraph():
    cuda = targets.get("cuda")
    assert not cuda.can_emit("ExpandDims", "com.microsoft", 17) and targets.get("x86_64").can_emit("ExpandDims", "com.microsoft", 17)
    model = _subgraph_model("ExpandDims", "com.microsoft")
    with pytest.raises(GraphoptError) as info:
        ort_backend.check_runs_on(model, cuda)
    assert str(info.value).startswith("node 'deep_node' (com.microsoft::ExpandDims) does not run on cuda:a100 (CUDAExecutionProvider has no kernel for it)")
    ort_backend.check_runs_on(model, targets.get("x86_64"))


def test_generic_refuses_contrib_ops_and_the_ort_format(models, tmp_path):
    bert, _ = models["bert_x86_64"]
    message = _refused(tmp_path, bert, "generic", "onnx", r"\(com\.microsoft::(Attention|Gelu)\) does not run on generic")
    assert "standard ONNX only" in message
    conv, _ = models["conv"]
    _refused(tmp_path, conv, "generic", "ort", "use --format onnx")
    _refused(tmp_path, conv, "x86_64", "tflite", "unknown artifact format 'tflite'")
    ort_backend.check_runs_on(onnx.load(conv), targets.get("generic"))


def test_ops_of_the_input_model_are_checked_too():
    # A standard op newer than the model's opset (Gelu is opset 20), and an op no provider has.
    with pytest.raises(GraphoptError, match=r"node 'lonely' \(Gelu\) does not run on x86_64:host \(no ONNX op Gelu at opset 17\)"):
        ort_backend.check_runs_on(_single_node_model("Gelu", ""), targets.get("x86_64"))
    with pytest.raises(GraphoptError, match=r"node 'lonely' \(com\.microsoft::NoSuchOp\)"):
        ort_backend.check_runs_on(_single_node_model("NoSuchOp", "com.microsoft"), targets.get("x86_64"))
    # arm64 never emits the x86-only NCHWc layout ops.
    with pytest.raises(GraphoptError, match=r"never_emits in targets/data/arm64\.toml"):
        ort_backend.check_runs_on(_single_node_model("ReorderInput", "com.microsoft.nchwc"), targets.get("arm64"))


def test_ai_onnx_ml_ops_run_on_the_cpu_fallback():
    model = _single_node_model("Normalizer", "ai.onnx.ml", norm="L2")
    ort_backend.check_runs_on(model, targets.get("cuda"))  # onnxruntime places them on the CPU provider
    ort_backend.check_runs_on(model, targets.get("x86_64"))
    with pytest.raises(GraphoptError, match=r"\(ai\.onnx\.ml::Normalizer\) does not run on generic"):
        ort_backend.check_runs_on(model, targets.get("generic"))


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_a_failed_conversion_leaves_no_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    model = _single_node_model("Relu", "")
    model.graph.node[0].input[0] = "nowhere"  # an input nothing produces: onnxruntime refuses to load it
    onnx.save(model, bad)
    out = tmp_path / "bad.ort"
    with pytest.raises(GraphoptError, match="onnxruntime could not convert") as info:
        ort_backend.convert_to_ort(bad, out, targets.get("x86_64"))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
    # An artifact already there stays as it was.
    out.write_bytes(b"previous artifact")
    with pytest.raises(GraphoptError):
        ort_backend.write_artifact(bad, targets.get("x86_64"), "ort", out)
    assert out.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "bad.ort"]


def test_a_conversion_that_dies_midway_leaves_no_half_written_file(models, tmp_path, monkeypatch):
    """onnxruntime writing part of the file and then failing (a full disk, a crash in a
    transformer) must leave nothing at the artifact's path: it writes to a temporary file."""
    def half_then_fail(path, options, *args, **kwargs):
        with open(options.optimized_model_filepath, "wb") as f:
            f.write(b"\x00\x00\x00\x00ORTM half")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(ort, "InferenceSession", half_then_fail)
    out = tmp_path / "out" / "model.ort"
    with pytest.raises(GraphoptError, match="No space left on device"):
        ort_backend.write_artifact(models["conv"][0], targets.get("x86_64"), "ort", out)
    assert list(out.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# graphopt run --format


def test_run_format_ort_writes_an_artifact_that_matches_the_onnx(models, tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    source, feeds = models["conv"]
    onnx_out, ort_out = tmp_path / "m.onnx", tmp_path / "m.ort"
    for fmt, out in (("onnx", onnx_out), ("ort", ort_out)):
        result = CliRunner().invoke(cli, ["run", str(source), "-O3", "--format", fmt, "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
    assert ort_out.read_bytes()[4:8] == b"ORTM"
    options = json.loads((tmp_path / "m.ort.session.json").read_text())
    assert options["format"] == "ort" and options["target"].startswith("x86_64")
    assert json.loads((tmp_path / "m.onnx.session.json").read_text())["graph_optimization_level"] == "ORT_ENABLE_ALL"
    expected = _run(_reference(onnx_out), feeds)
    got = _run(ort_backend.make_session(ort_out, options), feeds)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.session.json", "m.ort", "m.ort.session.json"]


def test_run_refuses_an_op_the_target_does_not_run_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    source = tmp_path / "in.onnx"
    proto = _single_node_model("ExpandDims", "com.microsoft")
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]))  # graphopt's loader wants a type
    onnx.save(proto, source)
    out = tmp_path / "out" / "m.ort"
    out.parent.mkdir()
    for fmt in ("onnx", "ort"):
        result = CliRunner().invoke(cli, ["run", str(source), "--target", "cuda", "--format", fmt, "-o", str(out), "--no-verify"])
        assert result.exit_code == 2  # bad input, as every one-line refusal
        assert "node 'lonely' (com.microsoft::ExpandDims) does not run on cuda" in result.output
        assert "Traceback" not in result.output and list(out.parent.iterdir()) == []
    result = CliRunner().invoke(cli, ["run", str(source), "--target", "generic", "--format", "ort", "-o", str(out)])
    assert result.exit_code == 2 and "no .ort artifact" in result.output
