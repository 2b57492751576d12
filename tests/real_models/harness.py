"""Optimize a real model at -O3 for a target and measure what happened: shared by the tests and the table.

Outputs are compared with `graphopt.verify.compare` on onnxruntime's CPU provider with its own
graph optimizations off (`graphopt.verify.run`). A sequence-of-maps output (skl2onnx's ZipMap, one
``{label: probability}`` dict per row) is compared as two outputs: its keys, exactly, and its
values as a [rows, labels] float array, with the model's tolerances.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt import verify
from graphopt.optimize import Report, optimize

from . import zoo

TARGETS = ("x86_64", "arm64", "cuda")
OPT_LEVEL = 3


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def serialized(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def run_O3(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, Report, float]:
    """optimize() a copy at -O3; returns the result, the report and the seconds it took."""
    start = time.perf_counter()
    optimized, report = optimize(copy(model), target=target, opt_level=OPT_LEVEL)
    return optimized, report, time.perf_counter() - start


def data_sets(real: zoo.RealModel) -> list[zoo.Feeds]:
    if real.feeds is None:
        return [verify.make_inputs(real.model)]
    return real.feeds if isinstance(real.feeds, list) else [real.feeds]


def _flatten_maps(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        if value.dtype == object and value.size and isinstance(value.flat[0], dict):
            keys = sorted(value.flat[0])
            flat[f"{name}[keys]"] = np.array([sorted(row) for row in value.flat], dtype=object)
            flat[name] = np.array([[row.get(k, np.nan) for k in keys] for row in value.flat], dtype=np.float64)
        else:
            flat[name] = value
    return flat


def compare(original: onnx.ModelProto, optimized: onnx.ModelProto, feeds: zoo.Feeds, *, rtol: float, atol: float) -> verify.Fidelity:
    reference = _flatten_maps(verify.run(original, feeds))
    candidate = _flatten_maps(verify.run(optimized, feeds))
    return verify.compare(reference, candidate, rtol=rtol, atol=atol)


@dataclass
class Outcome:
    name: str
    exporter: str
    target: str
    opset: str
    nodes_before: int
    nodes_after: int
    seconds: float
    fidelities: list[verify.Fidelity]
    checker_error: str | None
    optimized: onnx.ModelProto
    report: Report

    @property
    def ok(self) -> bool:
        return self.checker_error is None and all(f.ok for f in self.fidelities)

    def worst(self) -> verify.OutputFidelity:
        candidates = [f.worst() for f in self.fidelities]

        def badness(o: verify.OutputFidelity):
            rel = math.inf if math.isnan(o.max_rel_error) else o.max_rel_error
            return (not o.within_tolerance, rel)

        return max(candidates, key=badness)


def evaluate(name: str, target: str) -> Outcome:
    """Load, optimize at -O3, full-check and compare on every data set. Raises zoo.ModelUnavailable."""
    real = zoo.load(name)
    entry = zoo.ENTRIES[name]
    optimized, report, seconds = run_O3(real.model, target)
    checker_error = None
    try:
        onnx.checker.check_model(optimized, full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types; all are findings
        checker_error = f"{type(exc).__name__}: {exc}"
    fidelities = [compare(real.model, optimized, feeds, rtol=entry.rtol, atol=entry.atol) for feeds in data_sets(real)]
    return Outcome(
        name=name,
        exporter=real.exporter,
        target=target,
        opset=zoo.opset_summary(real.model),
        nodes_before=report.before.nodes,
        nodes_after=report.after.nodes,
        seconds=seconds,
        fidelities=fidelities,
        checker_error=checker_error,
        optimized=optimized,
        report=report,
    )
