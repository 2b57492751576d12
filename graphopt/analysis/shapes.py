"""Shape and type inference: onnx's inference with data propagation, written back onto gs tensors.

Symbolic dimensions stay symbolic (strings); a dimension nobody can know stays None. Ops onnx does
not know (other domains) keep whatever shapes the model itself recorded.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import register_analysis


@register_analysis("shapes")
def infer_shapes(model: ir.Model, ctx=None) -> dict[str, tuple]:
    """Annotate every Variable of every graph with dtype and shape; returns name -> (dtype, shape)."""
    # Recorded value_info may be stale after rewrites: everything is inferred afresh.
    proto = ir.structure_proto(model, value_info=False)
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


def _collect(graph: onnx.GraphProto, out: dict[str, tuple]) -> None:
    for g in ir.all_graphs(graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            parsed = _parse(vi)
            if parsed is not None:
                out[vi.name] = parsed


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
