"""graphopt as a library: what `graphopt run`, `graphopt passes` and `graphopt targets` do, in Python.

    from graphopt import api

    result = api.optimize("model.onnx", target="arm64")   # or a ModelProto, or "zoo:resnet18"
    result.save("model.opt.onnx")

Built on `graphopt.optimize.optimize_model` (the pipeline) and `export.save` (the atomic write), so a
model comes out exactly as the CLI writes it. Errors are GraphoptErrors with the CLI's one-line
messages; VerificationError (a GraphoptError) when the result no longer computes what the original
did.

This lives in its own module because `graphopt.optimize` is already a module: a function of that
name on the package would be replaced by the submodule as soon as anything imports it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from graphopt import export, ir
from graphopt import targets as _targets
from graphopt import verify as _verify
from graphopt.optimize import Report, check_opset, optimize_model, resolve_source
from graphopt.specialize import specialize_proto
from graphopt.pipelines import PassInfo, describe_passes
from graphopt.plugins import load_plugins

__all__ = ["Result", "optimize", "passes", "targets"]


class Result:
    """An optimized model, the report on what was done to it, and how far its outputs moved."""

    def __init__(self, model: ir.Model, report: Report):
        self._ir = model
        self.report = report

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        # Built on first use: it copies every weight, which `save` does not need.
        return export.to_proto(self._ir)

    @property
    def fidelity(self) -> _verify.Fidelity | None:
        """The comparison with the original in onnxruntime; None when not verified."""
        return self.report.fidelity

    def save(self, path: str | os.PathLike) -> int:
        """Write the model atomically (weights over 2 GiB to `<path>.data`); returns the bytes written."""
        size = export.save(self._ir, path)
        self.report.output = str(path)
        return size


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    target: str = "x86_64",
    target_file: str | os.PathLike | None = None,
    opt_level: int = 2,
    passes: Sequence[str] | None = None,
    disable: Sequence[str] | None = None,
    plugins: Sequence[str] | None = None,
    cleanup: bool = True,
    dims: dict[str, int] | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    verify: bool = True,
    inputs: dict[str, np.ndarray] | str | os.PathLike | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Result:
    """Optimize a model (a file, `zoo:NAME` or a ModelProto, which is left untouched) for a target.

    Like `graphopt run`: `passes` replaces the level's pipeline (ended by dce unless `cleanup` is
    False), `disable` leaves passes out, `plugins` are loaded first (files or module names).
    `dims` ({"batch": 1}) and `input_shapes` ({"input_ids": [1, 128]}) specialize the model first,
    as --dim and --input-shape do. With
    `verify`, the result is compared with the original in onnxruntime on `inputs` (a dict or an
    .npz path) or on generated ones, and VerificationError is raised if an output moved beyond
    rtol/atol. `target` is a family or family:variant ("x86_64:avx512"); `target_file` (a TOML
    file in the schema of targets/data/*.toml, as --target-file) adds families or variants first.
    """
    if target_file is not None:
        _targets.load_file(target_file)
    load_plugins(plugins)
    if isinstance(model, onnx.ModelProto):
        # optimize_model consumes the proto it is given; the caller's stays the reference.
        proto, reference, source = _copy(model), model, "<ModelProto>"
    else:
        source = os.fspath(model)
        proto, path = resolve_source(source)
        reference = path if path is not None else _copy(proto)
    specialization = specialize_proto(proto, input_shapes, dims)
    check_opset(proto, _targets.get(target))
    feeds = expected = record = None
    if verify:  # before optimizing, which consumes the proto
        feeds, expected, record = _verify.reference_inputs(reference, proto, inputs)
    optimized, report = optimize_model(
        proto,
        target=target,
        opt_level=opt_level,
        passes=_names(passes),
        disabled=_names(disable),
        cleanup=cleanup,
        source=source,
        specialization=specialization,
    )
    report.verification_inputs = record
    result = Result(optimized, report)
    if verify:
        if expected is None:
            expected = _verify.original_outputs(reference, feeds, remedy="pass other inputs or verify=False")
        report.fidelity = _verify.compare(expected, _run(result, feeds), rtol=rtol, atol=atol)
        _verify.require_within_tolerance(report.fidelity, rtol, atol)
    return result


def passes(plugins: Sequence[str] | None = None) -> dict[str, PassInfo]:
    """Every available pass by name: description, level ("-O2" or "opt-in") and source."""
    load_plugins(plugins)
    return describe_passes()


def targets() -> dict:
    """The targets by name (graphopt.targets.Target: runtime, max_opset, description, ...)."""
    return _targets.available()


def _names(names: Sequence[str] | str | None) -> list[str] | None:
    if names is None:
        return None
    # A string is taken as the CLI's comma-separated list, not as a sequence of one-letter names.
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n.strip()] or None


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _run(result: Result, feeds) -> dict[str, np.ndarray]:
    if export.approx_nbytes(result._ir) <= export.PROTOBUF_LIMIT_BYTES:
        return _verify.run(result.model, feeds)
    # Too big for onnxruntime to take from memory: it reads the weights from a saved copy.
    with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        export.save(result._ir, path)
        return _verify.run(str(path), feeds)
