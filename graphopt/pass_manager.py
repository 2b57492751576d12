"""Passes, the pass registry, composition (Sequential, FixedPoint), the pass context and instruments.

The shape follows LLVM's new pass manager and TVM's `tvm.transform`: a pass is small and stateless,
returns whether it changed the graph and which analyses it preserved, and everything around it
(walking subgraphs, caching analyses, timing, stats, IR dumps, verification, rollback) belongs to
the manager and its instruments, not to the pass. Analyses are registered and cached by
`graphopt.analysis` (register_analysis, AnalysisManager); `PassContext.analysis(name)` asks it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from graphopt import export, ir, loading
from graphopt.analysis import AnalysisManager
from graphopt.errors import GraphoptError

# ---------------------------------------------------------------------------------------------
# Passes


@dataclass(frozen=True)
class CostDecision:
    """A rewrite the cost model was asked about (PassContext.cost): kept or declined, and why."""

    rule: str
    node: str       # the matched root
    kept: bool
    before_s: float  # predicted time of what the rewrite replaces
    after_s: float   # and of what it would put there
    reason: str


@dataclass
class PassResult:
    changed: bool
    # Counters a pass wants reported, e.g. {"removed": 12}; summed over graphs and iterations.
    stats: dict[str, int] = field(default_factory=dict)
    decisions: list[CostDecision] = field(default_factory=list)

    def merge(self, other: PassResult) -> None:
        self.changed |= other.changed
        for key, value in other.stats.items():
            self.stats[key] = self.stats.get(key, 0) + value
        self.decisions.extend(other.decisions)


class Pass:
    """A graph transformation. Subclass, set the class attributes, implement `run`.

    `run` is called once per graph of the model (the main graph, then every If/Loop/Scan body,
    outer before inner) unless `subgraphs` is False. Inside a subgraph, a value from an outer scope
    is an input the pass must treat as opaque unless it is a constant.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # The lowest -O level (1 to 3) whose default pipeline runs this pass; None: opt-in, it runs
    # only when named in --passes. None is the default so that registering a pass never changes
    # what existing pipelines do until its author says at which level it is safe and worth it.
    opt_level: ClassVar[int | None] = None
    # Where a pass outside the built-in order (a plugin's) goes in the default pipelines: right
    # after the pass named here; None: just before the trailing cleanup (cse, dce), which then
    # sweeps up what it left dead. See pipelines.default_order.
    run_after: ClassVar[str | None] = None
    # Names of analyses still valid after this pass changed the graph.
    preserves: ClassVar[frozenset[str]] = frozenset()
    subgraphs: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


