"""Targets: what each may emit (Target.can_emit, PassContext.can_emit), probed from onnxruntime."""

from __future__ import annotations

import re
import time

import numpy as np
import onnx
import onnx.defs
import onnxruntime as ort
import pytest
from helpers import make_model
from onnx import TensorProto, helper

from graphopt import targets
from graphopt.loading import from_proto
from graphopt.pass_manager import PassContext
from graphopt.targets import capabilities as caps

MS = "com.microsoft"
CPU = "CPUExecutionProvider"

# Fused ops graphopt's fusions emit on CPU; all have CPU kernels in onnxruntime >= 1.17.
CPU_FUSED = ("FusedConv", "FusedMatMul", "Attention", "SkipLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "MultiHeadAttention")
# com.microsoft ops whose only kernels are CUDA ones (onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc).
CUDA_ONLY = ("BiasAdd", "BiasSplitGelu", "GroupNorm")
# The hand-written com.microsoft list of the cuda target (targets/data/cuda.toml), as loaded.
CUDA_CONTRIB_OPS = targets.get("cuda").declared_kernels[MS]


@pytest.fixture(scope="module")
def cpu_ms() -> frozenset[str]:
    found = caps.kernels(CPU, MS)
    assert found is not None, "the installed onnxruntime reported no CPU kernels (get_all_opkernel_def)"
    return found


def test_the_probe_reports_the_cpu_contrib_kernels(cpu_ms):
    assert set(CPU_FUSED) <= cpu_ms, sorted(set(CPU_FUSED) - cpu_ms)
    # Standard kernels come with their opset ranges, and the default domain is "" however spelled.
    ranges = caps.kernel_table()[CPU][""]["LayerNormalization"]
    assert any(start == 17 for start, _ in ranges), ranges
    assert caps.kernels(CPU, "ai.onnx") == caps.kernels(CPU, "")


@pytest.mark.parametrize("name", ["x86_64", "arm64"])
def test_cpu_targets_emit_the_fused_ops_their_provider_has(name, cpu_ms):
    target = targets.get(name)
    for op in CPU_FUSED:
        assert target.can_emit(op, MS), op
    # Everything the probe reports for com.microsoft, and nothing else.
    assert all(target.can_emit(op, MS) for op in cpu_ms)
    assert not target.can_emit("NoSuchFusedOp", MS)
    assert not target.can_emit("NoSuchOp")
    assert not target.can_emit("FusedConv")  # the right op in the wrong domain
    assert not target.can_emit("FusedConv", "com.example")


@pytest.mark.parametrize("name", ["x86_64", "arm64", "generic"])
def test_cuda_only_contrib_ops_are_not_emitted_for_cpu(name, cpu_ms):
    for op in CUDA_ONLY:
        assert op in CUDA_CONTRIB_OPS and op not in cpu_ms, op
        assert not targets.get(name).can_emit(op, MS), op


def test_cuda_emits_listed_contrib_ops_that_verification_can_run(cpu_ms):
    cuda = targets.get("cuda")
    for op in ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "FastGelu", "BiasGelu", "FusedMatMul"):
        assert cuda.can_emit(op, MS), op
    # Listed for CUDA but with no CPU kernel: graphopt verifies on CPU, so not emitted.
    assert set(CUDA_ONLY) <= cuda.kernels(MS)
    assert not any(cuda.can_emit(op, MS) for op in CUDA_ONLY)
    # CUDA's FusedConv serves activation="Relu" only: never emitted, though the CPU has one.
    assert "FusedConv" in cpu_ms and not cuda.can_emit("FusedConv", MS)
    # CPU kernels that CUDA lacks (the probe reports no CUDA provider in a CPU wheel) are not emitted.
    cpu_only = sorted(cpu_ms - cuda.kernels(MS))
    assert cpu_only and not any(cuda.can_emit(op, MS) for op in cpu_only), cpu_only


def test_nchwc_layout_kernels_are_x86_only():
    if not caps.kernels(CPU, "com.microsoft.nchwc"):
        pytest.skip("this host's onnxruntime registers no NCHWc kernels (not x86_64)")
    assert targets.get("x86_64").can_emit("Conv", "com.microsoft.nchwc")
    assert not targets.get("arm64").can_emit("Conv", "com.microsoft.nchwc")


