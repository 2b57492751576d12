"""x86_64 CPUs (AVX2/AVX-512 servers and desktops) running onnxruntime's CPU provider."""

from graphopt.targets import Target

TARGET = Target(
    name="x86_64",
    description="x86_64 CPU, onnxruntime CPUExecutionProvider (TVM: llvm x86_64-linux-gnu)",
    triple="x86_64-linux-gnu",
)
