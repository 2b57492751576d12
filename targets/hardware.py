"""Hardware descriptions as data: the TOML files of targets/data/ (or --target-file), parsed and checked.

One file per target family: a `[family]` table (what onnxruntime runs it with and what it may
emit) and `[variants.NAME]` tables (one concrete chip each: peaks per dtype, memory bandwidth,
caches, cores, vector width, int8 signedness, layout, LLVM mcpu/mattr and the public sources the
figures come from). See targets/data/x86_64.toml for the schema with comments; `parse_file` names
the file and the field in every error.

The x86_64 `host` variant is not in a file: `host_variant` derives it from /proc/cpuinfo's flags
(`detect_host_variant`) and os.cpu_count().
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError

DATA_DIR = Path(__file__).resolve().parent / "data"
SCHEMA_VERSION = 1

INT8_SIGNEDNESS = ("u8s8", "s8s8")
# onnxruntime's graph optimization levels, lowest first (a fusion made at one is made at the later ones).
RUNTIME_LEVELS = ("basic", "extended", "all")
LAYOUTS = ("NCHW", "NHWC")
CACHE_SCOPES = ("per-core", "total")
# Dtypes a peak may be given for (GFLOP/s; integer dtypes GOP/s); "sparse_" ones are 2:4 sparse.
DTYPES = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4",
          "sparse_fp16", "sparse_bf16", "sparse_fp8", "sparse_int8")
REQUIRED_DTYPES = ("fp32",)

FAMILY_FIELDS = ("name", "description", "triple", "runtime", "execution_providers", "default_variant",
                 "never_emits", "declared_kernels", "extra_passes", "runtime_fusions")
VARIANT_FIELDS = ("description", "cores", "vector_bits", "memory_bandwidth_gbs", "int8_signedness", "int8_weight_bits", "layout",
                  "mcpu", "mattr", "caches", "sources", "peak_gflops")


@dataclass(frozen=True)
class Cache:
    level: str  # "L1d", "L2", "L3"
    kib: int
    scope: str  # "per-core" (per SM on a GPU) or "total"


@dataclass(frozen=True)
class Source:
    title: str
    url: str


@dataclass(frozen=True)
class Hardware:
    """One concrete chip's figures, for the cost model. Peaks in GFLOP/s (integer dtypes GOP/s)."""

    description: str
    peak_gflops: Mapping[str, float]
    memory_bandwidth_gbs: float
    caches: tuple[Cache, ...]
    cores: int
    vector_bits: int
    int8_signedness: str
    layout: str
    mcpu: str
    mattr: str
    sources: tuple[Source, ...]
    # 7 where the int8 dot product adds two u8 x s8 products in int16 with saturation (AVX2 and
    # AVX-512BW vpmaddubsw, which onnxruntime's MLAS uses without VNNI): 2 x 255 x 127 overflows
    # int16, 2 x 255 x 63 does not. Measured on an AVX2 EPYC, DynamicQuantizeMatMul [8,256]x[256,64]:
    # relative error 0.031 with 8-bit weights, 0.017 with 7-bit (onnxruntime's quantizer calls
    # this reduce_range).
    int8_weight_bits: int = 8

    @property
    def int8_weight_levels(self) -> int:
        """The largest magnitude of a symmetric int8 weight: 127, or 63 for 7-bit weights."""
        return 2 ** (self.int8_weight_bits - 1) - 1

    def peak(self, dtype: str) -> float:
        """The peak for `dtype`; a dtype without its own figure runs at the fp32 rate."""
        return self.peak_gflops.get(dtype, self.peak_gflops["fp32"])

    def cache(self, level: str) -> Cache | None:
        return next((c for c in self.caches if c.level.lower() == level.lower()), None)


@dataclass(frozen=True)
class RuntimeFusion:
    """A group of ops the target's runtime fuses into one kernel by itself, at session time."""

    ops: tuple[str, ...]  # the op types of the group, in graph order ("Conv", "Add", "Relu")
    by: str               # what does it, for reports ("onnxruntime's NCHWc layout pass (...)")
    # The lowest onnxruntime graph optimization level that makes it: "basic", "extended" or "all".
    level: str = "all"