def test_generic_emits_standard_onnx_at_the_models_opset_only(cpu_ms):
    generic = targets.get("generic")
    assert (generic.runtime, generic.execution_providers) == ("any", ())
    assert generic.can_emit("LayerNormalization", "", 17)
    assert generic.can_emit("LayerNormalization", "ai.onnx", 17)
    assert not generic.can_emit("LayerNormalization", "", 16)
    assert not generic.can_emit("Gelu", "", 19)
    assert generic.can_emit("Gelu", "", 20)
    assert not any(generic.can_emit(op, MS, 20) for op in cpu_ms)
    assert not generic.can_emit("Conv", "com.microsoft.nchwc")
    assert generic.kernels(MS) == frozenset()
    # Removed from the standard: Scatter exists at opset 10, is deprecated from 11.
    assert generic.can_emit("Scatter", "", 10) and not generic.can_emit("Scatter", "", 11)


@pytest.mark.parametrize("name", ["x86_64", "arm64", "cuda"])
def test_an_op_newer_than_the_models_opset_is_not_emitted(name):
    target = targets.get(name)
    assert not target.can_emit("LayerNormalization", "", 16) and target.can_emit("LayerNormalization", "", 17)
    assert not target.can_emit("Gelu", "", 19) and target.can_emit("Gelu", "", 20)
    assert not target.can_emit("Relu", "", target.max_opset + 1)
    assert target.can_emit("Relu")  # opset None: the newest the target runs


def _ops_at(opset):
    names = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    return sorted(op for op in names if caps.standard_op_exists(op, opset))


def test_standard_ops_need_a_kernel_or_a_function_body():
    x86, generic = targets.get("x86_64"), targets.get("generic")
    opset = x86.max_opset
    ops = _ops_at(opset)
    schema = {op: caps.standard_schema(op, opset) for op in ops}
    unrunnable = [op for op in ops if not x86.can_emit(op, "", opset)]
    # Those the runtime cannot run have neither a kernel for their version nor a function body,
    # and generic (no runtime of its own) still emits them.
    for op in unrunnable:
        assert not (schema[op].has_function or schema[op].has_context_dependent_function), op
        assert generic.can_emit(op, "", opset), op
    assert len(unrunnable) < len(ops) / 10, unrunnable
    # An op without a kernel but with a function body runs: onnxruntime inlines it.
    inlined = [op for op in ops if schema[op].has_function and op not in caps.kernel_table()[CPU][""]]
    assert "HardSwish" in inlined or opset < 22, inlined
    if "HardSwish" in inlined:
        assert x86.can_emit("HardSwish", "", 22)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
        model = make_model([helper.make_node("HardSwish", ["x"], ["y"])], [x], [y], opset=22)
        session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
        session.run(None, {"x": np.ones(4, np.float32)})


def test_kernel_versions_follow_onnxruntimes_matching_rule(monkeypatch):
    # Abs: since 6 and 13 (no function body). A kernel from 6 to 12 serves opset 6..12; an
    # open-ended kernel from 6 serves only since_version 6, not the newer Abs-13.
    monkeypatch.setattr(caps, "kernel_table", lambda: {CPU: {"": {"Abs": ((6, 12),)}}})
    assert caps.runs_standard_op(CPU, "Abs", 12) and not caps.runs_standard_op(CPU, "Abs", 13)
    monkeypatch.setattr(caps, "kernel_table", lambda: {CPU: {"": {"Abs": ((6, 2**31 - 1),)}}})
    assert caps.runs_standard_op(CPU, "Abs", 6) and not caps.runs_standard_op(CPU, "Abs", 13)
    assert not caps.runs_standard_op("CUDAExecutionProvider", "Abs", 13)
    # Without a kernel-def API the opset bound is all there is.
    monkeypatch.setattr(caps, "kernel_table", lambda: None)
    assert caps.runs_standard_op(CPU, "Abs", 13) and not caps.runs_standard_op(CPU, "Gelu", 19)


def test_without_the_kernel_def_api_the_probe_reports_nothing(monkeypatch):
    from onnxruntime.capi import _pybind_state

    monkeypatch.delattr(_pybind_state, "get_all_opkernel_def")
    monkeypatch.setattr(caps, "_kernel_defs", caps._kernel_defs.__wrapped__)  # probe again, uncached
    assert caps.kernel_table.__wrapped__() is None and caps.typed_kernel_table.__wrapped__() is None


