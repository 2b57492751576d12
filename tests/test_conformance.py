"""ONNX backend conformance tier: the backend test models of the onnx wheel, optimized at -O3.

Every case runs for x86_64; arm64 and cuda run a fixed sample (every 10th case in the suite's
fixed order, plus every `light` model). A case whose original model onnxruntime cannot load, run,
or reproduce the expected outputs of is skipped with onnxruntime's reason; every other case must
give the expected outputs after optimization. The whole set, every target:
`python -m tests.conformance.suite --target all` (see tests/conformance/suite.py).
"""

from __future__ import annotations

import pytest
from conformance import suite


def _params() -> list:
    cases = suite.all_cases()
    sampled = {c.id for c in suite.select(cases, suite.CI_SAMPLE_EVERY)}
    params = []
    # Case-major, so that xdist tends to send a case's targets to one worker, where the verdict on
    # the original (suite.original_verdict) is cached.
    for case in cases:
        for target in suite.TARGETS:
            if target == "x86_64" or case.id in sampled:
                params.append(pytest.param(target, case.id, id=f"{target}:{case.id}"))
    return params


@pytest.mark.parametrize(("target", "case_id"), _params())
def test_backend_case_after_O3(target: str, case_id: str) -> None:
    result = suite.run_case(suite.cases_by_id()[case_id], target)
    if result.status == suite.SKIPPED:
        pytest.skip(result.reason)
    assert result.status == suite.PASSED, f"{case_id} on {target}: {result.reason}"


def test_harness_fails_a_wrong_optimization(monkeypatch) -> None:
    """The tier is only worth something if a miscompiled model fails: Abs optimized into Neg must."""
    import graphopt.optimize

    real = graphopt.optimize.optimize

    def miscompile(proto, **kwargs):
        optimized, report = real(proto, **kwargs)
        for node in optimized.graph.node:
            if node.op_type == "Abs":
                node.op_type = "Neg"
        return optimized, report

    monkeypatch.setattr(graphopt.optimize, "optimize", miscompile)
    result = suite.run_case(suite.cases_by_id()["node/test_abs"], "x86_64")
    assert result.status == suite.FAILED and "not within" in result.reason, result
