"""The rules weight-only and dynamic quantization share: a MatMul by a constant float32 [K, N]
weight, with or without the bias Add after it. Not a pass: the patterns and their conditions."""

from __future__ import annotations

import numpy as np

from graphopt.patterns import Match


def matmul_bias(op, x, w, b):
    return op.Add(op.MatMul(x, w), b)


def matmul(op, x, w):
    return op.MatMul(x, w)


def weight_ok(m: Match) -> bool:
    """A float32 activation times a constant float32 matrix, in a node the pass may change."""
    w = m.value("w")
    return not m.excluded() and w is not None and w.dtype == np.float32 and w.ndim == 2 and m.dtype("x") == np.float32


def bias_fits(m: Match) -> bool:
    b = m.value("b")
    return b is not None and b.dtype == np.float32 and b.shape == (m.value("w").shape[1],)


def bias_follows(m: Match) -> bool:
    """Whether a bias Add reads the MatMul: then it is the bias rule's to take (it runs later in
    the worklist, rooted at the Add), not the plain rule's."""
    out = m.node("MatMul").outputs[0]
    readers = out.outputs
    if len(readers) != 1 or readers[0].op != "Add":
        return False
    other = [t for t in readers[0].inputs if t is not out]
    value = None if not other else getattr(other[0], "values", None)
    return value is not None and np.asarray(value).shape == (m.value("w").shape[1],)
