"""Fusion passes: replace multi-node patterns by the single op a runtime implements directly."""

from graphopt.passes.fusion import activations, attention, conv_add, conv_affine, conv_bn, layer_norm, matmul  # noqa: F401
