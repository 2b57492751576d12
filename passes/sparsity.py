"""Structured pruning: remove whole channels, so the model is really smaller (not a mask).

`prune-channels` takes the channel groups of graphopt.analysis.channels (a Conv's or Gemm's output
channels with everything that must lose the same channels: BatchNormalization, biases, depthwise
Convs, residual partners, the input channels of every reader), ranks each group's channels, and
removes the least important ones across the whole graph until `options["prune"]` is met:

    {"flops": 0.3}    30% fewer FLOPs (multiply-adds of Conv/Gemm/MatMul, counted by the cost analysis)
    {"budget": True}  as many fewer as options["accuracy_budget"] (a graphopt.accuracy.Budget or its
                      text, default cos=0.99) allows on held-out calibration batches (`_within_budget`)

Ranking (`options["prune_importance"]`):
* "activation" (the default with calibration data): channel c's contribution to what its readers
  compute, E[a_c^2] * ||W_reader[:, c]||^2 summed over the readers (a channel that is always near
  zero, or read by tiny weights, costs nothing to remove);
* "weight" (the default without data): ||W_producer[c]|| * ||W_reader[:, c]|| (the producer's row
  norm already carries a folded BatchNormalization's scale).
Each group's scores are normalized to its total, and channels go in the order of (normalized score)
/ (FLOPs the channel costs), so that cheap-to-lose, expensive-to-compute channels go first; no group
keeps fewer than `prune_min_keep` (default 0.25) of its channels.

Reconstruction (with calibration data): each reader whose input channels were removed gets new
weights and bias by least squares, min ||A_pruned [W'; b'] - Y_original|| on calibration
activations (A: the reader's pruned input as im2col rows, Y: its original output), so the next
layer absorbs what the removed channels contributed (their mean, and what the kept channels can
express of the rest) without retraining (He et al. 2017, "Channel pruning"; ThiNet). Readers are
refit in waves from the input side (`_waves`): a reader downstream of another is fitted on what
the pruned model computes once the upstream ones are refit. A probe of the sensitivity search
(one group pruned) cuts the readers' inputs out of the original activations where that is exact
(`_sliced_inputs`) instead of running the model.

Lossy: it joins `-O3` only when a budget asks for it (options["prune"]); the accuracy budget is
checked by the caller's verification like every lossy pass.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.analysis.channels import ChannelGroup, channel_groups, set_shape_entry
from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass

DEFAULT_MIN_KEEP = 0.25
# Rows of im2col per reader for the least-squares fit: enough for a well-posed fit of a
# 512*9-input conv (4608 unknowns) with some margin, bounded in memory.
MAX_ROWS = 20000
RIDGE = 1e-4  # relative to the mean diagonal of A^T A: keeps the fit stable where channels correlate


PRUNE_FORMS = "flops=FRACTION (0 < FRACTION < 1) or budget (the most FLOPs the --accuracy-budget allows)"


def parse_prune(spec) -> dict[str, float | bool]:
    """"flops=0.3" (or a dict) -> {"flops": 0.3}; "budget" -> {"budget": True}; a one-line error otherwise."""
    if isinstance(spec, dict):
        items = dict(spec)
    elif str(spec).strip() == "budget":
        return {"budget": True}
    else:
        items = {}
        for part in str(spec).split(","):
            key, _, value = part.partition("=")
            try:
                items[key.strip()] = float(value)
            except ValueError:
                raise GraphoptError(f"--prune takes {PRUNE_FORMS}, not '{spec}'") from None
    if items == {"budget": True}:
        return items
    if set(items) != {"flops"} or not 0 < items["flops"] < 1:
        raise GraphoptError(f"--prune takes {PRUNE_FORMS}, not '{spec}'")
    return items


def _known(dims) -> int:
    return int(np.prod([d for d in dims if isinstance(d, int)], dtype=np.int64))


def _flops(node: gs.Node) -> int:
    """Multiply-add FLOPs per sample of a Conv/Gemm/MatMul (with a constant weight, or of two
    activations, as attention's scores) and of a com.microsoft Attention (0 for other nodes): 2 |W|
    per output position. Per sample, so a symbolic batch does not hide them; the pruning goal is a
    share, which the batch does not change. Dims not known as numbers count as 1."""
    out = node.outputs[0].shape if node.outputs else None
    if node.op == "Attention" and node.domain == "com.microsoft" and isinstance(node.inputs[1], gs.Constant):
        sequence = _known(out[1:2]) if out is not None else 1
        # The projections, then Q K^T and P V: 2 * S * S * F each.
        return 2 * int(node.inputs[1].values.size) * sequence + 4 * sequence * sequence * node.inputs[1].values.shape[1] // 3
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return 0
    if not isinstance(node.inputs[1], gs.Constant):
        a = node.inputs[0].shape
        if node.op != "MatMul" or out is None or a is None or len(out) < 3 or not isinstance(a[-1], int):
            return 0
        return 2 * _known(out[1:]) * a[-1]
    positions = 1
    if out is not None:
        positions = _known(out[2:] if node.op == "Conv" else out[1:-1])
    return 2 * int(node.inputs[1].values.size) * positions


def _channel_flops(group: ChannelGroup) -> float:
    """FLOPs one channel of the group costs: its share of every producer, depthwise Conv and reader."""
    # (A producer's bias, BatchNormalization and activations are O(channels), left out like in `_flops`.)
    total = 0.0
    for node in group.producers + group.depthwise:
        total += _flops(node) / group.channels
    for s in group.slices:
        if s.role == "consumer":
            total += _flops(s.node) * s.block / s.constant.values.shape[s.axis]
    return total


def _rows(values: np.ndarray, axis: int, channels: int, offset: int, block: int) -> np.ndarray:
    """The constant's entries for each channel: [channels, everything else]."""
    moved = np.moveaxis(values, axis, 0)[offset : offset + channels * block]
    return moved.reshape(channels, -1).astype(np.float64)


def _weight_scores(group: ChannelGroup) -> np.ndarray:
    produce = np.ones(group.channels)
    for s in group.slices:
        if s.role == "producer" and s.constant.values.ndim >= 2:
            produce *= np.linalg.norm(_rows(s.constant.values, s.axis, group.channels, s.offset, s.block), axis=1)
    read = np.zeros(group.channels)
    for s in group.slices:
        if s.role == "consumer":
            read += np.linalg.norm(_rows(s.constant.values, s.axis, group.channels, s.offset, s.block), axis=1)
    return produce * read


def _activation_scores(group: ChannelGroup, energy: dict[str, np.ndarray]) -> np.ndarray:
    scores = np.zeros(group.channels)
    for s in group.slices:
        if s.role != "consumer":
            continue
        mean_square = energy[s.node.inputs[0].name]  # per input feature of the reader
        segment = mean_square[s.offset : s.offset + group.channels * s.block].reshape(group.channels, -1)
        weights = _rows(s.constant.values, s.axis, group.channels, s.offset, s.block)
        if s.block > 1:  # Flatten: each channel is `block` features, each with its own weight rows
            per_feature = (weights.reshape(group.channels, s.block, -1) ** 2).sum(axis=2)
            scores += (segment * per_feature).sum(axis=1)
        else:
            scores += segment[:, 0] * (weights**2).sum(axis=1)
    return scores


def _choose(groups: list[ChannelGroup], scores: list[np.ndarray], target_flops: float, min_keep: float) -> list[np.ndarray]:
    """Per group, the channel indices kept: the global order of normalized score per FLOP."""
    candidates = []
    for g, (group, score) in enumerate(zip(groups, scores)):
        per_channel = _channel_flops(group)
        if per_channel <= 0:
            continue
        normalized = score / max(score.sum(), 1e-30)
        candidates += [(normalized[c] / per_channel, g, c, per_channel) for c in range(group.channels)]
    candidates.sort()
    removed = [set() for _ in groups]
    floor = [max(1, math.ceil(min_keep * g.channels)) for g in groups]
    saved = 0.0
    for _, g, c, per_channel in candidates:
        if saved >= target_flops:
            break
        if groups[g].channels - len(removed[g]) <= floor[g]:
            continue
        removed[g].add(c)
        saved += per_channel
    return [np.array(sorted(set(range(group.channels)) - gone), dtype=np.int64) for group, gone in zip(groups, removed)]


def _apply(graph: gs.Graph, groups: list[ChannelGroup], kept: list[np.ndarray], fresh_name) -> None:
    """Slice every constant along the axes the groups index, once per constant and axis."""
    masks: dict[tuple[int, int], tuple[gs.Constant, np.ndarray]] = {}
    shrink: dict[int, tuple[gs.Variable, int, int]] = {}
    for group, keep in zip(groups, kept):
        if len(keep) == group.channels:
            continue
        dropped = np.setdiff1d(np.arange(group.channels), keep)
        for s in group.slices:
            key = (id(s.constant), s.axis)
            if key not in masks:
                masks[key] = (s.constant, np.ones(s.constant.values.shape[s.axis], bool))
            positions = (s.offset + dropped[:, None] * s.block + np.arange(s.block)[None, :]).reshape(-1)
            masks[key][1][positions] = False
        for node in group.depthwise:
            node.attrs["group"] = len(keep)
        for node, attribute in group.head_counts:
            node.attrs[attribute] = int(len(keep))
        for node, entry, per_head in group.head_shapes:
            set_shape_entry(graph, node, entry, len(keep) * per_head, fresh_name)
        for t in group.reshaped:
            t.shape = None  # [.., heads, ..] somewhere: inferred again after the pass
        for t, _offset, block, axis in group.tensors:
            previous = shrink.get(id(t), (t, 0, axis))[1]
            shrink[id(t)] = (t, previous + len(dropped) * block, axis)
    by_constant: dict[int, list[tuple[int, np.ndarray]]] = {}
    constants = {}
    for (cid, axis), (constant, mask) in masks.items():
        by_constant.setdefault(cid, []).append((axis, mask))
        constants[cid] = constant
    for cid, cuts in by_constant.items():
        values = ir.constant_value(constants[cid])
        for axis, mask in cuts:
            values = np.compress(mask, values, axis=axis)
        constants[cid].values = np.ascontiguousarray(values)
    for t, removed, axis in shrink.values():
        if t.shape is not None and len(t.shape) > axis and isinstance(t.shape[axis], int):
            shape = list(t.shape)
            shape[axis] -= removed
            t.shape = shape


# ---------------------------------------------------------------------------------------------
# Calibration activations


def _run_batches(proto, data, names: list[str], batches: int, first: int = 0) -> list[dict[str, np.ndarray]]:
    """The named tensors on `batches` calibration batches from batch `first` on, one dict per batch."""
    from graphopt import calibration

    return [{name: np.asarray(value) for name, value in values.items()}
            for values in calibration.tensor_batches(proto, data, names, batches=batches, first=first)]


def _joined(per_batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches concatenated along axis 0; where their shapes differ (sentences of several lengths),
    as rows of their last axis ([tokens, features]: what a MatMul reader's fit and the output error read)."""
    joined = {}
    for name in per_batch[0] if per_batch else ():
        parts = [batch[name] for batch in per_batch]
        if len({p.shape[1:] for p in parts}) == 1:
            joined[name] = np.concatenate(parts, axis=0)
        else:
            joined[name] = np.concatenate([p.reshape(-1, p.shape[-1] if p.ndim else 1) for p in parts], axis=0)
    return joined


def _run(proto, data, names: list[str], batches: int, first: int = 0) -> dict[str, np.ndarray]:
    return _joined(_run_batches(proto, data, names, batches, first))


def _feature_energy(x: np.ndarray, reader: gs.Node) -> np.ndarray:
    """E[x^2] per feature of a reader's input (a Conv's axis 1, a Gemm/MatMul's last), averaged over the rest."""
    axis = 1 if reader.op == "Conv" else x.ndim - 1
    return (x.astype(np.float64) ** 2).mean(axis=tuple(i for i in range(x.ndim) if i != axis)).reshape(-1)


def _output_rows(y: np.ndarray, picks: np.ndarray) -> np.ndarray:
    n, k = y.shape[0], y.shape[1]
    return y.transpose(0, 2, 3, 1).reshape(-1, k)[picks] if y.ndim == 4 else y.reshape(n, k)


def _reconstruct(reader: gs.Node, x_pruned: np.ndarray, y_original: np.ndarray, graph: gs.Graph, ctx: PassContext, rng) -> bool:
    """Least-squares weights and bias for a reader from its pruned input to its original output."""
    from graphopt import calibration

    weight = reader.inputs[1]
    if reader.op == "Conv":
        if int(reader.attrs.get("group", 1)) != 1 or x_pruned.ndim != 4:
            return False
        rows, picks = calibration.conv_patches(x_pruned, reader, rng, MAX_ROWS)
        target = _output_rows(y_original, picks)
    else:
        rows = x_pruned.reshape(-1, x_pruned.shape[-1])
        target = y_original.reshape(-1, y_original.shape[-1])
        if len(rows) > MAX_ROWS:
            picks = rng.choice(len(rows), MAX_ROWS, replace=False)
            rows, target = rows[picks], target[picks]
    a = np.concatenate([rows.astype(np.float64), np.ones((len(rows), 1))], axis=1)
    values = weight.values
    gram = a.T @ a
    # Ridge towards the layer's own (pruned) weights, not towards zero: where the calibration rows
    # are few for the unknowns (a transformer's 1536 FFN inputs from a few hundred tokens) the plain
    # fit interpolates the calibration set and wrecks unseen inputs; pulled towards what the layer
    # had, it changes only what the data pins down.
    start = np.concatenate([_as_features(reader, values), _current_bias(reader, values.dtype)[None, :]], axis=0)
    strength = max(RIDGE, len(a[0]) / len(a)) * np.trace(gram) / len(gram)
    gram[np.diag_indices_from(gram)] += strength
    solution = np.linalg.solve(gram, a.T @ target.astype(np.float64) + strength * start)  # [features + 1, outputs]
    fitted, bias = solution[:-1], solution[-1]
    if reader.op == "Conv":
        new_weight = fitted.T.reshape(values.shape)
    elif reader.op == "Gemm" and reader.attrs.get("transB", 0):
        new_weight = fitted.T
    else:
        new_weight = fitted
    weight.values = new_weight.astype(values.dtype)
    _set_bias(reader, bias.astype(values.dtype), graph, ctx)
    return True


def _as_features(reader: gs.Node, values: np.ndarray) -> np.ndarray:
    """A reader's weight as [input features, outputs], the layout of the least-squares fit."""
    if reader.op == "Conv":
        return values.reshape(values.shape[0], -1).T.astype(np.float64)
    if reader.op == "Gemm" and reader.attrs.get("transB", 0):
        return values.T.astype(np.float64)
    return values.astype(np.float64)


def _current_bias(reader: gs.Node, dtype) -> np.ndarray:
    """What the fit's target includes besides x @ W: a Conv's or Gemm's own bias (a MatMul's bias
    Add comes after the output the fit targets)."""
    outputs = reader.inputs[1].values.shape[0 if reader.op == "Conv" or (reader.op == "Gemm" and reader.attrs.get("transB", 0)) else 1]
    current = ir.constant_value(reader.inputs[2]) if reader.op in ("Conv", "Gemm") and len(reader.inputs) > 2 and not reader.inputs[2].is_empty() else None
    if current is None:
        return np.zeros(outputs)
    scale = float(reader.attrs.get("beta", 1.0)) if reader.op == "Gemm" else 1.0
    return np.broadcast_to(np.asarray(current, np.float64).reshape(-1) * scale, (outputs,)).copy()


def _set_bias(reader: gs.Node, bias: np.ndarray, graph: gs.Graph, ctx: PassContext) -> None:
    """The fitted bias replaces the reader's: for a Conv/Gemm (whose output the fit targeted) the
    difference goes into its bias; a MatMul's goes into its bias Add, or a new Add after it."""
    if reader.op in ("Conv", "Gemm"):
        current = ir.constant_value(reader.inputs[2]) if len(reader.inputs) > 2 and not reader.inputs[2].is_empty() else None
        if current is not None and reader.op == "Gemm":
            current = current * float(reader.attrs.get("beta", 1.0))
            reader.attrs["beta"] = 1.0
            reader.inputs[2].values = current.astype(bias.dtype)
        shift = bias - (np.zeros_like(bias) if current is None else np.broadcast_to(current, bias.shape))
    else:
        shift = bias
    if ir.add_to_bias(reader, shift.astype(np.float32), ctx.fresh_name):
        return
    out = reader.outputs[0]
    product = gs.Variable(ctx.fresh_name(f"{reader.name}_product"), dtype=out.dtype, shape=out.shape)
    reader.outputs[0] = product
    graph.nodes.append(gs.Node("Add", ctx.fresh_name(f"{reader.name}_bias_refit"),
                               inputs=[product, ir.make_constant(ctx.fresh_name(f"{reader.name}_bias"), bias)], outputs=[out]))


def _distinct(nodes) -> list[gs.Node]:
    return list({id(n): n for n in nodes}.values())


def _sliced_inputs(changed: list[tuple[ChannelGroup, np.ndarray]], touched: list[gs.Node], original: dict) -> dict[str, np.ndarray] | None:
    """The readers' pruned inputs without running the pruned model: the original inputs with the
    removed channels cut out. Exact where one group changed (every probe of the sensitivity
    search) and no reader's output flows back into one of its producers (a residual stream's
    blocks read it and write it): then the producers and everything between them and the readers
    compute the kept channels as before. None otherwise, or where a reader's input is not a
    tensor the group indexes."""
    if len(changed) != 1:
        return None
    group, keep = changed[0]
    producers = {id(p) for p in group.producers}
    frontier, seen = list(touched), set()
    while frontier:
        for out in frontier.pop().outputs:
            for consumer in out.outputs:
                if id(consumer) in producers:
                    return None
                if id(consumer) not in seen:
                    seen.add(id(consumer))
                    frontier.append(consumer)
    dropped = np.setdiff1d(np.arange(group.channels), keep)
    where: dict[int, list[tuple[int, int, int]]] = {}
    for t, offset, block, axis in group.tensors:
        where.setdefault(id(t), []).append((offset, block, axis))
    out = {}
    for reader in touched:
        x = reader.inputs[0]
        if id(x) not in where or x.shape is None or x.name not in original:
            return None
        values = original[x.name]
        cuts = {}
        for offset, block, axis in where[id(x)]:
            axis = axis % len(x.shape)
            if values.ndim != len(x.shape):
                if axis != len(x.shape) - 1:
                    return None  # sentences of several lengths joined as rows: only the feature axis is left
                axis = values.ndim - 1
            mask = cuts.setdefault(axis, np.ones(values.shape[axis], bool))
            mask[(offset + dropped[:, None] * block + np.arange(block)[None, :]).reshape(-1)] = False
        for axis, mask in cuts.items():
            values = np.compress(mask, values, axis=axis)
        out[x.name] = values
    return out


def _prune(graph: gs.Graph, ctx: PassContext, groups: list[ChannelGroup], kept: list[np.ndarray], original: dict | None, model) -> int:
    """Removes the channels not in `kept`, then (with `original`: the readers' inputs and outputs on
    calibration data before pruning) refits every reader that lost input channels; readers refitted."""
    from graphopt import export

    changed = [(g, k) for g, k in zip(groups, kept) if len(k) < g.channels]
    _apply(graph, groups, kept, ctx.fresh_name)
    if original is None or not ctx.options.get("prune_reconstruct", True):
        return 0
    touched = _distinct(n for g, _ in changed for n in g.consumers)
    pruned = _sliced_inputs(changed, touched, original)
    rng = np.random.default_rng(0)
    # A reader that also produces a pruned group keeps only its kept output channels.
    kept_outputs = {id(p): k for g, k in changed for p in g.producers}
    refitted = 0
    # Readers downstream of other readers are refit on what the refit model upstream computes:
    # fitted on the pruned model's inputs before the upstream refits, they would learn to make up
    # for losses those refits then undo (which collapsed the PP-OCR recognizer at 20%).
    for depth, wave in enumerate(_waves(graph, touched)):
        if depth or pruned is None:
            pruned = _run(export.to_proto(model), ctx.calibration_data, [n.inputs[0].name for n in wave], _batches(ctx))
        before = len(graph.nodes)
        for reader in wave:
            target = original[reader.outputs[0].name]
            if id(reader) in kept_outputs:
                target = np.take(target, kept_outputs[id(reader)], axis=1 if reader.op == "Conv" else -1)
            refitted += _reconstruct(reader, pruned[reader.inputs[0].name], target, graph, ctx, rng)
        if len(graph.nodes) != before:
            ir.toposort(graph)  # the refit bias Adds went to the end
    return refitted


def _waves(graph: gs.Graph, readers: list[gs.Node]) -> list[list[gs.Node]]:
    """The readers in refit order: wave k holds those whose input k readers upstream of it reach
    (the longest such chain), so that a wave's inputs are final once the waves before it are refit."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    ids = {id(r) for r in readers}
    upstream: dict[int, set[int]] = {id(r): set() for r in readers}
    for reader in readers:
        frontier, seen = [reader], set()
        while frontier:
            for out in frontier.pop().outputs:
                for consumer in out.outputs:
                    if id(consumer) in seen:
                        continue
                    seen.add(id(consumer))
                    frontier.append(consumer)
                    if id(consumer) in ids:
                        upstream[id(consumer)].add(id(reader))
    depth: dict[int, int] = {}
    for reader in sorted(readers, key=lambda r: position.get(id(r), 0)):
        depth[id(reader)] = 1 + max((depth[u] for u in upstream[id(reader)]), default=-1)
    waves: list[list[gs.Node]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for reader in readers:
        waves[depth[id(reader)]].append(reader)
    return waves


def _batches(ctx: PassContext) -> int:
    """Calibration batches the refit reads (the first ones): enough for `prune_samples` samples
    (batches of one sample are the CLI's default, and sixteen samples fit nothing), with a quarter
    of the batches at least left for the search to judge on."""
    wanted = -(-int(ctx.options.get("prune_samples", 512)) // max(1, ctx.calibration_data.batch_size))
    available = len(ctx.calibration_data)
    return max(1, min(wanted, available - max(1, available // 4)))


def _held_out(ctx: PassContext) -> tuple[int, int]:
    """(first batch, batches) the sensitivity search measures the output error on: batches the
    refit never saw, so that a fit that only memorised the calibration set does not look good."""
    fitted, available = _batches(ctx), len(ctx.calibration_data)
    if available <= fitted:
        return 0, available  # one batch: nothing is held out
    return fitted, min(fitted, available - fitted)


def _ranked(score: np.ndarray) -> np.ndarray:
    """Channel indices, least important first."""
    return np.argsort(score, kind="stable")


# Removal steps tried per group in the sensitivity search: eighths of its channels.
SEARCH_STEPS = 8


class _Sensitivity:
    """Each group pruned alone at each step, on a copy of the model, refit, and the outputs' error
    measured on the calibration data: which groups can lose how much."""

    def __init__(self, ctx: PassContext, proto, original: dict):
        """`original`: the unpruned model's tensors on the refit's calibration batches."""
        self.ctx, self.proto, self.original = ctx, proto, original
        self.outputs = [o.name for o in proto.graph.output]
        self.held_out = _held_out(ctx)
        self.reference_batches = _run_batches(proto, ctx.calibration_data, self.outputs, self.held_out[1], self.held_out[0])
        self.reference = _joined(self.reference_batches)
        self.evaluations = 0

    def outputs_without(self, removals: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The outputs on the held-out batches with these channels (per group name) removed and the
        readers refit (`self.flops_after`: that model's FLOPs per sample)."""
        from graphopt import export, loading
        from graphopt.analysis import shapes

        model = loading.from_proto(self.proto)
        shapes.infer_shapes(model)
        groups, _ = channel_groups(model.graph)
        chosen = [g for g in groups if g.name in removals]
        kept = [np.setdiff1d(np.arange(g.channels), removals[g.name]) for g in chosen]
        _prune(model.graph, self.ctx, chosen, kept, self.original, model)
        self.flops_after = sum(_flops(n) for n in model.graph.nodes)
        self.evaluations += 1
        return _run_batches(export.to_proto(model), self.ctx.calibration_data, self.outputs, self.held_out[1], self.held_out[0])

    def error(self, removals: dict[str, np.ndarray]) -> float:
        """Relative squared error of the outputs with these channels removed."""
        got = _joined(self.outputs_without(removals))
        num = sum(float(((got[o].astype(np.float64) - self.reference[o]) ** 2).sum()) for o in self.outputs)
        den = sum(float((self.reference[o].astype(np.float64) ** 2).sum()) for o in self.outputs)
        return num / max(den, 1e-30)


Steps = list[list[tuple[int, float]]]  # per group: (channels removed, measured error) for each step


def _measure_steps(groups: list[ChannelGroup], orders: list[np.ndarray], sensitivity: _Sensitivity, min_keep: float) -> Steps:
    """Each group pruned alone at eighths of its channels (down to `min_keep`), the error measured."""
    steps: Steps = []
    for group, order in zip(groups, orders):
        limit = group.channels - max(1, math.ceil(min_keep * group.channels))
        counts = sorted({min(limit, max(1, round(group.channels * k / SEARCH_STEPS))) for k in range(1, SEARCH_STEPS)} - {0})
        counts = [c for c in counts if 0 < c <= limit]
        steps.append([(c, sensitivity.error({group.name: order[:c]})) for c in counts])
    return steps


def _allocate(groups: list[ChannelGroup], orders: list[np.ndarray], steps: Steps, target_flops: float) -> list[np.ndarray]:
    """Kept channels per group: greedily the step with the least measured error added per FLOP
    saved, until `target_flops` are saved (or every group is at its limit)."""
    level = [0] * len(groups)  # steps taken per group
    saved = 0.0
    per_channel = [_channel_flops(g) for g in groups]
    while saved < target_flops:
        best = None
        for g, options in enumerate(steps):
            if level[g] >= len(options) or per_channel[g] <= 0:
                continue
            done_count, done_error = (0, 0.0) if level[g] == 0 else options[level[g] - 1]
            count, error = options[level[g]]
            cost = max(error - done_error, 0.0) / ((count - done_count) * per_channel[g])
            if best is None or cost < best[0]:
                best = (cost, g, count)
        if best is None:
            break
        _, g, count = best
        previous = 0 if level[g] == 0 else steps[g][level[g] - 1][0]
        saved += (count - previous) * per_channel[g]
        level[g] += 1
    return [np.sort(order[0 if level[g] == 0 else steps[g][level[g] - 1][0]:]) for g, order in enumerate(orders)]


def _removals(groups: list[ChannelGroup], kept: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {g.name: np.setdiff1d(np.arange(g.channels), k) for g, k in zip(groups, kept) if len(k) < g.channels}


# Probes of the FLOPs saved under an accuracy budget: the most that can go, then bisections to 1/32 of it.
BUDGET_BISECTIONS = 6


def _within_budget(groups: list[ChannelGroup], orders: list[np.ndarray], steps: Steps, sensitivity: _Sensitivity,
                   budget, record: dict) -> list[np.ndarray] | None:
    """The allocation that saves the most FLOPs while the whole pruned and refit model meets
    `budget` on the held-out batches, by bisection over the FLOPs saved (the allocation for a goal
    is the greedy walk above, so each probe costs one refit and one run); None when even the first
    probe misses it."""
    per_channel = [_channel_flops(g) for g in groups]
    most = sum(steps[g][-1][0] * per_channel[g] for g in range(len(groups)) if steps[g])
    low, high, best = 0.0, most, None
    probes = []
    for _ in range(BUDGET_BISECTIONS):
        goal = high if best is None and not probes else (low + high) / 2
        kept = _allocate(groups, orders, steps, goal)
        measures = budget.measure(sensitivity.reference_batches, sensitivity.outputs_without(_removals(groups, kept)))
        met = budget.meets(measures)
        probes.append({"flops_after": sensitivity.flops_after, "met": met, **measures.to_dict()})
        if met:
            low, best = goal, (kept, measures)
            if goal == most:
                break
        else:
            high = goal
    record.update(budget=str(budget), budget_probes=probes, budget_met=best is not None)
    if best is None:
        return None
    record["budget_measures"] = best[1].to_dict()
    return best[0]


def _budget(spec):
    """options["accuracy_budget"]: a graphopt.accuracy.Budget, its text, or the default cos=0.99."""
    from graphopt.accuracy import Budget

    return spec if isinstance(spec, Budget) else Budget.parse(spec or "cos=0.99")


@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    description = "Remove whole Conv/Gemm channels (and what must lose them too) to meet options['prune'], refitting the readers on calibration data"
    subgraphs = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from graphopt import export

        spec = ctx.options.get("prune")
        if not spec:
            return PassResult(False)
        goal = parse_prune(spec)
        ctx.analysis("shapes")
        groups, refused = channel_groups(graph)
        record = ctx.options.setdefault("_pruning", {})
        record["refused"] = [r.to_dict() for r in refused]
        total = sum(_flops(n) for n in graph.nodes)
        record["flops_before"] = total
        if not groups or total <= 0:
            record["groups"] = []
            return PassResult(False, stats={"groups refused": len(refused)})
        data = ctx.calibration_data
        importance = ctx.options.get("prune_importance") or "weight"
        if importance not in ("activation", "weight"):
            raise GraphoptError(f"prune_importance is activation or weight, not '{importance}'")
        if importance == "activation" and data is None:
            raise GraphoptError("activation-based pruning needs calibration data (--calibration)")
        readers = _distinct(n for g in groups for n in g.consumers)
        original = None
        proto = None
        if data is not None:
            proto = export.to_proto(ctx.model)
            names = [n.inputs[0].name for n in readers] + [n.outputs[0].name for n in readers]  # the refit's
            original = _run(proto, data, names, _batches(ctx))
        if importance == "activation":
            energy = {n.inputs[0].name: _feature_energy(original[n.inputs[0].name], n) for n in readers}
            scores = [_activation_scores(g, energy) for g in groups]
        else:
            scores = [_weight_scores(g) for g in groups]
        min_keep = float(ctx.options.get("prune_min_keep", DEFAULT_MIN_KEEP))
        search = data is not None and ctx.options.get("prune_search", True)
        if goal.get("budget") and not search:
            raise GraphoptError("--prune budget measures the accuracy budget on calibration data: add --calibration")
        if search:
            sensitivity = _Sensitivity(ctx, proto, original)
            orders = [_ranked(s) for s in scores]
            steps = _measure_steps(groups, orders, sensitivity, min_keep)
            if goal.get("budget"):
                kept = _within_budget(groups, orders, steps, sensitivity, _budget(ctx.options.get("accuracy_budget")), record)
                if kept is None:
                    record["evaluations"] = sensitivity.evaluations
                    record["groups"] = []
                    return PassResult(False, stats={"groups refused": len(refused)})
            else:
                kept = _allocate(groups, orders, steps, goal["flops"] * total)
            record["evaluations"] = sensitivity.evaluations
        else:
            kept = _choose(groups, scores, goal["flops"] * total, min_keep)
        changed = [(g, k) for g, k in zip(groups, kept) if len(k) < g.channels]
        if not changed:
            return PassResult(False)
        refitted = _prune(graph, ctx, groups, kept, original, ctx.model)
        after = sum(_flops(n) for n in graph.nodes)
        record.update(flops_after=after, importance=importance, refitted=refitted, searched=bool(search),
                      groups=[{"producers": [p.name for p in g.producers], "channels": g.channels, "kept": int(len(k)), "head_size": g.head_size}
                              for g, k in zip(groups, kept)])
        return PassResult(True, stats={"channels removed": int(sum(g.channels - len(k) for g, k in zip(groups, kept))),
                                       "groups pruned": len(changed), "readers refitted": refitted, "groups refused": len(refused)})
