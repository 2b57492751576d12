"""Declarative pattern rewriting: a rule reads like the graph it rewrites.

A pattern is a function written with the ONNX ops it matches; its parameters after `op` are the
values it binds. A rewrite builds what replaces the match with the same `op` notation; a check
says when the rewrite is legal:

    def conv_bn(op, x, w, b, gamma, beta, mean, var):
        return op.BatchNormalization(op.Conv(x, w, op.optional(b)), gamma, beta, mean, var)

    def folded(op, m):
        return op.Conv(m.x, op.constant(new_weight), op.constant(new_bias), **m.node("Conv").attrs)

    RULE = Rule(conv_bn, folded, check=lambda m: m.is_constant("w", "gamma", "beta", "mean", "var"))

`RewritePass` runs its rules over a graph: candidates are indexed by the pattern's root op, so a
pass costs time linear in the graph; the nodes a rewrite creates join the worklist, so what one
rewrite exposes is matched in the same run; replaced nodes are removed once, at the end.

What a match guarantees, so that no check has to: every op matched below the root is of the
default domain (or the one given), and whatever it produces is read by matched nodes only (no
other node, no subgraph) and is no graph output; the root's outputs beyond those the rewrite
replaces are unused too. An op a pattern uses twice (`d = op.Sub(x, mean)` read by a Pow and a
Div) is one node; a value bound twice (`op.Mul(x, x)`) must be the same tensor both times.
Commutative ops (Add, Mul, ...) match with their two inputs in either order.

Written by hand because no library matches ONNX graphs this way over onnx-graphsurgeon (onnxscript's
rewriter works on its own IR, which graphopt deliberately does not adopt: one graph type).
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import CostDecision, Pass, PassContext, PassResult

COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal"})


# ---------------------------------------------------------------------------------------------
# Patterns: what the `op` of a pattern function builds


@dataclass(frozen=True)
class Var:
    """A value the pattern binds by name (a parameter of the pattern function)."""

    name: str
    optional: bool = False


@dataclass
class OpPattern:
    """One op of a pattern: its type, domain, inputs (Vars or other OpPatterns' outputs) and attribute values."""

    op: str
    domain: str | None
    inputs: list[Var | OpOutput]
    attrs: dict[str, Any]
    # Matched nodes can be looked up by this (the op type unless named with _name=).
    label: str


@dataclass(frozen=True)
class OpOutput:
    """Output `index` of an op pattern, as an input of another."""

    pattern: OpPattern
    index: int = 0


class _PatternBuilder:
    """`op.Conv(x, w)` in a pattern function: records an OpPattern. Keyword arguments are attribute
    values the node must have (`_domain=`, `_name=` are the pattern's own).

    `either` and `optional` make one pattern function describe several forms; tracing runs the
    function once per combination of their choices (see `_trace`), and `decisions` holds the
    choices of this run: a prefix given, the rest the first form.
    """

    def __init__(self, decisions: list[int]):
        self.decisions = decisions
        self.arities: list[int] = []

    def either(self, *forms):
        """One of several forms of the same value (the ways exporters write it), first form first."""
        if not forms:
            raise TypeError("either() needs at least one form")
        i = len(self.arities)
        self.arities.append(len(forms))
        if i == len(self.decisions):
            self.decisions.append(0)
        return forms[self.decisions[i]]

    def optional(self, value: Var | OpOutput):
        """A Var: an input that may be absent (an omitted optional input, or one the node does not
        have). An op: a node that may be absent, its first input then taking its place
        (`op.optional(op.Mul(r, gamma))` is r scaled by gamma, or r itself)."""
        if isinstance(value, Var):
            return Var(value.name, optional=True)
        return self.either(value, value.pattern.inputs[0])

    def __getattr__(self, op: str) -> Callable[..., OpOutput]:
        def make(*inputs, _domain: str | None = None, _name: str | None = None, **attrs) -> OpOutput:
            return OpOutput(OpPattern(op, _domain, list(inputs), attrs, _name or op))

        return make


@dataclass
class Match:
    """What a pattern matched: bound values by parameter name (`m.x`, `m["x"]`) and nodes by label
    (the op type, or the `_name=` given in the pattern; the outermost wins when two share one)."""

    # Every parameter of the pattern: None when absent (an optional input, or one that only a form
    # other than the matched one reads).
    values: dict[str, gs.Tensor | None]
    # Every matched node, root first, with its label.
    matched: list[tuple[str, gs.Node]]
    root: gs.Node
    graph: gs.Graph
    ctx: PassContext | None = None

    @property
    def nodes(self) -> dict[str, gs.Node]:
        labelled: dict[str, gs.Node] = {}
        for label, node in self.matched:
            labelled.setdefault(label, node)
        return labelled

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str):
        return self.values[name]

    def node(self, label: str) -> gs.Node:
        return self.nodes[label]

    def value(self, name: str) -> np.ndarray | None:
        """The constant value bound to `name`, or None when it is computed at run time (or absent)."""
        tensor = self.values.get(name)
        return None if tensor is None else ir.constant_value(tensor)

    def can_emit(self, op: str, domain: str = "") -> bool:
        """Whether the target runs `op` at the model's opset, for checks that depend on it."""
        return self.ctx.can_emit(op, domain)

    def excluded(self) -> bool:
        """Whether a matched node is one the pass was told to leave alone
        (`options["quantize_exclude"]`: the layers an accuracy search keeps float)."""
        names = self.ctx.options.get("quantize_exclude") if self.ctx is not None else None
        return bool(names) and any(node.name in names for _, node in self.matched)

    def is_constant(self, *names: str) -> bool:
        return all(self.values.get(n) is not None and ir.constant_value(self.values[n]) is not None for n in names)

    def scalar(self, name: str) -> float | None:
        """The value of a constant holding a single number (shape [] or [1]), else None."""
        value = self.value(name)
        if value is None or value.size != 1 or value.ndim > 1:
            return None
        return value.reshape(-1)[0].item()

    def dtype(self, name: str) -> np.dtype | None:
        tensor = self.values.get(name)
        if tensor is None or tensor.dtype is None:
            return None
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            return None

    def shape(self, name: str) -> tuple[int | str, ...] | None:
        """The shape as shape inference left it (ints, symbolic names), or None when unknown."""
        tensor = self.values.get(name)
        return None if tensor is None or tensor.shape is None else tuple(tensor.shape)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.values.get(name)
        return None if tensor is None else ir.static_shape(tensor)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)


