"""The `graphopt` command line, run for real in a subprocess (see the `cli` fixture in conftest.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from graphopt import models, targets
from graphopt.pass_manager import registered_passes
from graphopt.pipelines import build_pipeline
from graphopt.verify import verify

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _pass_names(report: dict) -> list[str]:
    return [p["name"] for p in report["passes"]]


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == EXIT_OK, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory) -> Path:
    """zoo:bert_tiny saved as a plain file."""
    path = tmp_path_factory.mktemp("bert") / "bert_tiny.onnx"
    onnx.save_model(models.load("bert_tiny"), str(path))
    return path


@pytest.fixture(scope="module")
def bert_run(cli, tmp_path_factory):
    """One `run zoo:bert_tiny -o out.onnx --report r.json`, shared by the tests that inspect it."""
    work = tmp_path_factory.mktemp("bert-run")
    proc = cli("run", "zoo:bert_tiny", "-o", "out.onnx", "--report", "r.json", cwd=work)
    return proc, work / "out.onnx", work / "r.json"


# ---------------------------------------------------------------------------------------------
# run


def test_run_bert_tiny_exit_code_and_output(bert_run):
    proc, out, report = bert_run
    _assert_ok(proc)
    assert out.is_file()
    assert report.is_file()
    onnx.checker.check_model(str(out))
    # Loads in onnxruntime and computes what the original computes.
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    fidelity = verify(models.load("bert_tiny"), str(out))
    assert fidelity.ok, fidelity.to_dict()


def test_run_bert_tiny_report_json(bert_run):
    proc, out, report_path = bert_run
    _assert_ok(proc)
    report = _report(report_path)
    assert report["source"] == "zoo:bert_tiny"
    assert report["target"] == "x86_64"
    assert report["opt_level"] == 2
    assert report["after"]["nodes"] < report["before"]["nodes"]
    assert report["before"]["nodes"] == len(models.load("bert_tiny").graph.node)
    assert report["after"]["nodes"] == len(onnx.load(str(out)).graph.node)
    assert report["after"]["bytes"] > 0 and report["before"]["bytes"] > 0

    records = report["passes"]
    assert records, "no per-pass records"
    registered = set(registered_passes())
    for record in records:
        assert record["name"] in registered
        assert record["runs"] >= 1
        assert record["seconds"] >= 0
        assert isinstance(record["changed"], bool)
        assert isinstance(record["stats"], dict)
        assert record["rolled_back"] is None
    # The -O2 pipeline is what ran, every pass of it once or more.
    assert set(_pass_names(report)) == set(build_pipeline(2, targets.get("x86_64")).pass_names())
    assert any(r["changed"] for r in records)

    assert report["fidelity"] is not None
    assert report["fidelity"]["ok"] is True
    assert {o["name"] for o in report["fidelity"]["outputs"]} == {"last_hidden_state", "pooler_output"}
    assert all(o["within_tolerance"] for o in report["fidelity"]["outputs"])


def test_run_bert_tiny_summary_text(bert_run):
    proc, out, report_path = bert_run
    _assert_ok(proc)
    text = proc.stdout
    for word in ("nodes", "FLOPs", "parameters"):
        assert word in text, f"{word!r} missing from the summary:\n{text}"
    # The size row was labelled "file size" at first and is "model size" since sizes are estimated.
    assert "file size" in text or "model size" in text, f"no size row in the summary:\n{text}"
    for name in _pass_names(_report(report_path)):
        assert name in text, f"pass {name!r} missing from the summary:\n{text}"
    assert "wrote" in text and "out.onnx" in text
    # The node counts in the table are the report's.
    report = _report(report_path)
    row = next(line for line in text.splitlines() if re.search(r"\bnodes\b", line) and re.search(r"\d", line))
    assert str(report["before"]["nodes"]) in row and str(report["after"]["nodes"]) in row


def test_run_resnet18_arm64(cli, tmp_path):
    proc = cli("run", "zoo:resnet18", "--target", "arm64", "-o", "r18.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    assert (tmp_path / "r18.onnx").is_file()
    report = _report(tmp_path / "r.json")
    assert report["target"] == "arm64"
    # BatchNormalization folding may not exist yet: the count must at least not grow.
    assert report["after"]["nodes"] <= report["before"]["nodes"]
    assert report["fidelity"]["ok"] is True
    assert len(onnx.load(str(tmp_path / "r18.onnx"), load_external_data=False).graph.node) == report["after"]["nodes"]


def test_run_O0_changes_nothing(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "-O0", "-o", "o0.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    report = _report(tmp_path / "r.json")
    assert report["opt_level"] == 0
    assert report["after"]["nodes"] == report["before"]["nodes"]
    assert report["passes"] == []
    assert len(onnx.load(str(tmp_path / "o0.onnx")).graph.node) == len(models.load("bert_tiny").graph.node)


def test_run_explicit_passes(cli, tmp_path):
    # --no-cleanup: exactly the list (by default a list not ending in dce gets one appended).
    proc = cli("run", "zoo:bert_tiny", "--passes", "dce,cse", "--no-cleanup", "-o", "p.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    report = _report(tmp_path / "r.json")
    assert _pass_names(report) == ["dce", "cse"]
    assert all(r["runs"] == 1 for r in report["passes"])
    assert report["fidelity"]["ok"] is True


def test_run_disable_pass(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "--disable", "cse", "-o", "d.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    names = _pass_names(_report(tmp_path / "r.json"))
    assert "cse" not in names
    assert set(names) == set(build_pipeline(2, targets.get("x86_64")).pass_names()) - {"cse"}
    assert not re.search(r"^\W*cse\b", proc.stdout, re.MULTILINE), proc.stdout


def test_run_dump_ir(cli, tmp_path):
    dump = tmp_path / "ir"
    proc = cli("run", "zoo:bert_tiny", "--dump-ir", dump, "-o", "out.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    files = sorted(p.name for p in dump.iterdir())
    assert files, "--dump-ir wrote nothing"
    pattern = re.compile(r"^(\d{3})-([A-Za-z0-9_.-]+)\.onnx$")
    # Only the dumps: no temporary files or folders left behind.
    assert all(pattern.match(f) for f in files), files
    numbers = [int(pattern.match(f).group(1)) for f in files]
    assert numbers == list(range(1, len(files) + 1)), files
    dumped_passes = {pattern.match(f).group(2) for f in files}
    changed = {r["name"] for r in _report(tmp_path / "r.json")["passes"] if r["changed"]}
    assert dumped_passes == changed
    for f in files:
        onnx.checker.check_model(str(dump / f))
    # The last dump is the model that was written.
    last = onnx.load(str(dump / files[-1]))
    assert len(last.graph.node) == len(onnx.load(str(tmp_path / "out.onnx")).graph.node)


def test_run_verify_each(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "--verify-each", "-o", "v.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    report = _report(tmp_path / "r.json")
    assert report["fidelity"]["ok"] is True
    assert report["rollbacks"] == []
    assert report["after"]["nodes"] < report["before"]["nodes"]
    assert (tmp_path / "v.onnx").is_file()


def _bert_inputs(seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((1, seq), dtype=np.int64)
    mask[:, -3:] = 0
    return {"input_ids": rng.integers(0, 100, size=(1, seq), dtype=np.int64), "attention_mask": mask}


def test_run_inputs_npz(cli, tmp_path):
    np.savez(tmp_path / "x.npz", **_bert_inputs())
    proc = cli("run", "zoo:bert_tiny", "--inputs", "x.npz", "-o", "i.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    assert _report(tmp_path / "r.json")["fidelity"]["ok"] is True
    assert (tmp_path / "i.onnx").is_file()


def test_run_inputs_npz_missing_input(cli, tmp_path):
    inputs = _bert_inputs()
    del inputs["attention_mask"]
    np.savez(tmp_path / "x.npz", **inputs)
    proc = cli("run", "zoo:bert_tiny", "--inputs", "x.npz", "-o", "i.onnx", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "attention_mask" in proc.stderr
    assert not (tmp_path / "i.onnx").exists()


def test_run_inputs_npz_values_reach_onnxruntime(cli, tmp_path):
    # Token ids far outside the vocabulary: only a run on *these* arrays fails, so they were used.
    inputs = _bert_inputs()
    inputs["input_ids"][:] = 10**9
    np.savez(tmp_path / "x.npz", **inputs)
    proc = cli("run", "zoo:bert_tiny", "--inputs", "x.npz", "-o", "i.onnx", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "onnxruntime" in proc.stderr
    assert not (tmp_path / "i.onnx").exists()


def test_run_inputs_npz_wrong_shape(cli, tmp_path):
    np.savez(tmp_path / "x.npz", **_bert_inputs(seq=5))
    proc = cli("run", "zoo:bert_tiny", "--inputs", "x.npz", "-o", "i.onnx", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "input_ids" in proc.stderr or "attention_mask" in proc.stderr
    assert not (tmp_path / "i.onnx").exists()


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_json(cli):
    proc = cli("inspect", "--json", "zoo:resnet18")
    _assert_ok(proc)
    data = json.loads(proc.stdout)
    assert "ops" in data and "inputs" in data
    assert data["ops"]["Conv"]["count"] == 20
    assert data["ops"]["BatchNormalization"]["count"] == 20
    assert [i["name"] for i in data["inputs"]] == [i.name for i in models.load("resnet18").graph.input]
    assert data["stats"]["nodes"] == sum(v["count"] for v in data["ops"].values())


def test_inspect_text(cli):
    proc = cli("inspect", "zoo:resnet18")
    _assert_ok(proc)
    text = proc.stdout
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│") and len(line.split()) > 2}
    assert "Conv" in rows, text
    assert re.search(r"\b20\b", rows["Conv"]), rows["Conv"]
    for vi in models.load("resnet18").graph.input:
        assert vi.name in text
    assert "[1, 3, 224, 224]" in text


def test_inspect_shows_symbolic_dims(cli, tmp_path):
    # An input of shape [batch, 3]: the name of a symbolic dim must be shown, not swallowed.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "sym.onnx"))
    proc = cli("inspect", "sym.onnx", cwd=tmp_path)
    _assert_ok(proc)
    assert "[batch, 3]" in proc.stdout, proc.stdout
    data = json.loads(cli("inspect", "--json", "sym.onnx", cwd=tmp_path).stdout)
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": "[batch, 3]"}]


# ---------------------------------------------------------------------------------------------
# passes, targets, zoo


def test_passes_lists_every_registered_pass(cli):
    proc = cli("passes")
    _assert_ok(proc)
    listed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("│") and line.split()[1] != "│"}
    # Passes registered by other test modules in this process ("test-...") do not exist in the CLI's.
    library = {name for name in registered_passes() if not name.startswith("test-")}
    assert library <= listed, proc.stdout


def test_targets(cli):
    proc = cli("targets")
    _assert_ok(proc)
    for name in ("x86_64", "arm64", "cuda"):
        assert re.search(rf"\b{name}\b", proc.stdout), proc.stdout


def test_zoo(cli):
    proc = cli("zoo")
    _assert_ok(proc)
    for name in ("resnet18", "bert_tiny", "digits_cnn"):
        assert f"zoo:{name}" in proc.stdout


def test_zoo_descriptions_are_not_mangled(cli):
    # Descriptions contain "[batch,1,8,8]"; they must come out as written.
    proc = cli("zoo")
    _assert_ok(proc)
    assert "[batch,1,8,8]" in proc.stdout, proc.stdout


def test_console_script_entry_point(cli):
    exe = shutil.which("graphopt") or str(Path(sys.executable).with_name("graphopt"))
    assert Path(exe).is_file(), "the graphopt console script is not installed"
    proc = cli("zoo", exe=[exe])
    _assert_ok(proc)
    assert "zoo:resnet18" in proc.stdout
    version = cli("--version", exe=[exe])
    _assert_ok(version)
    assert "0.1.0" in version.stdout
    usage = cli("--help", exe=[exe])
    _assert_ok(usage)
    for command in ("run", "inspect", "passes", "targets", "zoo", "compare"):
        assert command in usage.stdout


# ---------------------------------------------------------------------------------------------
# compare


def _perturbed(model: onnx.ModelProto, output: str, delta: float = 1.0) -> onnx.ModelProto:
    """A copy whose `output` has `delta` added to it (same name, shape and dtype)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    raw = output + "_unperturbed"
    for node in out.graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
        node.input[:] = [raw if i == output else i for i in node.input]
    out.graph.initializer.append(numpy_helper.from_array(np.array(delta, dtype=np.float32), "perturbation"))
    out.graph.node.append(helper.make_node("Add", [raw, "perturbation"], [output], name="perturb"))
    onnx.checker.check_model(out)
    return out


