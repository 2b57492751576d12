"""Targets: what graphopt optimizes for, described as data in targets/data/*.toml (one file per family).

A target names its runtime, the newest opset that runtime executes, what it may be handed
(`can_emit`, probed from the installed onnxruntime: see capabilities.py), and any passes it adds
to the pipeline; passes ask `can_emit` (through `PassContext.can_emit`) and never name a target.
A family (x86_64, arm64, cuda, generic) has variants, concrete chips whose figures
(`Target.hardware`, targets/hardware.py) the cost model reads: `get("x86_64:avx512")`, or
`get("x86_64")` for the family's default variant. More families or variants come from TOML files
dropped into targets/data/ or loaded with `load_file` (`--target-file`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.targets.hardware import DATA_DIR, Family, Hardware, detect_host_variant, host_variant, parse_file, platform_is_x86_64

__all__ = ["Target", "Hardware", "available", "families", "get", "load_file", "detect_host_variant", "onnxruntime_max_opset"]


@dataclass(frozen=True)
class Target:
    """A family (runtime, providers, what it may emit: see Family) at one variant of hardware."""

    family: Family
    # The variant of the family (None: a family without variants, such as generic) and its figures.
    variant: str | None = None
    hardware: Hardware | None = None

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def description(self) -> str:
        return self.family.description

    @property
    def triple(self) -> str:
        return self.family.triple

    @property
    def runtime(self) -> str:
        return self.family.runtime

    @property
    def execution_providers(self) -> tuple[str, ...]:
        return self.family.execution_providers

    @property
    def extra_passes(self) -> dict[int, tuple[str, ...]]:
        return self.family.extra_passes

    @property
    def runtime_fusions(self):
        return self.family.runtime_fusions

    @property
    def declared_kernels(self) -> Mapping[str, frozenset[str]]:
        return self.family.declared_kernels

    @property
    def never_emits(self) -> frozenset[tuple[str, str]]:
        return self.family.never_emits

    @property
    def full_name(self) -> str:
        """"family:variant" ("x86_64:avx512"), or the family name when it has no variant."""
        return f"{self.name}:{self.variant}" if self.variant else self.name

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


# Files loaded with load_file (--target-file), in order, on top of targets/data/*.toml.
_extra_files: list[Path] = []


@functools.cache
def _families(extra: tuple[Path, ...]) -> dict[str, Family]:
    found: dict[str, Family] = {}
    for path in [*sorted(DATA_DIR.glob("*.toml")), *extra]:
        family = parse_file(path, found)
        found[family.name] = family
    x86 = found.get("x86_64")
    if x86 is not None and platform_is_x86_64() and {"avx2", "avx512", "avx512-vnni"} <= set(x86.variants):
        x86.variants = {**x86.variants, "host": host_variant(x86.variants)}
    if x86 is not None and x86.default_variant == "host" and "host" not in x86.variants:
        x86.default_variant = "avx2"  # not an x86_64 machine: nothing to detect
    return found


def families() -> dict[str, Family]:
    """Every target family by name (built in, dropped into targets/data/, or loaded with load_file)."""
    return _families(tuple(_extra_files))


def load_file(path: str | os.PathLike) -> list[str]:
    """Add the family (or variants) a target TOML file defines, for every later `get`.

    Raises GraphoptError naming the file and the bad field; returns the family names it defines.
    Loading the same file twice is a no-op.
    """
    given, path = Path(path), Path(path).resolve()
    if path in _extra_files:
        return [name for name, family in families().items() if str(path) in family.files]
    family = parse_file(given, families())  # checked before it joins the registry (errors name it as given)
    _extra_files.append(path)
    return [family.name]


def _target(family: Family, variant: str | None) -> Target:
    return _cached_target(tuple(_extra_files), family.name, variant)


@functools.cache
def _cached_target(extra: tuple[Path, ...], name: str, variant: str | None) -> Target:
    family = _families(extra)[name]
    return Target(family, variant, family.variants[variant] if variant else None)


def available() -> dict[str, Target]:
    """Each family's default target, by family name."""
    return {name: get(name) for name in families()}


def get(name: str) -> Target:
    """The target `family` (its default variant) or `family:variant`."""
    fams = families()
    family_name, _, variant = name.partition(":")
    if family_name not in fams:
        raise GraphoptError(f"unknown target '{family_name}'; known targets: {', '.join(sorted(fams))}")
    family = fams[family_name]
    if not variant:
        if name.endswith(":"):
            raise GraphoptError(f"target '{name}' names no variant; {_variants_text(family)}")
        return _target(family, family.default_variant)
    if variant not in family.variants:
        raise GraphoptError(f"unknown variant '{variant}' of target {family_name}; {_variants_text(family)}")
    return _target(family, variant)


def _variants_text(family: Family) -> str:
    if not family.variants:
        return f"{family.name} has no variants"
    return f"known variants of {family.name}: {', '.join(family.variants)}"


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
