"""The TVM backend: graphopt's optimized graph compiled by Apache TVM into a shared library.

The graph (standard ONNX ops only: `for_tvm` makes the target runtime-neutral, so no pass emits an
onnxruntime contrib op, and onnxruntime's own workarounds such as residual-add-as-sum stay out) is
imported with TVM's Relax ONNX frontend at static shapes, compiled with `tvm.compile` for the
target's LLVM or CUDA description (`tvm_target`), and exported as one shared library. Beside it a
manifest (`manifest_path`) records the inputs and outputs (names, shapes, dtypes, in the ONNX
model's order), the target, graphopt's and TVM's versions and the tuning database's digest;
`graphopt.runtime.load` reads both and returns a callable with the ONNX model's inputs and outputs.

Targets:
* x86_64: llvm for x86_64-linux-gnu; the host variant takes LLVM's name for this machine's CPU
  (its features), the named variants their `mcpu`.
* arm64: llvm for aarch64-linux-gnu with the variant's `mcpu` and `mattr` (+neon, +dotprod,
  +i8mm, +sve), linked by Debian's cross compiler aarch64-linux-gnu-gcc.
* cuda: CUDA code for the variant's `arch` (its `mcpu`, sm_80), host code for this machine;
  compiled and exported without a GPU, loaded only on a machine with one.

Which TVM: apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.14.post1 (the `tvm` extra); 0.1.15's
ffi crashes in every MetaSchedule tuning run (../shared/notes/tvm-0.27.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.runtime import MANIFEST_FORMAT

MANIFEST_VERSION = 1
ARM64_CROSS_COMPILER = "aarch64-linux-gnu-gcc"
INSTALL_HINT = "pip install 'graphopt[tvm]'"


def for_tvm(target):
    """The target as TVM compiles for it: the same hardware, no onnxruntime (standard ops only,
    none of onnxruntime's workaround passes, none of its session-time fusions)."""
    family = dataclasses.replace(target.family, runtime="tvm", execution_providers=(), extra_passes={}, runtime_fusions=(),
                                 declared_kernels={})
    return dataclasses.replace(target, family=family)


def import_tvm():
    try:
        import tvm
        import tvm.relax  # noqa: F401 - the frontend and VM live there
    except ImportError:
        raise GraphoptError(f"--backend tvm needs Apache TVM, which is not installed: {INSTALL_HINT}") from None
    return tvm


def tvm_target(target) -> dict:
    """The TVM target (its dict form: 0.27 refuses the old string form) for a graphopt target."""
    hw = target.hardware
    if target.name == "x86_64":
        return _x86_spec(target)
    if target.name == "arm64":
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": hw.mcpu, "num-cores": hw.cores}
        if hw.mattr:
            spec["mattr"] = [a.strip() for a in hw.mattr.split(",") if a.strip()]
        return spec
    if target.name == "cuda":
        from graphopt.targets.hardware import cpu_flags, read_cpuinfo

        mcpu, mattr = host_x86_features(cpu_flags(read_cpuinfo()))  # the host code runs on the build machine's kind
        return {"kind": "cuda", "arch": hw.mcpu, "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, **({"mattr": mattr} if mattr else {})}}
    raise GraphoptError(f"--backend tvm compiles for x86_64, arm64 or cuda, not for target {target.full_name}")


# /proc/cpuinfo flags -> LLVM features beyond an x86-64 microarchitecture level.
X86_EXTRA_FEATURES = {"avx512_vnni": "+avx512vnni", "avx_vnni": "+avxvnni", "avx512_bf16": "+avx512bf16",
                      "amx_tile": "+amx-tile", "amx_int8": "+amx-int8", "amx_bf16": "+amx-bf16"}
X86_64_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
X86_64_V3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}


def host_x86_features(flags) -> tuple[str, list[str]]:
    """(LLVM mcpu, mattr) for the CPU whose /proc/cpuinfo flags these are: an x86-64 level and the
    extras it has. Not LLVM's host CPU name: a virtual machine reports its chip's model (znver4)
    with AVX-512 masked off, and code for znver4 then dies of an illegal instruction."""
    flags = set(flags)
    level = "x86-64-v4" if X86_64_V4 <= flags else "x86-64-v3" if X86_64_V3 <= flags else "x86-64-v2"
    return level, [feature for flag, feature in X86_EXTRA_FEATURES.items() if flag in flags]


def _x86_spec(target) -> dict:
    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": target.hardware.mcpu, "num-cores": target.hardware.cores}
    if target.variant == "host":
        from graphopt.targets.hardware import cpu_flags, read_cpuinfo

        spec["mcpu"], mattr = host_x86_features(cpu_flags(read_cpuinfo()))
        spec["num-cores"] = os.cpu_count() or 1
        if mattr:
            spec["mattr"] = mattr
    return spec


def static_signature(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) as [{"name", "shape", "dtype"}]; refuses a dynamic input in one line."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs, dynamic = [], []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if not value.type.tensor_type.HasField("shape") or any(d is None or d <= 0 for d in shape):
            dynamic.append(f"{value.name} {[d.dim_param or '?' if not d.HasField('dim_value') else d.dim_value for d in dims]}")
        inputs.append({"name": value.name, "shape": shape, "dtype": _dtype(value)})
    if dynamic:
        raise GraphoptError(f"--backend tvm compiles static shapes, and these inputs are dynamic: {'; '.join(dynamic)}; "
                            "fix them with --input-shape NAME:D0,D1,... or --dim SYMBOL=VALUE")
    outputs = [{"name": v.name, "shape": [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim],
                "dtype": _dtype(v)} for v in proto.graph.output]
    return inputs, outputs


def _dtype(value: onnx.ValueInfoProto) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


def database_digest(db: Path | None) -> str | None:
    """A digest of a tuning database folder's files (what the build was tuned with), or None."""
    if db is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(db).glob("*.json")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def relax_module(proto: onnx.ModelProto):
    """The model imported by TVM's Relax ONNX frontend at its static input shapes, its QDQ
    convolutions and matmuls computed in integers (tvm_int8)."""
    import_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    from graphopt.targets.backends.tvm_int8 import lower_qdq

    inputs, _ = static_signature(proto)
    try:
        mod = from_onnx(proto, shape_dict={i["name"]: i["shape"] for i in inputs}, dtype_dict={i["name"]: i["dtype"] for i in inputs})
    except Exception as exc:  # noqa: BLE001 - the frontend raises many types; the user needs the op
        raise GraphoptError(f"TVM's ONNX frontend cannot import the model: {_one_line(exc)}") from None
    return lower_qdq(mod)


def tuning_module(proto: onnx.ModelProto, tvm_tgt, imported=None):
    """The model lowered to the TIR functions tuning measures and a database is applied to (the
    two must match structurally): decomposed for inference, fused, legalized, and with its constant
    weights marked layout-free so that tuned schedules may store them pre-packed."""
    import tvm
    from tvm import relax

    with tvm_tgt:
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                         relax.get_pipeline("zero"), relax.transform.AttachAttrLayoutFreeBuffers()])(imported if imported is not None else relax_module(proto))


