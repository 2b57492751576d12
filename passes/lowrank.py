"""Low-rank splits: a MatMul, Gemm or Conv by a constant weight W (K x N) becomes two products of rank r,
x @ A (K x r) @ B (r x N), where that removes work.

    MatMul(x, W)                  -> MatMul(MatMul(x, A), B)
    Gemm(x, W, C, alpha, beta, transB)  -> Gemm(MatMul(x, A), B, C, alpha=1, beta, transB=0)

A 2-D Conv (group 1) by a constant weight W [O, C, kh, kw] is the same product on its input's
receptive fields (im2col rows of C kh kw values, the weight as M = W.reshape(O, -1)^T, K = C kh kw
and N = O): it becomes a kh x kw Conv with r outputs (A^T as [r, C, kh, kw], the original's pads,
strides and dilations) followed by a 1 x 1 Conv from r to O (B^T as [O, r, 1, 1], with the bias).

Tucker-2 (`options["lowrank_conv_form"]`: "auto", the default, "split" or "tucker"): a k x k Conv (k
> 1) also has the form 1 x 1 Conv C -> r_in (U_in^T), then the k x k core Conv r_in -> r_out (G = W
x_0 U_out^T x_1 U_in^T, the original's pads, strides and dilations), then 1 x 1 Conv r_out -> O
(U_out, with the bias): W projected onto r_out directions of its outputs and r_in of its input
channels, which pays where both C and O are large (the core's k x k work shrinks in both). The first
1 x 1 runs before the padding, which is exact: it has no bias, so zeros stay zeros. U_out are the
directions below; U_in the top eigenvectors of W's channel-mode Gram matrix (HOSVD: one
eigendecomposition serves every rank) or, with calibration data, whichever of those, the input
channels' principal directions and the eigenvectors of the channel moment's symmetric product with
that Gram matrix has the smaller error on the activations (each is right where the weight, the data
or neither dominates; the exact optimum under a weighting S has no closed form). r_out is the
smallest multiple of `LOWRANK_ALIGNMENT` (r_in at the same fraction of C) meeting the tolerance,
found by bisection on the exactly measured error. "auto" keeps whichever form the cost model
predicts faster (fewer multiply-adds per output position without one).

Both variants keep the same form, A = W V_r and B = V_r^T with V_r orthonormal (r x N rows of
B), so that A B = W V_r V_r^T is W projected onto r directions of its output space:

- plain (no calibration data): V_r are W's top right singular vectors, the truncated SVD, which
  minimises ||W - A B||_F;
- data-aware (`ctx.calibration_data`): V_r are those of L^T W, where S = X^T X / n = L L^T is
  the second moment of the layer's input over the calibration data (leading axes flattened to
  rows; a Conv's: its receptive fields, `CONV_ROWS_PER_BATCH` sampled per batch). That minimises ||X W - X A B||_F over rank-r products: with L invertible, L^T A B is any
  rank-r matrix, the best is [L^T W]_r = L^T W V_r V_r^T. Writing A as W V_r instead of
  L^{-T} U_r Σ_r is the same matrix without inverting L, whose small eigenvalues (directions the
  data never visits) would amplify rounding.

Rank: the smallest r whose relative error, sqrt(discarded σ² / all σ²) of the matrix above (of W,
or of L^T W, which is exactly ||X W - X A B|| / ||X W|| on the calibration activations), is at
most `options["lowrank_tolerance"]` (0.05); rounded up to a multiple of `LOWRANK_ALIGNMENT` where
that still fits the size limit (GEMM kernels block by it). `options["lowrank_rank"]` forces r.

Kept only where it pays: r (K + N) <= `options["lowrank_max_ratio"]` (0.6) x K N, and the
target's cost model (ctx.cost) predicts the two products faster than the one (every consultation
is a CostDecision in the result; a layer that does not pay even at rank 1, two tiny kernels
instead of one, is declined before any SVD or calibration run). A weight that is not a constant
2-D float32 tensor (4-D for a Conv), or that another node also reads, a Gemm with transA or a
constant A, a grouped Conv or one with auto_pad, and subgraphs (calibration observes the main
graph) are left alone.

Stats: `split` layers (`tucker2` of them in three Convs), and the weight parameters of those layers
`parameters_before` and `parameters_after`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.errors import GraphoptError
from graphopt.pass_manager import CostDecision, Pass, PassContext, PassResult, register_pass

DEFAULT_TOLERANCE = 0.05
DEFAULT_MAX_RATIO = 0.6
LOWRANK_ALIGNMENT = 8
CONV_FORMS = ("auto", "split", "tucker")
# Added to S's diagonal, relative to its mean eigenvalue: makes S positive definite where the
# data spans fewer than K directions, without moving the directions it does span.
RIDGE = 1e-6
# Receptive fields per calibration batch in a Conv's second moment: S is (C kh kw)^2, its rows a
# sample of the batch's output positions (a 56x56 map has 3136 per image).
CONV_ROWS_PER_BATCH = 2048


class _Candidate(NamedTuple):
    node: gs.Node
    activation: gs.Variable
    weight: np.ndarray  # K x N, as the product reads it: alpha and transB applied; a Conv's W.reshape(O, -1)^T


def _conv_candidate(node: gs.Node) -> _Candidate | None:
    x, w_tensor = node.inputs[0], node.inputs[1]
    if not isinstance(x, gs.Variable) or ir.constant_value(x) is not None:
        return None
    w = ir.constant_value(w_tensor)
    if w is None or w.dtype != np.float32 or w.ndim != 4 or len(w_tensor.outputs) != 1:
        return None
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if int(node.attrs.get("group", 1)) != 1 or (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return None
    if min(w.shape[0], w[0].size) < 2:
        return None
    return _Candidate(node, x, w.reshape(w.shape[0], -1).T)


def _candidate(node: gs.Node) -> _Candidate | None:
    if node.domain not in ir.DEFAULT_DOMAINS or node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return None
    if node.op == "Conv":
        return _conv_candidate(node)
    x, w_tensor = node.inputs[0], node.inputs[1]
    if not isinstance(x, gs.Variable) or ir.constant_value(x) is not None:
        return None
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return None
    w = ir.constant_value(w_tensor)
    if w is None or w.dtype != np.float32 or w.ndim != 2 or min(w.shape) < 2:
        return None
    if len(w_tensor.outputs) != 1:
        return None  # splitting it for one reader would leave the others the full copy
    if node.op == "Gemm":
        w = w.T if int(node.attrs.get("transB", 0)) else w
        w = w * np.float32(node.attrs.get("alpha", 1.0))
    return _Candidate(node, x, w)


_SPATIAL_ATTRS = ("kernel_shape", "pads", "strides", "dilations")


def _conv_probe(node: gs.Node, x: gs.Variable, rank: int) -> list[gs.Node]:
    weight = node.inputs[1].values
    out = node.outputs[0]
    x_probe = gs.Variable(x.name, dtype=x.dtype, shape=x.shape)
    hidden = gs.Variable("hidden", dtype=x.dtype, shape=None if out.shape is None else [out.shape[0], rank, *out.shape[2:]])
    out_probe = gs.Variable(out.name, dtype=out.dtype, shape=out.shape)
    first = gs.Node("Conv", attrs={k: v for k, v in node.attrs.items() if k in _SPATIAL_ATTRS},
                    inputs=[x_probe, gs.Constant("a", np.zeros((rank, *weight.shape[1:]), np.float32))], outputs=[hidden])
    second_inputs = [hidden, gs.Constant("b", np.zeros((weight.shape[0], rank, 1, 1), np.float32))]
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        second_inputs.append(gs.Constant("bias", np.zeros(weight.shape[0], np.float32)))
    return [first, gs.Node("Conv", inputs=second_inputs, outputs=[out_probe])]


def _probe(node: gs.Node, x: gs.Variable, k: int, n: int, rank: int) -> list[gs.Node]:
    """Detached copies of what the split would put in the graph, for the cost model only."""
    if node.op == "Conv":
        return _conv_probe(node, x, rank)
    x_probe = gs.Variable(x.name, dtype=x.dtype, shape=x.shape)
    hidden = gs.Variable("hidden", dtype=x.dtype, shape=None if x.shape is None else [*x.shape[:-1], rank])
    out = node.outputs[0]
    out_probe = gs.Variable(out.name, dtype=out.dtype, shape=out.shape)
    first = gs.Node("MatMul", inputs=[x_probe, gs.Constant("a", np.zeros((k, rank), np.float32))], outputs=[hidden])
    second_inputs = [hidden, gs.Constant("b", np.zeros((rank, n), np.float32))]
    if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
        c = node.inputs[2]
        second_inputs.append(gs.Variable(c.name, dtype=c.dtype, shape=c.shape))
    second = gs.Node(node.op, attrs={"beta": node.attrs.get("beta", 1.0)} if node.op == "Gemm" else {},
                     inputs=second_inputs, outputs=[out_probe])
    return [first, second]


def _tucker_probe(node: gs.Node, x: gs.Variable, r_in: int, r_out: int) -> list[gs.Node]:
    weight = node.inputs[1].values
    out = node.outputs[0]
    x_probe = gs.Variable(x.name, dtype=x.dtype, shape=x.shape)
    squeezed = gs.Variable("squeezed", dtype=x.dtype, shape=None if x.shape is None else [x.shape[0], r_in, *x.shape[2:]])
    core_out = gs.Variable("core", dtype=x.dtype, shape=None if out.shape is None else [out.shape[0], r_out, *out.shape[2:]])
    out_probe = gs.Variable(out.name, dtype=out.dtype, shape=out.shape)
    last_inputs = [core_out, gs.Constant("u_out", np.zeros((weight.shape[0], r_out, 1, 1), np.float32))]
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        last_inputs.append(gs.Constant("bias", np.zeros(weight.shape[0], np.float32)))
    return [gs.Node("Conv", inputs=[x_probe, gs.Constant("u_in", np.zeros((r_in, weight.shape[1], 1, 1), np.float32))], outputs=[squeezed]),
            gs.Node("Conv", attrs={k: v for k, v in node.attrs.items() if k in _SPATIAL_ATTRS},
                    inputs=[squeezed, gs.Constant("g", np.zeros((r_out, r_in, *weight.shape[2:]), np.float32))], outputs=[core_out]),
            gs.Node("Conv", inputs=last_inputs, outputs=[out_probe])]


class _Form(NamedTuple):
    """One way to split a layer: "split" (factors a, b) or "tucker" (u_in [C, r_in], core, u_out [O, r_out])."""
    kind: str
    summary: str
    parameters: int
    macs_per_position: int  # the fallback ranking where there is no cost model
    factors: tuple[np.ndarray, ...]


def _top_eigenvectors(symmetric: np.ndarray) -> np.ndarray:
    _, vectors = np.linalg.eigh(symmetric)
    return np.ascontiguousarray(vectors[:, ::-1])


def _channel_moment(second_moment: np.ndarray, channels: int) -> np.ndarray:
    """The C x C second moment of the input channels, from S over receptive fields ((c, i, j) rows):
    the mean of its diagonal blocks over the kernel offsets."""
    taps = len(second_moment) // channels
    return np.einsum("aibi->ab", second_moment.reshape(channels, taps, channels, taps)) / taps


def _weight_error(weight: np.ndarray, approximation: np.ndarray, second_moment: np.ndarray | None) -> float:
    """||X W - X W'|| / ||X W|| on the calibration activations (S = X^T X / rows), or ||W - W'|| / ||W||."""
    w = weight.reshape(weight.shape[0], -1).T
    delta = w - approximation.reshape(weight.shape[0], -1).T
    if second_moment is None:
        return float(np.linalg.norm(delta) / max(np.linalg.norm(w), 1e-30))
    return float(np.sqrt(max(np.sum(delta * (second_moment @ delta)), 0.0) / max(np.sum(w * (second_moment @ w)), 1e-30)))


def _input_bases(weight: np.ndarray, second_moment: np.ndarray | None) -> list[np.ndarray]:
    """Candidate orthonormal bases of the input channels, best directions first (the module docstring)."""
    unfolded = weight.transpose(1, 0, 2, 3).reshape(weight.shape[1], -1)
    gram = unfolded @ unfolded.T
    bases = [_top_eigenvectors(gram)]
    if second_moment is not None:
        channel_moment = _channel_moment(second_moment, weight.shape[1])
        product = channel_moment @ gram
        bases += [_top_eigenvectors(channel_moment), _top_eigenvectors(product + product.T)]
    return bases


def _tucker_factors(weight: np.ndarray, vt: np.ndarray, bases: list[np.ndarray], r_in: int, r_out: int,
                    second_moment: np.ndarray | None) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(error, u_in, core, u_out) of the Tucker-2 form at these ranks, over the candidate input bases."""
    u_out = vt[:r_out].T
    # tensordot and matmul, not einsum: without optimize, einsum contracts every operand in one loop nest.
    projected = (u_out.T @ weight.reshape(len(weight), -1)).reshape(-1, *weight.shape[1:])
    best = None
    for basis in bases:
        u_in = basis[:, :r_in]
        core = np.tensordot(projected, u_in, axes=([1], [0])).transpose(0, 3, 1, 2)
        expanded = (u_out @ core.reshape(len(core), -1)).reshape(len(u_out), *core.shape[1:])
        error = _weight_error(weight, np.tensordot(expanded, u_in, axes=([1], [1])).transpose(0, 3, 1, 2), second_moment)
        if best is None or error < best[0]:
            best = (error, u_in, core, u_out)
    return best