# ---------------------------------------------------------------------------------------------
# Rewrites: what the `op` of a rewrite function builds


class _GraphBuilder:
    """`op.Conv(x, w, b, **attrs)` in a rewrite: a new node of the graph; returns its output(s)."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, base: str):
        self.graph, self.ctx, self.base = graph, ctx, base
        self.created: list[gs.Node] = []

    def constant(self, value: np.ndarray, name: str | None = None) -> gs.Constant:
        """A new constant, named `name` (made unique) or after the matched root."""
        return ir.make_constant(self.ctx.fresh_name(name or f"{self.base}_const"), np.asarray(value))

    def can_emit(self, op: str, domain: str = "") -> bool:
        """Whether the target runs `op` at the model's opset: for rewrites that pick among forms."""
        return self.ctx.can_emit(op, domain)

    def __getattr__(self, op: str) -> Callable[..., gs.Variable | tuple[gs.Variable, ...]]:
        def make(*inputs, _domain: str | None = None, _outputs: int = 1, **attrs):
            outputs = [gs.Variable(self.ctx.fresh_name(f"{self.base}_{op}_out")) for _ in range(_outputs)]
            ins = list(inputs)
            while ins and ins[-1] is None:  # omitted trailing optional inputs are left out
                ins.pop()
            ins = [gs.Variable.empty() if t is None else t for t in ins]
            node = gs.Node(op, name=self.ctx.fresh_name(f"{self.base}_{op}"), attrs=dict(attrs), inputs=ins, outputs=outputs,
                           domain=_domain)
            self.graph.nodes.append(node)
            self.created.append(node)
            return outputs[0] if _outputs == 1 else tuple(outputs)

        return make


