"""onnxruntime artifacts: the model as `.onnx` or `.ort`, and the session options to load it with.

`write_artifact(onnx_path, target, "onnx" | "ort", out_path)` first refuses a model that uses an
op the target does not run (`check_runs_on`), then writes the artifact (for "ort", onnxruntime's
own offline conversion, `convert_to_ort`) and beside it `<artifact name>.session.json`
(`model.ort` -> `model.ort.session.json`, `model.onnx` -> `model.onnx.session.json`: the full
artifact name, so a `.onnx` and a `.ort` of one model in one folder never share one file, and
their levels differ). The JSON (`session_options`) is what a deployer sets: providers and their
options, threads, execution mode, and the graph optimization level that adds what graphopt and
the conversion have not already done. `make_session` loads an artifact exactly as such a JSON says.

A generic target (runtime "any") gets no `.ort` and no JSON: it is handed to runtimes graphopt
does not model, whose session settings it cannot speak for.

Every file is written to a temporary file in its folder and renamed into place: a failure leaves
no half-written artifact and no artifact at all where there was none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from graphopt.errors import GraphoptError, one_line
from graphopt.ir import DEFAULT_DOMAINS, all_graphs, all_nodes, node_subgraphs

__all__ = [
    "FORMATS",
    "check_runs_on",
    "convert_to_ort",
    "conversion_level",
    "session_options",
    "session_options_path",
    "write_session_options",
    "apply_session_options",
    "make_session",
    "write_artifact",
]

FORMATS = ("onnx", "ort")
CPU = "CPUExecutionProvider"
ML_DOMAIN = "ai.onnx.ml"

# What convert_to_ort leaves out at ORT_ENABLE_ALL, as onnxruntime's own
# tools/convert_onnx_models_to_ort.py does for any platform but "amd64": NCHWc bakes in the block
# size of the converting machine's vector width (8 with AVX2, 16 with AVX-512) and does not exist
# in default arm64 builds, so an artifact holding it runs only where it was made.
NON_PORTABLE_OPTIMIZERS = ("NchwcTransformer",)


# ---------------------------------------------------------------------------------------------
# What the target runs


def check_runs_on(model: onnx.ModelProto, target) -> None:
    """Raise GraphoptError naming the first node (main graph, then subgraphs, then model-local
    functions) the target does not run.

    The rule is `target.can_emit` (what graphopt's passes may produce) with one widening: an
    `ai.onnx.ml` op passes on an onnxruntime target that lists the CPU provider and whose CPU
    provider has its kernel, because no other provider registers ai.onnx.ml kernels and
    onnxruntime places them on that CPU fallback (cuda's can_emit says no, yet a GPU deployment
    runs a classic-ML model that way). A generic target is checked by the same rule, which for it
    means standard ONNX at the model's opset and nothing else. A call of a model-local function is
    not an op: its body is checked instead (onnxruntime inlines it).
    """
    opset = _default_opset(model.opset_import)
    local = {(f.domain, f.name) for f in model.functions}
    for node in all_nodes(model.graph):
        _check_node(node, target, opset, local)
    for function in model.functions:
        fn_opset = _default_opset(function.opset_import) or opset
        for node in _function_nodes(function):
            _check_node(node, target, fn_opset, local)


def _default_opset(imports) -> int | None:
    for entry in imports:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return None


def _function_nodes(function: onnx.FunctionProto) -> Iterator[onnx.NodeProto]:
    for node in function.node:
        yield node
        for sub in node_subgraphs(node):
            yield from all_nodes(sub)


def _check_node(node: onnx.NodeProto, target, opset: int | None, local: set[tuple[str, str]]) -> None:
    from graphopt.targets import capabilities as caps

    domain = caps.normalize_domain(node.domain)
    if (node.domain, node.op_type) in local or _runs(target, node.op_type, domain, opset):
        return
    name = f"'{node.name}'" if node.name else "(unnamed)"
    where = f"{domain}::{node.op_type}" if domain else node.op_type
    raise GraphoptError(
        f"node {name} ({where}) does not run on {target.full_name} ({_why_not(target, node.op_type, domain, opset)}); "
        "choose another target or disable the pass that made it"
    )


def _runs(target, op: str, domain: str, opset: int | None) -> bool:
    from graphopt.targets import capabilities as caps

    if target.can_emit(op, domain, opset):
        return True
    return (
        domain == ML_DOMAIN
        and target.runtime == "onnxruntime"
        and CPU in target.execution_providers
        and op in (caps.kernels(CPU, ML_DOMAIN) or ())
    )


def _why_not(target, op: str, domain: str, opset: int | None) -> str:
    """The reason, in a few words, that `_runs` said no."""
    from graphopt.targets import capabilities as caps

    if domain == "":
        opset = target.max_opset if opset is None else opset
        if not caps.standard_op_exists(op, opset):
            return f"no ONNX op {op} at opset {opset}"
        if opset > target.max_opset:
            return f"onnxruntime runs opsets up to {target.max_opset}"
        return f"{caps.VERIFY_PROVIDER} has no kernel for it at opset {opset}"
    if target.runtime != "onnxruntime":
        return f"{target.name} emits standard ONNX only"
    if (domain, op) in target.never_emits or (domain, "*") in target.never_emits:
        return f"never_emits in targets/data/{target.name}.toml"
    provider = target.execution_providers[0] if target.execution_providers else "no provider"
    if op not in target.kernels(domain):
        return f"{provider} has no kernel for it"
    return f"{caps.VERIFY_PROVIDER}, which graphopt verifies on, has no kernel for it"


# ---------------------------------------------------------------------------------------------
# Conversion to .ort


def conversion_level(target) -> str:
    """The GraphOptimizationLevel name `convert_to_ort` bakes into a `.ort` for this target.

    CPU-only targets: ORT_ENABLE_ALL less NON_PORTABLE_OPTIMIZERS, onnxruntime's own
    conversion default (convert_onnx_models_to_ort.py): every fusion and the NHWC transform use
    kernels every CPU build registers, and NCHWc, the one machine-specific rewrite, is left out.
    Any other provider (cuda): ORT_ENABLE_BASIC. Conversion runs on the CPU provider of the wheel
    graphopt runs with; extended and layout rewrites run after partitioning and apply to the
    nodes assigned to a provider (onnxruntime docs, Graph Optimizations), here all of them to the
    CPU one, so they would bake in CPU-provider kernels the GPU provider lacks or runs otherwise
    (FusedConv with activations cuDNN does not map, NCHWc). Basic rewrites run before
    partitioning and keep standard ONNX ops: valid on every provider.
    """
    if target.runtime != "onnxruntime":
        raise GraphoptError(f"target {target.full_name} names no runtime, so it has no .ort artifact; use --format onnx")
    if tuple(target.execution_providers) == (CPU,):
        return "ORT_ENABLE_ALL"
    return "ORT_ENABLE_BASIC"


def convert_to_ort(onnx_path: str | os.PathLike, ort_path: str | os.PathLike, target) -> str:
    """Write `ort_path`, onnxruntime's offline conversion of `onnx_path` for `target`; returns the
    level used (`conversion_level`).

    Does not check the ops (write_artifact does: `check_runs_on`). Raises GraphoptError with
    onnxruntime's message on one line when it cannot load the model; nothing is left at
    `ort_path` then (an existing file there stays as it was).
    """
    import onnxruntime as ort

    level = conversion_level(target)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3  # the conversion's warnings are about what we chose to leave out
    options.add_session_config_entry("session.save_model_format", "ORT")
    # As the conversion script sets it per target platform: whether QDQ rewrites may keep int8
    # (signed) activations, which arm64 kernels run well and x86 ones convert to uint8.
    options.add_session_config_entry("session.qdqisint8allowed", "1" if target.name == "arm64" else "0")
    disabled = list(NON_PORTABLE_OPTIMIZERS) if level == "ORT_ENABLE_ALL" else None
    with _atomic_path(Path(ort_path)) as tmp:
        options.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(os.fspath(onnx_path), options, providers=[CPU], disabled_optimizers=disabled)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for any refusal
            raise GraphoptError(f"onnxruntime could not convert {os.fspath(onnx_path)} to .ort: {one_line(exc)}") from exc
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise GraphoptError(f"onnxruntime wrote no .ort for {os.fspath(onnx_path)}")
    return level


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); an artifact is meant to be shipped and read by others.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # there is no reading the umask without setting it
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Session options


def session_options(target, artifact_format: str, threads: int | None = None) -> dict:
    """The JSON-able session options a deployer sets to load `target`'s artifact of that format.

    `threads` overrides intra_op_num_threads (default: the variant's cores on a CPU target; 0,
    onnxruntime's choice of the host's physical cores, on a GPU target, whose "cores" are SMs).
    """
    import onnxruntime as ort

    _check_format(artifact_format)
    if target.runtime != "onnxruntime":
        raise GraphoptError(f"target {target.full_name} names no runtime, so graphopt writes no onnxruntime session options for it")
    gpu = target.execution_providers[0] != CPU
    why: dict[str, str] = {}

    providers: list = []
    for name in target.execution_providers:
        if name == "CUDAExecutionProvider":
            # device_id: the first GPU; a multi-GPU host sets it per process. The rest of the
            # CUDA provider's options are onnxruntime's defaults, which are what graphopt measured.
            providers.append([name, {"device_id": 0}])
        else:
            providers.append(name)
    why["execution_providers"] = (
        f"{target.execution_providers[0]} first; {CPU} runs what it has no kernel for"
        if gpu else f"{CPU}: the provider {target.name} runs on"
    )

    if threads is not None:
        intra = int(threads)
        why["intra_op_num_threads"] = "as asked"
    elif gpu or target.hardware is None:
        intra = 0
        why["intra_op_num_threads"] = "0: onnxruntime picks the host's physical cores (the GPU's SM count says nothing of the host CPU)"
    else:
        intra = int(target.hardware.cores)
        why["intra_op_num_threads"] = f"the {target.full_name} variant's {intra} cores"
    why["inter_op_num_threads"] = "1: sequential execution runs one node at a time, so no inter-op pool"
    why["execution_mode"] = "ORT_SEQUENTIAL: parallelism is inside each kernel (intra-op threads)"

    level = _load_level(target, artifact_format)
    kind = "gpu" if gpu else "arm64" if target.name == "arm64" else "cpu"
    why["graph_optimization_level"] = _LOAD_LEVEL_WHY["ort" if artifact_format == "ort" else ("onnx", kind)]
    if artifact_format == "ort":
        baked = conversion_level(target)
        left_out = f" less {', '.join(NON_PORTABLE_OPTIMIZERS)} (machine-specific)" if baked == "ORT_ENABLE_ALL" else ""
        why["conversion"] = f"converted at {baked}{left_out}: {_CONVERSION_WHY[baked]}"
    return {
        "target": target.full_name,
        "format": artifact_format,
        "onnxruntime": ort.__version__,
        "execution_providers": providers,
        "intra_op_num_threads": intra,
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": level,
        "why": why,
    }


def _load_level(target, artifact_format: str) -> str:
    if artifact_format == "ort":
        return "ORT_DISABLE_ALL"
    if target.execution_providers[0] != CPU:
        return "ORT_ENABLE_EXTENDED"
    return "ORT_ENABLE_ALL"


_LOAD_LEVEL_WHY = {
    # A full onnxruntime build runs no graph transformer on an ORT-format model at load (only
    # optimizations saved with the "Runtime" conversion style, which this fixed-style one has
    # none of): a .ort converted without NCHWc and loaded at ORT_ENABLE_ALL keeps the same nodes
    # (checked with onnxruntime 1.32's profiler; tests/test_ort_backend.py pins it), so a level
    # would only promise what does not happen.
    "ort": "ORT_DISABLE_ALL: onnxruntime applies no graph optimization to a .ort at load; the conversion baked them in",
    # graphopt folded, cleaned up and fused what the target runs, but does not do onnxruntime's
    # layout transform, which must be chosen on the machine that runs: NCHWc is registered on
    # every x86_64 build with the block size of its vector width (measured: ResNet-50 57 ms at
    # ALL against 80 ms at EXTENDED on one x86 thread).
    ("onnx", "cpu"): "ORT_ENABLE_ALL: adds the NCHWc layout for this machine's vector width, which graphopt leaves to load time",
    # On arm64 NCHWc is registered only in builds configured with onnxruntime_USE_ARM_NEON_NCHWC
    # (a no-op elsewhere); the level also runs the NHWC transform for quantized and fp16 convs.
    ("onnx", "arm64"): "ORT_ENABLE_ALL: the NHWC transform (quantized/fp16 convs) pays on ARM; NCHWc is a no-op in default arm64 builds",
    # Layout rewrites apply only to nodes assigned to the CPU provider (onnxruntime docs, Graph
    # Optimizations): on a GPU target those are the fallback; extended fusions also cover CUDA nodes.
    ("onnx", "gpu"): "ORT_ENABLE_EXTENDED: fusions still apply to CUDA nodes; layout rewrites would touch only CPU-fallback nodes",
}


_CONVERSION_WHY = {
    "ORT_ENABLE_ALL": "every CPU build has the kernels its fusions use",
    "ORT_ENABLE_BASIC": "later levels would bake in CPU-provider kernels, as conversion runs on the CPU provider",
}


def session_options_path(artifact_path: str | os.PathLike) -> Path:
    """Where the session JSON of an artifact goes: `<artifact name>.session.json` beside it."""
    artifact_path = Path(artifact_path)
    return artifact_path.with_name(artifact_path.name + ".session.json")


def write_session_options(path: str | os.PathLike, options: dict) -> Path:
    """Write `options` as JSON at `path`, atomically; returns the path."""
    path = Path(path)
    text = json.dumps(options, indent=2, sort_keys=False) + "\n"
    with _atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def apply_session_options(options: dict, providers_available: Sequence[str] | None = None):
    """(onnxruntime.SessionOptions, providers) as `options` (a `session_options` dict) says.

    Providers this onnxruntime lacks (`providers_available`, default `get_available_providers()`)
    are dropped, so a CUDA artifact loads on the CPU wheel on CPU alone; the session's
    `get_providers()` tells which ran. Raises GraphoptError on a value onnxruntime has no name for.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers() if providers_available is None else providers_available)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(options.get("intra_op_num_threads", 0))
    so.inter_op_num_threads = int(options.get("inter_op_num_threads", 0))
    so.execution_mode = _enum(ort.ExecutionMode, options.get("execution_mode", "ORT_SEQUENTIAL"), "execution_mode")
    so.graph_optimization_level = _enum(
        ort.GraphOptimizationLevel, options.get("graph_optimization_level", "ORT_ENABLE_ALL"), "graph_optimization_level"
    )
    providers: list = []
    for entry in options.get("execution_providers", [CPU]):
        name, provider_options = (entry, None) if isinstance(entry, str) else (entry[0], entry[1])
        if name not in available:
            continue
        providers.append((name, {k: str(v) for k, v in provider_options.items()}) if provider_options else name)
    if not providers:
        providers = [CPU]
    return so, providers


