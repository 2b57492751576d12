"""NVIDIA GPUs running onnxruntime's CUDA provider."""

from graphopt.targets import Target

TARGET = Target(
    name="cuda",
    description="NVIDIA GPU, onnxruntime CUDAExecutionProvider (TVM: cuda)",
    triple="nvptx64-nvidia-cuda",
    execution_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
)