_REGISTRY: dict[str, type[Pass]] = {}
# Where each registered pass came from: "built-in", "plugin FILE" or "package DIST" (see plugins.py).
_SOURCES: dict[str, str] = {}
# The plugins being imported right now, innermost last; what registers meanwhile belongs to them.
_LOADING: list[tuple[str, list[str]]] = []


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to pipelines and to `--passes`."""
    if not cls.name or not cls.description:
        raise TypeError(f"{cls.__name__} needs a name and a one-line description")
    if cls.opt_level is not None and (isinstance(cls.opt_level, bool) or cls.opt_level not in (1, 2, 3)):
        raise TypeError(f"pass '{cls.name}' has opt_level {cls.opt_level!r}; use 1, 2, 3 or None (opt-in)")
    if cls.run_after is not None and not isinstance(cls.run_after, str):
        raise TypeError(f"pass '{cls.name}' has run_after {cls.run_after!r}; use a pass name or None")
    existing = _REGISTRY.get(cls.name)
    if existing is cls:
        return cls
    if existing is not None:
        raise TypeError(f"pass name '{cls.name}' is already registered by {existing.__name__} ({_SOURCES[cls.name]})")
    _REGISTRY[cls.name] = cls
    if _LOADING:
        source, names = _LOADING[-1]
        names.append(cls.name)
    else:
        source = "built-in" if cls.__module__.split(".")[0] == "graphopt" else cls.__module__
    _SOURCES[cls.name] = source
    return cls


@contextlib.contextmanager
def registering_from(source: str) -> Iterator[None]:
    """Attribute the passes registered inside the block to `source`; if the block fails, forget
    them, so that a plugin that broke halfway leaves nothing behind (and can be fixed and loaded again)."""
    names: list[str] = []
    _LOADING.append((source, names))
    try:
        yield
    except BaseException:
        for name in names:
            del _REGISTRY[name], _SOURCES[name]
        raise
    finally:
        _LOADING.pop()


def pass_source(name: str) -> str:
    return _SOURCES[name]


def registered_passes() -> dict[str, type[Pass]]:
    _load_pass_library()
    return dict(sorted(_REGISTRY.items()))


def create_pass(name: str) -> Pass:
    passes = registered_passes()
    if name not in passes:
        raise GraphoptError(f"unknown pass '{name}'; run 'graphopt passes' to list them")
    return passes[name]()


_library_loaded = False


def _load_pass_library() -> None:
    # Importing the library registers its passes; deferred so the core never imports passes eagerly.
    # Installed plugins come after the built-ins, so a name clash is blamed on the plugin.
    global _library_loaded
    if _library_loaded:
        return
    # Set first: a plugin that lists the passes while it is being imported must not load itself again.
    _library_loaded = True
    try:
        import graphopt.passes  # noqa: F401
        from graphopt import plugins

        plugins.load_installed()
    except BaseException:
        _library_loaded = False  # report the broken plugin again on the next use, not a short registry
        raise


# ---------------------------------------------------------------------------------------------
# Composition


class Sequential:
    """Run passes in order."""

    def __init__(self, items: Sequence[Pass | Sequential | FixedPoint], name: str = "sequential"):
        self.items = list(items)
        self.name = name

    def pass_names(self) -> list[str]:
        return [n for item in self.items for n in _names(item)]


class FixedPoint:
    """Repeat a group of passes until none changes the model, at most `max_iterations` times."""

    def __init__(self, items: Sequence[Pass | Sequential], max_iterations: int = 8, name: str = "fixed-point"):
        self.items = list(items)
        self.max_iterations = max_iterations
        self.name = name

    def pass_names(self) -> list[str]:
        return [n for item in self.items for n in _names(item)]


def _names(item) -> list[str]:
    return [item.name] if isinstance(item, Pass) else item.pass_names()


def filter_pipeline(item, disabled: set[str]):
    """The pipeline without the passes named in `disabled`."""
    if isinstance(item, Pass):
        return None if item.name in disabled else item
    kept = [x for x in (filter_pipeline(i, disabled) for i in item.items) if x is not None]
    if isinstance(item, FixedPoint):
        return FixedPoint(kept, item.max_iterations, item.name)
    return Sequential(kept, item.name)


# ---------------------------------------------------------------------------------------------
# Context and instruments


@dataclass
class PassContext:
    model: ir.Model
    target: Any = None
    opt_level: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    calibration_data: Any = None
    accuracy_budget: float | None = None
    instruments: list[Instrument] = field(default_factory=list)
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    # The graph the running pass is looking at; `is_main_graph` tells passes whether its inputs
    # and outputs are the model's (removable, renamable) or a subgraph's formal parameters.
    graph: gs.Graph | None = None

    def analysis(self, name: str) -> Any:
        return self.analyses.get(name, self.model, self)

    @property
    def is_main_graph(self) -> bool:
        return self.graph is None or self.graph is self.model.graph

    @property
    def opset(self) -> int:
        return self.model.opset

    def can_emit(self, op: str, domain: str = "") -> bool:
        """Whether this context's target may be handed `op` of `domain` at the model's opset.

        Passes ask this instead of naming a target (Target.can_emit); a context built without a
        target answers for the default one, x86_64.
        """
        target = self.target
        if target is None:
            from graphopt import targets  # lazily: targets probe onnxruntime

            target = targets.get("x86_64")
        return target.can_emit(op, domain, self.opset)

    @functools.cached_property
    def cost(self):
        """The target's cost model (graphopt.targets.cost.CostModel), for passes that ask whether a
        rewrite pays; None where the target has no hardware figures (generic) or options["cost"]
        is False (every cost-checked rewrite then applies). A context built without a target asks
        the default one, x86_64."""
        if self.options.get("cost") is False:
            return None
        from graphopt import targets
        from graphopt.targets import cost

        return cost.for_target(self.target or targets.get("x86_64"), threads=self.options.get("threads"))

    def fresh_name(self, base: str) -> str:
        allocator = self.options.get("_names")
        if allocator is None:
            allocator = self.options["_names"] = ir.NameAllocator(self.model)
        return allocator(base)


class Instrument:
    """Hooks around every pass: timing, stats, IR dumps, verification. Override what you need."""

    # True when the instrument needs the model as it was before the pass (e.g. to roll it back).
    needs_snapshot: ClassVar[bool] = False

    def before_pass(self, pass_: Pass, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, ctx: PassContext, result: PassResult) -> str | None:
        """Return a reason to reject the pass's change (the manager rolls the model back), else None."""
        return None

    def on_rollback(self, pass_: Pass, ctx: PassContext, reason: str) -> None:
        pass


