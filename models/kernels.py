"""A calibration model for the cost model: many independent kernels at many shapes, in one graph.

Not in the zoo. `graphopt calibrate-cost` profiles it beside whole networks (targets/calibrate.py,
DEFAULT_MODELS) because whole networks repeat a few shapes: ResNet's convolutions all have 64 to
512 channels and 3x3 or 1x1 kernels, so they say nothing about a 1-D kernel over 8 channels or an
LSTM. Each branch reads the graph input (or a constant of its own) and is a graph output, so every
node runs and the profiler times each one separately. Weights are seeded; sizes are chosen so
that every node takes between a few microseconds and a few milliseconds on one core.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def input(self, name: str, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def const(self, shape, scale: float = 0.1, dtype=np.float32) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(dtype), name))
        return name

    def ints(self, values) -> str:
        name = self.name("i")
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(self, op: str, inputs, n_out: int = 1, **attrs) -> str | list[str]:
        name = self.name(op)
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, tensor: str) -> None:
        self.outputs.append(tensor)


def calibration_kernels() -> onnx.ModelProto:
    g = _Graph(seed=15)
    images = {
        (c, hw): g.input(f"image_{c}x{hw}", [1, c, hw, hw]) for c, hw in ((3, 96), (8, 64), (32, 56), (64, 28), (128, 14))
    }
    for (c, hw), x in images.items():
        # convolutions of every kernel shape and channel ratio the networks do not cover
        for kernel, c_out in (((1, 3), 2 * c), ((3, 1), c), ((1, 1), max(4, c // 4)), ((5, 5), c), ((7, 7), 16)):
            pads = [kernel[0] // 2, kernel[1] // 2] * 2
            g.output(g.node("Conv", [x, g.const([c_out, c, *kernel]), g.const([c_out])], pads=pads))
        g.output(g.node("Conv", [x, g.const([c, 1, 3, 3])], group=c, pads=[1, 1, 1, 1], strides=[2, 2]))
        # per-channel broadcasts on NCHW, which onnxruntime runs far slower than same-shape ones
        g.output(g.node("PRelu", [x, g.const([c, 1, 1], 1.0)]))
        g.output(g.node("Mul", [x, g.const([1, c, 1, 1], 1.0)]))
        g.output(g.node("Add", [x, g.const([1, 1, hw, 1], 1.0)]))
        g.output(g.node("Add", [x, x]))
        g.output(g.node("Sigmoid", [x]))
        g.output(g.node("LeakyRelu", [x], alpha=0.1))
        g.output(g.node("Concat", [x, x], axis=1))
        g.output(g.node("Transpose", [x], perm=[0, 2, 3, 1]))
        g.output(g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        g.output(g.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2]))
        g.output(g.node("Resize", [x, "", _scales(g)], mode="nearest"))
        g.output(g.node("Resize", [x, "", _scales(g)], mode="linear"))
        g.output(g.node("ReduceMean", [x], axes=[2, 3], keepdims=1))
        g.output(g.node("Pad", [x, g.ints([0, 0, 1, 1, 0, 0, 1, 1])]))
        g.output(g.node("Slice", [x, g.ints([1]), g.ints([hw - 1]), g.ints([2])]))
        g.output(g.node("BatchNormalization", [x, *(g.const([c], 1.0) for _ in range(2)), g.const([c]), _positive(g, c)]))
        g.output(g.node("InstanceNormalization", [x, g.const([c], 1.0), g.const([c])]))
    for batch, seq, width in ((1, 50, 64), (1, 100, 128), (4, 20, 256)):
        x = g.input(f"sequence_{batch}x{seq}x{width}", [seq, batch, width])
        for op, gates in (("LSTM", 4), ("GRU", 3)):
            hidden = width
            outs = g.node(op, [x, g.const([1, gates * hidden, width]), g.const([1, gates * hidden, hidden])], n_out=2, hidden_size=hidden)
            g.output(outs[0])
        g.output(g.node("Softmax", [x], axis=-1))
        g.output(g.node("LayerNormalization", [x, g.const([width], 1.0), g.const([width])], axis=-1))
        g.output(g.node("MatMul", [x, g.const([width, 4 * width])]))
        g.output(g.node("MatMul", [x, g.const([width, 16])]))
        g.output(g.node("Gather", [g.const([1000, width]), g.ints(list(range(seq)))], axis=0))
        g.output(g.node("Tanh", [x]))
        g.output(g.node("Where", [g.node("Greater", [x, g.const([1], 0.0)]), x, g.const([1], 0.0)]))
    graph = helper.make_graph(g.nodes, "calibration_kernels", g.inputs, [], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt.models.kernels")
    model.ir_version = 8
    # The outputs' types and shapes are what inference finds for them.
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend(inferred[o] for o in g.outputs)
    return model


def _scales(g: _Graph) -> str:
    name = g.name("scales")
    g.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), name))
    return name


def _positive(g: _Graph, c: int) -> str:
    name = g.name("var")
    g.inits.append(numpy_helper.from_array(g.rng.uniform(0.5, 1.5, c).astype(np.float32), name))
    return name