def _tucker_form(node: gs.Node, vt: np.ndarray, second_moment: np.ndarray | None, tolerance: float,
                 max_ratio: float, forced) -> _Form | None:
    """The Tucker-2 form of a k x k Conv at the smallest aligned ranks meeting the tolerance, or None."""
    weight = node.inputs[1].values.astype(np.float64)
    out_channels, channels, kh, kw = weight.shape
    taps = kh * kw
    if taps == 1 or min(out_channels, channels) < 2 * LOWRANK_ALIGNMENT:
        return None

    def parameters(r_in: int, r_out: int) -> int:
        return channels * r_in + r_out * r_in * taps + out_channels * r_out

    limit = max_ratio * weight.size
    if forced is not None:
        pairs = [(min(int(forced), channels), min(int(forced), out_channels))]
    else:
        pairs = []
        for r_out in range(LOWRANK_ALIGNMENT, out_channels, LOWRANK_ALIGNMENT):
            r_in = min(-(-r_out * channels // out_channels // LOWRANK_ALIGNMENT) * LOWRANK_ALIGNMENT or LOWRANK_ALIGNMENT, channels)
            if parameters(r_in, r_out) > limit:
                break
            pairs.append((r_in, r_out))
    if not pairs or parameters(*pairs[0]) > limit:
        return None
    bases = _input_bases(weight, second_moment)
    # The error falls as the ranks grow: bisect for the first pair within the tolerance.
    low, high, found = 0, len(pairs) - 1, None
    while low <= high:
        middle = (low + high) // 2
        factors = _tucker_factors(weight, vt, bases, *pairs[middle], second_moment)
        if factors[0] <= tolerance or forced is not None:
            found, high = (pairs[middle], factors), middle - 1
        else:
            low = middle + 1
    if found is None:
        return None
    (r_in, r_out), (error, u_in, core, u_out) = found
    strides = node.attrs.get("strides", [1, 1])
    measured = "on the calibration activations" if second_moment is not None else "of the weight"
    return _Form("tucker", f"Tucker-2 ranks {r_in} in of {channels}, {r_out} out of {out_channels}, relative error {error:.2%} {measured}",
                 parameters(r_in, r_out), channels * r_in * int(np.prod(strides)) + r_out * r_in * taps + out_channels * r_out,
                 (u_in.astype(np.float32), core.astype(np.float32), u_out.astype(np.float32)))


def _second_moments(ctx: PassContext, candidates: list[_Candidate]) -> dict[int, np.ndarray]:
    """S = X^T X / rows of each candidate's input rows (a Conv's: sampled receptive fields) over
    the calibration data, in one onnxruntime run; keyed by id(node)."""
    from graphopt import calibration, export

    names = list(dict.fromkeys(c.activation.name for c in candidates))
    sums: dict[int, np.ndarray] = {}
    rows: dict[int, int] = {}
    rng = np.random.default_rng(0)
    for values in calibration.tensor_batches(export.to_proto(ctx.model), ctx.calibration_data, names, threads=ctx.options.get("threads") or 2):
        for c in candidates:
            value = np.asarray(values[c.activation.name])
            if c.node.op == "Conv":
                flat = calibration.conv_patches(value, c.node, rng, CONV_ROWS_PER_BATCH)[0].astype(np.float64)
            else:
                flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            # Masks and sentinels are not activations (calibration's module docstring).
            flat = np.where(np.isfinite(flat) & (np.abs(flat) < calibration.SENTINEL_MAGNITUDE), flat, 0.0)
            sums[id(c.node)] = sums.get(id(c.node), 0.0) + flat.T @ flat
            rows[id(c.node)] = rows.get(id(c.node), 0) + flat.shape[0]
    return {key: sums[key] / max(rows[key], 1) for key in sums}


def _directions(w: np.ndarray, second_moment: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(σ, V^T): the singular values and right singular vectors of W, or of L^T W with S = L L^T."""
    w = w.astype(np.float64)
    if second_moment is not None:
        ridge = RIDGE * float(np.trace(second_moment)) / len(second_moment)
        eigenvalues, q = np.linalg.eigh(second_moment + ridge * np.eye(len(second_moment)))
        w = np.sqrt(np.maximum(eigenvalues, ridge))[:, None] * (q.T @ w)
    _, sigma, vt = np.linalg.svd(w, full_matrices=False)
    return sigma, vt


def _relative_errors(sigma: np.ndarray) -> np.ndarray:
    """errors[r]: the relative Frobenius error keeping the first r singular values."""
    energy = np.square(sigma)
    total = float(energy.sum())
    if total == 0.0:
        return np.zeros(len(sigma) + 1)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tail, 0.0) / total)


def _rank(errors: np.ndarray, tolerance: float, largest: int, forced) -> int | None:
    if forced is not None:
        rank = min(int(forced), len(errors) - 1)
        return rank if 1 <= rank <= largest else None
    rank = max(int(np.argmax(errors <= tolerance)), 1)
    if rank > largest:
        return None
    aligned = -(-rank // LOWRANK_ALIGNMENT) * LOWRANK_ALIGNMENT
    return aligned if aligned <= min(largest, len(errors) - 1) else rank


@register_pass
class LowRankSplit(Pass):
    name = "lowrank-split"
    description = "MatMul/Gemm/Conv by a constant weight -> two products of rank r (truncated or activation-weighted SVD), where the cost model says it pays"
    # Calibration observes the main graph only; a body's layers would get a different variant.
    subgraphs = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.analysis("shapes")
        tolerance = float(ctx.options.get("lowrank_tolerance", DEFAULT_TOLERANCE))
        max_ratio = float(ctx.options.get("lowrank_max_ratio", DEFAULT_MAX_RATIO))
        forced = ctx.options.get("lowrank_rank")
        conv_form = ctx.options.get("lowrank_conv_form", "auto")
        if conv_form not in CONV_FORMS:
            raise GraphoptError(f"lowrank_conv_form {conv_form!r}: expected one of {', '.join(CONV_FORMS)}")
        symbolic_dims = ctx.options.get("symbolic_dims")
        cost = ctx.cost
        decisions: list[CostDecision] = []
        candidates = []
        for node in graph.nodes:
            found = _candidate(node)
            if found is None:
                continue
            k, n = found.weight.shape
            if cost is not None:
                cheapest = [_probe(node, found.activation, k, n, 1)]
                if node.op == "Conv" and conv_form != "split":
                    cheapest.append(_tucker_probe(node, found.activation, 1, 1))
                verdicts = [cost.compare([node], probe, symbolic_dims) for probe in cheapest]
                if not any(v.pays for v in verdicts):
                    verdict = verdicts[0]
                    decisions.append(CostDecision(self.name, node.name, False, verdict.before_s, verdict.after_s,
                                                  f"no faster even at rank 1: {verdict.reason}"))
                    continue
            candidates.append(found)
        if not candidates:
            return PassResult(False, {}, decisions)
        moments = {}
        if ctx.calibration_data is not None:
            for c in candidates:
                c.activation.dtype = np.float32  # a MatMul's inputs share its weight's type; calibration fetches typed tensors
            moments = _second_moments(ctx, candidates)
        split = tucker = parameters_before = parameters_after = too_full = 0
        for node, x, w in candidates:
            k, n = w.shape
            second_moment = moments.get(id(node))
            if second_moment is not None and not np.trace(second_moment) > 0:
                second_moment = None  # activations all zero: every rank fits them, the weight alone decides
            sigma, vt = _directions(w, second_moment)
            forms = []
            if node.op != "Conv" or conv_form != "tucker":
                form = _split_form(w, sigma, vt, second_moment, tolerance, max_ratio, forced)
                forms += [form] if form is not None else []
            if node.op == "Conv" and conv_form != "split":
                form = _tucker_form(node, vt, second_moment, tolerance, max_ratio, forced)
                forms += [form] if form is not None else []
            if not forms:
                too_full += 1  # the tolerance needs a rank whose products are no smaller
                continue
            if cost is not None:
                judged = sorted(((cost.compare([node], self._probe(node, x, form), symbolic_dims), form) for form in forms),
                                key=lambda pair: pair[0].after_s)
                verdict, form = judged[0]
                decisions.append(CostDecision(self.name, node.name, verdict.pays, verdict.before_s, verdict.after_s,
                                              f"{form.summary}; {verdict.reason}"))
                if not verdict.pays:
                    continue
            else:
                form = min(forms, key=lambda f: f.macs_per_position)
            if form.kind == "tucker":
                _tucker_conv(graph, ctx, node, x, *form.factors)
                tucker += 1
            else:
                _split(graph, ctx, node, x, *form.factors)
            split += 1
            parameters_before += k * n
            parameters_after += form.parameters
        if split:
            ir.toposort(graph)
        stats = {"split": split, "parameters_before": parameters_before, "parameters_after": parameters_after} if split else {}
        if tucker:
            stats["tucker2"] = tucker
        if too_full:
            stats["left whole (rank too high for the tolerance)"] = too_full
        return PassResult(bool(split), stats, decisions)

    @staticmethod
    def _probe(node: gs.Node, x: gs.Variable, form: _Form) -> list[gs.Node]:
        if form.kind == "tucker":
            return _tucker_probe(node, x, form.factors[0].shape[1], form.factors[2].shape[1])
        a, b = form.factors
        return _probe(node, x, a.shape[0], b.shape[1], a.shape[1])


def _split_form(w: np.ndarray, sigma: np.ndarray, vt: np.ndarray, second_moment: np.ndarray | None,
                tolerance: float, max_ratio: float, forced) -> _Form | None:
    """The two-product form A = W V_r, B = V_r^T at the smallest rank meeting the tolerance, or None."""
    k, n = w.shape
    largest = int(max_ratio * k * n // (k + n))
    if largest < 1:
        return None
    errors = _relative_errors(sigma)
    rank = _rank(errors, tolerance, largest, forced)
    if rank is None:
        return None
    measured = "on the calibration activations" if second_moment is not None else "of the weight"
    basis = vt[:rank]
    return _Form("split", f"rank {rank} of {min(k, n)}, relative error {errors[rank]:.2%} {measured}", rank * (k + n), rank * (k + n),
                 ((w.astype(np.float64) @ basis.T).astype(np.float32), basis.astype(np.float32)))


def _tucker_conv(graph: gs.Graph, ctx: PassContext, node: gs.Node, x: gs.Variable,
                 u_in: np.ndarray, core: np.ndarray, u_out: np.ndarray) -> None:
    """A new 1 x 1 Conv to r_in channels (u_in^T) and the k x k core Conv to r_out, then the node
    itself as the 1 x 1 Conv by u_out, keeping its output, name and bias."""
    base = node.name or node.op
    weight_name = node.inputs[1].name
    out = node.outputs[0]
    r_in, r_out = u_in.shape[1], u_out.shape[1]
    squeezed = gs.Variable(ctx.fresh_name(f"{base}_tucker_in"), dtype=x.dtype,
                           shape=None if x.shape is None else [x.shape[0], r_in, *x.shape[2:]])
    core_out = gs.Variable(ctx.fresh_name(f"{base}_tucker_core"), dtype=x.dtype,
                           shape=None if out.shape is None else [out.shape[0], r_out, *out.shape[2:]])
    graph.nodes.append(gs.Node("Conv", name=ctx.fresh_name(f"{base}_tucker_in"), attrs={"kernel_shape": [1, 1]},
                               inputs=[x, ir.make_constant(ctx.fresh_name(f"{weight_name}_tucker_in"),
                                                           np.ascontiguousarray(u_in.T.reshape(r_in, -1, 1, 1)))],
                               outputs=[squeezed]))
    graph.nodes.append(gs.Node("Conv", name=ctx.fresh_name(f"{base}_tucker_core"),
                               attrs={k: v for k, v in node.attrs.items() if k in _SPATIAL_ATTRS},
                               inputs=[squeezed, ir.make_constant(ctx.fresh_name(f"{weight_name}_tucker_core"), np.ascontiguousarray(core))],
                               outputs=[core_out]))
    ir.set_input(node, 0, core_out)
    ir.set_input(node, 1, ir.make_constant(ctx.fresh_name(f"{weight_name}_tucker_out"),
                                           np.ascontiguousarray(u_out.reshape(*u_out.shape, 1, 1))))
    _become_1x1(node)


def _split_conv(graph: gs.Graph, ctx: PassContext, node: gs.Node, x: gs.Variable, a: np.ndarray, b: np.ndarray) -> None:
    """A new kh x kw Conv to r channels (a^T), then the node itself as the 1 x 1 Conv by b^T,
    keeping its output, name and bias."""
    base = node.name or node.op
    weight = node.inputs[1].values
    rank, out = a.shape[1], node.outputs[0]
    hidden = gs.Variable(ctx.fresh_name(f"{base}_lowrank"), dtype=x.dtype,
                         shape=None if out.shape is None else [out.shape[0], rank, *out.shape[2:]])
    graph.nodes.append(gs.Node("Conv", name=ctx.fresh_name(f"{base}_lowrank_in"),
                               attrs={k: v for k, v in node.attrs.items() if k in _SPATIAL_ATTRS},
                               inputs=[x, ir.make_constant(ctx.fresh_name(f"{node.inputs[1].name}_lowrank_a"),
                                                           np.ascontiguousarray(a.T.reshape(rank, *weight.shape[1:])))],
                               outputs=[hidden]))
    ir.set_input(node, 0, hidden)
    ir.set_input(node, 1, ir.make_constant(ctx.fresh_name(f"{node.inputs[1].name}_lowrank_b"),
                                           np.ascontiguousarray(b.T.reshape(weight.shape[0], rank, 1, 1))))
    _become_1x1(node)


def _become_1x1(node: gs.Node) -> None:
    """The node, now reading the narrow channels, as the last 1 x 1 Conv of its split."""
    for attr in ("pads", "strides", "dilations"):
        node.attrs.pop(attr, None)
    if "kernel_shape" in node.attrs:
        node.attrs["kernel_shape"] = [1, 1]


def _split(graph: gs.Graph, ctx: PassContext, node: gs.Node, x: gs.Variable, a: np.ndarray, b: np.ndarray) -> None:
    """x @ a into a new MatMul; the node itself becomes the product by b, keeping its output, name and bias."""
    if node.op == "Conv":
        _split_conv(graph, ctx, node, x, a, b)
        return
    base = node.name or node.op
    hidden = gs.Variable(ctx.fresh_name(f"{base}_lowrank"), dtype=x.dtype,
                         shape=None if x.shape is None else [*x.shape[:-1], a.shape[1]])
    weight_name = node.inputs[1].name
    graph.nodes.append(gs.Node("MatMul", name=ctx.fresh_name(f"{base}_lowrank_in"),
                               inputs=[x, ir.make_constant(ctx.fresh_name(f"{weight_name}_lowrank_a"), a)], outputs=[hidden]))
    ir.set_input(node, 0, hidden)
    ir.set_input(node, 1, ir.make_constant(ctx.fresh_name(f"{weight_name}_lowrank_b"), b))
    if node.op == "Gemm":
        # alpha and transB are in a and b now.
        node.attrs["alpha"] = 1.0
        node.attrs["transB"] = 0
