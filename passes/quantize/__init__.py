"""Quantization passes: Q/DQ insertion calibrated on real data (graphopt.calibration)."""

from graphopt.passes.quantize import dynamic, float16, int4, smooth, static  # noqa: F401
