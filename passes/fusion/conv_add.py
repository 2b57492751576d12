"""Fuse a residual Add (and the activation after it) into the Conv that feeds it: com.microsoft FusedConv.

    Relu(Add(Conv(x, W, b), z))  ->  FusedConv(x, W, b, z, activation="Relu")

onnxruntime's CPU FusedConv adds its fourth input Z to the convolution's output before the
activation, in the same pass over the output (core/providers/cpu/nn/conv.cc reads a "Sum" input).
ResNet-style blocks (torch, tf2onnx, paddle alike) end in exactly this: the last Conv of the branch
(BatchNormalization already folded into it), the Add of the shortcut, a Relu. Fused, the Add no
longer reads two activation tensors and writes a third, and the Relu no longer makes a pass of its own.

Whether that pays depends on the target's runtime: onnxruntime's x86_64 NCHWc layout pass fuses
the same Add and Relu into its blocked convolution at session time, so there the rewrite would
only take the graph out of the form that pass looks for. The rule asks the cost model
(`cost=True`), which knows from the target's file which fusions its runtime makes itself.
"""

from __future__ import annotations

from graphopt.pass_manager import register_pass
from graphopt.patterns import Match, RewritePass, Rule

# The activations FusedConv applies after the sum (its "activation" attribute), without parameters.
_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh")


def _conv(op, x, w, b):
    return op.Conv(x, w, op.optional(b))


def conv_add_activation(op, x, w, b, z):
    return op.either(*(getattr(op, act)(op.Add(_conv(op, x, w, b), z)) for act in _ACTIVATIONS))


def applies(m: Match) -> bool:
    conv_out = m.node("Conv").outputs[0]
    residual = m.z
    return (
        m.is_constant("w")
        and (m.b is None or m.is_constant("b"))
        and m.dtype("x") is not None and m.dtype("x").kind == "f"
        # Z is added elementwise: it must have the convolution's output shape exactly, no broadcast.
        and m.static_shape("z") is not None
        and conv_out.shape is not None
        and tuple(m.static_shape("z")) == tuple(conv_out.shape)
        and residual is not conv_out
    )


def fused(op, m: Match):
    act = next(n.op for n in m.nodes.values() if n.op in _ACTIVATIONS)
    conv = m.node("Conv")
    bias = m.b
    return op.FusedConv(m.x, m.w, bias if bias is not None else op.constant(_zeros(m), f"{m.w.name}_zero_bias"),
                        m.z, _domain="com.microsoft", activation=act, **conv.attrs)


def _zeros(m: Match):
    import numpy as np

    w = m.value("w")
    return np.zeros(w.shape[0], w.dtype)


@register_pass
class FuseConvAddActivation(RewritePass):
    name = "fuse-conv-add-activation"
    description = "Fuse Conv + residual Add + Relu into com.microsoft FusedConv where the cost model says the runtime does not already"
    opt_level = 3
    needs_shapes = True
    rules = (Rule(conv_add_activation, fused, applies, name="fused", emits=[("FusedConv", "com.microsoft")], cost=True),)
