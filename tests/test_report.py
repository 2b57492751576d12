"""What the command line tells a user: the summary, the JSON report, compare, zoo export, feedback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import models
from graphopt.cli import _speed_words


@pytest.fixture(scope="module")
def bert_run(cli, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    proc = cli("run", "zoo:bert_tiny", "-o", "out.onnx", "--report", "r.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return proc, work


def test_summary_has_a_per_op_table_of_the_biggest_changes(bert_run):
    proc, work = bert_run
    report = json.loads((work / "r.json").read_text())
    before, after = report["before"]["ops"], report["after"]["ops"]
    assert sum(before.values()) == report["before"]["nodes"]
    assert sum(after.values()) == report["after"]["nodes"]
    assert "op types that changed most" in proc.stdout
    # The op whose count fell most heads the table, with both counts and the change.
    top = max(before, key=lambda op: before[op] - after.get(op, 0))
    row = next(line for line in proc.stdout.splitlines() if f" {top} " in line and "│" in line)
    assert str(before[top]) in row and f"{after.get(top, 0) - before[top]:+d}" in row


def test_verbose_lists_every_op_type(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "-o", tmp_path / "o.onnx", "--verbose")
    assert proc.returncode == 0, proc.stderr
    report_ops = ("MatMul", "Softmax", "Gather", "Shape")
    table = proc.stdout.split("op types")[1]
    for op in report_ops:
        assert f" {op} " in table


def test_json_report_has_versions_output_and_histograms(bert_run):
    _, work = bert_run
    report = json.loads((work / "r.json").read_text())
    assert report["output"] == "out.onnx"
    assert report["versions"]["graphopt"] == graphopt.__version__
    assert report["versions"]["onnx"] == onnx.__version__
    assert report["versions"]["onnxruntime"]
    assert report["before"]["ops"]["MatMul"] == report["after"]["ops"]["MatMul"] == 16
    assert report["verification_inputs"]["source"] == "generated"
    # Folding reveals every activation shape of this static-input BERT: its MatMuls count.
    assert report["after"]["flops_exact"] is True
    assert report["before"]["flops"] >= report["after"]["flops"] > 10_000_000


def test_quiet_prints_nothing_but_still_writes(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "-o", tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert (tmp_path / "o.onnx").is_file()


def test_piped_stderr_gets_one_plain_line_per_phase(bert_run):
    proc, _ = bert_run
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"graphopt: loading zoo:bert_tiny: done in \d+\.\d s", lines[0])
    assert any(line.startswith("graphopt: optimizing bert_tiny.onnx for x86_64 at -O2: done in") for line in lines)
    assert any(line.startswith("graphopt: verifying against the original in onnxruntime: done in") for line in lines)
    # Verification happens while the file is written: the inner phase ends first.
    phases = [line.split(": done in")[0] for line in lines if ": done in" in line]
    assert phases.index("graphopt: verifying against the original in onnxruntime") < phases.index("graphopt: writing out.onnx")
    # No spinner frames or control characters in a log.
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr


def test_a_closed_stdout_is_not_a_failure(tmp_path):
    """`graphopt run ... | head -1`: the reader goes away; the run still finishes and exits 0."""
    env = dict(os.environ, NO_COLOR="1", COLUMNS="120")
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphopt.cli", "run", "zoo:bert_tiny", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    proc.stdout.read(1)  # like head: read the beginning, then close the pipe
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert out.is_file()


def test_compare_json_speed_and_fidelity(cli, tmp_path):
    a = tmp_path / "a.onnx"
    onnx.save(models.load("bert_tiny"), a)
    b = tmp_path / "b.onnx"
    assert cli("run", a, "-o", b, "-q").returncode == 0
    proc = cli("compare", a, b, "--json", "--runs", "3")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fidelity"]["ok"] is True
    assert data["a"]["nodes"] > data["b"]["nodes"]
    assert data["speedup"] == pytest.approx(data["a"]["latency_ms"] / data["b"]["latency_ms"])


@pytest.mark.parametrize("speedup, words", [(1.25, "1.25x faster"), (0.8, "1.25x slower"), (1.001, "same speed"), (None, "-")])
def test_speed_words_never_call_a_slower_model_faster(speedup, words):
    assert _speed_words(speedup) == words


def _relu(input_name: str, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", [input_name], ["y"])], "g",
        [helper.make_tensor_value_info(input_name, dtype, [1, 4])],
        [helper.make_tensor_value_info("y", dtype, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "other, message",
    [
        (_relu("z"), "have different interfaces (inputs only in A: x; inputs only in B: z)"),
        (_relu("x", TensorProto.DOUBLE), "input 'x' is float rank 2 in A, double rank 2 in B"),
    ],
)
def test_compare_refuses_models_with_different_interfaces(cli, tmp_path, other, message):
    onnx.save(_relu("x"), tmp_path / "a.onnx")
    onnx.save(other, tmp_path / "b.onnx")
    proc = cli("compare", tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_zoo_export_writes_the_model(cli, tmp_path):
    proc = cli("zoo", "export", "bert_tiny", "-o", tmp_path / "bert.onnx")
    assert proc.returncode == 0, proc.stderr
    saved = onnx.load(tmp_path / "bert.onnx")
    built = models.load("bert_tiny")
    onnx.checker.check_model(saved, full_check=True)
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in built.graph.node]
    assert [i.name for i in saved.graph.input] == [i.name for i in built.graph.input]
    assert {t.name for t in saved.graph.initializer} == {t.name for t in built.graph.initializer}
    listing = cli("zoo")
    assert "zoo:resnet18" in listing.stdout
    assert cli("zoo", "export", "nosuch", "-o", tmp_path / "x.onnx").returncode == 2
    assert not (tmp_path / "x.onnx").exists()


def test_first_use_of_digits_says_it_trains(tmp_path, monkeypatch):
    from graphopt.models import digits

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    notes = []
    entry = models._entry("digits_cnn")
    assert "training zoo:digits_cnn" in entry.first_use()
    digits.cache_path().parent.mkdir(parents=True, exist_ok=True)
    np.savez(digits.cache_path(), x=np.zeros(1))
    assert entry.first_use() is None
    # A model built from code alone has nothing slow to announce.
    models.load("bert_tiny", notify=notes.append)
    assert notes == []


def test_progress_names_the_running_pass_and_its_iteration():
    import io

    from rich.console import Console

    from graphopt.feedback import Feedback, PassProgress
    from graphopt.optimize import optimize_model

    terminal = Console(file=io.StringIO(), force_terminal=True)
    feedback = Feedback(terminal)
    assert feedback.live
    seen = []
    feedback.update = seen.append  # what the live status would show, in order
    with feedback.phase("optimizing"):
        optimize_model(models.load("bert_tiny"), instruments=[PassProgress(feedback)])
    assert any(s.startswith("fold-constants (iteration 1,") for s in seen)
    assert any(s.startswith("dce (iteration 2,") for s in seen)  # -O2 runs to a fixed point
    # Not on a terminal: no live status, one plain line per phase instead.
    log = io.StringIO()
    plain = Feedback(Console(file=log, force_terminal=False))
    with plain.phase("optimizing x"):
        plain.update("dce (iteration 1)")
    assert re.fullmatch(r"graphopt: optimizing x: done in \d+\.\d s\n", log.getvalue())
    # A phase that fails says nothing: its error is the one line a user needs.
    failed = io.StringIO()
    with pytest.raises(ValueError):
        with Feedback(Console(file=failed, force_terminal=False)).phase("loading x"):
            raise ValueError
    assert failed.getvalue() == ""


def test_summary_says_why_flops_are_a_lower_bound(cli, tmp_path):
    loose = cli("run", "zoo:digits_cnn", "-o", tmp_path / "a.onnx")
    assert loose.returncode == 0, loose.stderr
    assert "(lower bound)" in loose.stdout
    assert "the inputs have symbolic dims (batch): --dim SYMBOL=VALUE" in " ".join(loose.stdout.split())
    bound = cli("run", "zoo:digits_cnn", "-o", tmp_path / "b.onnx", "--dim", "batch=2")
    assert bound.returncode == 0, bound.stderr
    assert "lower bound" not in bound.stdout.split("op types")[0]


def test_compare_with_dims_runs_both_at_those_sizes(cli, tmp_path):
    a = tmp_path / "digits.onnx"
    assert cli("zoo", "export", "digits_cnn", "-o", a, "-q").returncode == 0
    b = tmp_path / "digits3.onnx"
    assert cli("run", a, "-o", b, "--dim", "batch=3", "-q").returncode == 0
    proc = cli("compare", a, b, "--dim", "batch=3", "--json", "--runs", "2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["specialization"]["dims"] == {"batch": 3}
    assert data["inputs"]["tries"] == 1 and data["fidelity"]["ok"]
    # Without --dim, A's generated batch (1) does not fit B's static batch of 3: B fails to run.
    assert cli("compare", a, b, "--json", "--runs", "2").returncode == 2
