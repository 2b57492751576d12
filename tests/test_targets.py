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
from graphopt.targets import cuda as cuda_module

MS = "com.microsoft"
CPU = "CPUExecutionProvider"

# Fused ops graphopt's fusions emit on CPU; all have CPU kernels in onnxruntime >= 1.17.
CPU_FUSED = ("FusedConv", "FusedMatMul", "Attention", "SkipLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "MultiHeadAttention")
# com.microsoft ops whose only kernels are CUDA ones (onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc).
CUDA_ONLY = ("BiasAdd", "BiasSplitGelu", "GroupNorm")


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
        assert op in cuda_module.CUDA_CONTRIB_OPS and op not in cpu_ms, op
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
    assert caps.kernel_table.__wrapped__() is None


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
