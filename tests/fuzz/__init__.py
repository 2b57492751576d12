"""Property-based fuzzing of the optimizer: hypothesis strategies that build random valid ONNX models."""
