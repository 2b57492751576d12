"""Trained ONNX models shipped inside PyPI packages, outside the project's test tier (see models.py)."""
