"""graphopt: a compiler-style graph optimizer for ONNX models."""

__version__ = "0.1.0"
