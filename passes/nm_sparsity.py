"""Semi-structured N:M sparsity: in every group of M consecutive weights along a layer's reduction
axis, only the N largest stay; the others become exact zeros, and the model says so.

    MatMul(x, W[K, N])        groups along K (W's rows)
    Gemm(x, W, transB)        along K: W's rows, or its columns with transB=1
    Conv(x, W[O, I/g, kh, kw]) along the input channels, for each output channel and tap (the
                              layout NVIDIA's sparse convolutions prune in)

What to keep: the largest |w| in each group, or with calibration data |w| x rms(x_j), the weight's
magnitude times that of the activation channel it multiplies (the score of Sun et al., "A Simple
and Effective Pruning Approach for Large Language Models", 2023: a small weight on a loud channel
moves the output more than a large one on a quiet channel).

Who gains: sparse tensor cores (NVIDIA Ampere and later) run 2:4 weights at twice the dense
tensor-core rate, for the dtypes the target variant gives a "sparse_<dtype>" peak (fp16, int8 on an
A100). The cost model prices each layer dense and sparse (`CostModel.sparse_compare`, in the dtype
the layer will compute in: `options["sparsity_dtype"]`, which a --quantize in the same run sets), and
the pass zeroes a layer only where that predicts a speedup. No CPU runtime executes N:M weights any
faster, so on a CPU target nothing is applied unless `options["sparsity_force"]` asks for it (the
zeros still compress, and make a later fine-tuning's starting point); the report says which.

Marked for runtimes: the model's metadata_props["graphopt.sparsity"] is JSON naming the pattern and
each sparse layer (node, weight initializer, reduction axis). onnxruntime's CUDA provider runs
such weights dense; TensorRT (onnxruntime's TensorRT provider with trt_sparsity_enable) picks the
sparse kernels for weights that hold the 2:4 structure.

Fidelity: per layer, the relative weight error ||W - W_s|| / ||W|| and, with calibration data, the
activation-weighted one sqrt(sum_j E[x_j^2] ||ΔW_j||^2 / sum_j E[x_j^2] ||W_j||^2) (per-channel second
moments only: the cross terms are left out). The lossy run's budget judges the whole model.

Left alone: weights that are not constant float tensors, that another node also reads, whose
reduction length is not a multiple of M, and subgraphs (calibration observes the main graph).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pass_manager import CostDecision, Pass, PassContext, PassResult, register_pass

METADATA_KEY = "graphopt.sparsity"
LARGEST_GROUP = 32


def parse_sparsity(spec: str) -> tuple[int, int]:
    """(N, M) from "N:M" (2:4, 4:8): N kept in every M; a one-line error otherwise."""
    try:
        kept, group = (int(part) for part in str(spec).split(":"))
    except ValueError:
        kept = group = 0
    if not 0 < kept < group <= LARGEST_GROUP:
        raise GraphoptError(f"--sparsity takes N:M with 0 < N < M <= {LARGEST_GROUP} (2:4 or 4:8), not {spec!r}")
    return kept, group


class _Layer(NamedTuple):
    node: gs.Node
    weight: gs.Constant
    axis: int  # the reduction axis of the weight as stored
    activation: gs.Variable
    activation_axis: int  # the activation's axis that the reduction runs over


def _layer(node: gs.Node, group: int) -> _Layer | None:
    if node.domain not in ir.DEFAULT_DOMAINS or node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    value = ir.constant_value(w)
    if not isinstance(x, gs.Variable) or ir.constant_value(x) is not None or not isinstance(w, gs.Constant):
        return None
    if value is None or value.dtype not in (np.float32, np.float16) or len(w.outputs) != 1:
        return None  # another reader would get the zeros too, on a layer nobody priced
    if node.op == "Conv":
        if value.ndim < 3:
            return None
        axis, activation_axis = 1, 1
    elif node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or value.ndim != 2:
            return None
        axis, activation_axis = (1 if int(node.attrs.get("transB", 0)) else 0), -1
    else:
        if value.ndim != 2:
            return None
        axis, activation_axis = 0, -1
    if value.shape[axis] % group:
        return None
    return _Layer(node, w, axis, x, activation_axis)


def nm_mask(scores: np.ndarray, axis: int, kept: int, group: int) -> np.ndarray:
    """The boolean mask keeping the `kept` highest scores in every `group` consecutive entries
    along `axis` (ties: the earlier entry); `scores.shape[axis]` is a multiple of `group`."""
    moved = np.moveaxis(scores, axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)
    # Stable sort of the negated scores: the highest first, ties in index order.
    order = np.argsort(-grouped, axis=-1, kind="stable")
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :kept], True, axis=-1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def _channel_scale(weight: np.ndarray, axis: int, mean_square: np.ndarray | None) -> np.ndarray | None:
    """E[x_j^2] broadcast onto the weight along its reduction axis (a Conv weight's axis 1 holds one
    group's input channels: the first group's channels stand for the others only when groups == 1)."""
    if mean_square is None or len(mean_square) != weight.shape[axis]:
        return None
    shape = [1] * weight.ndim
    shape[axis] = len(mean_square)
    return mean_square.reshape(shape)


def _relative_error(weight: np.ndarray, sparse: np.ndarray, scale: np.ndarray | None) -> float:
    delta = np.square(weight.astype(np.float64) - sparse)
    full = np.square(weight.astype(np.float64))
    if scale is not None:
        delta, full = delta * scale, full * scale
    total = float(full.sum())
    return float(np.sqrt(delta.sum() / total)) if total > 0 else 0.0


@register_pass
class NMSparsity(Pass):
    name = "nm-sparsity"
    description = "N:M semi-structured sparsity (2:4, 4:8) of constant Conv/Gemm/MatMul weights, where the target's sparse tensor cores make it pay"
    # Calibration observes the main graph only.
    subgraphs = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        kept, group = parse_sparsity(ctx.options.get("sparsity", "2:4"))
        force = bool(ctx.options.get("sparsity_force", False))
        dtype = ctx.options.get("sparsity_dtype")
        symbolic_dims = ctx.options.get("symbolic_dims")
        ctx.analysis("shapes")
        layers = [found for node in graph.nodes if (found := _layer(node, group)) is not None]
        record = {"pattern": f"{kept}:{group}", "target": ctx.target.full_name, "forced": force, "considered": len(layers), "layers": []}
        ctx.options["_sparsity"] = record
        decisions: list[CostDecision] = []
        chosen = []
        for layer in layers:
            if ctx.cost is None:
                pays, before_s, after_s, reason = False, None, None, f"{ctx.target.full_name} has no cost model: no speedup can be predicted"
            else:
                verdict = ctx.cost.sparse_compare(layer.node, (kept, group), symbolic_dims, dtype=dtype)
                pays, before_s, after_s, reason = verdict.pays, verdict.before_s, verdict.after_s, verdict.reason
            if pays or force:
                chosen.append((layer, before_s, after_s, reason + ("" if pays else "; applied: forced")))
            else:
                decisions.append(CostDecision(self.name, layer.node.name, False, before_s, after_s, reason))
        record["expected_speedup"] = any(before and after and after < before for _, before, after, _ in chosen)
        declined = [reason for _, before, after, reason in chosen if not (before and after and after < before)] + [d.reason for d in decisions]
        if declined or not chosen:
            # Why (some) layers are not expected to gain: the first layer's reason stands for them.
            record["reason"] = declined[0].removesuffix("; applied: forced") if declined else f"no Conv/Gemm/MatMul weight whose reduction is a multiple of {group}"
        if not chosen:
            return PassResult(False, {}, decisions)
        statistics = self._activation_statistics(ctx, [layer for layer, *_ in chosen])
        marked = []
        zeros = total = 0
        for layer, before_s, after_s, reason in chosen:
            weight = np.asarray(layer.weight.values)
            scale = _channel_scale(weight, layer.axis, statistics.get(layer.activation.name))
            scores = np.abs(weight.astype(np.float64)) * (np.sqrt(scale) if scale is not None else 1.0)
            sparse = np.where(nm_mask(scores, layer.axis, kept, group), weight, np.zeros((), weight.dtype))
            entry = {"node": layer.node.name, "weight": layer.weight.name, "axis": layer.axis, "shape": list(weight.shape),
                     "weight_error": round(_relative_error(weight, sparse, None), 5),
                     "activation_error": None if scale is None else round(_relative_error(weight, sparse, scale), 5),
                     "predicted_before_s": before_s, "predicted_after_s": after_s, "reason": reason}
            ir.set_input(layer.node, 1, ir.make_constant(ctx.fresh_name(f"{layer.weight.name}_{kept}of{group}"), sparse))
            entry["weight"] = layer.node.inputs[1].name
            record["layers"].append(entry)
            marked.append({"node": layer.node.name, "weight": entry["weight"], "axis": layer.axis})
            zeros += int(sparse.size - np.count_nonzero(sparse))
            total += int(sparse.size)
            decisions.append(CostDecision(self.name, layer.node.name, True, before_s, after_s,
                                          f"{reason}; weight error {entry['weight_error']:.1%}"))
        record.update(applied=len(marked), zeros=zeros, weights=total)
        ctx.model.metadata_props[METADATA_KEY] = json.dumps({"pattern": f"{kept}:{group}", "layers": marked})
        return PassResult(True, {"layers made sparse": len(marked), "weights zeroed": zeros}, decisions)

    @staticmethod
    def _activation_statistics(ctx: PassContext, layers: list[_Layer]) -> dict[str, np.ndarray]:
        """E[x_j^2] per reduction channel of each layer's input over the calibration data."""
        if ctx.calibration_data is None:
            return {}
        from graphopt import calibration, export

        for layer in layers:
            if layer.activation.dtype is None:
                layer.activation.dtype = layer.weight.values.dtype  # an input of the layer has its weight's type; calibration fetches typed tensors
        axes = {layer.activation.name: layer.activation_axis for layer in layers}
        stats = calibration.channel_statistics(export.to_proto(ctx.model), ctx.calibration_data, list(axes), axis=axes,
                                               threads=ctx.options.get("threads") or 2)
        return {name: s.mean_square for name, s in stats.items()}
