"""Fuse decomposed layer normalization into one LayerNormalization node (opset >= 17).

Shapes recognised, each starting from the ReduceMean that computes the mean (``x`` any tensor, the
reductions over the last k axes with keepdims=1, the axes as an attribute or, opset >= 18, an input):

* torch (legacy and dynamo), paddle2onnx::

      mean = ReduceMean(x); d = Sub(x, mean); sq = Pow(d, 2)   # 2 of any numeric dtype
      var = ReduceMean(sq); s = Sqrt(Add(var, eps)); n = Div(d, s)
      [y = Mul(n, gamma)] [y = Add(y, beta)]                    # gamma/beta either operand order

* tf2onnx (SquaredDifference lowered): the square is Mul(d, d); the variance may read its own
  Sub(x, mean) (the mean then feeds exactly two Subs); the division may be ``Mul(d, Reciprocal(s))``
  in either operand order.
* tf2onnx of Keras' LayerNormalization (tf.nn.batch_normalization form)::

      r = Reciprocal(Sqrt(Add(ReduceMean(Mul(d, d)), eps)));  [r = Mul(r, gamma)]
      y = Add(Mul(x, r), Sub(beta, Mul(mean, r)))   or, without beta,
      y = Add(Mul(x, r), Neg(Mul(mean, r)))  /  y = Sub(Mul(x, r), Mul(mean, r))

Conditions (the pattern is left alone when any fails): the model's default opset is >= 17 (the
pass never introduces an op newer than the model's opset); both reductions are over the same last k
contiguous axes; every intermediate value is read only inside the pattern and is no graph output
(nor read by a subgraph); eps is a constant scalar (or a single-element 1-D constant); x is
float16/float32/float64 with a static normalized shape; gamma and beta are constants of x's dtype
that broadcast over the normalized axes only. The fused node is ``LayerNormalization(axis=-k)`` with
the default stash_type; without gamma its scale is ones, without beta it has no bias input (B is
optional). The final tensor of the pattern keeps its name, so a graph output stays one.

Cost: one walk over the graph's nodes; each ReduceMean is matched by following single-consumer
edges a bounded number of steps, and all matched nodes are removed in one sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass

MIN_OPSET = 17  # LayerNormalization entered the default domain in opset 17
_FLOAT_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


@register_pass
class FuseLayerNorm(Pass):
    name = "fuse-layernorm"
    description = "Replace decomposed layer normalization (ReduceMean/Sub/Pow/.../Div) by LayerNormalization"
    opt_level = 2
    preserves = frozenset({"shapes"})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.opset < MIN_OPSET:
            return PassResult(False)
        candidates = [n for n in graph.nodes if n.op == "ReduceMean" and n.domain in ir.DEFAULT_DOMAINS]
        if not candidates:
            return PassResult(False)
        ctx.analysis("shapes")
        matcher = _Matcher(graph, ctx.opset)
        claimed: set[int] = set()
        matches: list[_Match] = []
        for node in candidates:
            if id(node) in claimed:
                continue
            match = matcher.match(node)
            if match is None or any(id(n) in claimed for n in match.nodes):
                continue
            claimed.update(id(n) for n in match.nodes)
            matches.append(match)
        if not matches:
            return PassResult(False)

        inserted: dict[int, gs.Node] = {}
        dead: list[gs.Node] = []
        for match in matches:
            inserted[id(match.last)] = self._emit(match, ctx)
            dead.extend(match.nodes)
        # The fused node takes the place of the pattern's last node, so the node list stays in
        # whatever (topological) order it was.
        nodes: list[gs.Node] = []
        for node in graph.nodes:
            nodes.append(node)
            new = inserted.get(id(node))
            if new is not None:
                nodes.append(new)
        graph.nodes = nodes
        ir.remove_nodes(graph, dead)
        return PassResult(True, {"fused": len(matches), "removed_nodes": len(dead) - len(matches)})

    @staticmethod
    def _emit(match: _Match, ctx: PassContext) -> gs.Node:
        out = match.output
        base = match.first.name.rsplit("/", 1)[0] if match.first.name and "/" in match.first.name else ""
        base = f"{base}/LayerNormalization" if base else f"{out.name}_LayerNormalization"
        scale = match.scale
        if scale is None:
            scale = ir.make_constant(ctx.fresh_name(f"{out.name}_scale"), np.ones(match.norm_shape, dtype=match.dtype))
        elif not isinstance(scale, gs.Tensor):
            scale = ir.make_constant(ctx.fresh_name(f"{out.name}_scale"), scale)
        bias = match.bias
        if bias is not None and not isinstance(bias, gs.Tensor):
            bias = ir.make_constant(ctx.fresh_name(f"{out.name}_bias"), bias)
        inputs = [match.x, scale] + ([bias] if bias is not None else [])
        # Detach the output from the pattern's last node; the new node produces it under its name.
        out.inputs.clear()
        return gs.Node(
            "LayerNormalization",
            name=ctx.fresh_name(base),
            attrs={"axis": -match.k, "epsilon": match.eps},
            inputs=inputs,
            outputs=[out],
        )


# ---------------------------------------------------------------------------------------------
# Matching


@dataclass
class _Match:
    first: gs.Node  # the mean's ReduceMean
    last: gs.Node  # the node producing `output`
    x: gs.Tensor
    output: gs.Tensor
    k: int
    eps: float
    dtype: np.dtype
    norm_shape: tuple[int, ...]
    # A tensor usable as is, an array to store as a new constant, or None (absent).
    scale: gs.Tensor | np.ndarray | None = None
    bias: gs.Tensor | np.ndarray | None = None
    nodes: list[gs.Node] = field(default_factory=list)


@dataclass
class _Input:
    """What a match needs to know about x."""

    x: gs.Tensor
    rank: int
    k: int
    dtype: np.dtype
    norm_shape: tuple[int, ...]


def _is(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and node.domain in ir.DEFAULT_DOMAINS


class _Matcher:
    def __init__(self, graph: gs.Graph, opset: int):
        self.opset = opset
        # Values read outside this graph's nodes: graph outputs and what subgraphs read or return.
        self.escaping: set[int] = {id(t) for t in graph.outputs}
        for node in graph.nodes:
            if ir.subgraphs_of(node):
                self.escaping.update(id(t) for t in ir.outer_uses(node))

    # --- small helpers ----------------------------------------------------------------------

    def users(self, tensor: gs.Tensor) -> list[gs.Node] | None:
        """The distinct consumers of an intermediate value, or None when it escapes the graph."""
        if id(tensor) in self.escaping:
            return None
        seen: dict[int, gs.Node] = {}
        for node in tensor.outputs:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def only_user(self, tensor: gs.Tensor) -> gs.Node | None:
        users = self.users(tensor)
        return users[0] if users is not None and len(users) == 1 else None

    @staticmethod
    def out(node: gs.Node) -> gs.Tensor | None:
        return node.outputs[0] if len(node.outputs) == 1 else None

    @staticmethod
    def other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
        """The other operand of a binary node that reads `tensor` exactly once."""
        if len(node.inputs) != 2:
            return None
        a, b = node.inputs
        if a is tensor and b is not tensor:
            return b
        if b is tensor and a is not tensor:
            return a
        return None

    def reduce_k(self, node: gs.Node, rank: int | None) -> int | None:
        """k when `node` is a keepdims ReduceMean over exactly the last k axes of a rank-`rank` input."""
        if len(node.outputs) != 1 or int(node.attrs.get("keepdims", 1)) != 1:
            return None
        axes = None
        if len(node.inputs) > 1 and not node.inputs[1].is_empty():
            value = ir.constant_value(node.inputs[1])
            if value is None:
                return None
            axes = [int(a) for a in np.asarray(value).reshape(-1)]
        elif "axes" in node.attrs and node.attrs["axes"] is not None:
            axes = [int(a) for a in node.attrs["axes"]]
        if not axes:
            # No axes: all of them (opset >= 18 unless noop_with_empty_axes, which makes it an Identity).
            if int(node.attrs.get("noop_with_empty_axes", 0)) or rank is None or rank == 0:
                return None
            return rank
        if rank is None:
            return None
        if any(a < -rank or a >= rank for a in axes):
            return None
        norm = sorted(a % rank for a in axes)
        k = len(norm)
        if len(set(norm)) != k or norm != list(range(rank - k, rank)):
            return None
        return k

    @staticmethod
    def scalar(tensor: gs.Tensor) -> np.ndarray | None:
        value = ir.constant_value(tensor)
        if value is None:
            return None
        value = np.asarray(value)
        if value.size != 1 or value.ndim > 1:
            return None
        return value

    def affine(self, tensor: gs.Tensor, inp: _Input) -> gs.Tensor | np.ndarray | None:
        """gamma/beta as LayerNormalization takes it (normalized shape), when `tensor` qualifies:
        a constant of x's dtype that broadcasts over the normalized axes only, without changing the
        result's shape. Returns the tensor itself when its shape is already the normalized shape."""
        value = ir.constant_value(tensor)
        if value is None:
            return None
        value = np.asarray(value)
        if value.dtype != inp.dtype or value.ndim > inp.rank:
            return None
        shape = (1,) * (inp.k - value.ndim) + value.shape if value.ndim < inp.k else value.shape
        outer, inner = shape[: len(shape) - inp.k], shape[len(shape) - inp.k :]
        if any(d != 1 for d in outer):
            return None
        if any(d != 1 and d != n for d, n in zip(inner, inp.norm_shape)):
            return None
        if value.shape == inp.norm_shape:
            return tensor
        return np.ascontiguousarray(np.broadcast_to(value.reshape(inner), inp.norm_shape))

    def describe_input(self, node: gs.Node) -> _Input | None:
        x = node.inputs[0] if node.inputs else None
        if x is None or x.is_empty() or isinstance(x, gs.Constant) or x.dtype is None or x.shape is None:
            return None
        try:
            dtype = np.dtype(x.dtype)
        except TypeError:
            return None
        if dtype not in _FLOAT_DTYPES:
            return None
        rank = len(x.shape)
        k = self.reduce_k(node, rank)
        if k is None:
            return None
        norm = tuple(x.shape[rank - k :])
        if not all(isinstance(d, (int, np.integer)) and d > 0 for d in norm):
            return None
        return _Input(x=x, rank=rank, k=k, dtype=dtype, norm_shape=tuple(int(d) for d in norm))

    def is_square_of(self, node: gs.Node, d: gs.Tensor) -> bool:
        if len(node.outputs) != 1 or len(node.inputs) != 2:
            return False
        if _is(node, "Mul"):
            return node.inputs[0] is d and node.inputs[1] is d
        if _is(node, "Pow") and node.inputs[0] is d and node.inputs[1] is not d:
            exponent = self.scalar(node.inputs[1])
            return exponent is not None and exponent.dtype.kind in "fiu" and float(exponent.reshape(-1)[0]) == 2.0
        return False

    def variance(self, square: gs.Node, inp: _Input, nodes: list[gs.Node]) -> tuple[gs.Tensor, float] | None:
        """From the square of the centered input to Sqrt(var + eps): (the Sqrt's output, eps)."""
        sq = self.out(square)
        reduce = self.only_user(sq) if sq is not None else None
        if not _is(reduce, "ReduceMean") or reduce.inputs[0] is not sq or self.reduce_k(reduce, inp.rank) != inp.k:
            return None
        var = self.out(reduce)
        add = self.only_user(var)
        if not _is(add, "Add") or len(add.outputs) != 1:
            return None
        eps_tensor = self.other(add, var)
        eps = self.scalar(eps_tensor) if eps_tensor is not None else None
        if eps is None or eps.dtype != inp.dtype:
            return None
        sqrt = self.only_user(self.out(add))
        if not _is(sqrt, "Sqrt") or len(sqrt.outputs) != 1:
            return None
        nodes += [square, reduce, add, sqrt]
        return self.out(sqrt), float(eps.reshape(-1)[0])

    # --- the patterns ---------------------------------------------------------------------------

    def match(self, first: gs.Node) -> _Match | None:
        inp = self.describe_input(first)
        if inp is None:
            return None
        mean = self.out(first)
        users = self.users(mean)
        if not users or len(users) > 2:
            return None
        x = inp.x
        subs = [u for u in users if _is(u, "Sub") and len(u.inputs) == 2 and u.inputs[0] is x and u.inputs[1] is mean]
        if len(subs) == len(users):
            return self.match_divide(first, inp, subs)
        if len(subs) == 1 and len(users) == 2:
            return self.match_batchnorm_form(first, inp, subs[0], next(u for u in users if u is not subs[0]))
        return None

    def match_divide(self, first: gs.Node, inp: _Input, subs: list[gs.Node]) -> _Match | None:
        """(x - mean) / sqrt(var + eps), or (x - mean) * reciprocal(sqrt(var + eps)), then affine."""
        nodes: list[gs.Node] = [first, *subs]
        centered = [self.out(s) for s in subs]
        if any(c is None for c in centered):
            return None
        # Which use of (x - mean) squares it and which normalizes it.
        if len(subs) == 1:
            d = centered[0]
            users = self.users(d)
            if users is None or len(users) != 2:
                return None
            squares = [u for u in users if self.is_square_of(u, d)]
            if len(squares) != 1:
                return None
            square = squares[0]
            norm = users[1] if users[0] is square else users[0]
            d_norm = d
        else:
            pair = [self.only_user(c) for c in centered]
            if pair[0] is None or pair[1] is None or pair[0] is pair[1]:
                return None
            if self.is_square_of(pair[0], centered[0]):
                square, norm, d_norm = pair[0], pair[1], centered[1]
            elif self.is_square_of(pair[1], centered[1]):
                square, norm, d_norm = pair[1], pair[0], centered[0]
            else:
                return None
        found = self.variance(square, inp, nodes)
        if found is None:
            return None
        std, eps = found
        if len(norm.outputs) != 1 or len(norm.inputs) != 2:
            return None
        if _is(norm, "Div"):
            if norm.inputs[0] is not d_norm or norm.inputs[1] is not std or self.only_user(std) is not norm:
                return None
        elif _is(norm, "Mul"):
            rstd = self.other(norm, d_norm)
            recip = ir.producer(rstd) if rstd is not None else None
            if (
                not _is(recip, "Reciprocal")
                or recip.inputs[0] is not std
                or self.only_user(std) is not recip
                or self.only_user(rstd) is not norm
            ):
                return None
            nodes.append(recip)
        else:
            return None
        nodes.append(norm)

        match = _Match(first, norm, inp.x, self.out(norm), inp.k, eps, inp.dtype, inp.norm_shape, nodes=nodes)
        # Optional Mul(gamma) then optional Add(beta), either operand order.
        nxt = self.only_user(match.output)
        if _is(nxt, "Mul") and len(nxt.outputs) == 1:
            operand = self.other(nxt, match.output)
            scale = self.affine(operand, inp) if operand is not None else None
            if scale is not None:
                match.scale, match.last, match.output = scale, nxt, self.out(nxt)
                nodes.append(nxt)
                nxt = self.only_user(match.output)
        if _is(nxt, "Add") and len(nxt.outputs) == 1:
            operand = self.other(nxt, match.output)
            bias = self.affine(operand, inp) if operand is not None else None
            if bias is not None:
                match.bias, match.last, match.output = bias, nxt, self.out(nxt)
                nodes.append(nxt)
        return match

    def match_batchnorm_form(self, first: gs.Node, inp: _Input, sub: gs.Node, mean_mul: gs.Node) -> _Match | None:
        """x * r + (beta - mean * r), r = reciprocal(sqrt(var + eps)) [* gamma] (tf.nn.batch_normalization)."""
        x, mean = inp.x, self.out(first)
        d = self.out(sub)
        square = self.only_user(d) if d is not None else None
        if square is None or not self.is_square_of(square, d):
            return None
        nodes: list[gs.Node] = [first, sub]
        found = self.variance(square, inp, nodes)
        if found is None:
            return None
        std, eps = found
        recip = self.only_user(std)
        if not _is(recip, "Reciprocal") or len(recip.outputs) != 1:
            return None
        nodes.append(recip)
        r = self.out(recip)
        scale = None
        users = self.users(r)
        if users is not None and len(users) == 1 and _is(users[0], "Mul") and len(users[0].outputs) == 1:
            operand = self.other(users[0], r)
            scale = self.affine(operand, inp) if operand is not None else None
            if scale is None:
                return None
            nodes.append(users[0])
            r = self.out(users[0])
            users = self.users(r)
        if users is None or len(users) != 2 or not all(_is(u, "Mul") and len(u.outputs) == 1 for u in users):
            return None
        x_mul = next((u for u in users if u is not mean_mul), None)
        if not any(u is mean_mul for u in users) or x_mul is None or self.other(x_mul, r) is not x or self.other(mean_mul, r) is not mean:
            return None
        p, q = self.out(x_mul), self.out(mean_mul)
        nodes += [x_mul, mean_mul]
        last = self.only_user(q)
        bias = None
        if _is(last, "Sub") and len(last.inputs) == 2 and last.inputs[1] is q and last.inputs[0] is not q:
            if last.inputs[0] is p:  # x*r - mean*r
                pass
            else:  # x*r + (beta - mean*r)
                bias = self.affine(last.inputs[0], inp)
                if bias is None:
                    return None
                nodes.append(last)
                last = self.only_user(self.out(last))
                if not _is(last, "Add") or self.other(last, p) is not self.out(nodes[-1]):
                    return None
        elif _is(last, "Neg"):  # x*r + (-(mean*r))
            nodes.append(last)
            last = self.only_user(self.out(last))
            if not _is(last, "Add") or self.other(last, p) is not self.out(nodes[-1]):
                return None
        else:
            return None
        if self.only_user(p) is not last or len(last.outputs) != 1:
            return None
        nodes.append(last)
        return _Match(
            first, last, x, self.out(last), inp.k, eps, inp.dtype, inp.norm_shape, scale=scale, bias=bias, nodes=nodes
        )
