"""What a target may emit: the ONNX standard at a model's opset, and the kernels its runtime has.

Fusion passes ask `Target.can_emit(op, domain, opset)` (or `PassContext.can_emit`) and never name a
target. The answers come from two sources, both read from what is installed, not written by hand:

* the ONNX standard: `onnx.defs` says whether an op exists at an opset (and since which version);
* the kernels of the installed onnxruntime: `onnxruntime.capi._pybind_state.get_all_opkernel_def()`
  lists every kernel the build registers, each with op type, domain, execution provider and the
  opset range it covers (a CPU-only wheel reports CPUExecutionProvider only; a CUDA wheel adds the
  CUDA provider's kernels). One call, a few milliseconds; cached for the process.

Only a provider the installed build lacks (CUDA in the CPU wheel) needs a hand-written list; see
targets/data/cuda.toml (family.declared_kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from graphopt.ir import DEFAULT_DOMAINS

# The provider graphopt verifies every result on (graphopt.verify, graphopt.evaluate): an op it has
# no kernel for would make verification fail, whichever runtime the target names.
VERIFY_PROVIDER = "CPUExecutionProvider"

_INT_MAX = 2**31 - 1

# provider -> domain -> op type -> the opset ranges (start, end) its kernels cover
KernelTable = Mapping[str, Mapping[str, Mapping[str, tuple[tuple[int, int], ...]]]]


def normalize_domain(domain: str | None) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


@functools.cache
def _kernel_defs() -> tuple | None:
    try:
        from onnxruntime.capi import _pybind_state as C

        return tuple(C.get_all_opkernel_def())
    except Exception:  # noqa: BLE001 - no API (or a provider that failed to load): nothing probed
        return None


@functools.cache
def kernel_table() -> KernelTable | None:
    """Every kernel the installed onnxruntime registers, by provider, domain and op; probed once.

    None when this onnxruntime has no kernel-def API (a build without
    onnxruntime_PYBIND_EXPORT_OPSCHEMA): then nothing outside the ONNX standard is emitted, and a
    standard op is trusted to run when its opset does (`onnxruntime_max_opset`).
    """
    defs = _kernel_defs()
    if defs is None:
        return None
    table: dict[str, dict[str, dict[str, set[tuple[int, int]]]]] = {}
    for k in defs:
        ranges = table.setdefault(k.provider, {}).setdefault(normalize_domain(k.domain), {}).setdefault(k.op_name, set())
        ranges.add(tuple(k.version_range))
    return {
        provider: {domain: {op: tuple(sorted(r)) for op, r in ops.items()} for domain, ops in domains.items()}
        for provider, domains in table.items()
    }


@functools.cache
def typed_kernel_table() -> dict | None:
    """provider -> domain -> op -> [((start, end), {type var: allowed type strings})], or None:
    the same kernels as `kernel_table` with the types each accepts (which dtype a pass may give it)."""
    defs = _kernel_defs()
    if defs is None:
        return None
    table: dict = {}
    for k in defs:
        entry = (tuple(k.version_range), {name: frozenset(types) for name, types in k.type_constraints.items()})
        table.setdefault(k.provider, {}).setdefault(normalize_domain(k.domain), {}).setdefault(k.op_name, []).append(entry)
    return table


@functools.cache
def runtime_schemas() -> dict:
    """(domain, op) -> the installed onnxruntime's schemas of it, oldest first: its contrib domains'
    ops (com.microsoft, ...), which onnx.defs does not know. Empty for a build without schemas."""
    try:
        from onnxruntime.capi import _pybind_state as C

        schemas = C.get_all_operator_schema()
    except Exception:  # noqa: BLE001 - a build without schemas: contrib ops are unknown
        return {}
    found: dict = {}
    for s in schemas:
        found.setdefault((s.domain, s.name), []).append(s)
    for versions in found.values():
        versions.sort(key=lambda s: s.since_version)
    return found


def probed_providers() -> frozenset[str]:
    """The execution providers the installed onnxruntime reported kernels for."""
    table = kernel_table()
    return frozenset(table or ())


@functools.cache
def kernels(provider: str, domain: str) -> frozenset[str] | None:
    """The op types `provider` has kernels for in `domain`; None when the probe cannot tell."""
    table = kernel_table()
    if table is None or provider not in table:
        return None
    return frozenset(table[provider].get(normalize_domain(domain), ()))


@functools.cache
def standard_schema(op: str, opset: int):
    """The ONNX schema `op` has at default-domain `opset`, or None (unknown, newer, or removed)."""
    import onnx.defs

    if not onnx.defs.has(op, opset, ""):
        return None
    schema = onnx.defs.get_schema(op, opset, "")
    return None if schema.deprecated else schema


def standard_op_exists(op: str, opset: int) -> bool:
    return standard_schema(op, opset) is not None


def runs_standard_op(provider: str, op: str, opset: int) -> bool:
    """Whether `provider` of the installed onnxruntime runs standard `op` in a model of `opset`.

    onnxruntime picks a kernel by the node's since_version (the schema version in force at the
    model's opset), as KernelRegistry's VerifyKernelDef does: a kernel registered from `start`
    serves it when start == since, or when start < since <= end for a kernel with an end (an
    open-ended kernel newer than its schema's latest version does not serve that version). An
    op with no kernel still runs when its schema has a function body (onnxruntime inlines it:
    HardSwish-22, Swish, Mish, GroupNormalization-21, ...), and Constant becomes an initializer.
    """
    schema = standard_schema(op, opset)
    if schema is None:
        return False
    table = kernel_table()
    if table is None:
        return True  # nothing to ask: the runtime's opset bound is all there is
    since = schema.since_version
    for start, end in table.get(provider, {}).get("", {}).get(op, ()):
        if start == since or start < since <= end != _INT_MAX:
            return True
    return op == "Constant" or schema.has_function or schema.has_context_dependent_function
