"""Fusion passes: replace multi-node patterns by the single op a runtime implements directly."""

from graphopt.passes.fusion import conv_affine, conv_bn, layer_norm  # noqa: F401
