"""--backend tvm (targets/backends/tvm.py) and its loader (graphopt.runtime): a library that
computes what the ONNX model does, a manifest that says what it takes, and one-line refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import export, models, runtime, targets
from graphopt.optimize import optimize_model
from graphopt.targets.backends import tvm as tvm_backend

pytest.importorskip("tvm", reason="the tvm extra is not installed")

EXIT_BAD_INPUT = 2


def _ort(proto, feeds):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_run_builds_a_library_that_computes_what_the_model_does(cli, tmp_path):
    out = tmp_path / "digits.so"
    proc = cli("run", "zoo:digits_cnn", "--backend", "tvm", "--dim", "batch=1", "-o", out, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(tvm_backend.manifest_path(out).read_text())
    assert manifest["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"][0]["name"] == "output" and manifest["target"] == "x86_64:host"
    assert manifest["tvm_target"]["kind"] == "llvm" and manifest["tuning_database"] is None
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"]["verified"] and report["backend"]["measured"]["ratio"] > 0
    assert "TVM library on this machine" in proc.stdout
    feeds, _ = models.eval_data("digits_cnn")
    x = feeds["input"][:1]
    expected = _ort(models.load("digits_cnn"), {"input": x})[0]
    got = runtime.load(out)({"input": x})
    assert list(got) == ["output"]
    np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-4)
    # The manifest itself loads too, and a wrong shape is refused by name.
    with pytest.raises(ValueError, match="input input has shape"):
        runtime.load(tvm_backend.manifest_path(out))(input=np.zeros((2, 1, 8, 8), np.float32))


def test_a_loaded_library_runs_on_every_physical_core(cli, tmp_path):
    """TVM's own default halves the logical CPUs: on a machine with one hardware thread per core
    the compiled model (and every tuning measurement) ran on half the cores onnxruntime uses."""
    out = tmp_path / "digits.so"
    assert cli("run", "zoo:digits_cnn", "--backend", "tvm", "--dim", "batch=1", "-o", out).returncode == 0
    probe = ("import os, sys, numpy as np, tvm; from graphopt import runtime; m = runtime.load(sys.argv[1]); "
             "m(input=np.zeros((1, 1, 8, 8), np.float32)); "
             "print(tvm.get_global_func('runtime.NumThreads')(), runtime.physical_cores())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    threads, cores = subprocess.run([sys.executable, "-c", probe, str(out)], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert int(threads) == int(cores) == len({Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
                                              for c in os.sched_getaffinity(0)})
    # A user's TVM_NUM_THREADS wins.
    threads, _ = subprocess.run([sys.executable, "-c", probe, str(out)], env={**env, "TVM_NUM_THREADS": "1"},
                                capture_output=True, text=True, check=True).stdout.split()
    assert threads == "1"


def test_dynamic_inputs_are_refused_by_name_and_nothing_is_written(cli, tmp_path):
    out = tmp_path / "digits.so"
    proc = cli("run", "zoo:digits_cnn", "--backend", "tvm", "-o", out)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "inputs are dynamic: input ['batch', 1, 8, 8]" in proc.stderr and "--dim" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and not out.exists() and not tvm_backend.manifest_path(out).exists()


def _two_outputs() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["relu"]), helper.make_node("Sigmoid", ["h"], ["gate"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("gate", TensorProto.FLOAT, [4, 8]), helper.make_tensor_value_info("relu", TensorProto.FLOAT, [4, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_outputs_keep_their_names_and_order(cli, tmp_path):
    model = tmp_path / "two.onnx"
    onnx.save(_two_outputs(), model)
    out = tmp_path / "two.so"
    assert cli("run", model, "--backend", "tvm", "-o", out).returncode == 0
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    got = runtime.load(out)(x=x)
    assert list(got) == ["gate", "relu"]
    for name, expected in zip(("gate", "relu"), _ort(_two_outputs(), {"x": x})):
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-5)


def test_a_contrib_op_is_refused_naming_the_node(cli, tmp_path):
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], name="the_gelu", domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = tmp_path / "gelu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), model)
    proc = cli("run", model, "--backend", "tvm", "-O", "0", "-o", tmp_path / "g.so")
    assert proc.returncode == EXIT_BAD_INPUT and "the_gelu" in proc.stderr
    assert not (tmp_path / "g.so").exists()


def test_the_tvm_target_emits_standard_ops_only_and_skips_onnxruntime_workarounds():
    proto = models.load("bert_tiny")
    result, report = optimize_model(proto, target="x86_64", opt_level=3, backend="tvm")
    domains = {n.domain for n in export.to_proto(result).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert "residual-add-as-sum" not in [p.name for p in report.passes]
    _, ort_report = optimize_model(models.load("bert_tiny"), target="x86_64", opt_level=3)
    assert "residual-add-as-sum" in [p.name for p in ort_report.passes]  # what for_tvm leaves out


def test_host_features_come_from_the_cpu_flags_not_the_chip_name():
    # An AVX2 EPYC virtual machine: LLVM names the chip znver4, whose AVX-512 the VM masks off.
    assert tvm_backend.host_x86_features({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}) == ("x86-64-v3", [])
    sapphire = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
    mcpu, mattr = tvm_backend.host_x86_features(sapphire)
    assert mcpu == "x86-64-v4" and {"+avx512vnni", "+amx-int8"} <= set(mattr)


def test_target_descriptions():
    arm = tvm_backend.tvm_target(targets.get("arm64:neoverse-v1"))
    assert arm["mtriple"] == "aarch64-linux-gnu" and {"+sve", "+i8mm", "+dotprod"} <= set(arm["mattr"])
    cuda = tvm_backend.tvm_target(targets.get("cuda"))
    assert cuda["kind"] == "cuda" and cuda["arch"].startswith("sm_") and cuda["host"]["kind"] == "llvm"
    with pytest.raises(Exception, match="x86_64, arm64 or cuda"):
        tvm_backend.tvm_target(targets.get("generic"))


def test_arm64_without_the_cross_compiler_is_a_one_line_error(cli, tmp_path, monkeypatch):
    if shutil.which(tvm_backend.ARM64_CROSS_COMPILER):
        pytest.skip("the cross compiler is installed here")
    proc = cli("run", "zoo:digits_cnn", "--backend", "tvm", "--dim", "batch=1", "--target", "arm64", "-o", tmp_path / "d.so")
    assert proc.returncode == EXIT_BAD_INPUT and "aarch64-linux-gnu-gcc" in proc.stderr and "apt-get install gcc-aarch64-linux-gnu" in proc.stderr
    assert not (tmp_path / "d.so").exists()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM's CUDA code generation compiles with nvcc, not installed here")
def test_cuda_library_builds_without_a_gpu(cli, tmp_path):
    out = tmp_path / "digits_cuda.so"
    proc = cli("run", "zoo:digits_cnn", "--backend", "tvm", "--dim", "batch=1", "--target", "cuda", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0 and json.loads(tvm_backend.manifest_path(out).read_text())["device"] == "cuda"
    assert "was not run here" in proc.stdout


def test_tune_writes_a_database_that_run_applies_and_a_second_tune_reuses(cli, tmp_path):
    model, db = tmp_path / "two.onnx", tmp_path / "db"
    onnx.save(_two_outputs(), model)
    first = cli("tune", model, "--trials", "4", "--db", db, timeout=600)
    assert first.returncode == 0, first.stderr
    assert re.search(r"(\d+) tasks: \1 tuned with [1-9]\d* trials \(0 failed\)", first.stdout), first.stdout
    assert "tuned TVM on this machine" in first.stdout and (db / "database_tuning_record.json").stat().st_size > 0
    second = cli("tune", model, "--trials", "4", "--db", db, timeout=600)
    assert re.search(r"(\d+) tasks: 0 tuned with 0 trials .* \1 already in", second.stdout), second.stdout
    out = tmp_path / "two.so"
    assert cli("run", model, "--backend", "tvm", "--db", db, "-o", out).returncode == 0
    assert json.loads(tvm_backend.manifest_path(out).read_text())["tuning_database"] == tvm_backend.database_digest(db)
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    for got, expected in zip(runtime.load(out)(x=x).values(), _ort(_two_outputs(), {"x": x})):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_db_needs_the_tvm_backend(cli, tmp_path):
    proc = cli("run", "zoo:digits_cnn", "--db", tmp_path, "-o", tmp_path / "d.onnx")
    assert proc.returncode == EXIT_BAD_INPUT and "--backend tvm" in proc.stderr


@pytest.fixture(scope="session")
def arm64_emulation():
    from tests import arm64_emulation

    try:
        return arm64_emulation.prepare()
    except arm64_emulation.Unavailable as why:
        pytest.skip(f"arm64 emulation cannot be prepared here: {why}")


@pytest.mark.arm64
@pytest.mark.slow
def test_resnet50_for_arm64_runs_correctly_under_emulation(cli, tmp_path, arm64_emulation):
    from tests.arm64_emulation import run_library

    out = tmp_path / "resnet50_arm64.so"
    proc = cli("run", "zoo:resnet50", "--target", "arm64", "--backend", "tvm", "-o", out, timeout=900,
               env_path=f"{arm64_emulation / 'bin'}")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(tvm_backend.manifest_path(out).read_text())
    assert manifest["tvm_target"]["mtriple"] == "aarch64-linux-gnu" and "+dotprod" in manifest["tvm_target"]["mattr"]
    with open(out, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    got = run_library(arm64_emulation, out, {"input": x})
    expected = _ort(models.load("resnet50"), {"input": x})[0]
    np.testing.assert_allclose(got[manifest["outputs"][0]["name"]], expected, rtol=1e-3, atol=1e-4)


def test_tune_refuses_a_target_this_machine_cannot_measure(cli, tmp_path):
    proc = cli("tune", "zoo:digits_cnn", "--dim", "batch=1", "--target", "arm64", "--db", tmp_path / "db")
    assert proc.returncode == EXIT_BAD_INPUT and "cannot run arm64:neoverse-n1 code" in proc.stderr
    assert not (tmp_path / "db").exists()
