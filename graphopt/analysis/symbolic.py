"""A small symbolic evaluator of shape arithmetic (used by the fold-shapes pass).

`ShapeEvaluator` walks a graph in topological order and tracks, for every 0-D or 1-D tensor it can,
a list of elements that are each a number or a symbolic integer (`Sym`, a polynomial over
symbolic dimensions). Shape/Size seed it with a tensor's dimensions as inference knows them
(static dims are numbers, symbolic or unknown ones atoms); Gather, Slice, Concat, Unsqueeze,
Squeeze, Cast, arithmetic, comparisons, Where, reductions... carry the elements on. Any computed
tensor all of whose elements came out as numbers is known at compile time (fold-shapes replaces it
with a constant), so only what really depends on a symbolic dimension stays. The evaluator also
refines the shapes of what Reshape, Expand and ConstantOfShape produce from their (partly
symbolic) target shapes.

Two atoms with the same name are the same value: onnx's inference gives two dimensions one name
only when it proved them equal (the rest of graphopt relies on this too). When the evaluator
proves that a dimension inference named N is some expression e (the -1 of a Reshape, say), N
stands for e from then on, which is how what it learns reaches tensors further down. Nothing is
ever concluded from two expressions being different, only from their being equal.

In an If/Loop/Scan body the evaluator starts afresh: an outer value is opaque unless it is a
constant (its shape, as inference annotated it, is still its shape).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ir


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A slice end at least this big reaches past any dimension a tensor in memory can have.
END_OF_ANY_DIM = 2**62
# The longest 1-D tensor tracked element by element (shape vectors are short).
_MAX_TRACKED = 64
# Bigger polynomials become opaque (real shape arithmetic never builds them).
_MAX_TERMS, _MAX_DEGREE = 16, 8


class Sym:
    """A symbolic integer: a polynomial with integer coefficients over named dimensions.

    Equal polynomials denote equal values; different ones prove nothing.
    """

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[str, ...], int]):
        self.terms = tuple(sorted(terms.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sym) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(self.terms)

    def __repr__(self) -> str:
        parts = [("*".join(m) if c == 1 else f"{c}*{'*'.join(m)}") if m else str(c) for m, c in self.terms]
        return " + ".join(parts) or "0"

    @staticmethod
    def atom(name: str) -> Sym:
        return Sym({(name,): 1})

    def nonnegative(self) -> bool:
        """True when the value cannot be negative: a sum of products of dimensions."""
        return all(c > 0 and not any(a.startswith("~") for a in m) for m, c in self.terms)


def _terms(x) -> dict:
    return {(): x} if isinstance(x, int) else dict(x.terms)


def _sym_make(terms: dict):
    """The canonical element for a polynomial: an int when constant, None when too big."""
    terms = {m: c for m, c in terms.items() if c}
    if not terms:
        return 0
    if len(terms) == 1 and () in terms:
        c = terms[()]
        return c if _INT64_MIN <= c <= _INT64_MAX else None
    if len(terms) > _MAX_TERMS or any(len(m) > _MAX_DEGREE or abs(c) > _INT64_MAX for m, c in terms.items()):
        return None
    return Sym(terms)


def sym_add(a, b):
    t = _terms(a)
    for m, c in _terms(b).items():
        t[m] = t.get(m, 0) + c
    return _sym_make(t)


def sym_neg(a):
    return _sym_make({m: -c for m, c in _terms(a).items()})


def sym_mul(a, b):
    t: dict = {}
    for m1, c1 in _terms(a).items():
        for m2, c2 in _terms(b).items():
            m = tuple(sorted(m1 + m2))
            t[m] = t.get(m, 0) + c1 * c2
    return _sym_make(t)


def sym_div_exact(a, b):
    """a / b when b divides a exactly (then floor and truncating division agree), else None."""
    if isinstance(b, int):
        if b == 0:
            return None
        ta = _terms(a)
        if any(c % b for c in ta.values()):
            return None
        return _sym_make({m: c // b for m, c in ta.items()})
    if len(b.terms) != 1:
        return 1 if a == b else None
    (mb, cb), = b.terms
    out: dict = {}
    for m, c in _terms(a).items():
        rest = list(m)
        for atom in mb:
            if atom not in rest:
                return None
            rest.remove(atom)
        if c % cb:
            return None
        out[tuple(rest)] = c // cb
    return _sym_make(out)


def sym_equal(a, b) -> bool | None:
    """True when a and b are proven equal, False when proven different, None when unknown."""
    if isinstance(a, Sym) or isinstance(b, Sym):
        if a == b:
            return True
        # A sum of products of dimensions is never negative.
        for s, n in ((a, b), (b, a)):
            if isinstance(s, Sym) and not isinstance(n, Sym) and s.nonnegative() and n < 0:
                return False
        return None
    return a == b


class _Val:
    """A tracked 0-D or 1-D tensor: dtype, rank, elements (numbers or Syms)."""

    __slots__ = ("dtype", "scalar", "elems", "derived")

    def __init__(self, dtype, scalar: bool, elems, derived: bool):
        self.dtype = np.dtype(dtype)
        self.scalar = scalar
        self.elems = tuple(elems)
        # Computed from some tensor's shape (not from constants alone, which fold-constants folds).
        self.derived = derived

    @staticmethod
    def of(array: np.ndarray, derived: bool) -> _Val | None:
        array = np.asarray(array)
        if array.ndim > 1 or array.size > _MAX_TRACKED or array.dtype.kind not in "biuf":
            return None
        return _Val(array.dtype, array.ndim == 0, array.reshape(-1).tolist(), derived)

    def known(self) -> bool:
        return not any(isinstance(e, Sym) for e in self.elems)

    def array(self) -> np.ndarray:
        return np.array(self.elems, dtype=self.dtype).reshape(() if self.scalar else (len(self.elems),))

    def ints(self) -> list[int] | None:
        """The elements as Python ints when all are known integers."""
        if self.dtype.kind not in "iu" or not self.known():
            return None
        return [int(e) for e in self.elems]

    def __len__(self) -> int:
        return len(self.elems)


def _np_dtype(onnx_type) -> np.dtype | None:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type)))
    except (TypeError, KeyError, ValueError):
        return None


class _Decline(Exception):
    """The evaluator cannot compute this node exactly."""


def _trunc_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        if np.any(b == 0):
            raise _Decline
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))
    return np.divide(a, b)


def _int_mod(fmod: bool):
    def mod(a, b):
        if np.any(b == 0) and a.dtype.kind in "iu":
            raise _Decline
        return np.fmod(a, b) if fmod else np.mod(a, b)

    return mod


_NUMPY_OPS = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _trunc_div, "Neg": np.negative,
    "Abs": np.abs, "Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal, "Not": np.logical_not, "And": np.logical_and, "Or": np.logical_or,
    "Xor": np.logical_xor, "Floor": np.floor, "Ceil": np.ceil, "Round": np.round, "Sign": np.sign,
}
_VARIADIC_OPS = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}
_BOOL_RESULT = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor"}


class ShapeEvaluator:
    def __init__(self, graph: gs.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.values: dict[int, _Val] = {}
        self.shapes: dict[int, list | None] = {}  # resolved or refined dims of tensors
        self.refined: set[int] = set()  # tensors whose shape the evaluator computed itself
        self.alias: dict[str, object] = {}  # inference's dim name -> what it was proven to be
        self._fresh = 0

    # -- elements and dims ------------------------------------------------------------------

    def fresh(self) -> Sym:
        """A dimension nothing is known about (never negative)."""
        self._fresh += 1
        return Sym.atom(f"?{self._fresh}")

    def opaque(self) -> Sym:
        """An integer nothing is known about, not even its sign."""
        self._fresh += 1
        return Sym.atom(f"~{self._fresh}")

    def _dim(self, d):
        if isinstance(d, (int, np.integer)) and d >= 0:
            return int(d)
        if isinstance(d, str) and d:
            return self.alias.get(d, Sym.atom(d))
        return self.fresh()  # unknown (or a negative placeholder some exporters write)

    def shape(self, tensor: gs.Tensor) -> list | None:
        """The tensor's dims as ints and Syms (an unknown dim is a fresh atom), None for unknown rank."""
        key = id(tensor)
        if key not in self.shapes:
            shape = tuple(tensor.shape) if isinstance(tensor, gs.Constant) else tensor.shape
            self.shapes[key] = None if shape is None else [self._dim(d) for d in shape]
        return self.shapes[key]

    def refine(self, tensor: gs.Tensor, dims: list | None) -> None:
        """Record dims the evaluator computed for `tensor`, merged with what inference annotated.

        A static annotated dim stays; a dim inference left unknown takes the computed one; a dim
        inference named takes the computed one when that says more than "unknown", and the name
        stands for it from then on.
        """
        if dims is None:
            return
        annotated = tensor.shape if not isinstance(tensor, gs.Constant) else tuple(tensor.shape)
        merged = list(dims)
        if annotated is not None and len(annotated) == len(dims):
            for i, (a, d) in enumerate(zip(annotated, dims)):
                if isinstance(a, (int, np.integer)) and a >= 0:
                    merged[i] = int(a)
                elif isinstance(a, str) and a:
                    if _is_fresh(d):
                        merged[i] = self._dim(a)
                    elif a not in self.alias and d != Sym.atom(a):
                        self.alias[a] = d
        elif annotated is not None and not _incomplete(annotated):
            return  # inference knows a different rank: keep to what it says
        self.shapes[id(tensor)] = merged
        self.refined.add(id(tensor))

    def _propagate(self, node: gs.Node, ins) -> None:
        """Shapes inference left unknown (downstream of ops it does not know), for simple ops."""
        outputs = [t for t in node.outputs if not t.is_empty()]
        if not outputs or not any(_incomplete(t.shape) for t in outputs):
            return
        op = node.op
        dims = None
        if op in _SAME_SHAPE_OPS:
            dims = self.shape(node.inputs[0])
        elif op in _BROADCAST_OPS:
            shapes = [self.shape(t) for t in node.inputs if not t.is_empty()]
            dims = None if any(s is None for s in shapes) else _broadcast_many(shapes, self)
        elif op == "Transpose":
            src = self.shape(node.inputs[0])
            perm = node.attrs.get("perm")
            if src is not None:
                perm = list(range(len(src)))[::-1] if perm is None else [int(p) for p in perm]
                dims = [src[p] for p in perm] if sorted(perm) == list(range(len(src))) else None
        elif op in ("MatMul", "MatMulInteger"):
            dims = _matmul_dims(self.shape(node.inputs[0]), self.shape(node.inputs[1]), self)
        elif op == "Gemm":
            a, b = self.shape(node.inputs[0]), self.shape(node.inputs[1])
            if a is not None and b is not None and len(a) == 2 and len(b) == 2:
                dims = [a[1] if node.attrs.get("transA", 0) else a[0], b[0] if node.attrs.get("transB", 0) else b[1]]
        elif op in ("Unsqueeze", "Squeeze"):
            src = self.shape(node.inputs[0])
            axes = self._attr_or_input(node, "axes", 1, ins)
            if src is not None and isinstance(axes, list):
                dims = _squeeze_like_dims(op, src, axes)
        elif op == "Flatten":
            src = self.shape(node.inputs[0])
            if src is not None:
                axis = int(node.attrs.get("axis", 1))
                axis = axis + len(src) if axis < 0 else axis
                if 0 <= axis <= len(src):
                    dims = [_product(src[:axis], self), _product(src[axis:], self)]
        elif op == "Concat":
            shapes = [self.shape(t) for t in node.inputs]
            if shapes and all(s is not None and len(s) == len(shapes[0]) for s in shapes) and shapes[0]:
                axis = int(node.attrs.get("axis", 0)) % len(shapes[0])
                total = 0
                for s in shapes:
                    total = None if total is None else sym_add(total, s[axis])
                dims = list(shapes[0])
                dims[axis] = self.fresh() if total is None else total
        if dims is not None:
            self.refine(outputs[0] if op not in _SAME_SHAPE_OPS else node.outputs[0], dims)

    def value(self, tensor: gs.Tensor) -> _Val | None:
        if tensor.is_empty():
            return None
        key = id(tensor)
        if key in self.values:
            return self.values[key]
        value = None
        if isinstance(tensor, gs.Constant) or ir.producer(tensor) is not None and ir.producer(tensor).op == "Constant":
            shape = tensor.shape if isinstance(tensor, gs.Constant) else None
            if shape is None or len(shape) <= 1 and int(np.prod(shape, dtype=np.int64)) <= _MAX_TRACKED:
                array = ir.constant_value(tensor)
                if array is not None:
                    value = _Val.of(array, derived=False)
        self.values[key] = value
        return value

    # -- the walk ---------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.nodes:
            if node.domain not in ir.DEFAULT_DOMAINS or not node.outputs or ir.subgraphs_of(node):
                continue
            ins = [self.value(t) for t in node.inputs]
            self._propagate(node, ins)
            if node.op == "Reshape" and len(node.inputs) >= 2:
                self._refine_reshape(node, ins)
            elif node.op == "Expand" and len(node.inputs) == 2:
                self._refine_expand(node, ins)
            method = getattr(self, "_op_" + node.op, None)
            if method is None and (node.op in _NUMPY_OPS or node.op in _VARIADIC_OPS):
                method = self._elementwise
            results = None
            if method is not None:
                try:
                    results = method(node, ins)
                except (_Decline, ValueError, TypeError, OverflowError, IndexError, KeyError, ZeroDivisionError):
                    results = None
            if results is None:
                continue
            if not isinstance(results, list):
                results = [results]
            derived = any(v is not None and v.derived for v in ins) or node.op in ("Shape", "Size")
            for tensor, result in zip(node.outputs, results):
                if result is not None and not tensor.is_empty():
                    result.derived = result.derived or derived
                    self.values[id(tensor)] = result

    def _refine_reshape(self, node, ins) -> None:
        target = ins[1]
        if target is None or target.scalar or target.dtype.kind not in "iu":
            return
        self.refine(node.outputs[0], reshape_dims(self.shape(node.inputs[0]), target.elems, bool(node.attrs.get("allowzero", 0)), self))

    def _refine_expand(self, node, ins) -> None:
        target, dims = ins[1], self.shape(node.inputs[0])
        if target is None or target.scalar or target.dtype.kind not in "iu" or dims is None:
            return
        self.refine(node.outputs[0], broadcast_dims(dims, target.elems, self))

    def _attr_or_input(self, node, name: str, index: int, ins) -> list[int] | None | bool:
        """An int-list argument given as an attribute (older opsets) or input; False when unknown."""
        if name in node.attrs:
            return [int(a) for a in node.attrs[name]]
        if len(node.inputs) > index and not node.inputs[index].is_empty():
            v = ins[index]
            return False if v is None or v.ints() is None else v.ints()
        return None

    # -- ops producing shape values ---------------------------------------------------------

    def _op_Shape(self, node, ins):
        dims = self.shape(node.inputs[0])
        if dims is None:
            return None
        rank = len(dims)
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = rank if end is None else min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
        return _Val(np.int64, False, dims[start:end], True)

    def _op_Size(self, node, ins):
        dims = self.shape(node.inputs[0])
        if dims is None:
            return None
        total = 1
        for d in dims:
            total = sym_mul(total, d)
            if total is None:
                return _Val(np.int64, True, [self.fresh()], True)
        return _Val(np.int64, True, [total], True)

    def _op_Identity(self, node, ins):
        return ins[0]

    def _op_Gather(self, node, ins):
        data, indices = ins[0], ins[1] if len(ins) > 1 else None
        if data is None or indices is None or data.scalar or int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        picks = indices.ints()
        if picks is None:
            return None
        n = len(data)
        if any(not -n <= i < n for i in picks):
            return None
        return _Val(data.dtype, indices.scalar, [data.elems[i % n] for i in picks], data.derived)

    def _op_Slice(self, node, ins):
        data = ins[0]
        if data is None or data.scalar:
            return None
        if self.opset < 10:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes"), None
        else:
            args = [ins[i].ints() if i < len(ins) and ins[i] is not None else None for i in range(1, 5)]
            for i, a in enumerate(args):
                if a is None and len(node.inputs) > i + 1 and not node.inputs[i + 1].is_empty():
                    return None
            starts, ends, axes, steps = args
        if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
            return None
        if axes is not None and list(axes) not in ([0], [-1]):
            return None
        step = 1 if steps is None else int(steps[0])
        if step <= 0:  # ONNX clamps negative-step bounds unlike Python: not worth the risk
            return None
        picked = range(*slice(int(starts[0]), int(ends[0]), step).indices(len(data)))
        return _Val(data.dtype, False, [data.elems[i] for i in picked], data.derived)

    def _op_Concat(self, node, ins):
        if int(node.attrs.get("axis", 0)) not in (0, -1) or not ins:
            return None
        if any(v is None or v.scalar for v in ins):
            return None
        return _Val(ins[0].dtype, False, [e for v in ins for e in v.elems], any(v.derived for v in ins))

    def _op_Unsqueeze(self, node, ins):
        axes = self._attr_or_input(node, "axes", 1, ins)
        if ins[0] is None or not ins[0].scalar or axes not in ([0], [-1]):
            return None
        return _Val(ins[0].dtype, False, ins[0].elems, ins[0].derived)

    def _op_Squeeze(self, node, ins):
        axes = self._attr_or_input(node, "axes", 1, ins)
        if ins[0] is None or ins[0].scalar or len(ins[0]) != 1 or axes not in (None, [0], [-1]):
            return None
        return _Val(ins[0].dtype, True, ins[0].elems, ins[0].derived)

    def _op_Reshape(self, node, ins):
        data = ins[0]
        target = ins[1].ints() if len(ins) > 1 and ins[1] is not None else None
        if data is None or target is None:
            return None
        if target == []:
            return _Val(data.dtype, True, data.elems, data.derived) if len(data) == 1 else None
        if len(target) == 1 and target[0] in (-1, len(data)) or target == [0] and not data.scalar:
            return _Val(data.dtype, False, data.elems, data.derived)
        return None

    def _op_Cast(self, node, ins):
        value, to = ins[0], _np_dtype(node.attrs.get("to"))
        if value is None or to is None or to.kind not in "biuf":
            return None
        if value.known():
            array = value.array()
            if array.dtype.kind == "f" and to.kind in "iu":
                info = np.iinfo(to)
                if not np.all(np.isfinite(array)) or np.any(array <= info.min - 1.0) or np.any(array >= info.max + 1.0):
                    return None
            with np.errstate(all="ignore"):
                return _Val.of(array.astype(to), value.derived)
        if value.dtype.kind in "iu" and to in (np.dtype(np.int64), np.dtype(np.int32)):
            # Dimensions fit in int32 in practice: a symbolic element passes through unchanged.
            return _Val(to, value.scalar, value.elems, value.derived)
        return _Val(to, value.scalar, [e if not isinstance(e, Sym) else self.opaque() for e in value.elems], value.derived)

    def _op_ConstantOfShape(self, node, ins):
        shape = ins[0]
        if shape is None or shape.scalar:
            return None
        dims = [e if not isinstance(e, int) or e >= 0 else self.fresh() for e in shape.elems]
        self.refine(node.outputs[0], dims)
        fill = node.attrs.get("value")
        fill = np.zeros(1, np.float32) if fill is None else np.asarray(fill.values).reshape(-1)
        counts = shape.ints()
        if counts is None or len(counts) != 1 or counts[0] > _MAX_TRACKED or fill.size != 1:
            return None
        return _Val.of(np.full(counts[0], fill[0], dtype=fill.dtype), shape.derived)

    def _op_Range(self, node, ins):
        if len(ins) != 3 or any(v is None or not v.known() or not v.scalar for v in ins):
            return None
        start, limit, delta = (v.array() for v in ins)
        if delta == 0:
            return None
        count = max(int(np.ceil((limit - start) / delta)), 0)
        if count > _MAX_TRACKED:
            return None
        return _Val.of((start + np.arange(count).astype(start.dtype) * delta).astype(start.dtype), any(v.derived for v in ins))

    def _reduce(self, node, ins, combine_sym, combine_np):
        value = ins[0]
        if value is None or value.scalar:
            return None
        axes = self._attr_or_input(node, "axes", 1, ins)
        if axes in (None, []) and node.attrs.get("noop_with_empty_axes", 0):
            return value
        if axes not in (None, [], [0], [-1]):
            return None
        keep = bool(node.attrs.get("keepdims", 1))
        if value.known():
            with np.errstate(all="ignore"):
                result = combine_np(value.array(), keepdims=keep)
            return _Val.of(np.asarray(result, dtype=value.dtype), value.derived)
        if combine_sym is None or value.dtype.kind not in "iu" or not value.elems:
            return None
        total = value.elems[0]
        for e in value.elems[1:]:
            total = combine_sym(total, e) if total is not None else None
        return _Val(value.dtype, not keep, [self.opaque() if total is None else total], value.derived)

    def _op_ReduceProd(self, node, ins):
        return self._reduce(node, ins, sym_mul, np.prod)

    def _op_ReduceSum(self, node, ins):
        return self._reduce(node, ins, sym_add, np.sum)

    def _op_ReduceMax(self, node, ins):
        return self._reduce(node, ins, None, np.max)

    def _op_ReduceMin(self, node, ins):
        return self._reduce(node, ins, None, np.min)

    def _op_Where(self, node, ins):
        if len(ins) != 3 or any(v is None for v in ins) or not ins[0].known():
            return None
        cond, x, y = ins
        rows = _broadcast_rows(ins)
        if rows is None:
            return None
        length, scalar = rows
        pick = [x.elems[_at(x, i)] if cond.elems[_at(cond, i)] else y.elems[_at(y, i)] for i in range(length)]
        return _Val(x.dtype, scalar, pick, any(v.derived for v in ins))

    def _op_Mod(self, node, ins):
        if len(ins) != 2 or any(v is None or not v.known() for v in ins):
            return None
        return _numeric(_int_mod(bool(node.attrs.get("fmod", 0))), ins)

    def _elementwise(self, node, ins):
        if not ins or any(v is None for v in ins):
            return None
        op = node.op
        if all(v.known() for v in ins):
            fn = _NUMPY_OPS.get(op) or _VARIADIC_OPS[op]
            return _numeric(fn, ins)
        rows = _broadcast_rows(ins)
        if rows is None:
            return None
        length, scalar = rows
        integer = all(v.dtype.kind in "iu" for v in ins)
        out_dtype = np.dtype(bool) if op in _BOOL_RESULT else ins[0].dtype
        elems = []
        for i in range(length):
            args = [v.elems[_at(v, i)] for v in ins]
            result = None
            if any(isinstance(a, Sym) for a in args):
                # Numbers alone go through numpy below, in the tensor's own dtype (int32 wraps).
                if integer and all(isinstance(a, (int, Sym)) for a in args):
                    result = _sym_elementwise(op, args)
            else:
                result = _numeric(_NUMPY_OPS.get(op) or _VARIADIC_OPS[op], [_Val(v.dtype, True, [a], False) for v, a in zip(ins, args)])
                result = None if result is None else result.elems[0]
            elems.append(self.opaque() if result is None else result)
        return _Val(out_dtype, scalar, elems, False)