# ---------------------------------------------------------------------------------------------
# Rules and the driver


class Rule:
    """A pattern (or several alternatives of one, e.g. the forms different exporters write), the
    rewrite that replaces what it matches, and the check that says when that is legal. Forms are
    tried in order (within a function: `either`'s first form first), the first that passes wins.

    `rewrite(op, m)` returns the tensor (or tuple of tensors) that replaces the root's output(s);
    None declines the match after all (for a reason only computing the rewrite reveals).
    """

    def __init__(
        self,
        pattern: Callable | Sequence[Callable],
        rewrite: Callable[[Any, Match], Any],
        check: Callable[[Match], bool] | None = None,
        *,
        name: str | None = None,
        emits: Sequence[str | tuple[str, str]] = (),
        cost: bool = False,
    ):
        functions = [pattern] if callable(pattern) else list(pattern)
        self.roots = [root for fn in functions for root in _trace(fn)]
        self.root_ops = frozenset(root.op for root in self.roots)
        self.params = list(dict.fromkeys(p for fn in functions for p in list(inspect.signature(fn).parameters)[1:]))
        shadowed = [p for p in self.params if hasattr(Match, p) or p in Match.__dataclass_fields__]
        if shadowed:
            raise TypeError(f"pattern parameter(s) {shadowed} shadow Match attributes (m.{shadowed[0]}); rename them")
        self.rewrite = rewrite
        self.check = check
        self.name = name or functions[0].__name__
        # The ops the rewrite creates ("Op" or ("Op", "domain")): the rule runs only where the
        # target may emit them all at the model's opset (PassContext.can_emit).
        self.emits = [(e, "") if isinstance(e, str) else tuple(e) for e in emits]
        # True: a match is rewritten only where the target's cost model predicts the rewrite is
        # faster (PassContext.cost); each decision, kept or declined, is reported with its reason.
        self.cost = cost

    def match(self, node: gs.Node, graph: gs.Graph, scope: _Scope) -> Match | None:
        """The first way `node` roots a match that passes the check."""
        for root in self.roots:
            if root.op != node.op:
                continue
            for m in _match_root(root, node, graph, scope):
                m.values = {**dict.fromkeys(self.params), **m.values}
                m.ctx = scope.ctx
                if self.check is None or self.check(m):
                    return m
        return None


# More forms than this in one rule is a pattern that should be split (matching tries each in turn).
MAX_FORMS = 256


def _trace(fn: Callable) -> list[OpPattern]:
    """Run a pattern function on Vars named after its parameters, once per combination of the
    choices its `either`/`optional` calls make; the op each run returns is a root."""
    params = list(inspect.signature(fn).parameters)[1:]
    roots: list[OpPattern] = []
    decisions: list[int] = []
    while True:
        builder = _PatternBuilder(decisions)
        out = fn(builder, *(Var(p) for p in params))
        if not isinstance(out, OpOutput):
            raise TypeError(f"pattern {fn.__name__} must return an op (op.Something(...)), not {type(out).__name__}")
        roots.append(out.pattern)
        if len(roots) > MAX_FORMS:
            raise TypeError(f"pattern {fn.__name__} has more than {MAX_FORMS} forms; split it into several rules")
        # The next combination, odometer style: advance the last choice that has forms left.
        decisions = builder.decisions[: len(builder.arities)]
        while decisions and decisions[-1] + 1 == builder.arities[len(decisions) - 1]:
            decisions.pop()
        if not decisions:
            return roots
        decisions[-1] += 1


def _domain_ok(node: gs.Node, pattern: OpPattern) -> bool:
    if pattern.domain is None:
        return node.domain in ir.DEFAULT_DOMAINS
    return node.domain == pattern.domain


@functools.cache
def _attribute_default(op: str, domain: str, name: str):
    """The default the op's (newest) schema gives an attribute a node omits, or None."""
    try:
        schema = onnx.defs.get_schema(op, domain=domain)
    except Exception:  # noqa: BLE001 - an op without a schema (a custom domain) has no defaults
        return None
    attribute = schema.attributes.get(name)
    if attribute is None or not attribute.default_value.type:
        return None
    value = onnx.helper.get_attribute_value(attribute.default_value)
    return value.decode() if isinstance(value, bytes) else value


