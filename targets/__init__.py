"""Targets: what graphopt optimizes for. One module per target describes its hardware.

Issue 4 grows these into full hardware descriptions with a roofline cost model; today a target
names its runtime, the newest opset that runtime executes, what it may be handed (`can_emit`,
probed from the installed onnxruntime: see capabilities.py), and any passes it adds to the
pipeline. Passes ask `can_emit` (through `PassContext.can_emit`) and never name a target.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
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
    # Kernels outside the default domain (domain -> op types) of execution_providers[0], for when
    # the installed onnxruntime cannot be asked (CUDA in the CPU wheel); a probe that reports the
    # provider wins over this list.
    declared_kernels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # (domain, op) pairs never emitted although the probe may report them: kernels of this
    # host's build that the target's builds lack, or that serve only some attributes. op "*" is
    # the whole domain.
    never_emits: frozenset[tuple[str, str]] = frozenset()

    @property
    def max_opset(self) -> int:
        # Every runtime's bound is onnxruntime's, also for runtime-neutral targets: graphopt
        # verifies each result in onnxruntime.
        return onnxruntime_max_opset()

    def can_emit(self, op: str, domain: str = "", opset: int | None = None) -> bool:
        """True when a node of this op type and domain may appear in this target's output.

        Default domain ("" or "ai.onnx"): the op exists in the ONNX standard at `opset` (the
        model's default-domain opset; None: the newest this target runs) and is not deprecated
        there, so a pass never emits an op newer than the model's opset; and for an onnxruntime
        target, onnxruntime runs it at that opset (a kernel serving its version, or a function
        body onnxruntime inlines). Other domains: the runtime has a kernel for the op on the
        target's execution provider, and on the CPU provider graphopt verifies with; a
        runtime-neutral target emits none.
        """
        from graphopt.targets import capabilities as caps

        domain = caps.normalize_domain(domain)
        if (domain, op) in self.never_emits or (domain, "*") in self.never_emits:
            return False
        if domain == "":
            opset = self.max_opset if opset is None else opset
            if self.runtime != "onnxruntime":
                return caps.standard_op_exists(op, opset)
            # Standard ops the target's provider lacks fall back to onnxruntime's CPU provider,
            # which is also the one results are verified on: that one must run it.
            return opset <= self.max_opset and caps.runs_standard_op(caps.VERIFY_PROVIDER, op, opset)
        if self.runtime != "onnxruntime":
            return False
        return op in self.kernels(domain) and op in (caps.kernels(caps.VERIFY_PROVIDER, domain) or ())

    def kernels(self, domain: str) -> frozenset[str]:
        """The op types of a non-default domain that execution_providers[0] has kernels for.

        Probed from the installed onnxruntime when it reports that provider, else
        `declared_kernels`; `never_emits` and the verification provider are not applied here
        (`can_emit` applies them).
        """
        from graphopt.targets import capabilities as caps

        if self.runtime != "onnxruntime" or not self.execution_providers:
            return frozenset()
        probed = caps.kernels(self.execution_providers[0], domain)
        if probed is not None:
            return probed
        return frozenset(self.declared_kernels.get(caps.normalize_domain(domain), ()))


def _registry() -> dict[str, Target]:
    from graphopt.targets import arm64, cuda, generic, x86_64

    return {t.name: t for t in (x86_64.TARGET, arm64.TARGET, cuda.TARGET, generic.TARGET)}


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
