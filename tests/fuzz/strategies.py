"""Hypothesis strategies that build random, valid ONNX models for fuzzing graphopt.

`models()` grows a model block by block with `onnx.helper`. A block reads values already in the
graph (or a fresh graph input) and adds a few nodes:

* ``unary``: Relu, Sigmoid, Tanh, Neg, Abs, Exp of a bounded value, Sqrt of Abs
* ``binary``: Add/Sub/Mul/Div with another value, a fresh input or a constant (broadcasting);
  denominators are constants away from zero or ``Abs(v) + c``
* ``clip``: Clip with min and/or max
* ``conv``: Conv (optional bias, stride, padding, depthwise) -> [BatchNormalization] -> [Relu]
* ``matmul`` / ``gemm``: MatMul [+ Add bias], Gemm with transB/alpha/beta/C variants
* ``layout``: chains of Reshape/Transpose/Squeeze/Unsqueeze/Flatten, with consecutive and inverse
  Transposes, identity Transposes and Reshapes, 0 and -1 in Reshape targets
* ``shape``: Shape -> Gather -> Unsqueeze -> Concat -> Reshape and its variants (Gather of 1-D
  indices, Slice of the shape, Shape start/end), Expand and ConstantOfShape of Shape(x)
* ``noop``: Identity, Dropout (inference), Cast to the same type, Cast to double and back
* ``layernorm``: decomposed layer normalization (Pow or Mul square, Div or Reciprocal, optional
  gamma/beta, one or two axes), sometimes with an intermediate that escapes the pattern
* ``const``: constant subexpressions (ops on initializers only, Transpose/Reshape of weights)
* ``duplicate``: the same op (or chain) on the same inputs twice
* ``duplicate`` also makes near-duplicates (same op and input, other attributes), which must stay
* ``gather``: Gather of data with constant indices or an int64 index input
* ``misc``: Slice (full, partial, strided, reversed), Pad, Concat (one input or several), Tile,
  Expand, Split (put back together or one part used), each sometimes the identity
* ``if``: an If whose branches are shape-keeping blocks (the ones above, Conv/MatMul/Gemm
  included) reading outer-scope values and initializers, with the condition a constant, a bool
  input or computed from an input; nested occasionally

Across blocks: constants are sometimes shared by several nodes, sometimes byte-identical
duplicates under another name, sometimes Constant nodes (value or value_float(s)/value_int(s)),
rarely initializers that are also graph inputs (overridable defaults); inputs may have a symbolic
leading dim ``batch``; several values become graph outputs, intermediates (also read by other
nodes) included, now and then a graph input or an initializer passed straight through, computed
shapes (int64) and double values; some models record value_info for intermediates; node names are
absent, short or torch-style paths; values nobody reads and that are no output are dead code.
Opset 17 mostly, 13 and 18 sometimes, IR version 7 to 10.

The builder tracks every value's shape (``"batch"`` for the symbolic dim) and an estimate of its
largest magnitude, and squashes values that grow too large, so that the only numerical
differences between the original and an optimized model are rounding (folding BN into Conv,
fusing LayerNorm), small against the tolerances the tests use.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
D = TensorProto.DOUBLE
I64 = TensorProto.INT64
BOOL = TensorProto.BOOL
BATCH = "batch"

# Values are squashed (Tanh, or scaled down) once their estimated magnitude passes this.
MAX_BOUND = 10.0
# Standard normal inputs (graphopt.verify.make_inputs) stay below this in practice.
INPUT_BOUND = 5.0
MAX_RANK = 5

ALL_BLOCKS = (
    "unary", "binary", "clip", "conv", "matmul", "gemm", "layout", "shape",
    "noop", "layernorm", "const", "duplicate", "if", "gather", "misc",
)
# Blocks that may run inside an If branch: they keep the value's shape.
_BRANCH_BLOCKS = (
    "unary", "binary", "clip", "noop", "layernorm", "const", "duplicate", "layout", "shape", "misc", "conv",
    "matmul", "gemm", "if",
)
# Blocks whose result comes out of an op no pass removes as a no-op.
_REAL_ORIGINS = frozenset({"unary", "binary", "clip", "conv", "matmul", "gemm", "layernorm", "const", "gather", "squash"})
# Default weights of the blocks (how often each is drawn).
DEFAULT_WEIGHTS = {
    "unary": 1, "binary": 3, "clip": 1, "conv": 2, "matmul": 2, "gemm": 1, "layout": 3, "shape": 2,
    "noop": 2, "layernorm": 2, "const": 2, "duplicate": 2, "if": 1, "gather": 1, "misc": 2,
}


@dataclass
class Value:
    name: str
    shape: tuple  # ints, and BATCH for the symbolic batch dim
    bound: float  # estimate of max |value|
    exact: bool = True  # computed by ops that no pass rewrites numerically
    const: bool = False  # computed from constants only
    is_input: bool = False
    origin: str = ""  # the block that produced it ("squash" for the squashing op)

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class FuzzCase:
    """A generated model and how to feed it."""

    model: onnx.ModelProto
    symbolic_batch: bool
    blocks: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        try:
            text = onnx.printer.to_text(self.model)
        except Exception:  # noqa: BLE001 - printing must never hide the failure
            text = str(self.model)
        return f"FuzzCase(blocks={self.blocks}, symbolic_batch={self.symbolic_batch})\n{text}"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints falsifying examples with this
        printer.text(repr(self))


def bcast(a: tuple, b: tuple) -> tuple | None:
    """Multidirectional broadcast of two shapes, or None when they do not broadcast."""
    r = max(len(a), len(b))
    a = (1,) * (r - len(a)) + tuple(a)
    b = (1,) * (r - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y:
            out.append(x)
        elif x == 1:
            out.append(y)
        elif y == 1:
            out.append(x)
        else:
            return None
    if out.count(BATCH) > 1:  # the tracking (and Reshape targets) assume one symbolic dim per value
        return None
    return tuple(out)


def _static(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _prod(dims) -> int:
    return int(np.prod([d for d in dims], dtype=np.int64)) if dims else 1


def _factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1 and p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


class _Scope:
    def __init__(self, depth: int):
        self.depth = depth
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.produced: set[str] = set()


class Builder:
    """Grows one model; every random choice is a hypothesis draw (numbers come from a seeded rng)."""

    def __init__(self, draw, *, opset: int, symbolic: bool, seed: int, weights: dict[str, int]):
        self.draw = draw
        self.opset = opset
        self.symbolic = symbolic
        self.rng = np.random.default_rng(seed)
        self.weights = weights
        # node names: none, short, or torch.onnx style paths
        self.name_style = self.choice(["short", "torch", "none"])
        self._ids = itertools.count()
        self.inputs: list[onnx.ValueInfoProto] = []
        self.pool: list[Value] = []
        # (name, value, kind, scope) of every constant made so far, for sharing and duplicating.
        self.consts: list[tuple[str, np.ndarray, str | None, _Scope]] = []
        self.scopes = [_Scope(0)]
        self.blocks: list[str] = []
        # Values of other element types that become graph outputs: (name, elem_type, shape).
        self.extra_outputs: list[tuple[str, int, list]] = []

    # --- drawing ------------------------------------------------------------------------------

    def flag(self, p: float = 0.5) -> bool:
        # shrinks towards False
        return self.draw(st.integers(0, 99)) >= 100 - round(100 * p)

    def choice(self, seq):
        seq = list(seq)
        return seq[self.draw(st.integers(0, len(seq) - 1))]

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    # --- graph plumbing -------------------------------------------------------------------------

    @property
    def scope(self) -> _Scope:
        return self.scopes[-1]

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outputs = [self.fresh(op.lower() + "_") for _ in range(n_out)]
        name = {"short": lambda: self.fresh(op + "_n"), "torch": lambda: f"/block{next(self._ids)}/{op}",
                "none": lambda: None}[self.name_style]()
        self.scope.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        self.scope.produced.update(outputs)
        return outputs

    def one(self, op: str, inputs: list[str], **attrs) -> str:
        return self.node(op, inputs, **attrs)[0]

    def _visible(self, scope: _Scope) -> bool:
        return any(s is scope for s in self.scopes)

    def const(self, value, kind: str | None = None) -> tuple[str, np.ndarray]:
        """A constant: new, shared with an earlier one, or a byte-identical duplicate of one.

        `kind` names how the values were drawn ("any", "pos", ...): a constant may stand in for any
        other of the same kind, dtype and shape. kind None: only for one with the same bytes.
        """
        value = np.asarray(value)
        same = [
            (n, v) for n, v, k, s in self.consts
            if self._visible(s) and v.dtype == value.dtype and v.shape == value.shape
            and (k == kind if kind is not None else (k is None and v.tobytes() == value.tobytes()))
        ]
        mode = self.choice(["new", "new", "shared", "duplicate"]) if same else "new"
        if mode != "new":
            name, existing = self.choice(same)
            if mode == "shared":
                return name, existing
            value = existing.copy()
        name = self.fresh("c")
        if self.flag(0.15):
            self.scope.nodes.append(self._constant_node(name, value))
            self.scope.produced.add(name)
        else:
            self.scope.initializers.append(numpy_helper.from_array(value, name))
            if kind is not None and self.scope.depth == 0 and self.flag(0.05):
                # an initializer that is also a graph input: an overridable default, not a constant
                dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
                self.inputs.append(helper.make_tensor_value_info(name, dtype, list(value.shape)))
                kind = "default"  # never shared: passes must leave it alone
        self.consts.append((name, value, kind, self.scope))
        return name, value

    def _constant_node(self, name: str, value: np.ndarray) -> onnx.NodeProto:
        """A Constant node, in one of the attribute forms exporters use."""
        if value.dtype == np.float32 and value.ndim == 0 and self.flag(0.5):
            return helper.make_node("Constant", [], [name], value_float=float(value))
        if value.dtype == np.float32 and value.ndim == 1 and value.size and self.flag(0.5):
            return helper.make_node("Constant", [], [name], value_floats=[float(x) for x in value])
        if value.dtype == np.int64 and value.ndim == 0 and self.flag(0.5):
            return helper.make_node("Constant", [], [name], value_int=int(value))
        if value.dtype == np.int64 and value.ndim == 1 and value.size and self.flag(0.5):
            return helper.make_node("Constant", [], [name], value_ints=[int(x) for x in value])
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))

    def rand_const(self, shape, kind: str = "any") -> tuple[str, np.ndarray]:
        shape = tuple(shape)
        if kind == "any":
            value = self.rng.uniform(-1, 1, shape)
        elif kind == "pos":
            value = self.rng.uniform(0.5, 2.0, shape)
        elif kind == "nz":
            value = self.rng.uniform(0.5, 2.0, shape) * self.rng.choice([-1.0, 1.0], shape)
        elif kind == "spread":
            n = _prod(shape)
            value = (self.rng.permutation(np.linspace(-2, 2, n)) + self.rng.uniform(-0.1, 0.1, n)).reshape(shape)
        else:
            raise ValueError(kind)
        return self.const(np.asarray(value, dtype=np.float32), kind)

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))[0]

    def scalar(self, x: float) -> str:
        return self.const(np.array(x, dtype=np.float32))[0]

    def add(self, name: str, shape, bound: float, exact: bool = True, const: bool = False) -> Value:
        v = Value(name, tuple(shape), float(bound), exact, const)
        self.pool.append(v)
        return v

    # --- shapes and inputs ----------------------------------------------------------------------

    def dim(self, lo: int = 1, hi: int = 5) -> int:
        return self.integer(lo, hi)

    def draw_shape(self, lo: int = 1, hi: int = 4) -> tuple:
        rank = self.integer(lo, hi)
        shape = [self.dim() for _ in range(rank)]
        if self.symbolic and rank and self.flag(0.8):
            shape[0] = BATCH
        return tuple(shape)

    def new_input(self, shape) -> Value:
        name = self.fresh("x")
        self.inputs.append(helper.make_tensor_value_info(name, F, list(shape)))
        v = Value(name, tuple(shape), INPUT_BOUND, True, False, True)
        self.pool.append(v)
        return v

    def pick(self, pred=lambda v: True, make_shape=None) -> Value:
        cands = [v for v in self.pool if v.rank >= 1 and pred(v)]
        if cands and self.flag(0.85):
            return cands[-1] if self.flag(0.5) else self.choice(cands)
        v = self.new_input(make_shape() if make_shape else self.draw_shape())
        assert pred(v), v
        return v

    def partner_shape(self, shape: tuple, *, allow_batch: bool) -> tuple:
        """A shape that broadcasts into `shape` (the result keeps `shape`)."""
        length = self.integer(0, len(shape))
        out = []
        for d in shape[len(shape) - length:]:
            if d == BATCH:
                out.append(BATCH if allow_batch and self.flag(0.7) else 1)
            else:
                out.append(d if self.flag(0.7) else 1)
        return tuple(out)

    # --- squashing ------------------------------------------------------------------------------

    def squash(self, v: Value) -> Value:
        if v.bound <= MAX_BOUND:
            return v
        if self.flag(0.5):
            out = self.add(self.one("Tanh", [v.name]), v.shape, 1.0, v.exact, v.const)
        else:
            scale = 2.0 ** -math.ceil(math.log2(v.bound / 4.0))
            out = self.add(self.one("Mul", [v.name, self.scalar(scale)]), v.shape, v.bound * scale, v.exact, v.const)
        out.origin = "squash"
        return out

    # --- blocks ---------------------------------------------------------------------------------

    def block(self, kind: str, v: Value | None = None, keep_shape: bool = False) -> Value:
        """Run one block on `v` (picked when None); with keep_shape the result has v's shape."""
        self.blocks.append(kind)
        method = getattr(self, "b_" + kind)
        out = method(v, keep_shape)
        if not out.origin:
            out.origin = kind
        out = self.squash(out)
        if keep_shape:
            assert out.shape == v.shape, (kind, out.shape, v.shape)
        return out

    def b_unary(self, v, keep_shape):
        v = v or self.pick()
        op = self.choice(["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Sqrt"])
        if op == "Exp":
            x = v
            if v.bound > 3:
                if self.flag(0.5):
                    clipped = self.one("Clip", [v.name, self.scalar(-3.0), self.scalar(3.0)])
                    x = self.add(clipped, v.shape, 3.0, v.exact, v.const)
                else:
                    x = self.add(self.one("Tanh", [v.name]), v.shape, 1.0, v.exact, v.const)
            return self.add(self.one("Exp", [x.name]), v.shape, math.exp(x.bound), v.exact, v.const)
        if op == "Sqrt":
            a = self.one("Abs", [v.name])
            if v.exact and self.flag(0.5):
                return self.add(self.one("Sqrt", [a]), v.shape, math.sqrt(v.bound), v.exact, v.const)
            c, cv = self.rand_const((), "pos")
            s = self.one("Sqrt", [self.one("Add", [a, c])])
            return self.add(s, v.shape, math.sqrt(v.bound + float(cv)), v.exact, v.const)
        bound = {"Sigmoid": 1.0, "Tanh": 1.0}.get(op, v.bound)
        return self.add(self.one(op, [v.name]), v.shape, bound, v.exact, v.const)

    def _operand(self, v: Value, keep_shape: bool, kind: str) -> tuple[str, tuple, float, float, bool, bool]:
        """Another operand for a binary op on v: (name, shape, bound, min |value|, exact, const)."""
        source = self.choice(["value", "const", "const", "input"])
        if source == "value":
            def fits(w):
                out = bcast(v.shape, w.shape)
                if keep_shape:
                    return out == v.shape
                return out is not None and len(out) <= MAX_RANK and _prod([d for d in out if d != BATCH]) <= 1024

            cands = [w for w in self.pool if w.rank >= 1 and fits(w)]
            if cands:
                w = self.choice(cands)
                return w.name, w.shape, w.bound, 0.0, w.exact, w.const
        if source == "input" and not keep_shape and self.scopes[-1].depth == 0:
            w = self.new_input(self.partner_shape(v.shape, allow_batch=True))
            return w.name, w.shape, w.bound, 0.0, True, False
        shape = self.partner_shape(v.shape, allow_batch=False)
        name, value = self.rand_const(shape, kind)
        low, high = float(np.min(np.abs(value), initial=1.0)), float(np.max(np.abs(value), initial=0.0))
        return name, shape, high, low, True, True

    def b_binary(self, v, keep_shape):
        v = v or self.pick()
        op = self.choice(["Add", "Sub", "Mul", "Div"])
        name, shape, bound, low, exact, const = self._operand(v, keep_shape, "nz" if op == "Div" else "any")
        if op == "Div" and low < 0.5:
            # not a constant away from zero: divide by |w| + c instead
            c, cv = self.rand_const((), "pos")
            name = self.one("Add", [self.one("Abs", [name]), c])
            bound, low = bound + float(cv), float(cv)
        out_shape = bcast(v.shape, shape)
        a, b = v.name, name
        if op != "Div" and self.flag(0.5):
            a, b = b, a
        if op in ("Add", "Sub"):
            out_bound = v.bound + bound
        elif op == "Mul":
            out_bound = v.bound * bound
        else:
            out_bound = v.bound / low
        return self.add(self.one(op, [a, b]), out_shape, out_bound, v.exact and exact, v.const and const)

    def b_clip(self, v, keep_shape):
        v = v or self.pick()
        lo = self.choice([-1.0, -0.5, 0.0])
        hi = self.choice([0.5, 1.0, 6.0])
        form = self.choice(["both", "min", "max", "none"])
        if form == "both":
            inputs = [v.name, self.scalar(lo), self.scalar(hi)]
            bound = min(v.bound, max(abs(lo), hi))
        elif form == "min":
            inputs, bound = [v.name, self.scalar(lo)], v.bound
        elif form == "max":
            inputs, bound = [v.name, "", self.scalar(hi)], v.bound
        else:
            inputs, bound = [v.name], v.bound
        return self.add(self.one("Clip", inputs), v.shape, bound, v.exact, v.const)

    def b_conv(self, v, keep_shape):
        def ok(w):
            return w.rank == 4 and _static(w.shape[1:]) and w.shape[1] <= 6

        if v is not None and not ok(v):
            return self.b_unary(v, keep_shape)
        v = v or self.pick(
            ok, lambda: ((BATCH if self.symbolic else self.dim(1, 2)), self.dim(1, 4), self.dim(2, 6), self.dim(2, 6))
        )
        _, c, h, w = v.shape
        x, bound, exact = v.name, v.bound, v.exact
        if self.flag(0.3):  # a BatchNormalization on its own (nothing to fold into)
            return self._bn(v.name, v.shape, v.bound, exact)
        k = self.choice([1, 3]) if min(h, w) >= 3 or self.flag(0.5) else 1
        pad = self.choice([0, 1]) if k == 3 else 0
        if k > min(h, w) + 2 * pad or (keep_shape and k == 3):
            pad = 1
        stride = 1 if keep_shape else self.choice([1, 1, 2])
        group = c if c > 1 and self.flag(0.25) else 1
        m = c * self.integer(1, 2) if group > 1 else self.integer(1, 4)
        if keep_shape:
            m = c
        fan_in = (c // group) * k * k
        weight = (self.rng.uniform(-1, 1, (m, c // group, k, k)) / math.sqrt(fan_in)).astype(np.float32)
        wname, weight = self.const(weight, "convw")
        inputs = [x, wname]
        bias_bound = 0.0
        if self.flag(0.5):
            bname, bias = self.rand_const((m,), "any")
            inputs.append(bname)
            bias_bound = float(np.max(np.abs(bias)))
        attrs = {}
        if pad or self.flag(0.3):
            attrs["pads"] = [pad] * 4
        if stride != 1 or self.flag(0.3):
            attrs["strides"] = [stride, stride]
        if self.flag(0.5):
            attrs["kernel_shape"] = [k, k]
        if group > 1:
            attrs["group"] = group
        out = self.one("Conv", inputs, **attrs)
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        shape = (v.shape[0], m, oh, ow)
        bound = bound * float(np.max(np.sum(np.abs(weight.reshape(m, -1)), axis=1))) + bias_bound
        if self.flag(0.7):
            bn = self._bn(out, shape, bound, exact)
            out, bound, exact = bn.name, bn.bound, False
        if self.flag(0.6):
            out = self.one("Relu", [out])
        return self.add(out, shape, bound, exact)

    def _bn(self, x: str, shape: tuple, bound: float, exact: bool) -> Value:
        m = shape[1]
        gname, gamma = self.rand_const((m,), "pos")
        bname, beta = self.rand_const((m,), "any")
        mname, mean = self.rand_const((m,), "any")
        vname, var = self.rand_const((m,), "pos")
        eps = self.choice([1e-5, 1e-3])
        attrs = {"epsilon": eps} if eps != 1e-5 or self.flag(0.3) else {}
        out = self.one("BatchNormalization", [x, gname, bname, mname, vname], **attrs)
        scale = float(np.max(np.abs(gamma / np.sqrt(var + eps))))
        bound = scale * (bound + float(np.max(np.abs(mean)))) + float(np.max(np.abs(beta)))
        return self.add(out, shape, bound, exact)

    def b_matmul(self, v, keep_shape):
        if v is not None and not isinstance(v.shape[-1], int):
            return self.b_unary(v, keep_shape)
        v = v or self.pick(lambda w: isinstance(w.shape[-1], int), lambda: self.draw_shape(2, 4))
        k = v.shape[-1]
        n = k if keep_shape else self.integer(1, 5)
        if self.flag(0.3):  # the weight as a constant subexpression: Transpose of its transpose
            tname, wt = self.rand_const((n, k), "any")
            wname, weight = self.one("Transpose", [tname], perm=[1, 0]), wt.T
        else:
            wname, weight = self.rand_const((k, n), "any")
        out = self.one("MatMul", [v.name, wname])
        shape = v.shape[:-1] + (n,) if v.rank > 1 else (n,)
        bound = v.bound * float(np.max(np.sum(np.abs(weight), axis=0)))
        if self.flag(0.6):
            bname, bias = self.rand_const((n,), "any")
            out = self.one("Add", [out, bname] if self.flag(0.7) else [bname, out])
            bound += float(np.max(np.abs(bias)))
        return self.add(out, shape, bound, v.exact)

    def b_gemm(self, v, keep_shape):
        if v is not None and not (v.rank == 2 and isinstance(v.shape[1], int)):
            return self.b_unary(v, keep_shape)
        v = v or self.pick(
            lambda w: w.rank == 2 and isinstance(w.shape[1], int),
            lambda: ((BATCH if self.symbolic else self.dim()), self.dim()),
        )
        m, k = v.shape
        n = k if keep_shape else self.integer(1, 5)
        trans_b = self.flag(0.5)
        bname, b = self.rand_const((n, k) if trans_b else (k, n), "any")
        weight = b.T if trans_b else b
        alpha = self.choice([1.0, 0.5])
        beta = self.choice([1.0, 2.0])
        inputs = [v.name, bname]
        c_bound = 0.0
        form = self.choice(["none", "vector", "row", "scalar", "full"])
        if form == "full" and m == BATCH:
            form = "row"
        if form != "none":
            shape = {"vector": (n,), "row": (1, n), "scalar": (), "full": (m, n)}[form]
            cname, c = self.rand_const(shape, "any")
            inputs.append(cname)
            c_bound = abs(beta) * float(np.max(np.abs(c)))
        attrs = {}
        if trans_b:
            attrs["transB"] = 1
        if alpha != 1.0:
            attrs["alpha"] = alpha
        if beta != 1.0:
            attrs["beta"] = beta
        out = self.one("Gemm", inputs, **attrs)
        bound = alpha * v.bound * float(np.max(np.sum(np.abs(weight), axis=0))) + c_bound
        return self.add(out, (m, n), bound, v.exact)

    # layout

    def _reshape_target(self, shape: tuple, new: tuple) -> list[int]:
        """Encode `new` as a Reshape target for input `shape` (the batch dim as 0 or -1)."""
        target = []
        minus_one = False
        for i, d in enumerate(new):
            if d == BATCH:
                if i < len(shape) and shape[i] == BATCH and self.flag(0.5):
                    target.append(0)
                else:
                    target.append(-1)
                    minus_one = True
            elif i < len(shape) and shape[i] == d and self.flag(0.2):
                target.append(0)
            else:
                target.append(d)
        if not minus_one and self.flag(0.3):
            static = [i for i, t in enumerate(target) if t > 0]
            if static:
                target[self.choice(static)] = -1
        return target

    def _reshape(self, v: Value, new: tuple) -> Value:
        target = self._reshape_target(v.shape, new)
        return self.add(self.one("Reshape", [v.name, self.ints(target)]), new, v.bound, v.exact, v.const)

    def _random_shape_like(self, shape: tuple) -> tuple:
        """A random shape with the same number of elements (the batch dim kept, maybe elsewhere)."""
        has_batch = BATCH in shape
        n = _prod([d for d in shape if d != BATCH])
        rank = self.integer(1 if not has_batch else 2, 4)
        parts = [1] * (rank - has_batch)
        if not parts:
            parts = []
        for f in _factors(n):
            if parts:
                parts[self.integer(0, len(parts) - 1)] *= f
        if not parts and n != 1:
            return shape
        if has_batch:
            parts.insert(self.integer(0, len(parts)), BATCH)
        return tuple(parts)

    def b_layout(self, v, keep_shape):
        v = v or self.pick()
        start = v
        last_perm = None
        for _ in range(self.integer(1, 4)):
            if last_perm is not None and self.flag(0.5):
                op = "transpose"  # consecutive Transposes
            else:
                op = self.choice(["transpose", "transpose", "reshape", "reshape", "flatten", "squeeze", "unsqueeze"])
            if op == "transpose":
                if last_perm is not None and self.flag(0.4):
                    perm = [int(i) for i in np.argsort(last_perm)]  # undo the previous one
                elif self.flag(0.2):
                    perm = list(range(v.rank))
                else:
                    perm = [int(i) for i in self.rng.permutation(v.rank)]
                attrs = {"perm": perm} if perm != list(range(v.rank)) or v.rank <= 1 or self.flag(0.7) else {}
                if not attrs:
                    perm = list(reversed(range(v.rank)))  # no perm attribute: reverse the axes
                out = self.one("Transpose", [v.name], **attrs)
                v = self.add(out, tuple(v.shape[p] for p in perm), v.bound, v.exact, v.const)
                last_perm = perm
                continue
            last_perm = None
            if op == "reshape":
                new = v.shape if self.flag(0.25) else self._random_shape_like(v.shape)
                v = self._reshape(v, new)
            elif op == "flatten":
                axis = self.integer(0, v.rank)
                head, tail = v.shape[:axis], v.shape[axis:]
                ok = lambda part: _static(part) or part == (BATCH,)  # noqa: E731
                if not (ok(head) and ok(tail)):
                    continue
                dims = tuple(BATCH if part == (BATCH,) else _prod(part) for part in (head, tail))
                attrs = {"axis": axis} if axis != 1 or self.flag(0.5) else {}
                v = self.add(self.one("Flatten", [v.name], **attrs), dims, v.bound, v.exact, v.const)
            elif op == "squeeze":
                ones = [i for i, d in enumerate(v.shape) if d == 1]
                if not ones or v.rank == 1:
                    continue
                axes = sorted(self.draw(st.lists(st.sampled_from(ones), min_size=1, max_size=len(ones), unique=True)))
                if len(axes) == v.rank:
                    axes = axes[1:]
                if _static(v.shape) and len(ones) < v.rank and self.flag(0.3):
                    # no axes: every dim of size 1 goes
                    new = tuple(d for d in v.shape if d != 1)
                    v = self.add(self.one("Squeeze", [v.name]), new, v.bound, v.exact, v.const)
                    continue
                encoded = [a - v.rank if self.flag(0.3) else a for a in axes]
                new = tuple(d for i, d in enumerate(v.shape) if i not in axes)
                v = self.add(self.one("Squeeze", [v.name, self.ints(encoded)]), new, v.bound, v.exact, v.const)
            else:
                if v.rank >= MAX_RANK:
                    continue
                out_rank = v.rank + 1
                axis = self.integer(0, v.rank)
                new = v.shape[:axis] + (1,) + v.shape[axis:]
                encoded = axis - out_rank if self.flag(0.3) else axis
                v = self.add(self.one("Unsqueeze", [v.name, self.ints([encoded])]), new, v.bound, v.exact, v.const)
        if (keep_shape or self.flag(0.3)) and v.shape != start.shape:
            v = self._reshape(v, start.shape)
        return v

    # shape arithmetic

    def b_shape(self, v, keep_shape):
        v = v or self.pick(
            lambda w: w.rank >= 2 and _static(w.shape[1:]),
            lambda: ((BATCH if self.symbolic else self.dim()),) + tuple(self.dim() for _ in range(self.integer(1, 3))),
        )
        if keep_shape or v.rank < 2 or not _static(v.shape[1:]) or self.flag(0.25):
            return self._expand_like(v)
        j = self.integer(1, v.rank - 1)
        head, tail = v.shape[:j], v.shape[j:]
        forms = ["gather", "gather", "gather1d", "slice"] + (["shape_start_end"] if self.opset >= 15 else [])
        form = self.choice(forms)
        r = v.rank
        if form == "gather":
            shape = self.one("Shape", [v.name])
            parts = []
            for i in range(j):
                index = np.array(i - r if self.flag(0.3) else i, dtype=np.int64)
                g = self.one("Gather", [shape, self.const(index)[0]], **({"axis": 0} if self.flag(0.3) else {}))
                parts.append(self.one("Unsqueeze", [g, self.ints([0])]))
        elif form == "gather1d":
            indices = [i - r if self.flag(0.3) else i for i in range(j)]
            parts = [self.one("Gather", [self.one("Shape", [v.name]), self.ints(indices)])]
        elif form == "slice":
            start = self.choice([0, -r])
            end = self.choice([j, j - r]) if j < r else j
            inputs = [self.one("Shape", [v.name]), self.ints([start]), self.ints([end])]
            if self.flag(0.3):
                inputs += [self.ints([self.choice([0, -1])]), self.ints([1])]
            parts = [self.one("Slice", inputs)]
        else:
            attrs = {"start": self.choice([0, -r])} if self.flag(0.7) else {}
            parts = [self.one("Shape", [v.name], end=self.choice([j, j - r]), **attrs)]
        tail_dim = -1 if self.flag(0.5) else _prod(tail)
        target = self.one("Concat", parts + [self.ints([tail_dim])], axis=0)
        if self.scope.depth == 0 and self.flag(0.15):  # the computed shape is an output too
            self.extra_outputs.append((target, I64, [j + 1]))
        return self.add(self.one("Reshape", [v.name, target]), head + (_prod(tail),), v.bound, v.exact, v.const)

    def _expand_like(self, v: Value) -> Value:
        """Expand or ConstantOfShape of Shape(v), combined with v."""
        shape = self.one("Shape", [v.name])
        if self.flag(0.5):
            cshape = self.partner_shape(v.shape, allow_batch=False)
            cname, c = self.rand_const(cshape, "any")
            filled, bound = self.one("Expand", [cname, shape]), float(np.max(np.abs(c), initial=0.0))
        else:
            fill = self.choice([0.0, 0.5, 1.0])
            tensor = numpy_helper.from_array(np.array([fill], dtype=np.float32), self.fresh("fill"))
            filled, bound = self.one("ConstantOfShape", [shape], value=tensor), fill
        op = self.choice(["Add", "Mul"])
        out_bound = v.bound + bound if op == "Add" else v.bound * bound
        return self.add(self.one(op, [v.name, filled]), v.shape, out_bound, v.exact, v.const)

    # gathers, slices, pads, concats, tiles, expands

    def b_gather(self, v, keep_shape):
        v = v or self.pick(lambda w: any(isinstance(d, int) for d in w.shape), lambda: self.draw_shape(2, 4))
        axes = [i for i, d in enumerate(v.shape) if isinstance(d, int)]
        if not axes or keep_shape:
            return self.b_unary(v, keep_shape)
        axis = self.choice(axes)
        n = v.shape[axis]
        # Indices as a graph input: make_inputs bounds them by the gathered axis, which it must be able
        # to infer. onnx cannot follow a computed Reshape target before opset 14, nor a -1 in a target
        # next to a symbolic dim, nor always the shape of an If's output.
        inferable = self.opset >= 14 and not self.symbolic and "if" not in self.blocks
        feedable = self.scope.depth == 0 and (v.is_input or inferable)
        form = self.choice(["scalar", "vector", "input"] if feedable else ["scalar", "vector"])
        if form == "scalar" and v.rank == 1:
            form = "vector"
        if form == "scalar":
            indices, ishape = self.const(np.array(self.integer(-n, n - 1), dtype=np.int64))[0], ()
        elif form == "vector":
            count = self.integer(1, 3)
            indices = self.ints([self.integer(-n, n - 1) for _ in range(count)])
            ishape = (count,)
        else:
            indices, ishape = self.fresh("idx"), (self.integer(1, 3),)
            self.inputs.append(helper.make_tensor_value_info(indices, I64, list(ishape)))
        attrs = {"axis": axis - v.rank if self.flag(0.3) else axis} if axis or self.flag(0.5) else {}
        shape = v.shape[:axis] + ishape + v.shape[axis + 1:]
        return self.add(self.one("Gather", [v.name, indices], **attrs), shape, v.bound, v.exact, v.const)

    def b_misc(self, v, keep_shape):
        v = v or self.pick()
        static = [i for i, d in enumerate(v.shape) if isinstance(d, int)]
        form = self.choice(["slice", "pad", "concat", "tile", "expand", "split"])
        identity = keep_shape or self.flag(0.4)
        if form == "split" and static:
            axis = self.choice(static)
            d = v.shape[axis]
            sizes = [d] if d == 1 else [self.integer(1, d - 1)]
            sizes.append(d - sum(sizes))
            if sizes[-1] == 0:
                sizes.pop()
            attrs = {"axis": axis - v.rank if self.flag(0.3) else axis}
            if self.opset >= 18 and len(set(sizes)) == 1 and self.flag(0.5):
                parts = self.node("Split", [v.name], n_out=len(sizes), num_outputs=len(sizes), **attrs)
            else:
                parts = self.node("Split", [v.name, self.ints(sizes)], n_out=len(sizes), **attrs)
            if identity or len(parts) == 1 or self.flag(0.5):  # put it back together (maybe reordered)
                order = list(range(len(parts)))
                if not identity and self.flag(0.5):
                    order.reverse()
                out = self.one("Concat", [parts[i] for i in order], axis=attrs["axis"])
                return self.add(out, v.shape, v.bound, v.exact, v.const)
            i = self.integer(0, len(parts) - 1)
            shape = list(v.shape)
            shape[axis] = sizes[i]
            return self.add(parts[i], shape, v.bound, v.exact, v.const)  # the other part is unused
        if form == "slice" and static:
            axes = sorted(self.draw(st.lists(st.sampled_from(static), min_size=1, max_size=len(static), unique=True)))
            starts, ends, steps, shape = [], [], [], list(v.shape)
            for a in axes:
                d = v.shape[a]
                if identity:
                    start, end, step = self.choice([(0, d), (0, 2**62), (-d, d)]) + (1,)
                elif self.flag(0.2):
                    start, end, step = d - 1, -(2**62), -1  # reversed
                else:
                    start = self.integer(0, d - 1)
                    end = self.integer(start + 1, d)
                    step = self.choice([1, 1, 2])
                starts.append(start)
                ends.append(end)
                steps.append(step)
                shape[a] = len(range(*slice(start, end, step).indices(d)))
            inputs = [v.name, self.ints(starts), self.ints(ends)]
            explicit_steps = any(s != 1 for s in steps) or self.flag(0.3)
            if axes != list(range(len(axes))) or explicit_steps or self.flag(0.5):
                inputs.append(self.ints([a - v.rank if self.flag(0.3) else a for a in axes]))
            if explicit_steps:
                inputs.append(self.ints(steps))
            return self.add(self.one("Slice", inputs), shape, v.bound, v.exact, v.const)
        if form == "pad":
            pads = [0] * (2 * v.rank)
            if not identity:
                for a in static:
                    pads[a], pads[a + v.rank] = self.integer(0, 1), self.integer(0, 1)
            inputs = [v.name, self.ints(pads)]
            if self.flag(0.5):
                inputs.append(self.scalar(self.choice([0.0, 1.0])))
            shape = tuple(d if d == BATCH else d + pads[i] + pads[i + v.rank] for i, d in enumerate(v.shape))
            return self.add(self.one("Pad", inputs), shape, max(v.bound, 1.0), v.exact, v.const)
        if form == "concat":
            if identity or not static:
                out = self.one("Concat", [v.name], axis=self.integer(-v.rank, v.rank - 1))
                return self.add(out, v.shape, v.bound, v.exact, v.const)
            axis = self.choice(static)
            others = [
                w for w in self.pool
                if w.rank == v.rank and isinstance(w.shape[axis], int)
                and all(w.shape[i] == d for i, d in enumerate(v.shape) if i != axis)
            ]
            parts = [v] + [self.choice(others) if others and self.flag(0.5) else v for _ in range(self.integer(1, 2))]
            shape = list(v.shape)
            shape[axis] = sum(p.shape[axis] for p in parts)
            out = self.one("Concat", [p.name for p in parts], axis=axis - v.rank if self.flag(0.3) else axis)
            bound = max(p.bound for p in parts)
            return self.add(out, shape, bound, all(p.exact for p in parts), all(p.const for p in parts))
        if form == "tile":
            repeats = [1] * v.rank
            if not identity and static:
                repeats[self.choice(static)] = 2
            shape = tuple(d if d == BATCH else d * r for d, r in zip(v.shape, repeats))
            return self.add(self.one("Tile", [v.name, self.ints(repeats)]), shape, v.bound, v.exact, v.const)
        # expand: to v's own shape (1 where it is symbolic), or with a new leading dim
        target = [1 if d == BATCH else d for d in v.shape]
        shape = v.shape
        if not identity and v.rank < MAX_RANK:
            lead = self.integer(2, 3)
            target, shape = [lead] + target, (lead,) + v.shape
        return self.add(self.one("Expand", [v.name, self.ints(target)]), shape, v.bound, v.exact, v.const)

    # no-ops

    def b_noop(self, v, keep_shape):
        v = v or self.pick()
        x = v.name
        # onnxruntime 1.31 fails to run a model whose If branch reads a Cast->Cast pair from the outer
        # scope, and eliminate-noop turns Cast->Identity->Cast into one. So a same-type Cast only
        # first in a chain, on a value that no removable op produced.
        cast_ok = v.is_input or v.origin in _REAL_ORIGINS
        for i in range(self.integer(1, 3)):
            op = self.choice(["Identity", "Dropout", "Cast", "CastRoundTrip"])
            if op == "Cast" and not (i == 0 and cast_ok):
                op = "Identity"
            if op == "Identity":
                x = self.one("Identity", [x])
            elif op == "Cast":
                x = self.one("Cast", [x], to=F)
            elif op == "CastRoundTrip":
                # through double and back, exactly (a Neg in between: see above)
                double = self.one("Neg", [self.one("Cast", [x], to=D)])
                if self.scope.depth == 0 and self.flag(0.2):  # a double output
                    self.extra_outputs.append((double, D, list(v.shape)))
                x = self.one("Neg", [self.one("Cast", [double], to=F)])
            else:
                form = self.choice(["plain", "ratio", "ratio_training", "training"])
                inputs = [x]
                if form in ("ratio", "ratio_training"):
                    inputs.append(self.scalar(self.choice([0.0, 0.1, 0.5])))
                if form in ("ratio_training", "training"):
                    if form == "training":
                        inputs.append("")
                    inputs.append(self.const(np.array(False))[0])
                x = self.node("Dropout", inputs, n_out=2 if self.flag(0.3) else 1)[0]
        return self.add(x, v.shape, v.bound, v.exact, v.const)

    # layer normalization

    def b_layernorm(self, v, keep_shape):
        def ok(w):
            return w.rank >= 1 and isinstance(w.shape[-1], int) and w.shape[-1] >= 2

        v = v or self.pick(ok, lambda: self.draw_shape(2, 3)[:-1] + (self.dim(2, 6),))
        if not ok(v):
            return self.b_unary(v, keep_shape)
        k = 2 if v.rank >= 2 and isinstance(v.shape[-2], int) and self.flag(0.3) else 1
        norm = v.shape[v.rank - k:]
        axes = [a - v.rank if self.flag(0.7) else a for a in range(v.rank - k, v.rank)]
        spread, sv = self.rand_const(norm, "spread")
        x = self.one("Add", [v.name, spread])

        def reduce_mean(t):
            if self.opset >= 18:
                return self.one("ReduceMean", [t, self.ints(axes)], **({"keepdims": 1} if self.flag(0.5) else {}))
            return self.one("ReduceMean", [t], axes=axes, **({"keepdims": 1} if self.flag(0.5) else {}))

        mean = reduce_mean(x)
        d = self.one("Sub", [x, mean])
        if self.flag(0.7):
            exponent = self.const(np.array(2.0, dtype=np.float32))[0] if self.flag(0.8) else self.ints(2)
            sq = self.one("Pow", [d, exponent])
        else:
            sq = self.one("Mul", [d, d])
        var = reduce_mean(sq)
        eps = self.scalar(self.choice([1e-5, 1e-6, 1e-3]))
        s = self.one("Sqrt", [self.one("Add", [var, eps] if self.flag(0.7) else [eps, var])])
        if self.flag(0.7):
            n = self.one("Div", [d, s])
        else:
            r = self.one("Reciprocal", [s])
            n = self.one("Mul", [d, r] if self.flag(0.5) else [r, d])
        size = _prod(norm)
        bound = math.sqrt(size)
        if self.flag(0.7):
            gshape = norm if self.flag(0.6) else (1,) * (k - 1) + (norm[-1],)
            gname, gamma = self.rand_const(gshape, "pos")
            n = self.one("Mul", [n, gname] if self.flag(0.7) else [gname, n])
            bound *= float(np.max(gamma))
        if self.flag(0.7):
            bname, beta = self.rand_const(norm, "any")
            n = self.one("Add", [n, bname] if self.flag(0.7) else [bname, n])
            bound += float(np.max(np.abs(beta)))
        if self.flag(0.15):  # an intermediate escapes the pattern: no fusion
            self.add(d, v.shape, v.bound + 2 * 2.1, False)
        return self.add(n, v.shape, bound, False)

    # constant subexpressions

    def _const_expr(self, shape: tuple, depth: int) -> tuple[str, np.ndarray]:
        if depth == 0:
            return self.rand_const(shape, "any")
        form = self.choice(["unary", "binary", "binary", "transpose", "reshape", "div", "big"])
        if form == "big" and shape and self.flag(0.3):
            # a constant over the fold size limit (1 MiB) feeding a reduction: folding must decline it
            fill = self.choice([0.5, 1.0])
            tensor = numpy_helper.from_array(np.array([fill], dtype=np.float32), self.fresh("fill"))
            big = self.one("ConstantOfShape", [self.ints([300_000])], value=tensor)
            mean = self.one("ReduceMean", [big], keepdims=1)
            name, value = self._const_expr(shape, depth - 1)
            return self.one("Mul", [name, mean]), value * fill
        if form == "unary":
            op = self.choice(["Neg", "Abs", "Relu", "Tanh", "Sigmoid", "Exp"])
            name, value = self._const_expr(shape, depth - 1)
            fn = {"Neg": np.negative, "Abs": np.abs, "Relu": lambda a: np.maximum(a, 0), "Tanh": np.tanh,
                  "Sigmoid": lambda a: 1 / (1 + np.exp(-a)), "Exp": np.exp}[op]
            if op == "Exp" and np.max(np.abs(value), initial=0) > 3:
                op, fn = "Tanh", np.tanh
            return self.one(op, [name]), fn(value)
        if form in ("binary", "div"):
            a, av = self._const_expr(shape, depth - 1)
            sub = shape[self.integer(0, len(shape)):]
            if form == "div":
                b, bv = self.rand_const(sub, "nz")
                return self.one("Div", [a, b]), av / bv
            b, bv = self._const_expr(sub, depth - 1)
            op = self.choice(["Add", "Sub", "Mul"])
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
            return self.one(op, [a, b]), fn(av, bv)
        if form == "transpose" and len(shape) >= 2:
            perm = [int(i) for i in self.rng.permutation(len(shape))]
            inverse = [int(i) for i in np.argsort(perm)]
            src_shape = tuple(shape[i] for i in inverse)
            name, value = self._const_expr(src_shape, depth - 1)
            return self.one("Transpose", [name], perm=perm), np.transpose(value, perm)
        name, value = self._const_expr((_prod(shape),), depth - 1)
        return self.one("Reshape", [name, self.ints(list(shape))]), value.reshape(shape)

    def b_const(self, v, keep_shape):
        v = v or self.pick()
        shape = self.partner_shape(v.shape, allow_batch=False)
        name, value = self._const_expr(shape, self.integer(1, 3))
        bound = float(np.max(np.abs(value), initial=0.0))
        if bound > MAX_BOUND:
            name, value, bound = self.one("Tanh", [name]), np.tanh(value), 1.0
        if shape and self.flag(0.5) and not keep_shape:
            self.add(name, shape, bound, True, True)  # the constant itself may be read or output
        op = self.choice(["Add", "Sub", "Mul"])
        a, b = (v.name, name) if self.flag(0.7) else (name, v.name)
        out_bound = v.bound * bound if op == "Mul" else v.bound + bound
        return self.add(self.one(op, [a, b]), v.shape, out_bound, v.exact, v.const)

    # duplicated subexpressions

    def b_duplicate(self, v, keep_shape):
        v = v or self.pick()
        forms = ["unary", "chain", "binary", "near"] + ([] if keep_shape else ["transpose", "reduce"])
        form = self.choice(forms)
        if form == "near":  # the same op on the same input with different attributes: must not merge
            op, attr, values = self.choice([
                ("LeakyRelu", "alpha", [0.1, 0.2, 0.01]), ("Elu", "alpha", [1.0, 0.5]),
                ("Softmax", "axis", list(range(-v.rank, v.rank))), ("HardSigmoid", "alpha", [0.2, 0.25]),
            ])
            a, b = self.choice(values), self.choice(values)
            outs = [self.one(op, [v.name], **{attr: a}), self.one(op, [v.name], **{attr: b})]
            shape, bound = v.shape, (1.0 if op in ("Softmax", "HardSigmoid") else v.bound)
        elif form in ("unary", "chain"):
            ops = [self.choice(["Relu", "Tanh", "Sigmoid", "Neg", "Abs"]) for _ in range(1 if form == "unary" else 2)]
            outs = []
            for _ in range(2):
                x = v.name
                for op in ops:
                    x = self.one(op, [x])
                outs.append(x)
            shape, bound = v.shape, (1.0 if ops[-1] in ("Tanh", "Sigmoid") else v.bound)
        elif form == "binary":
            name, oshape, obound, _, exact, _ = self._operand(v, True, "any")
            op = self.choice(["Add", "Mul"])
            outs = [self.one(op, [v.name, name]) for _ in range(2)]
            shape, bound = v.shape, (v.bound + obound if op == "Add" else v.bound * obound)
        elif form == "transpose":
            perm = [int(i) for i in self.rng.permutation(v.rank)]
            outs = [self.one("Transpose", [v.name], perm=perm) for _ in range(2)]
            shape, bound = tuple(v.shape[p] for p in perm), v.bound
        else:
            axis = self.integer(0, v.rank - 1)
            if self.opset >= 18:
                axes = self.ints([axis])
                outs = [self.one("ReduceMean", [v.name, axes]) for _ in range(2)]
            else:
                outs = [self.one("ReduceMean", [v.name], axes=[axis]) for _ in range(2)]
            shape, bound = v.shape[:axis] + (1,) + v.shape[axis + 1:], v.bound
        how = self.choice(["Add", "Sub", "Mul", "keep"])
        if how == "keep":
            self.add(outs[0], shape, bound, v.exact, v.const)
            return self.add(outs[1], shape, bound, v.exact, v.const)
        out_bound = bound * bound if how == "Mul" else 2 * bound
        return self.add(self.one(how, outs), shape, out_bound, v.exact, v.const)

    # control flow

    def b_if(self, v, keep_shape):
        v = v or self.pick()
        form = self.choice(["init", "input", "computed"])
        if form == "init" or self.scope.depth > 0 and form == "input":
            cond = self.const(np.array(self.flag(0.5)))[0]
        elif form == "input":
            cond = self.fresh("cond")
            self.inputs.append(helper.make_tensor_value_info(cond, BOOL, []))
        else:
            src = [w for w in self.pool if w.is_input]
            x = self.choice(src) if src else v
            reduced = self.one("ReduceMean", [x.name], keepdims=0)
            cond = self.one("Greater", [reduced, self.scalar(0.0)])
        branches = []
        bound, exact = 0.0, v.exact
        for _ in range(2):
            pool_size = len(self.pool)
            self.scopes.append(_Scope(self.scope.depth + 1))
            cur = v
            for _ in range(self.integer(1, 2)):
                kinds = [k for k in _BRANCH_BLOCKS if k != "if" or self.scope.depth < 2]
                cur = self.block(self.choice(kinds), cur, keep_shape=True)
            if cur.name not in self.scope.produced:
                cur = self.add(self.one("Identity", [cur.name]), cur.shape, cur.bound, cur.exact, cur.const)
            scope = self.scopes.pop()
            del self.pool[pool_size:]
            declared = list(v.shape) if self.flag(0.8) else None  # no shape at all
            branches.append(helper.make_graph(
                scope.nodes, self.fresh("branch"), [], [helper.make_tensor_value_info(cur.name, F, declared)],
                initializer=scope.initializers,
            ))
            bound, exact = max(bound, cur.bound), exact and cur.exact
        out = self.one("If", [cond], then_branch=branches[0], else_branch=branches[1])
        return self.add(out, v.shape, bound, exact)

    # --- the model ------------------------------------------------------------------------------

    def consumed(self) -> set[str]:
        names: set[str] = set()

        def walk(nodes):
            for n in nodes:
                names.update(n.input)
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g.node)
                        names.update(o.name for o in a.g.output)

        walk(self.scope.nodes)
        return names

    def finish(self, ir_version: int) -> onnx.ModelProto:
        produced = [v for v in self.pool if not v.is_input and v.name in self.scope.produced]
        if not produced:  # every block was a no-op on an input: make sure something is computed
            v = self.pick()
            produced = [self.add(self.one("Relu", [v.name]), v.shape, v.bound, v.exact, v.const)]
        consumed = self.consumed()
        chosen = [(produced[-1].name, F, produced[-1].shape)]
        for v in produced[:-1]:
            if self.flag(0.3 if v.name in consumed else 0.8):
                chosen.append((v.name, F, v.shape))
        chosen += [(name, t, tuple(shape)) for name, t, shape in self.extra_outputs]
        inputs = [v for v in self.pool if v.is_input]
        if inputs and self.flag(0.05):  # a graph input passed straight through
            chosen.append((inputs[0].name, F, inputs[0].shape))
        inits = [(n, v) for n, v, k, sc in self.consts if sc is self.scope and k not in (None, "default")]
        if inits and self.flag(0.05):  # an initializer (or Constant) as an output
            name, value = self.choice(inits)
            chosen.append((name, F, value.shape))
        order = self.draw(st.permutations(range(len(chosen))))
        outputs = []
        input_names = {v.name for v in inputs}
        for i in order:
            name, elem_type, shape = chosen[i]
            # rank only, sometimes; not for an input passed through (onnx's inference would then
            # forget the input's shape for everything that reads it)
            declared = list(shape) if name in input_names or self.flag(0.85) else [None] * len(shape)
            outputs.append(helper.make_tensor_value_info(name, elem_type, declared))
        value_info = []
        if self.flag(0.3):  # value_info for some intermediates, as some exporters write it
            out_names = {c[0] for c in chosen}
            for v in produced:
                if v.name not in out_names and self.flag(0.5):
                    value_info.append(helper.make_tensor_value_info(v.name, F, list(v.shape)))
        graph = helper.make_graph(
            self.scope.nodes, "fuzz", self.inputs, outputs, initializer=self.scope.initializers, value_info=value_info
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = ir_version
        return model


@st.composite
def models(
    draw,
    *,
    weights: dict[str, int] | None = None,
    min_blocks: int = 2,
    max_blocks: int = 7,
    opsets=(13, 17, 17, 17, 17, 18),
) -> FuzzCase:
    """A random valid model (see the module docstring), as a FuzzCase; `weights` says how often each
    block is drawn (DEFAULT_WEIGHTS when None)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    opset = draw(st.sampled_from(opsets))
    symbolic = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, opset=opset, symbolic=symbolic, seed=seed, weights=weights)
    kinds = [k for k, w in weights.items() for _ in range(w)]
    for _ in range(draw(st.integers(min_blocks, max_blocks))):
        b.block(draw(st.sampled_from(kinds)))
    ir_version = draw(st.sampled_from([8, 8, 8, 7, 9, 10] if opset < 18 else [8, 8, 9, 10]))
    return FuzzCase(b.finish(ir_version), symbolic, b.blocks)
