"""Quantization passes: Q/DQ insertion calibrated on real data (graphopt.calibration)."""

from graphopt.passes.quantize import dynamic, static  # noqa: F401