def _latency_rows(text: str, *names: str) -> dict[str, str]:
    rows = {}
    for name in names:
        row = next((line for line in text.splitlines() if name in line and re.search(r"\d+(\.\d+)? ms", line)), None)
        assert row is not None, f"no latency row for {name}:\n{text}"
        rows[name] = row
    return rows


def test_compare_optimized_copy(cli, bert_file, tmp_path):
    shutil.copy(bert_file, tmp_path / "a.onnx")
    _assert_ok(cli("run", "a.onnx", "-o", "b.onnx", cwd=tmp_path))
    proc = cli("compare", "a.onnx", "b.onnx", "--runs", "3", cwd=tmp_path)
    _assert_ok(proc)
    rows = _latency_rows(proc.stdout, "a.onnx", "b.onnx")
    assert str(len(onnx.load(str(tmp_path / "a.onnx")).graph.node)) in rows["a.onnx"]
    assert str(len(onnx.load(str(tmp_path / "b.onnx")).graph.node)) in rows["b.onnx"]
    assert "pooler_output" in proc.stdout and "last_hidden_state" in proc.stdout


def test_compare_perturbed_model_fails(cli, bert_file, tmp_path):
    shutil.copy(bert_file, tmp_path / "a.onnx")
    onnx.save_model(_perturbed(onnx.load(str(bert_file)), "pooler_output"), str(tmp_path / "b.onnx"))
    proc = cli("compare", "a.onnx", "b.onnx", "--runs", "3", cwd=tmp_path)
    assert proc.returncode == EXIT_VERIFICATION_FAILED, proc.stdout + proc.stderr
    _latency_rows(proc.stdout, "a.onnx", "b.onnx")
    row = next(line for line in proc.stdout.splitlines() if "pooler_output" in line)
    assert "no" in row.split(), row


def test_compare_zoo_against_file(cli, bert_run):
    proc, out, _ = bert_run
    _assert_ok(proc)
    cmp = cli("compare", "zoo:bert_tiny", out, "--runs", "2")
    _assert_ok(cmp)
    _latency_rows(cmp.stdout, "zoo:bert_tiny")


# ---------------------------------------------------------------------------------------------
# --no-verify


def test_run_no_verify(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "--no-verify", "-o", "nv.onnx", "--report", "r.json", cwd=tmp_path)
    _assert_ok(proc)
    assert _report(tmp_path / "r.json")["fidelity"] is None
    assert "fidelity" not in proc.stdout
    assert (tmp_path / "nv.onnx").is_file()