# Ops whose first output has the shape of their first input.
_SAME_SHAPE_OPS = frozenset({
    "Cast", "CastLike", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity", "Neg",
    "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Not", "Softmax", "LogSoftmax",
    "Gelu", "Elu", "Selu", "Softplus", "Softsign", "Sign", "Sin", "Cos", "Clip", "Dropout", "DynamicQuantizeLinear",
    "QuantizeLinear", "DequantizeLinear", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
    "Mish", "IsNaN", "IsInf", "Shrink", "ThresholdedRelu", "Celu",
})
# Ops whose output is the multidirectional broadcast of their inputs.
_BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And",
    "Or", "Xor", "BitShift", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
})


def _incomplete(shape) -> bool:
    """Inference left the rank or some dimension unknown (a name counts as known)."""
    return shape is None or any(not (isinstance(d, str) and d or isinstance(d, (int, np.integer)) and d >= 0) for d in shape)


def _is_fresh(d) -> bool:
    """`d` is nothing but an unknown dimension (a fresh atom): it says nothing."""
    return isinstance(d, Sym) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1 and d.terms[0][0][0].startswith("?")


def _product(dims: list, ev: ShapeEvaluator):
    total = 1
    for d in dims:
        total = None if total is None else sym_mul(total, d)
    return ev.fresh() if total is None else total


