"""x86_64 CPUs (AVX2/AVX-512 servers and desktops) running onnxruntime's CPU provider.

What it may emit is probed from the installed onnxruntime's CPUExecutionProvider kernels
(capabilities.py): contrib ops such as com.microsoft FusedConv, FusedMatMul, Attention,
SkipLayerNormalization, Gelu, BiasGelu, FastGelu, MultiHeadAttention; and on x86_64 the
com.microsoft.nchwc layout kernels (registered where MlasNchwcGetBlockSize() > 1, which is every
x86_64 build: block 8 from SSE2, 16 with AVX-512).
"""

from graphopt.targets import Target

TARGET = Target(
    name="x86_64",
    description="x86_64 CPU, onnxruntime CPUExecutionProvider (TVM: llvm x86_64-linux-gnu)",
    triple="x86_64-linux-gnu",
    # Registered only on arm64 (onnxruntime/contrib_ops/cpu/cpu_contrib_kernels.cc,
    # RegisterFp16Kernels under MLAS_F16VEC_INTRINSICS_SUPPORTED, which mlas.h defines for
    # non-Apple ARM64 only): an arm64 host's probe reports it, an x86_64 build lacks it.
    never_emits=frozenset({("com.microsoft", "NhwcFusedConv")}),
)
