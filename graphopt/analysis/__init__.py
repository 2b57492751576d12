"""Analyses passes ask for through the PassContext; cached until a pass invalidates them.

This package holds the analysis registry: `register_analysis` names an analysis, and the
`AnalysisManager` each PassContext carries computes one on demand and caches it. The built-in
analyses (graphopt.analysis.shapes, .stats) register themselves when first imported, which the
manager does lazily the first time it is asked for an analysis it does not know. graphopt.pass_manager
imports this registry; no analysis module imports pass_manager when it loads (shapes.resolve_shapes,
which runs passes, imports it when called).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from graphopt import ir

if TYPE_CHECKING:  # annotations only: pass_manager imports this module
    from graphopt.pass_manager import PassContext

AnalysisFn = Callable[[ir.Model, "PassContext"], Any]
_ANALYSES: dict[str, AnalysisFn] = {}


def register_analysis(name: str):
    """Decorator: `fn(model, ctx) -> result` computed on demand, cached until a pass invalidates it."""

    def wrap(fn: AnalysisFn) -> AnalysisFn:
        _ANALYSES[name] = fn
        return fn

    return wrap


class AnalysisManager:
    def __init__(self):
        self._cache: dict[str, Any] = {}

    def get(self, name: str, model: ir.Model, ctx: PassContext) -> Any:
        if name not in self._cache:
            if name not in _ANALYSES:
                _load_analyses()
            if name not in _ANALYSES:
                raise KeyError(f"unknown analysis '{name}'")
            self._cache[name] = _ANALYSES[name](model, ctx)
        return self._cache[name]

    def invalidate(self, preserved: Iterable[str] = ()) -> None:
        keep = set(preserved)
        self._cache = {k: v for k, v in self._cache.items() if k in keep}


def _load_analyses() -> None:
    import graphopt.analysis.shapes  # noqa: F401
    import graphopt.analysis.stats  # noqa: F401