def _broadcast_many(shapes: list[list], ev: ShapeEvaluator) -> list:
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    out = []
    for column in zip(*padded):
        rest = [d for d in column if not (isinstance(d, int) and d == 1)]
        if not rest:
            out.append(1)
        elif all(sym_equal(d, rest[0]) is True for d in rest):
            out.append(rest[0])
        else:
            static = [d for d in rest if isinstance(d, int)]
            # A static dimension other than 1 is what the others broadcast to (or the model is invalid).
            out.append(static[0] if static and all(d == static[0] for d in static) else ev.fresh())
    return out


def _matmul_dims(a: list | None, b: list | None, ev: ShapeEvaluator) -> list | None:
    if a is None or b is None or not a or not b:
        return None
    a_vec, b_vec = len(a) == 1, len(b) == 1
    a2 = [1] + list(a) if a_vec else list(a)
    b2 = list(b) + [1] if b_vec else list(b)
    batch = _broadcast_many([a2[:-2], b2[:-2]], ev) if len(a2) > 2 or len(b2) > 2 else []
    out = batch + [a2[-2], b2[-1]]
    if b_vec:
        out.pop(-1)
    if a_vec:
        out.pop(-2 if not b_vec else -1)
    return out


def _squeeze_like_dims(op: str, src: list, axes: list[int]) -> list | None:
    if op == "Unsqueeze":
        rank = len(src) + len(axes)
        axes = sorted(a + rank if a < 0 else a for a in axes)
        if len(set(axes)) != len(axes) or any(not 0 <= a < rank for a in axes):
            return None
        it = iter(src)
        return [1 if i in axes else next(it) for i in range(rank)]
    if not axes:
        return None  # squeezing every 1: a symbolic dim might be one
    axes = {a + len(src) if a < 0 else a for a in axes}
    if any(not 0 <= a < len(src) for a in axes):
        return None
    return [d for i, d in enumerate(src) if i not in axes]


