"""Model-level figures the report shows before and after each pass: nodes, parameters, FLOPs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from graphopt import ir
from graphopt.analysis import register_analysis
from graphopt.analysis.cost import graph_cost


@dataclass(frozen=True)
class ModelStats:
    nodes: int
    parameters: int
    parameter_bytes: int
    flops: int
    # FLOPs are a lower bound when some node's shapes are symbolic or unknown.
    flops_exact: bool
    # Nodes per op type (domain-qualified outside ai.onnx), subgraphs included.
    ops: dict[str, int] = field(default_factory=dict)
    # Nodes whose FLOPs could not be counted (their shapes are not known).
    unknown_nodes: int = 0
    # Dims of the graph inputs that have no size (by name; "?" when unnamed): what --dim can fix.
    symbolic_inputs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@register_analysis("stats")
def stats_analysis(model: ir.Model, ctx) -> ModelStats:
    ctx.analysis("shapes")
    return model_stats(model, ctx.options.get("symbolic_dims"))


def model_stats(model: ir.Model, symbolic_dims: dict[str, int] | None = None) -> ModelStats:
    """Figures from the shapes the tensors carry now (no new inference: cheap enough per pass)."""
    nodes = sum(len(g.nodes) for g in model.graphs())
    params = param_bytes = 0
    for t in ir.used_constants(model):
        count = int(np.prod(t.shape))
        params += count
        param_bytes += count * np.dtype(t.dtype).itemsize
    cost = graph_cost(model.graph, symbolic_dims)
    ops = {op: v["count"] for op, v in sorted(cost["by_op"].items())}
    symbolic = {str(d) if d is not None else "?" for t in model.graph.inputs for d in (t.shape or ()) if not isinstance(d, int)}
    return ModelStats(
        nodes, params, param_bytes, int(cost["flops"]), cost["unknown_nodes"] == 0, ops,
        cost["unknown_nodes"], tuple(sorted(symbolic)),
    )