@dataclass
class Family:
    """A target family as read from its file(s): the Target fields and the variants."""

    name: str
    description: str
    # An LLVM-style triple for code generation backends (TVM).
    triple: str
    runtime: str = "onnxruntime"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    default_variant: str | None = None
    # (domain, op) pairs never emitted although the probe may report them: kernels of this
    # host's build that the target's builds lack, or that serve only some attributes. op "*" is
    # the whole domain.
    never_emits: frozenset[tuple[str, str]] = frozenset()
    # Kernels outside the default domain (domain -> op types) of execution_providers[0], for when
    # the installed onnxruntime cannot be asked (CUDA in the CPU wheel); a probe that reports the
    # provider wins over this list.
    declared_kernels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Pass names this target adds after the generic pipeline, per -O level.
    extra_passes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # What the runtime fuses itself: the cost model prices such a group as the one kernel it becomes.
    runtime_fusions: tuple[RuntimeFusion, ...] = ()
    variants: dict[str, Hardware] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


class _Checker:
    def __init__(self, path: Path | str):
        self.path = str(path)

    def fail(self, where: str, why: str):
        raise GraphoptError(f"target file {self.path}: {where}: {why}")

    def get(self, table: Mapping, key: str, where: str, kind, *, required: bool = True, default=None):
        name = f"{where}.{key}" if where else key
        if key not in table:
            if required:
                self.fail(name, "missing")
            return default
        value = table[key]
        if kind in (float, int):
            # A float field takes an integer too (TOML's 25 for 25.0); bool is an int to Python only.
            accepted = (int, float) if kind is float else int
            if isinstance(value, bool) or not isinstance(value, accepted):
                self.fail(name, f"must be {'a number' if kind is float else 'an integer'}, not {value!r}")
            if not value > 0:
                self.fail(name, f"must be positive, not {value!r}")
            return kind(value)
        if kind is str:
            if not isinstance(value, str):
                self.fail(name, f"must be a string, not {value!r}")
            return value
        if kind is list:
            if not isinstance(value, list):
                self.fail(name, f"must be a list, not {value!r}")
            return value
        if kind is dict:
            if not isinstance(value, dict):
                self.fail(name, f"must be a table, not {value!r}")
            return value
        raise AssertionError(kind)

    def strings(self, value: list, name: str) -> tuple[str, ...]:
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"{name}[{i}]", f"must be a non-empty string, not {item!r}")
        return tuple(value)

    def unknown(self, table: Mapping, allowed: Iterable[str], where: str):
        extra = sorted(set(table) - set(allowed))
        if extra:
            self.fail(where, f"unknown field {extra[0]!r} (known: {', '.join(allowed)})")