def compile_model(proto: onnx.ModelProto, target, db: Path | None = None, imported=None):
    """The model compiled by TVM for the target: a relax executable, ready to export.
    `imported`: its `relax_module`, where the caller has it already."""
    tvm = import_tvm()
    from tvm import relax

    tvm_tgt = tvm.target.Target(tvm_target(target))
    if db is not None:
        from graphopt.targets.backends.tvm_schedules import register_vnni_intrinsic

        # The database's integer traces tensorize with graphopt's intrinsic: replaying them in a
        # process that did not tune needs it registered.
        register_vnni_intrinsic()
        mod = tuning_module(proto, tvm_tgt, imported)
        with tvm_tgt:
            # The tuned schedules read the weights in the blocked layouts they chose: the layout
            # transforms split off and folded into the constants at compile time (prepacked
            # weights), so the library's interface stays the ONNX model's.
            mod = tvm.transform.Sequential([relax.transform.MetaScheduleApplyDatabase(str(db)), relax.transform.SplitLayoutRewritePreproc(),
                                            relax.transform.FoldConstant()])(mod)
    else:
        mod = imported if imported is not None else relax_module(proto)
    if target.name == "cuda":
        with tvm_tgt:
            from tvm.s_tir import dlight

            mod = dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                              dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())(relax.get_pipeline("zero")(mod))
    return tvm.compile(mod, target=tvm_tgt)


def export(executable, target, path: Path) -> None:
    """Writes the shared library (cross-linked for arm64)."""
    if target.name == "arm64":
        if shutil.which(ARM64_CROSS_COMPILER) is None:
            raise GraphoptError(f"the arm64 library is linked with {ARM64_CROSS_COMPILER}, which is not installed "
                                "(Debian: apt-get install gcc-aarch64-linux-gnu)")
        executable.export_library(str(path), cc=ARM64_CROSS_COMPILER)
    else:
        executable.export_library(str(path))


def build(proto: onnx.ModelProto, target, db: Path | None, library: Path) -> dict:
    """Compiles the model, writes the library and its manifest beside it; the manifest."""
    from graphopt.targets.backends.tvm_int8 import integer_layers

    imported = relax_module(proto)
    export(compile_model(proto, target, db, imported), target, library)
    data = manifest(proto, target, db, library)
    data["integer_layers"] = integer_layers(imported)
    write_manifest(data, manifest_path(library))
    return data


def manifest_path(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def manifest(proto: onnx.ModelProto, target, db: Path | None, library: Path) -> dict:
    import tvm

    from graphopt import __version__

    inputs, outputs = static_signature(proto)
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "library": library.name, "inputs": inputs, "outputs": outputs,
            "target": target.full_name, "tvm_target": tvm_target(target), "device": "cuda" if target.name == "cuda" else "cpu",
            "graphopt_version": __version__, "tvm_version": tvm.__version__, "tuning_database": database_digest(db)}


def write_manifest(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def runs_here(target) -> bool:
    """Whether this machine can load and run the library (same architecture, a GPU for cuda)."""
    import platform

    if target.name == "x86_64":
        return platform.machine() in ("x86_64", "AMD64")
    if target.name == "arm64":
        return platform.machine() in ("aarch64", "arm64")
    return False  # cuda: graphopt does not probe for a GPU; `graphopt.runtime.load` there


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def time_against_onnxruntime(library, onnx_path: str, feeds: dict, rounds: int, seconds: float) -> dict:
    """Median milliseconds of the library and of onnxruntime (ORT_ENABLE_ALL, all cores) on the
    same model and inputs, rounds interleaved in a shuffled order, stopped after `seconds`; the
    ratio tvm / onnxruntime."""
    import random
    import statistics
    import time

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    runners = {"tvm": lambda: library(feeds), "onnxruntime": lambda: session.run(None, feeds)}
    for run in runners.values():
        run()  # warm-up: first-call allocation and code loading
    times: dict[str, list[float]] = {name: [] for name in runners}
    order, rng, deadline = list(runners), random.Random(0), time.perf_counter() + seconds
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    tvm_ms, ort_ms = (statistics.median(times[n]) * 1e3 for n in ("tvm", "onnxruntime"))
    return {"tvm_ms": round(tvm_ms, 3), "onnxruntime_ms": round(ort_ms, 3), "ratio": round(tvm_ms / ort_ms, 3), "rounds": len(times["tvm"])}
