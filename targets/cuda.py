"""NVIDIA GPUs running onnxruntime's CUDA provider.

The CPU-only onnxruntime wheel reports no CUDA kernels, so unless the installed onnxruntime is a
CUDA build (then its probe wins, see Target.kernels), the contrib ops come from the list below,
each checked against onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc
(microsoft/onnxruntime, RegisterCudaContribKernels; read at commit 004b79eda305). graphopt
verifies on onnxruntime's CPU provider, so `can_emit` also wants a CPU kernel: the CUDA-only ops
(BiasAdd, BiasSplitGelu, BiasSoftmax, GroupNorm, SkipGroupNorm, NhwcConv) are listed for
completeness but not emitted while verification runs on CPU.

Notes from that file:
* FusedConv is registered for float only, and onnxruntime/contrib_ops/cuda/fused_conv.cc maps only
  activation="Relu" to cuDNN (any other activation, or none, fails at run time), which an op-level
  answer cannot express: never emitted (also when a CUDA build's probe reports it).
* GroupQueryAttention has CUDA kernels for fp16/bf16 only (a float node falls back to the CPU
  kernel); SparseAttention likewise fp16/bf16.
* SimplifiedLayerNormalization (RMSNorm) is registered in the ONNX domain, not com.microsoft, and
  has no ONNX schema, so it is not emitted (RMSNormalization-23 is the standard op).
"""

from graphopt.targets import Target

CUDA_CONTRIB_OPS = frozenset({
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",  # fp16/bf16 only
    "RotaryEmbedding",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "FusedMatMul",
    "TransposeMatMul",
    "MatMulNBits",
    "DecoderMaskedMultiHeadAttention",
    "SparseAttention",  # fp16/bf16 only
    # CUDA-only: no CPU kernel, so not emitted while results are verified on CPU.
    "BiasAdd",
    "BiasSplitGelu",
    "BiasSoftmax",
    "GroupNorm",
    "SkipGroupNorm",
    "NhwcConv",
})

TARGET = Target(
    name="cuda",
    description="NVIDIA GPU, onnxruntime CUDAExecutionProvider (TVM: cuda)",
    triple="nvptx64-nvidia-cuda",
    execution_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    declared_kernels={"com.microsoft": CUDA_CONTRIB_OPS},
    never_emits=frozenset({("com.microsoft", "FusedConv")}),
)