def test_the_probe_is_cached_and_fast(monkeypatch):
    table = caps.kernel_table()
    assert caps.kernel_table() is table
    start = time.perf_counter()
    again = caps.kernel_table.__wrapped__()  # uncached
    assert time.perf_counter() - start < 1.0
    assert again == table

    from onnxruntime.capi import _pybind_state

    def fail():
        raise AssertionError("probed twice")

    monkeypatch.setattr(_pybind_state, "get_all_opkernel_def", fail)
    for name in targets.available():
        targets.get(name).can_emit("QuickGelu", MS)
        targets.get(name).can_emit("Softmax", "", 13)


def _context(opset, target=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=opset)
    return PassContext(model=from_proto(model), target=target)


def test_pass_context_asks_its_target_at_the_models_opset():
    ctx = _context(17, targets.get("generic"))
    assert ctx.can_emit("LayerNormalization") and not ctx.can_emit("Gelu")
    assert not ctx.can_emit("FusedConv", MS)
    assert _context(20, targets.get("generic")).can_emit("Gelu")
    assert not _context(16, targets.get("x86_64")).can_emit("LayerNormalization")


def test_pass_context_without_a_target_answers_for_x86_64():
    ctx = _context(17)
    assert ctx.target is None
    assert ctx.can_emit("FusedConv", MS) and ctx.can_emit("LayerNormalization")
    assert not ctx.can_emit("BiasAdd", MS) and not ctx.can_emit("Gelu")
    for op in ("FusedConv", "BiasAdd", "NoSuchOp"):
        assert ctx.can_emit(op, MS) == targets.get("x86_64").can_emit(op, MS, 17)


def test_cli_lists_generic(cli):
    proc = cli("targets")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\bgeneric\b.*\bany\b", proc.stdout), proc.stdout


