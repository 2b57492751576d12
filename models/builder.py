"""A small helper for emitting ONNX graphs the way the torch exporter names them.

Node names follow the exporter's scheme: ``{scope}/{OpType}`` with ``_1``, ``_2``... appended when the
same op type repeats within one scope (``/layer1/layer1.0/relu_1/Relu``, ``/embeddings/LayerNorm/Add_1``),
and a node's single output is called ``{node name}_output_0`` unless a name is given.
Everything is emitted in call order, so a builder driven by a seeded RNG is fully deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER_NAME = "graphopt.models"
PRODUCER_VERSION = "1"


def torch_scope(qualname: str) -> str:
    """The exporter's scope for a module's qualified name: ``features.1.conv.0.0`` ->
    ``/features/features.1/conv/conv.0/conv.0.0`` (numbered children carry their parent's name)."""
    if not qualname:
        return ""
    parts: list[str] = []
    for seg in qualname.split("."):
        parts.append(f"{parts[-1]}.{seg}" if seg.isdigit() and parts else seg)
    return "/" + "/".join(parts)


class GraphBuilder:
    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set()
        self._matmul_counter = 0

    # --- names --------------------------------------------------------------------------------
    def _node_name(self, scope: str, op_type: str) -> str:
        base = f"{scope}/{op_type}"
        name, k = base, 0
        while name in self._node_names:
            k += 1
            name = f"{base}_{k}"
        self._node_names.add(name)
        return name

    def _claim(self, tensor: str) -> str:
        if tensor in self._tensor_names:
            raise ValueError(f"tensor name '{tensor}' defined twice in {self.name}")
        self._tensor_names.add(tensor)
        return tensor

    # --- graph interface ----------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def param(self, name: str, array: np.ndarray) -> str:
        """Adds an initializer (weights, buffers)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), self._claim(name)))
        return name

    def matmul_weight(self, weight_t: np.ndarray) -> str:
        """A pre-transposed Linear weight, named like the exporter names it (``onnx::MatMul_N``)."""
        self._matmul_counter += 1
        return self.param(f"onnx::MatMul_{1000 + self._matmul_counter}", weight_t)

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str = "",
        *,
        output: str | None = None,
        num_outputs: int = 1,
        **attrs,
    ) -> str:
        """Emits one node; returns its (first) output name."""
        name = self._node_name(scope, op_type)
        if num_outputs == 1:
            outs = [self._claim(output if output is not None else f"{name}_output_0")]
        else:
            outs = [self._claim(f"{name}_output_{i}") for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0]

    def const(self, scope: str, value, dtype=np.float32) -> str:
        """A Constant node (the exporter keeps scalars and small shape pieces as Constant nodes)."""
        arr = np.asarray(value, dtype=dtype)
        return self.node("Constant", [], scope, value=numpy_helper.from_array(arr, ""))

    # --- random weights -----------------------------------------------------------------------
    def normal(self, shape: Sequence[int], std: float, mean: float = 0.0) -> np.ndarray:
        a = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return a

    def uniform(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, tuple(shape)).astype(np.float32)

    # --- result -------------------------------------------------------------------------------
    def build(self, doc_string: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER_NAME,
            producer_version=PRODUCER_VERSION,
            doc_string=doc_string,
        )
        return model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
