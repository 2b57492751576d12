"""Shape and type inference: onnx's inference with data propagation, written back onto gs tensors.

Symbolic dimensions stay symbolic (strings); a dimension nobody can know stays None. Ops onnx does
not know (other domains) keep whatever shapes the model itself recorded.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphopt import export, ir, loading
from graphopt.analysis import register_analysis


@register_analysis("shapes")
def infer_shapes(model: ir.Model, ctx=None) -> dict[str, tuple]:
    """Annotate every Variable of every graph with dtype and shape; returns name -> (dtype, shape)."""
    # Recorded value_info may be stale after rewrites: everything is inferred afresh.
    proto = export.structure_proto(model, value_info=False)
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
                    tensor.shape = _keep_known_dims(shape, tensor.shape)
    return types


def _keep_known_dims(inferred: list, recorded) -> list:
    """The inferred shape, except where it does not know a dim the tensor already had.

    onnx names a dim it cannot tie to another `unk__N`; the exporter (dynamo writes the batch and
    sequence symbols on every value) or an earlier, better-informed inference may know it. Losing
    it matters beyond graphopt: onnxruntime's SkipLayerNormalization fusion, for one, requires the
    two Add operands to have the same (symbolic) shape.
    """
    if recorded is None or len(recorded) != len(inferred):
        return inferred
    return [r if _unknown(d) and not _unknown(r) else d for d, r in zip(inferred, recorded)]


def _unknown(dim) -> bool:
    return dim is None or (isinstance(dim, str) and dim.startswith("unk__"))


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


def resolve_shapes(model: ir.Model) -> int:
    """Give tensors the shapes that only folding reveals; returns how many tensors got one.

    onnx's inference does not read values it propagated as a Slice's ends or a Range's limit, so in
    a torch-exported BERT every activation after the embeddings has an unknown batch dim even when
    the inputs are static, and its MatMuls would count 0 FLOPs. Folding a weight-free copy of the
    model (-O2's folding passes to a fixed point) turns those computed shapes into
    constants; tensors that survive folding keep their names, so their inferred shapes are carried
    back onto the model. Only a dimension the original does not know yet is filled in.
    """
    # Imported here, not at the top: analyses sit below the pass manager (which imports their
    # registry, graphopt.analysis), and only this function, which runs passes, needs it.
    from graphopt.pass_manager import FixedPoint, PassContext, PassManager, create_pass

    copy = loading.from_proto(export.structure_proto(model, value_info=False))
    # A folded tensor is gone from the copy, but what replaced it sits at the same input of each
    # consumer that survived: that replacement's shape is the folded tensor's.
    uses = {
        t.name: [(node, i) for node in t.outputs for i, x in enumerate(node.inputs) if x is t]
        for graph in copy.graphs()
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable)
    }
    ctx = PassContext(model=copy, opt_level=2)
    folding = ["constant-to-initializer", "fold-shapes", "fold-constants", "dce"]
    PassManager(FixedPoint([create_pass(name) for name in folding], max_iterations=10)).run(ctx)
    ctx.analyses.invalidate()
    folded = dict(ctx.analysis("shapes"))
    for name, sites in uses.items():
        if name not in folded:
            for node, i in sites:
                if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant):
                    folded[name] = (None, list(node.inputs[i].shape))
                    break
    filled = 0
    for graph in model.graphs():
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Variable) or tensor.name not in folded:
                continue
            better = _fill_unknown(tensor.shape, folded[tensor.name][1])
            if better is not None:
                tensor.shape = better
                filled += 1
    return filled


def _fill_unknown(have, found):
    """`have` with its unknown or symbolic dims taken from `found` where that is static, or None if
    nothing improves (or the two disagree, which would mean the copy is not the same model)."""
    if found is None:
        return None
    if have is None:
        return list(found) if all(isinstance(d, int) for d in found) else None
    if len(have) != len(found):
        return None
    merged, improved = [], False
    for h, f in zip(have, found):
        if isinstance(h, int) and h >= 0:
            if isinstance(f, int) and f != h:
                return None
            merged.append(h)
        elif isinstance(f, int) and f >= 0:
            merged.append(f)
            improved = True
        else:
            merged.append(h)
    return merged if improved else None