def _attrs_ok(node: gs.Node, pattern: OpPattern) -> bool:
    for key, want in pattern.attrs.items():
        # An omitted attribute has its schema's default (HardSigmoid's alpha is 0.2 unless given).
        have = node.attrs[key] if key in node.attrs else _attribute_default(node.op, node.domain or "", key)
        if callable(want):
            if not want(have):
                return False
        elif not _same_attribute(have, want):
            return False
    return True


def _same_attribute(have, want) -> bool:
    # ONNX stores float attributes as float32: 0.2 in a pattern is the 0.2 a model holds.
    if isinstance(want, float) and isinstance(have, (float, int)):
        return np.float32(have) == np.float32(want)
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(have) == len(want) and all(_same_attribute(h, w) for h, w in zip(have, want))
    return have == want


@dataclass
class _Scope:
    """The graph being rewritten, as the matcher needs it: ids of its nodes and of its outputs."""

    nodes: set[int]
    outputs: set[int]
    ctx: PassContext | None = None
    # Nodes replaced by a rewrite of this run, removed when it ends.
    gone: set[int] = field(default_factory=set)


def _match_root(root: OpPattern, node: gs.Node, graph: gs.Graph, scope: _Scope) -> Iterator[Match]:
    if node.op != root.op or not _domain_ok(node, root) or not _attrs_ok(node, root):
        return
    for values, nodes in _match_op(root, node, {}, [(root, node)], scope):
        if _self_contained(nodes, scope) and not _binds_interior(values, nodes):
            yield Match(values, [(pattern.label, n) for pattern, n in nodes], node, graph)


def _self_contained(nodes: list[tuple[OpPattern, gs.Node]], scope: _Scope) -> bool:
    """Every value a matched node below the root produces is read by matched nodes only (no other
    node, no subgraph) and is no graph output, so replacing the root removes the match entirely."""
    matched = {id(n) for _, n in nodes}
    for _, node in nodes[1:]:
        for tensor in node.outputs:
            # Nodes an earlier rewrite replaced still read their inputs until the pass ends; they
            # are no readers (so a rule can match what another rule just created, in one run).
            if id(tensor) in scope.outputs or any(id(r) not in matched and id(r) not in scope.gone for r in tensor.outputs):
                return False
    return True


def _binds_interior(values: dict, nodes: list[tuple[OpPattern, gs.Node]]) -> bool:
    """Whether a bound value is produced by a matched node: the rewrite would read a value whose
    producer it removes (`Gemm(t, t)` with t = Transpose(a) binds B to the Transpose's output)."""
    matched = {id(n) for _, n in nodes}
    return any(v is not None and any(id(producer) in matched for producer in v.inputs) for v in values.values())


def _match_op(pattern: OpPattern, node: gs.Node, values: dict, nodes: list, scope: _Scope) -> Iterator[tuple[dict, list]]:
    """Every way `node` matches `pattern` given the bindings so far (commutative orders included)."""
    orders = [pattern.inputs]
    if pattern.op in COMMUTATIVE_OPS and len(pattern.inputs) == 2:
        orders.append(pattern.inputs[::-1])
    for order in orders:
        yield from _match_inputs(order, list(node.inputs), 0, values, nodes, scope)


