"""torchvision ResNet-18/50 and MobileNetV2, emitted as the torch exporter does in eval mode with
BatchNormalization left unfused (Conv without bias -> BatchNormalization -> Relu/Clip).

Weights are seeded random: He-initialised convolutions, BatchNormalization statistics drawn with a
positive variance, and the last BatchNormalization of each residual branch scaled down so the
activations stay bounded through all the residual additions (finite, non-degenerate logits).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .builder import FLOAT, GraphBuilder, torch_scope

IMAGE_SHAPE = [1, 3, 224, 224]
NUM_CLASSES = 1000


def _conv(
    b: GraphBuilder,
    x: str,
    qual: str,
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    pad: int | None = None,
    group: int = 1,
) -> str:
    """Conv without bias (its BatchNormalization follows); ``qual`` is the torch module name."""
    if pad is None:
        pad = (k - 1) // 2
    fan_in = cin // group * k * k
    w = b.param(f"{qual}.weight", b.normal([cout, cin // group, k, k], math.sqrt(2.0 / fan_in)))
    return b.node(
        "Conv",
        [x, w],
        torch_scope(qual),
        dilations=[1, 1],
        group=group,
        kernel_shape=[k, k],
        pads=[pad, pad, pad, pad],
        strides=[stride, stride],
    )


def _bn(b: GraphBuilder, x: str, qual: str, c: int, gamma_scale: float = 1.0) -> str:
    gamma = b.uniform([c], 0.5, 1.0) * np.float32(gamma_scale)
    beta = b.normal([c], 0.05)
    mean = b.normal([c], 0.1)
    var = b.uniform([c], 0.5, 1.5)
    ins = [
        x,
        b.param(f"{qual}.weight", gamma),
        b.param(f"{qual}.bias", beta),
        b.param(f"{qual}.running_mean", mean),
        b.param(f"{qual}.running_var", var),
    ]
    return b.node("BatchNormalization", ins, torch_scope(qual), epsilon=1e-5, momentum=0.9)


def _head(b: GraphBuilder, x: str, cin: int, pool_scope: str, fc_qual: str) -> str:
    x = b.node("GlobalAveragePool", [x], pool_scope)
    x = b.node("Flatten", [x], "", axis=1)
    bound = 1.0 / math.sqrt(cin)
    w = b.param(f"{fc_qual}.weight", b.uniform([NUM_CLASSES, cin], -bound, bound))
    bias = b.param(f"{fc_qual}.bias", b.uniform([NUM_CLASSES], -bound, bound))
    out = b.node("Gemm", [x, w, bias], torch_scope(fc_qual), output="output", alpha=1.0, beta=1.0, transB=1)
    b.output(out, FLOAT, [1, NUM_CLASSES])
    return out


# --- ResNet --------------------------------------------------------------------------------------
RESIDUAL_GAMMA = 0.2  # scale of the last BatchNormalization in each residual branch


def _basic_block(b: GraphBuilder, x: str, name: str, cin: int, planes: int, stride: int) -> tuple[str, int]:
    s = torch_scope(name)
    out = _conv(b, x, f"{name}.conv1", cin, planes, 3, stride)
    out = _bn(b, out, f"{name}.bn1", planes)
    out = b.node("Relu", [out], f"{s}/relu")
    out = _conv(b, out, f"{name}.conv2", planes, planes, 3)
    out = _bn(b, out, f"{name}.bn2", planes, RESIDUAL_GAMMA)
    identity = x
    if stride != 1 or cin != planes:
        identity = _conv(b, x, f"{name}.downsample.0", cin, planes, 1, stride)
        identity = _bn(b, identity, f"{name}.downsample.1", planes)
    out = b.node("Add", [out, identity], s)
    out = b.node("Relu", [out], f"{s}/relu_1")
    return out, planes


def _bottleneck(b: GraphBuilder, x: str, name: str, cin: int, planes: int, stride: int) -> tuple[str, int]:
    s = torch_scope(name)
    cout = planes * 4
    out = _conv(b, x, f"{name}.conv1", cin, planes, 1)
    out = _bn(b, out, f"{name}.bn1", planes)
    out = b.node("Relu", [out], f"{s}/relu")
    out = _conv(b, out, f"{name}.conv2", planes, planes, 3, stride)
    out = _bn(b, out, f"{name}.bn2", planes)
    out = b.node("Relu", [out], f"{s}/relu_1")
    out = _conv(b, out, f"{name}.conv3", planes, cout, 1)
    out = _bn(b, out, f"{name}.bn3", cout, RESIDUAL_GAMMA)
    identity = x
    if stride != 1 or cin != cout:
        identity = _conv(b, x, f"{name}.downsample.0", cin, cout, 1, stride)
        identity = _bn(b, identity, f"{name}.downsample.1", cout)
    out = b.node("Add", [out, identity], s)
    out = b.node("Relu", [out], f"{s}/relu_2")
    return out, cout


def _resnet(name: str, block, layers: list[int], seed: int) -> onnx.ModelProto:
    b = GraphBuilder(f"torch_jit_{name}", seed)
    x = b.input("input", FLOAT, IMAGE_SHAPE)
    x = _conv(b, x, "conv1", 3, 64, 7, 2, 3)
    x = _bn(b, x, "bn1", 64)
    x = b.node("Relu", [x], "/relu")
    x = b.node("MaxPool", [x], "/maxpool", ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3],
               pads=[1, 1, 1, 1], strides=[2, 2])
    c = 64
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], layers)):
        for bi in range(n):
            stride = 2 if (li > 0 and bi == 0) else 1
            x, c = block(b, x, f"layer{li + 1}.{bi}", c, planes, stride)
    _head(b, x, c, "/avgpool", "fc")
    return b.build(f"torchvision {name} (random weights, BatchNormalization unfused)")


def resnet18() -> onnx.ModelProto:
    return _resnet("resnet18", _basic_block, [2, 2, 2, 2], seed=18)


def resnet50() -> onnx.ModelProto:
    return _resnet("resnet50", _bottleneck, [3, 4, 6, 3], seed=50)


# --- MobileNetV2 ---------------------------------------------------------------------------------
# t (expansion), c (output channels), n (repeats), s (first stride): torchvision's table.
_MBV2_SETTINGS = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _conv_bn_relu6(
    b: GraphBuilder, x: str, qual: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1
) -> str:
    """torchvision Conv2dNormActivation: Sequential(0: Conv, 1: BatchNorm, 2: ReLU6 -> Clip(0, 6))."""
    x = _conv(b, x, f"{qual}.0", cin, cout, k, stride, group=group)
    x = _bn(b, x, f"{qual}.1", cout)
    clip_scope = torch_scope(f"{qual}.2")
    lo = b.const(clip_scope, 0.0)
    hi = b.const(clip_scope, 6.0)
    return b.node("Clip", [x, lo, hi], clip_scope)


def mobilenetv2() -> onnx.ModelProto:
    b = GraphBuilder("torch_jit_mobilenetv2", seed=2)
    x = b.input("input", FLOAT, IMAGE_SHAPE)
    x = _conv_bn_relu6(b, x, "features.0", 3, 32, 3, 2)
    c = 32
    idx = 1
    for t, cout, n, s in _MBV2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            q = f"features.{idx}.conv"
            hidden = c * t
            h = x
            j = 0
            if t != 1:  # pointwise expansion
                h = _conv_bn_relu6(b, h, f"{q}.{j}", c, hidden, 1)
                j += 1
            h = _conv_bn_relu6(b, h, f"{q}.{j}", hidden, hidden, 3, stride, group=hidden)  # depthwise
            j += 1
            h = _conv(b, h, f"{q}.{j}", hidden, cout, 1)  # pointwise linear projection
            use_res = stride == 1 and c == cout
            h = _bn(b, h, f"{q}.{j + 1}", cout, RESIDUAL_GAMMA if use_res else 1.0)
            if use_res:
                h = b.node("Add", [x, h], torch_scope(f"features.{idx}"))
            x, c = h, cout
            idx += 1
    x = _conv_bn_relu6(b, x, f"features.{idx}", c, 1280, 1)
    # torchvision: adaptive_avg_pool2d -> flatten -> classifier (Dropout omitted in eval export)
    _head(b, x, 1280, "", "classifier.1")
    return b.build("torchvision mobilenet_v2 (random weights, BatchNormalization unfused)")