def _parse_variant(check: _Checker, name: str, table: Any) -> Hardware:
    where = f"variants.{name}"
    if not isinstance(table, dict):
        check.fail(where, "must be a table")
    check.unknown(table, VARIANT_FIELDS, where)
    peaks_table = check.get(table, "peak_gflops", where, dict)
    for dtype in REQUIRED_DTYPES:
        if dtype not in peaks_table:
            check.fail(f"{where}.peak_gflops.{dtype}", "missing")
    peaks = {}
    for dtype in peaks_table:
        if dtype not in DTYPES:
            check.fail(f"{where}.peak_gflops.{dtype}", f"unknown dtype (known: {', '.join(DTYPES)})")
        peaks[dtype] = check.get(peaks_table, dtype, f"{where}.peak_gflops", float)
    caches = []
    for i, c in enumerate(check.get(table, "caches", where, list)):
        cw = f"{where}.caches[{i}]"
        if not isinstance(c, dict):
            check.fail(cw, "must be a table {level, kib, scope}")
        check.unknown(c, ("level", "kib", "scope"), cw)
        scope = check.get(c, "scope", cw, str)
        if scope not in CACHE_SCOPES:
            check.fail(f"{cw}.scope", f"must be one of {', '.join(CACHE_SCOPES)}, not {scope!r}")
        caches.append(Cache(check.get(c, "level", cw, str), check.get(c, "kib", cw, int), scope))
    sources = []
    for i, s in enumerate(check.get(table, "sources", where, list)):
        sw = f"{where}.sources[{i}]"
        if not isinstance(s, dict):
            check.fail(sw, "must be a table {title, url}")
        check.unknown(s, ("title", "url"), sw)
        url = check.get(s, "url", sw, str)
        if not url.startswith(("https://", "http://")):
            check.fail(f"{sw}.url", f"must be an http(s) URL, not {url!r}")
        sources.append(Source(check.get(s, "title", sw, str), url))
    if not sources:
        check.fail(f"{where}.sources", "must cite at least one public source {title, url}")
    signedness = check.get(table, "int8_signedness", where, str)
    if signedness not in INT8_SIGNEDNESS:
        check.fail(f"{where}.int8_signedness", f"must be one of {', '.join(INT8_SIGNEDNESS)}, not {signedness!r}")
    weight_bits = check.get(table, "int8_weight_bits", where, int, required=False, default=8)
    if weight_bits not in (7, 8):
        check.fail(f"{where}.int8_weight_bits", f"must be 7 or 8, not {weight_bits!r}")
    layout = check.get(table, "layout", where, str)
    if layout not in LAYOUTS:
        check.fail(f"{where}.layout", f"must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    return Hardware(
        description=check.get(table, "description", where, str),
        peak_gflops=peaks,
        memory_bandwidth_gbs=check.get(table, "memory_bandwidth_gbs", where, float),
        caches=tuple(caches),
        cores=check.get(table, "cores", where, int),
        vector_bits=check.get(table, "vector_bits", where, int),
        int8_signedness=signedness,
        int8_weight_bits=weight_bits,
        layout=layout,
        mcpu=check.get(table, "mcpu", where, str),
        mattr=check.get(table, "mattr", where, str, required=False, default=""),
        sources=tuple(sources),
    )