@dataclass
class PassRecord:
    name: str
    seconds: float = 0.0
    runs: int = 0
    changed: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    rolled_back: str | None = None
    decisions: list[CostDecision] = field(default_factory=list)


class PassManager:
    def __init__(self, pipeline: Sequential | FixedPoint | Pass):
        self.pipeline = pipeline

    def run(self, ctx: PassContext) -> list[PassRecord]:
        records: dict[str, PassRecord] = {}
        # The graph is one big web of reference cycles (tensors <-> nodes) that stays alive for the
        # whole run; the cyclic collector would rescan all of it again and again, which makes the
        # run's cost grow faster than the graph. Nothing collectable piles up meanwhile.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._run_item(self.pipeline, ctx, records)
        finally:
            if collecting:
                gc.enable()
        return list(records.values())

    def _run_item(self, item, ctx: PassContext, records) -> bool:
        if isinstance(item, Pass):
            return self._run_pass(item, ctx, records)
        if isinstance(item, Sequential):
            changed = False
            for sub in item.items:
                changed |= self._run_item(sub, ctx, records)
            return changed
        changed_any = False
        for _ in range(item.max_iterations):
            changed = False
            for sub in item.items:
                changed |= self._run_item(sub, ctx, records)
            changed_any |= changed
            if not changed:
                break
        return changed_any

    def _run_pass(self, pass_: Pass, ctx: PassContext, records) -> bool:
        record = records.setdefault(pass_.name, PassRecord(pass_.name))
        snapshot = None
        if any(i.needs_snapshot for i in ctx.instruments):
            snapshot = export.to_proto(ctx.model)
        for instrument in ctx.instruments:
            instrument.before_pass(pass_, ctx)
        start = time.perf_counter()
        result = PassResult(False)
        graphs = [ctx.model.graph]
        # Breadth-first over graphs: subgraphs are collected after their parent ran, so a body a
        # pass removed is never visited and a body it created is.
        while graphs:
            graph = graphs.pop(0)
            ctx.graph = graph
            result.merge(pass_.run(graph, ctx))
            if pass_.subgraphs:
                for node in graph.nodes:
                    graphs.extend(ir.subgraphs_of(node))
        ctx.graph = None
        record.seconds += time.perf_counter() - start
        record.runs += 1
        if result.changed:
            ctx.analyses.invalidate(pass_.preserves)
        rejections = [r for r in (i.after_pass(pass_, ctx, result) for i in ctx.instruments) if r]
        if rejections and snapshot is not None:
            reason = "; ".join(rejections)
            restored = loading.from_proto(snapshot)
            ctx.model.graph = restored.graph
            ctx.model.input_defaults = restored.input_defaults
            ctx.analyses.invalidate()
            record.rolled_back = reason
            for instrument in ctx.instruments:
                instrument.on_rollback(pass_, ctx, reason)
            return False
        record.decisions.extend(result.decisions)
        if result.changed:
            record.changed = True
            for key, value in result.stats.items():
                record.stats[key] = record.stats.get(key, 0) + value
        return result.changed
