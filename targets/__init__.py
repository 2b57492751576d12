"""Targets: what graphopt optimizes for. One module per target describes its hardware.

Issue 4 grows these into full hardware descriptions with a roofline cost model; today a target
names its runtime, the newest opset that runtime executes, and any passes it adds to the pipeline.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from graphopt.errors import GraphoptError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    # An LLVM-style triple for code generation backends (TVM).
    triple: str
    runtime: str = "onnxruntime"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Peak figures for the cost model (issue 4 fills these in properly).
    peak_gflops_fp32: float = 0.0
    memory_bandwidth_gbs: float = 0.0
    # Pass names this target adds after the generic pipeline, per -O level.
    extra_passes: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def max_opset(self) -> int:
        return onnxruntime_max_opset()


def _registry() -> dict[str, Target]:
    from graphopt.targets import arm64, cuda, x86_64

    return {t.name: t for t in (x86_64.TARGET, arm64.TARGET, cuda.TARGET)}


def available() -> dict[str, Target]:
    return _registry()


def get(name: str) -> Target:
    targets = _registry()
    if name not in targets:
        raise GraphoptError(f"unknown target '{name}'; known targets: {', '.join(sorted(targets))}")
    return targets[name]


@functools.cache
def onnxruntime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime executes, probed once.

    onnxruntime publishes no API for this, and the installed version is a range, so ask it.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    def runs(version: int) -> bool:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        model.ir_version = 8
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return True
        except Exception:  # noqa: BLE001 - any refusal means "not supported"
            return False

    low, high = 13, onnx.defs.onnx_opset_version()
    if runs(high):
        return high
    while low < high - 1:
        mid = (low + high) // 2
        low, high = (mid, high) if runs(mid) else (low, mid)
    return low