def test_cli_runs_for_the_generic_target(cli, tmp_path):
    out = tmp_path / "bert.onnx"
    proc = cli("run", "zoo:bert_tiny", "--target", "generic", "-o", out, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(out)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert '"target": "generic"' in (tmp_path / "r.json").read_text()


# --- Hardware descriptions as data (targets/data/*.toml, --target-file) ---------------------------

from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.targets import hardware as hw_mod  # noqa: E402

FAMILIES = {
    "x86_64": {"avx2", "avx512", "avx512-vnni"},
    "arm64": {"neoverse-n1", "neoverse-v1", "cortex-a76"},
    "cuda": {"a100", "h100"},
    "generic": set(),
}

NEW_FAMILY = """
schema = 1
[family]
name = "myfamily"
description = "a made-up accelerator"
triple = "riscv64-linux-gnu"
default_variant = "small"

[variants.small]
description = "made-up chip, 8 cores at 1 GHz"
cores = 8
vector_bits = 128
memory_bandwidth_gbs = 25.6
int8_signedness = "s8s8"
layout = "NHWC"
mcpu = "generic-rv64"
mattr = "+v"
caches = [{ level = "L1d", kib = 32, scope = "per-core" }]
sources = [{ title = "made up", url = "https://example.com/datasheet.pdf" }]
[variants.small.peak_gflops]
fp32 = 256.0
int8 = 1024.0
"""


def _all_variants():
    return [(family, v) for family, variants in FAMILIES.items() for v in sorted(variants)]


def test_the_four_families_are_data_files():
    assert set(targets.families()) >= set(FAMILIES)
    for family, variants in FAMILIES.items():
        assert (hw_mod.DATA_DIR / f"{family}.toml").is_file()
        assert variants <= set(targets.families()[family].variants)


@pytest.mark.parametrize(("family", "variant"), _all_variants())
def test_every_variant_loads_with_positive_figures_and_sources(family, variant):
    target = targets.get(f"{family}:{variant}")
    assert (target.name, target.variant, target.full_name) == (family, variant, f"{family}:{variant}")
    hw = target.hardware
    assert hw is not None and hw.cores > 0 and hw.vector_bits > 0
    assert hw.memory_bandwidth_gbs > 0
    assert {"fp32", "fp16", "bf16", "int8"} <= set(hw.peak_gflops)
    assert all(v > 0 for v in hw.peak_gflops.values())
    assert hw.peak("fp32") == hw.peak_gflops["fp32"] and hw.peak("fp8") == hw.peak_gflops.get("fp8", hw.peak_gflops["fp32"])
    assert hw.int8_signedness in ("u8s8", "s8s8") and hw.layout in ("NCHW", "NHWC")
    assert hw.mcpu and hw.caches and all(c.kib > 0 and c.scope in ("per-core", "total") for c in hw.caches)
    assert hw.sources and all(s.url.startswith("https://") and s.title for s in hw.sources)


def test_default_variants_and_the_unchanged_target_api():
    assert targets.get("arm64").variant == "neoverse-n1"
    assert targets.get("cuda").variant == "a100"
    generic = targets.get("generic")
    assert (generic.variant, generic.hardware, generic.full_name) == (None, None, "generic")
    x86 = targets.get("x86_64")
    assert x86.variant == ("host" if hw_mod.platform_is_x86_64() else "avx2")
    # The family's fields are the same whichever variant.
    for name in ("x86_64", "arm64", "cuda"):
        a, b = targets.get(name), targets.get(f"{name}:{sorted(FAMILIES[name])[0]}")
        assert a.name == b.name == name
        assert (a.triple, a.runtime, a.execution_providers, a.never_emits, a.declared_kernels) == (
            b.triple, b.runtime, b.execution_providers, b.never_emits, b.declared_kernels)
    assert targets.get("x86_64:avx512").can_emit("FusedConv", MS)
    assert set(targets.available()) >= set(FAMILIES)
    assert targets.get("cuda:h100").hardware.peak_gflops["fp8"] > targets.get("cuda:h100").hardware.peak_gflops["fp16"]


def test_int8_signedness_follows_the_instruction_set():
    assert targets.get("x86_64:avx512-vnni").hardware.int8_signedness == "u8s8"
    assert targets.get("arm64:neoverse-n1").hardware.int8_signedness == "s8s8"
    assert targets.get("cuda:a100").hardware.int8_signedness == "s8s8"


def test_host_detection_picks_the_variant_from_the_cpuinfo_flags():
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 fma {}\n\nprocessor\t: 1\n"
    pick = hw_mod.detect_host_variant
    assert pick(hw_mod.cpu_flags(cpuinfo.format("avx512f avx512bw avx512_vnni"))) == "avx512-vnni"
    assert pick(hw_mod.cpu_flags(cpuinfo.format("avx512f avx512bw"))) == "avx512"
    assert pick(hw_mod.cpu_flags(cpuinfo.format(""))) == "avx2"
    assert pick([]) == "avx2"
    variants = targets.families()["x86_64"].variants
    host = hw_mod.host_variant(variants, cpuinfo.format("avx512f"), cores=7)
    assert host.cores == 7 and "detected" in host.description
    per_core = variants["avx512"].peak_gflops["fp32"] / variants["avx512"].cores
    assert host.peak_gflops["fp32"] == pytest.approx(per_core * 7, rel=1e-3)
    assert host.int8_signedness == "u8s8" and host.mcpu == variants["avx512"].mcpu


def test_unknown_families_and_variants_are_one_line_errors():
    with pytest.raises(GraphoptError, match=r"unknown variant 'nope' of target arm64; known variants of arm64: neoverse-n1") as exc:
        targets.get("arm64:nope")
    assert "\n" not in str(exc.value)
    with pytest.raises(GraphoptError, match=r"unknown target 'riscv'; known targets: arm64, cuda, generic"):
        targets.get("riscv:x")
    with pytest.raises(GraphoptError, match="generic has no variants"):
        targets.get("generic:foo")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.replace('cores = 8\n', ''), r"variants\.small\.cores: missing"),
    (lambda s: s.replace('memory_bandwidth_gbs = 25.6', 'memory_bandwidth_gbs = -1'), r"variants\.small\.memory_bandwidth_gbs: must be positive"),
    (lambda s: s.replace('"s8s8"', '"s4s4"'), r"variants\.small\.int8_signedness: must be one of u8s8, s8s8"),
    (lambda s: s.replace('fp32 = 256.0', 'fp33 = 256.0'), r"variants\.small\.peak_gflops\.fp32: missing"),
    (lambda s: s.replace('triple = "riscv64-linux-gnu"\n', ''), r"family\.triple: missing"),
    (lambda s: s.replace('[family]', '[family'), r"not valid TOML"),
    (lambda s: s.replace('url = "https://example.com/datasheet.pdf"', 'url = "see the datasheet"'), r"sources\[0\]\.url: must be an http"),
    (lambda s: s.replace('name = "myfamily"', 'name = "x86_64"'), r"family\.description: family 'x86_64' is already defined"),
])
def test_a_broken_target_file_names_the_file_and_the_field(tmp_path, edit, message):
    path = tmp_path / "broken.toml"
    path.write_text(edit(NEW_FAMILY))
    with pytest.raises(GraphoptError, match=message) as exc:
        hw_mod.parse_file(path, targets.families())
    assert str(exc.value).startswith(f"target file {path}: ") and "\n" not in str(exc.value)


