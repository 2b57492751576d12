"""Shape and type inference: onnx's inference with data propagation, written back onto gs tensors.

Symbolic dimensions stay symbolic (strings); a dimension nobody can know stays None. Ops onnx does
not know (other domains) keep whatever shapes the model itself recorded.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from graphopt import ir
from graphopt.pass_manager import register_analysis

# Initializers at least this big are handed to inference as typed inputs without data: inference
# never needs their values, and it keeps the proto small (and under protobuf's 2 GiB limit).
_DATA_FREE_MIN_BYTES = 4096


@register_analysis("shapes")
def infer_shapes(model: ir.Model, ctx=None) -> dict[str, tuple]:
    """Annotate every Variable of every graph with dtype and shape; returns name -> (dtype, shape)."""
    proto = _inference_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=False)
    types: dict[str, tuple] = {}
    _collect(inferred.graph, types)
    for graph in model.graphs():
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name in types:
                dtype, shape = types[tensor.name]
                if dtype is not None:
                    tensor.dtype = dtype
                if shape is not None:
                    tensor.shape = shape
    return types


def _inference_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as inference needs it: big weights as typed inputs without data, no stale value_info.

    Built here rather than with ir.to_proto so that no weight is copied for an analysis.
    """
    graph = model.graph
    for g in model.graphs():
        ir.toposort(g)
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    initializers = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
        if int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize >= _DATA_FREE_MIN_BYTES:
            inputs.append(onnx.helper.make_tensor_value_info(tensor.name, dtype, list(tensor.shape)))
        else:
            initializers.append(OnnxExporter.export_tensor_proto(tensor))
    onnx_graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in graph.nodes], graph.name or "graph", inputs, outputs, initializer=initializers
    )
    proto = onnx.helper.make_model(
        onnx_graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    )
    proto.ir_version = max(model.ir_version, 4)
    proto.functions.extend(model.functions)
    return proto


def _collect(graph: onnx.GraphProto, out: dict[str, tuple]) -> None:
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        parsed = _parse(vi)
        if parsed is not None:
            out[vi.name] = parsed
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect(attr.g, out)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _collect(sub, out)


def _parse(vi: onnx.ValueInfoProto):
    t = vi.type
    if t.WhichOneof("value") != "tensor_type":
        return None
    tt = t.tensor_type
    dtype = None
    if tt.elem_type:
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except (KeyError, ValueError):
            dtype = None
    shape = None
    if tt.HasField("shape"):
        shape = []
        for dim in tt.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return dtype, shape
