"""Which nodes of a model are shape arithmetic: what the real-model benchmark and tests count.

Shape arithmetic is what only computes or applies shapes (Shape, Reshape, Unsqueeze, ...) and
integer-valued computation (Gather, Concat, Add, ... on int64 shape vectors); everything else is
compute, where a gap to a peer tool is fusion rather than folding.
"""

from __future__ import annotations

import collections

import onnx

from graphopt.ir import all_graphs, all_nodes

# Ops that only compute or apply shapes, whatever their element type.
SHAPE_OPS = frozenset({
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "Reshape", "Expand", "Unsqueeze", "Squeeze",
    "Flatten", "Cast", "CastLike", "Identity",
})
# Ops that are shape arithmetic when their output is an integer (or bool) tensor.
INT_SHAPE_OPS = frozenset({
    "Gather", "GatherElements", "Slice", "Concat", "Split", "Add", "Sub", "Mul", "Div", "Neg", "Mod", "Abs",
    "Max", "Min", "Floor", "Ceil", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And",
    "Or", "Where", "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Tile", "Transpose", "Sign", "Clip",
    "ScatterND", "ScatterElements", "NonZero", "Pow", "Sqrt", "Round",
})

def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference (every graph, subgraphs included)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - classification falls back to op names alone
        inferred = model
    types: dict[str, int] = {}
    for g in all_graphs(inferred.graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for init in g.initializer:
            types[init.name] = init.data_type
    return types


_INT_TYPES = {
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16, onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
}


def op_keys(model: onnx.ModelProto) -> collections.Counter:
    """Histogram of op keys: the op type, with ':int' for an integer-valued op of INT_SHAPE_OPS."""
    types = _elem_types(model)
    hist: collections.Counter = collections.Counter()
    for node in all_nodes(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if node.op_type in INT_SHAPE_OPS and node.output and types.get(node.output[0]) in _INT_TYPES:
            key += ":int"
        hist[key] += 1
    return hist


def classify(key: str) -> str:
    op = key.split(":")[0]
    if op in SHAPE_OPS or key.endswith(":int"):
        return "shape"
    return "other"


def shape_arithmetic_nodes(model: onnx.ModelProto) -> int:
    """How many nodes of `model` (subgraphs included) are shape arithmetic."""
    return sum(n for key, n in op_keys(model).items() if classify(key) == "shape")