def test_a_target_file_adds_variants_to_a_known_family(tmp_path):
    extra = NEW_FAMILY.split("[variants.small]", 1)[1].replace("[variants.small.", "[variants.tiny.")
    path = tmp_path / "arm-extra.toml"
    path.write_text('[family]\nname = "arm64"\n[variants.tiny]' + extra)
    family = hw_mod.parse_file(path, targets.families())
    assert set(family.variants) == FAMILIES["arm64"] | {"tiny"}
    assert family.default_variant == "neoverse-n1" and family.triple == "aarch64-linux-gnu"


def test_cli_lists_families_with_their_variants(cli):
    proc = cli("targets")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\bcuda\b.*\ba100\*, h100\b", proc.stdout), proc.stdout
    assert re.search(r"\barm64\b.*\bneoverse-n1\*, neoverse-v1, cortex-a76\b", proc.stdout), proc.stdout


def test_cli_shows_one_target_with_units_and_sources(cli):
    proc = cli("targets", "show", "cuda:h100")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"peak fp8\s*│\s*1,978,900 GFLOP/s", proc.stdout), proc.stdout
    assert re.search(r"memory bandwidth\s*│\s*3,350 GB/s", proc.stdout), proc.stdout
    assert "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet" in proc.stdout
    assert "sm_90" in proc.stdout and "CUDAExecutionProvider" in proc.stdout


def test_cli_unknown_variant_and_broken_target_file_exit_2(cli, tmp_path):
    proc = cli("run", "zoo:bert_tiny", "--target", "x86_64:avx9000", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2, proc.stderr
    assert "unknown variant 'avx9000' of target x86_64; known variants of x86_64: avx2, avx512, avx512-vnni" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(NEW_FAMILY.replace("cores = 8\n", ""))
    for args in (("targets", "--target-file", broken), ("targets", "show", "myfamily", "--target-file", broken),
                 ("run", "zoo:bert_tiny", "--target-file", broken, "--target", "myfamily", "-o", tmp_path / "o.onnx")):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"error: target file {broken}: variants.small.cores: missing", proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_cli_runs_for_a_family_from_a_target_file(cli, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(NEW_FAMILY)
    proc = cli("targets", "--target-file", path)
    assert proc.returncode == 0 and re.search(r"\bmyfamily\b.*\bsmall\*", proc.stdout), proc.stdout + proc.stderr
    proc = cli("targets", "show", "myfamily:small", "--target-file", path)
    assert proc.returncode == 0 and "https://example.com/datasheet.pdf" in proc.stdout, proc.stdout + proc.stderr
    out = tmp_path / "out.onnx"
    proc = cli("run", "zoo:bert_tiny", "--target-file", path, "--target", "myfamily", "-o", out, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(out).graph.node
    import json

    assert json.loads((tmp_path / "r.json").read_text())["target"] == "myfamily"


def test_api_optimize_takes_a_target_file(tmp_path, monkeypatch):
    from graphopt import api

    # The family it loads is the process's for every later `get`: forget it after this test.
    monkeypatch.setattr(targets, "_extra_files", [])
    path = tmp_path / "mine.toml"
    path.write_text(NEW_FAMILY.replace('"myfamily"', '"apifamily"'))
    result = api.optimize("zoo:bert_tiny", target="apifamily:small", target_file=path, opt_level=1)
    assert result.report.target == "apifamily"
    assert targets.get("apifamily").hardware.peak_gflops["int8"] == 1024.0
