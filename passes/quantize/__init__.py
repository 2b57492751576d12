"""Quantization passes: Q/DQ insertion calibrated on real data (graphopt.calibration)."""

from graphopt.passes.quantize import static  # noqa: F401
