"""The pass manager: registry, composition, analysis caching, instruments and safe-mode rollback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import F, copy, make_model, op_types
from onnx import helper

from graphopt import analysis, export, loading, pass_manager
from graphopt.errors import GraphoptError
from graphopt.optimize import optimize
from graphopt.pass_manager import FixedPoint, Pass, PassContext, PassManager, PassResult, Sequential, register_pass


def _relu_chain(n=3):
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    return make_model(nodes, [helper.make_tensor_value_info("t0", F, [4])], [helper.make_tensor_value_info(f"t{n}", F, [4])])


@register_pass
class BreakEverything(Pass):
    """Deliberately wrong: turns every Relu into Neg. Registered only by this test module."""

    name = "test-break-relu"
    description = "test only: rewrite Relu to Neg (wrong on purpose)"

    def run(self, graph, ctx):
        changed = 0
        for node in graph.nodes:
            if node.op == "Relu":
                node.op = "Neg"
                changed += 1
        return PassResult(changed > 0, {"broken": changed})


def test_verify_each_rolls_back_a_pass_that_breaks_equivalence():
    model = _relu_chain()
    out, report = optimize(copy(model), passes=["test-break-relu", "dce"], verify_each=True, reference=copy(model))
    assert op_types(out) == ["Relu"] * 3
    assert [name for name, _ in report.rollbacks] == ["test-break-relu"]
    assert "moved" in report.rollbacks[0][1]
    record = next(r for r in report.passes if r.name == "test-break-relu")
    assert record.rolled_back and not record.changed


def test_without_safe_mode_the_broken_pass_lands():
    out, report = optimize(_relu_chain(), passes=["test-break-relu"])
    assert op_types(out) == ["Neg"] * 3 and not report.rollbacks


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(TypeError):

        @register_pass
        class Duplicate(Pass):
            name = "dce"
            description = "clash"

    with pytest.raises(TypeError):

        @register_pass
        class Nameless(Pass):
            description = "no name"

    with pytest.raises(GraphoptError, match="unknown pass 'nope'"):
        pass_manager.create_pass("nope")


class _CountingPass(Pass):
    name = "test-counting"
    description = "changes the model a fixed number of times"

    def __init__(self, changes):
        self.remaining = changes
        self.calls = 0

    def run(self, graph, ctx):
        self.calls += 1
        if self.remaining:
            self.remaining -= 1
            return PassResult(True, {"n": 1})
        return PassResult(False)


def test_fixed_point_stops_when_nothing_changes_and_at_its_cap():
    ctx = PassContext(model=loading.from_proto(_relu_chain()))
    settles = _CountingPass(2)
    PassManager(FixedPoint([settles], max_iterations=10)).run(ctx)
    assert settles.calls == 3  # two changing runs, then one that confirms the fixed point
    never_settles = _CountingPass(100)
    records = PassManager(FixedPoint([never_settles], max_iterations=4)).run(ctx)
    assert never_settles.calls == 4 and records[0].stats == {"n": 4}


def test_analyses_are_cached_until_a_pass_invalidates_them():
    calls = []

    @analysis.register_analysis("test-counter")
    def _counter(model, ctx):
        calls.append(1)
        return len(calls)

    class Reader(Pass):
        name = "test-reader"
        description = "reads the analysis"
        preserves = frozenset()

        def __init__(self, change):
            self.change = change

        def run(self, graph, ctx):
            ctx.analysis("test-counter")
            return PassResult(self.change)

    ctx = PassContext(model=loading.from_proto(_relu_chain()))
    PassManager(Sequential([Reader(False), Reader(False)])).run(ctx)
    assert len(calls) == 1  # unchanged graph: cached
    PassManager(Sequential([Reader(True), Reader(False)])).run(ctx)
    assert len(calls) == 2  # the changing pass invalidated it


def test_a_pass_runs_on_every_subgraph_once():
    body = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["b"])], "body", [], [helper.make_tensor_value_info("b", F, [4])]
    )
    model = make_model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body),
        ],
        [helper.make_tensor_value_info("x", F, [4])],
        [helper.make_tensor_value_info("y", F, [4])],
        [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    seen = []

    class Spy(Pass):
        name = "test-spy"
        description = "records the graphs it sees"

        def run(self, graph, ctx):
            seen.append((graph.name, ctx.is_main_graph))
            return PassResult(False)

    PassManager(Spy()).run(PassContext(model=loading.from_proto(model)))
    assert seen == [("test", True), ("body", False), ("body", False)]


def test_opset_newer_than_the_runtime_is_refused():
    from graphopt.targets import onnxruntime_max_opset

    model = _relu_chain()
    model.opset_import[0].version = onnxruntime_max_opset() + 1
    with pytest.raises(GraphoptError, match="opset"):
        optimize(model)


def test_dump_ir_writes_each_changing_pass(tmp_path):
    from graphopt import models

    optimize(models.load("bert_tiny"), opt_level=2, dump_ir=str(tmp_path))
    dumps = sorted(tmp_path.iterdir())
    assert dumps and all(p.suffix == ".onnx" for p in dumps)
    for path in dumps:
        onnx.checker.check_model(str(path))


def test_save_is_atomic_and_uses_external_data_past_the_limit(tmp_path, monkeypatch):
    from graphopt import models

    target = tmp_path / "m.onnx"
    monkeypatch.setattr(export, "PROTOBUF_LIMIT_BYTES", 1000)
    export.save(loading.from_proto(models.load("digits_cnn")), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = loading.load(target)
    assert len(loaded.graph.nodes) == 9
