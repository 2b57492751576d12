"""64-bit ARM CPUs (Neoverse, Cortex-A, Apple) running onnxruntime's CPU provider.

What it may emit is probed from the installed onnxruntime's CPUExecutionProvider kernels
(capabilities.py), usually an x86_64 build. That stands for arm64 builds because
onnxruntime/contrib_ops/cpu/cpu_contrib_kernels.cc registers the com.microsoft CPU kernels
(RegisterCpuContribKernels, RegisterQuantizationKernels) on every architecture: MLAS picks AVX or
NEON code inside a kernel, it does not decide which kernels exist. The exceptions, by the same
file and core/mlas/inc/mlas.h:

* com.microsoft.nchwc (ReorderInput/ReorderOutput, NCHWc Conv and pools) is registered only
  where MlasNchwcGetBlockSize() > 1: every x86_64 build, but on arm64 only builds configured with
  the opt-in onnxruntime_USE_ARM_NEON_NCHWC. Never emitted here.
* fp16 FusedConv and com.microsoft NhwcFusedConv exist only on arm64 (RegisterFp16Kernels, under
  MLAS_F16VEC_INTRINSICS_SUPPORTED: non-Apple ARM64 with fp16 acceleration). An x86_64 host's
  probe does not report them, so they are emitted only where graphopt itself runs on such an
  arm64 build (it verifies on the local CPU provider).
"""

from graphopt.targets import Target

TARGET = Target(
    name="arm64",
    description="aarch64 CPU with NEON, onnxruntime CPUExecutionProvider (TVM: llvm aarch64-linux-gnu)",
    triple="aarch64-linux-gnu",
    never_emits=frozenset({("com.microsoft.nchwc", "*")}),
)