def _match_inputs(pins, tensors, i, values, nodes, scope) -> Iterator[tuple[dict, list]]:
    if i == len(pins):
        # Inputs the pattern does not mention must be absent.
        if any(not t.is_empty() for t in tensors[len(pins):]):
            return
        yield values, nodes
        return
    pin = pins[i]
    tensor = tensors[i] if i < len(tensors) and not tensors[i].is_empty() else None
    if isinstance(pin, Var):
        if tensor is None and not pin.optional:
            return
        if pin.name in values and values[pin.name] is not tensor:
            return
        yield from _match_inputs(pins, tensors, i + 1, {**values, pin.name: tensor}, nodes, scope)
        return
    if tensor is None:
        return
    producer = ir.producer(tensor)
    sub = pin.pattern
    if producer is None or not any(t is tensor for t in producer.outputs[pin.index : pin.index + 1]):
        return
    # An op the pattern reads twice (the mean of a normalization feeds two ops) is one node.
    seen = next((n for pattern, n in nodes if pattern is sub), None)
    if seen is not None:
        if seen is producer:
            yield from _match_inputs(pins, tensors, i + 1, values, nodes, scope)
        return
    if (
        # An outer scope's node is not this graph's to replace: inside a body it is an opaque value.
        id(producer) not in scope.nodes
        or producer.op != sub.op
        or not _domain_ok(producer, sub)
        or not _attrs_ok(producer, sub)
        or ir.subgraphs_of(producer)
        or any(n is producer for _, n in nodes)
    ):
        return
    for inner_values, inner_nodes in _match_op(sub, producer, values, nodes + [(sub, producer)], scope):
        yield from _match_inputs(pins, tensors, i + 1, inner_values, inner_nodes, scope)


class RewritePass(Pass):
    """A pass made of rules: subclass, set `rules` (and name, description, opt_level)."""

    rules: ClassVar[Sequence[Rule]] = ()
    # True when checks read shapes or dtypes (`m.shape`, `m.dtype`): shape inference runs first.
    needs_shapes: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        by_root: dict[str, list[Rule]] = {}
        for rule in self.rules:
            if not all(ctx.can_emit(op, domain) for op, domain in rule.emits):
                continue
            for op in rule.root_ops:
                by_root.setdefault(op, []).append(rule)
        worklist = deque(n for n in graph.nodes if n.op in by_root)
        if not worklist:
            return PassResult(False)
        if self.needs_shapes:
            ctx.analysis("shapes")
        outputs = {id(t) for t in graph.outputs}
        scope = _Scope({id(n) for n in graph.nodes}, outputs, ctx)
        counts: dict[str, int] = {}
        decisions: list[CostDecision] = []
        replaced: list[gs.Node] = []
        gone = scope.gone
        while worklist:
            node = worklist.popleft()
            if id(node) in gone:
                continue
            for rule in by_root.get(node.op, ()):
                m = rule.match(node, graph, scope)
                if m is None:
                    continue
                builder = _GraphBuilder(graph, ctx, node.name or node.op)
                result = rule.rewrite(builder, m)
                if result is None:
                    ir.remove_nodes(graph, builder.created)
                    continue
                new = list(result) if isinstance(result, tuple) else [result]
                # What replaces a value has its type and shape (a graph output keeps its name).
                for old, fresh in zip(node.outputs, new):
                    if fresh.dtype is None:
                        fresh.dtype = old.dtype
                    if fresh.shape is None:
                        fresh.shape = old.shape
                if rule.cost and ctx.cost is not None:
                    verdict = ctx.cost.compare([n for _, n in m.matched], builder.created)
                    decisions.append(CostDecision(rule.name, node.name, verdict.pays, verdict.before_s, verdict.after_s, verdict.reason))
                    if not verdict.pays:
                        ir.remove_nodes(graph, builder.created)
                        continue
                # The root's outputs the rewrite does not replace must be unused.
                if any(t.outputs or id(t) in outputs for t in node.outputs[len(new):]) or not all(
                    ir.replace_all_uses(graph, old, fresh) for old, fresh in zip(node.outputs, new)
                ):
                    ir.remove_nodes(graph, builder.created)
                    continue
                for _, matched in m.matched:
                    gone.add(id(matched))
                    replaced.append(matched)
                counts[rule.name] = counts.get(rule.name, 0) + 1
                scope.nodes.update(id(n) for n in builder.created)
                # What the rewrite created may match in turn. What reads its results comes later
                # in the (topological) worklist, so it is still to be visited, now reading them.
                worklist.extend(n for n in builder.created if n.op in by_root)
                break
        # What a match covers is read by nothing else (see the module docstring), so it all goes.
        ir.remove_nodes(graph, replaced)
        if counts:
            ir.toposort(graph)
        return PassResult(bool(counts), counts, decisions)
