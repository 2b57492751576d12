"""Instruments: what the pass manager does around every pass, kept out of the passes themselves."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from graphopt import export
from graphopt.analysis.stats import ModelStats, model_stats
from graphopt.pass_manager import Instrument, Pass, PassContext, PassResult


class StatsDelta(Instrument):
    """Node, parameter and FLOP change of every pass that changed the model, summed per pass name."""

    def __init__(self):
        self.deltas: dict[str, dict[str, int]] = {}
        self._before: ModelStats | None = None

    def before_pass(self, pass_: Pass, ctx: PassContext) -> None:
        if self._before is None:
            self._before = model_stats(ctx.model, ctx.options.get("symbolic_dims"))

    def after_pass(self, pass_: Pass, ctx: PassContext, result: PassResult) -> str | None:
        if result.changed:
            after = model_stats(ctx.model, ctx.options.get("symbolic_dims"))
            delta = self.deltas.setdefault(pass_.name, {"nodes": 0, "parameters": 0, "flops": 0})
            delta["nodes"] += after.nodes - self._before.nodes
            delta["parameters"] += after.parameters - self._before.parameters
            delta["flops"] += after.flops - self._before.flops
            self._before = after
        return None

    def on_rollback(self, pass_: Pass, ctx: PassContext, reason: str) -> None:
        self._before = None


class DumpIR(Instrument):
    """Write the model after every pass that changed it: DIR/NNN-<pass>.onnx."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def after_pass(self, pass_: Pass, ctx: PassContext, result: PassResult) -> str | None:
        if result.changed:
            self.count += 1
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", pass_.name)
            export.save(ctx.model, self.folder / f"{self.count:03d}-{safe}.onnx")
        return None


class VerifyEach(Instrument):
    """Check every changed model against the original in onnxruntime; reject a pass that breaks it.

    The manager rolls a rejected pass back; the reason names the pass and the worst output.
    """

    needs_snapshot = True

    def __init__(self, original: onnx.ModelProto, inputs: dict, *, rtol: float = 1e-3, atol: float = 1e-4):
        from graphopt import verify

        self._verify = verify
        self.reference = verify.run(original, inputs)
        self.inputs = inputs
        self.rtol, self.atol = rtol, atol
        self.rollbacks: list[tuple[str, str]] = []

    def after_pass(self, pass_: Pass, ctx: PassContext, result: PassResult) -> str | None:
        if not result.changed:
            return None
        try:
            proto = export.to_proto(ctx.model)
            onnx.checker.check_model(proto)
            got = self._verify.run(proto, self.inputs)
        except Exception as exc:  # noqa: BLE001 - any failure to run is a broken model
            return f"the model no longer loads: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        fidelity = self._verify.compare(self.reference, got, rtol=self.rtol, atol=self.atol)
        if fidelity.ok:
            return None
        worst = fidelity.worst()
        return f"output '{worst.name}' moved by {worst.max_abs_error:.3g} (max abs)"

    def on_rollback(self, pass_: Pass, ctx: PassContext, reason: str) -> None:
        self.rollbacks.append((pass_.name, reason))
