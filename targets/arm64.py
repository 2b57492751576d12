"""64-bit ARM CPUs (Neoverse, Cortex-A, Apple) running onnxruntime's CPU provider."""

from graphopt.targets import Target

TARGET = Target(
    name="arm64",
    description="aarch64 CPU with NEON, onnxruntime CPUExecutionProvider (TVM: llvm aarch64-linux-gnu)",
    triple="aarch64-linux-gnu",
)