def _at(value: _Val, i: int) -> int:
    return 0 if len(value) == 1 else i


def _broadcast_rows(vals: list[_Val]) -> tuple[int, bool] | None:
    """Length and rank-0-ness of the broadcast of 0-D/1-D values, None when they do not broadcast."""
    lengths = {len(v) for v in vals if not v.scalar}
    longer = lengths - {1}
    if len(longer) > 1:
        return None
    return (longer.pop() if longer else 1), not lengths


def _numeric(fn, vals: list[_Val]) -> _Val | None:
    with np.errstate(all="ignore"):
        if len(vals) > 2 and fn in (np.maximum, np.minimum, np.add):
            result = vals[0].array()
            for v in vals[1:]:
                result = fn(result, v.array())
        else:
            result = fn(*[v.array() for v in vals])
    result = np.asarray(result)
    if result.dtype.kind not in "b" and vals[0].dtype.kind in "iuf" and fn not in (np.equal, np.less, np.less_equal, np.greater, np.greater_equal):
        result = result.astype(vals[0].dtype)
    return _Val.of(result, any(v.derived for v in vals))


def _sym_elementwise(op: str, args: list):
    if op == "Add" or op == "Sum":
        total = args[0]
        for a in args[1:]:
            total = None if total is None else sym_add(total, a)
        return total
    if op == "Sub":
        negated = sym_neg(args[1])
        return None if negated is None else sym_add(args[0], negated)
    if op == "Mul":
        return sym_mul(args[0], args[1])
    if op == "Div":
        return sym_div_exact(args[0], args[1])
    if op == "Neg":
        return sym_neg(args[0])
    if op in ("Max", "Min"):
        return args[0] if all(a == args[0] for a in args) else None
    if op == "Equal":
        equal = sym_equal(args[0], args[1])
        return None if equal is None else bool(equal)
    return None


