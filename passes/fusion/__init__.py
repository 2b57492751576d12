"""Fusion passes: replace multi-node patterns by the single op a runtime implements directly."""

from graphopt.passes.fusion import activations, conv_affine, conv_bn, layer_norm, matmul  # noqa: F401
from graphopt.passes.fusion import attention  # noqa: F401,E402