def _enum(kind, name: str, field: str):
    if name not in kind.__members__:
        raise GraphoptError(f"session option {field} = {name!r} is not one of {', '.join(kind.__members__)}")
    return kind.__members__[name]


def make_session(model_path: str | os.PathLike, options: dict, providers_available: Sequence[str] | None = None):
    """An onnxruntime.InferenceSession of `model_path` loaded as `options` says (see apply_session_options)."""
    import onnxruntime as ort

    so, providers = apply_session_options(options, providers_available)
    return ort.InferenceSession(os.fspath(model_path), so, providers=providers)


# ---------------------------------------------------------------------------------------------
# The artifact


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise GraphoptError(f"unknown artifact format '{fmt}'; known formats: {', '.join(FORMATS)}")


def write_artifact(onnx_path: str | os.PathLike, target, fmt: str, out_path: str | os.PathLike) -> list[Path]:
    """Check, then write `target`'s artifact of `onnx_path` at `out_path` and its session JSON
    beside (`session_options_path`; none for a generic target); returns the files written.

    "onnx": `onnx_path` copied to `out_path` (nothing copied when they are the same file); a model
    with external data is copied only within its folder, where the data's relative paths hold.
    "ort": `convert_to_ort`. Raises GraphoptError, writing nothing, for an unknown format, an op
    the target does not run, or "ort" for a target with no runtime.
    """
    _check_format(fmt)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if fmt == "ort" and target.runtime != "onnxruntime":
        raise GraphoptError(f"target {target.full_name} names no runtime, so it has no .ort artifact; use --format onnx")
    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise GraphoptError(f"cannot read {onnx_path}: {one_line(exc)}") from exc
    check_runs_on(model, target)

    written: list[Path] = []
    if fmt == "ort":
        convert_to_ort(onnx_path, out_path, target)
        written.append(out_path)
    else:
        if not (out_path.exists() and out_path.samefile(onnx_path)):
            if _has_external_data(model) and out_path.resolve().parent != onnx_path.resolve().parent:
                raise GraphoptError(f"{onnx_path} keeps weights in external files; write it to {out_path} directly")
            with _atomic_path(out_path) as tmp:
                shutil.copyfile(onnx_path, tmp)
        written.append(out_path)
    if target.runtime == "onnxruntime":
        written.append(write_session_options(session_options_path(out_path), session_options(target, fmt)))
    return written


def _has_external_data(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for g in all_graphs(model.graph) for t in g.initializer)
