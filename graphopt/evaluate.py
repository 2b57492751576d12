"""Compile-time evaluation of a group of constant nodes, for folding.

The whole group runs as one onnxruntime session (one session per node would cost milliseconds
each); if onnxruntime refuses the group, nodes are evaluated one by one with onnx's reference
evaluator and then onnxruntime, and a node neither can evaluate is left out of the result.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter



def evaluate_subgraph(nodes: list[gs.Node], wanted: list[gs.Tensor], opset_imports: dict[str, int]) -> dict[str, np.ndarray]:
    """Values of `wanted` (outputs of `nodes`), computed from the constants `nodes` read.

    Names missing from the result could not be evaluated.
    """
    try:
        return _run_ort(nodes, wanted, opset_imports)
    except Exception:  # noqa: BLE001 - any refusal sends us to the careful path below
        return _run_node_by_node(nodes, wanted, opset_imports)


def _model(nodes: list[gs.Node], wanted: list[gs.Tensor], opset_imports: dict[str, int], feeds: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    produced = {id(t) for n in nodes for t in n.outputs}
    initializers, inputs, seen = [], [], set()
    for node in nodes:
        for t in node.inputs:
            if t.is_empty() or id(t) in produced or t.name in seen:
                continue
            seen.add(t.name)
            if feeds is not None and t.name in feeds:
                value = feeds[t.name]
                inputs.append(onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
            else:
                initializers.append(OnnxExporter.export_tensor_proto(t))
    graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes],
        "fold",
        inputs,
        [onnx.helper.make_empty_tensor_value_info(t.name) for t in wanted],
        initializer=initializers,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in opset_imports.items()]
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run_ort(nodes, wanted, opset_imports, feeds=None) -> dict[str, np.ndarray]:
    session = _session(_model(nodes, wanted, opset_imports, feeds))
    results = session.run([t.name for t in wanted], feeds or {})
    return {t.name: np.asarray(v) for t, v in zip(wanted, results)}


def _run_node_by_node(nodes, wanted, opset_imports) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    known: dict[str, np.ndarray] = {}
    for node in nodes:
        produced = [t for t in node.outputs if not t.is_empty()]
        inner_inputs = [t for t in node.inputs if not t.is_empty() and not isinstance(t, gs.Constant)]
        if any(t.name not in known for t in inner_inputs):
            continue  # depends on a node that could not be evaluated
        feeds = {t.name: known[t.name] for t in inner_inputs}
        values = None
        try:
            model = _model([node], produced, opset_imports, feeds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs = ReferenceEvaluator(model).run(None, feeds)
            values = dict(zip((t.name for t in produced), (np.asarray(o) for o in outs)))
        except Exception:  # noqa: BLE001
            try:
                values = _run_ort([node], produced, opset_imports, feeds)
            except Exception:  # noqa: BLE001
                values = None
        if values is not None:
            known.update(values)
    return {t.name: known[t.name] for t in wanted if t.name in known}