def parse_file(path: str | os.PathLike, known: Mapping[str, Family] | None = None) -> Family:
    """Read one target file. A file naming a family in `known` adds (or replaces) variants of it
    and may set its default_variant; any other family field there is an error. Raises
    GraphoptError naming the file and the field."""
    path = Path(path)
    check = _Checker(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraphoptError(f"target file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GraphoptError(f"target file {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise GraphoptError(f"target file {path}: not valid TOML ({exc})") from None
    check.unknown(data, ("schema", "family", "variants"), "top level")
    schema = data.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        check.fail("schema", f"version {schema!r} is not supported (this graphopt reads {SCHEMA_VERSION})")
    fam = check.get(data, "family", "", dict)
    check.unknown(fam, FAMILY_FIELDS, "family")
    name = check.get(fam, "name", "family", str)
    if not name or ":" in name or name != name.strip():
        check.fail("family.name", f"must be a non-empty name without ':' or spaces, not {name!r}")
    variants_table = check.get(data, "variants", "", dict, required=False, default={})
    variants = {}
    for vname, vtable in variants_table.items():
        if not vname or ":" in vname:
            check.fail(f"variants.{vname}", "a variant name must be non-empty and without ':'")
        variants[vname] = _parse_variant(check, vname, vtable)
    default = check.get(fam, "default_variant", "family", str, required=False)

    if known and name in known:
        extra = sorted(set(fam) - {"name", "default_variant"})
        if extra:
            check.fail(f"family.{extra[0]}", f"family {name!r} is already defined ({', '.join(known[name].files) or 'built in'}); "
                       "a file for it may only add variants and set default_variant")
        base = known[name]
        merged = dict(base.variants, **variants)
        default = default if default is not None else base.default_variant
        if default is not None and default not in merged and not (default == "host" and name == "x86_64"):
            check.fail("family.default_variant", f"{default!r} is not a variant of {name} (known: {', '.join(merged)})")
        return replace(base, variants=merged, default_variant=default, files=[*base.files, str(path)])

    providers = check.strings(check.get(fam, "execution_providers", "family", list, required=False,
                                        default=["CPUExecutionProvider"]), "family.execution_providers")
    never = []
    for i, pair in enumerate(check.get(fam, "never_emits", "family", list, required=False, default=[])):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            check.fail(f"family.never_emits[{i}]", f"must be a [domain, op] pair of strings, not {pair!r}")
        never.append(tuple(pair))
    declared = {}
    for domain, ops in check.get(fam, "declared_kernels", "family", dict, required=False, default={}).items():
        if not isinstance(ops, list):
            check.fail(f"family.declared_kernels.{domain}", "must be a list of op types")
        declared[domain] = frozenset(check.strings(ops, f"family.declared_kernels.{domain}"))
    extra_passes = {}
    for level, names in check.get(fam, "extra_passes", "family", dict, required=False, default={}).items():
        if not level.isdigit() or int(level) > 3:
            check.fail(f"family.extra_passes.{level}", "keys must be -O levels 0..3")
        if not isinstance(names, list):
            check.fail(f"family.extra_passes.{level}", "must be a list of pass names")
        extra_passes[int(level)] = check.strings(names, f"family.extra_passes.{level}")
    fusions = []
    for i, entry in enumerate(check.get(fam, "runtime_fusions", "family", list, required=False, default=[])):
        fw = f"family.runtime_fusions[{i}]"
        if not isinstance(entry, dict):
            check.fail(fw, "must be a table {ops, by}")
        check.unknown(entry, ("ops", "by", "level"), fw)
        ops = check.strings(check.get(entry, "ops", fw, list), f"{fw}.ops")
        if len(ops) < 2:
            check.fail(f"{fw}.ops", "a fusion groups at least two ops")
        level = check.get(entry, "level", fw, str, required=False, default="all")
        if level not in RUNTIME_LEVELS:
            check.fail(f"{fw}.level", f"must be one of {', '.join(RUNTIME_LEVELS)}, not {level!r}")
        fusions.append(RuntimeFusion(ops, check.get(entry, "by", fw, str), level))
    if default is not None and default not in variants and not (default == "host" and name == "x86_64"):
        check.fail("family.default_variant", f"{default!r} is not a variant in this file (known: {', '.join(variants) or 'none'})")
    if default is None and variants:
        default = next(iter(variants))
    return Family(
        name=name,
        description=check.get(fam, "description", "family", str),
        triple=check.get(fam, "triple", "family", str),
        runtime=check.get(fam, "runtime", "family", str, required=False, default="onnxruntime"),
        execution_providers=providers,
        default_variant=default,
        never_emits=frozenset(never),
        declared_kernels=declared,
        extra_passes=extra_passes,
        runtime_fusions=tuple(fusions),
        variants=variants,
        files=[str(path)],
    )


def platform_is_x86_64() -> bool:
    """Whether graphopt runs on an x86_64 machine (then x86_64's default variant is `host`)."""
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in /proc/cpuinfo text ("flags : fpu vme ...")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect_host_variant(flags: Iterable[str]) -> str:
    """The x86_64 variant whose figures stand for a CPU with these /proc/cpuinfo flags."""
    flags = set(flags)
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def host_variant(variants: Mapping[str, Hardware], cpuinfo: str | None = None, cores: int | None = None) -> Hardware:
    """The x86_64 `host` variant: the figures of the variant the flags pick, peaks scaled to this
    machine's core count (per-core rate x os.cpu_count()); bandwidth and caches are the chosen
    variant's (nothing portable reports them)."""
    flags = cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    picked = detect_host_variant(flags)
    base = variants[picked]
    cores = cores or os.cpu_count() or base.cores
    scale = cores / base.cores
    which = next((f for f in ("avx512_vnni", "avx512f", "avx2") if f in flags), None)
    return replace(
        base,
        description=(f"detected on this host: {'flag ' + which if which else 'no AVX-512 flag'} in /proc/cpuinfo -> "
                     f"{picked} figures ({base.description}) scaled to {cores} cores"),
        peak_gflops={dtype: round(v * scale, 1) for dtype, v in base.peak_gflops.items()},
        cores=cores,
    )