def reshape_dims(dims: list | None, target, allowzero: bool, ev: ShapeEvaluator) -> list | None:
    """The output dims of Reshape(data with `dims`, `target`), with -1 worked out when it can be."""
    out, infer = [], None
    for i, t in enumerate(target):
        if isinstance(t, Sym):
            out.append(t)
        elif t == 0 and not allowzero:
            if dims is None or i >= len(dims):
                return None
            out.append(dims[i])
        elif t == -1:
            if infer is not None:
                return None
            infer = i
            out.append(None)
        elif t < 0:
            return None
        else:
            out.append(int(t))
    if infer is not None:
        inferred = None
        if dims is not None:
            total, known = 1, 1
            for d in dims:
                total = None if total is None else sym_mul(total, d)
            for i, d in enumerate(out):
                if i != infer:
                    known = None if known is None else sym_mul(known, d)
            if total is not None and known is not None and known != 0:
                inferred = sym_div_exact(total, known)
        out[infer] = ev.fresh() if inferred is None else inferred
    return out


def broadcast_dims(dims: list, target, ev: ShapeEvaluator) -> list:
    """The output dims of Expand(data with `dims`, `target`)."""
    rank = max(len(dims), len(target))
    a = [1] * (rank - len(dims)) + list(dims)
    b = [1] * (rank - len(target)) + list(target)
    out = []
    for d, t in zip(a, b):
        if isinstance(t, int) and t == 1:
            out.append(d)
        elif isinstance(d, int) and d == 1:
            out.append(t)
        elif sym_equal(d, t) is True:
            out.append(d)
        elif isinstance(t, int) and t > 1:
            out.append(t)  # d is 1 or t, or the model is invalid
        elif isinstance(d, int) and d > 1:
            out.append(d)
        else:
            out.append(ev.fresh())
    return out
