"""graphopt.api: the README's Python API example verbatim, and what it promises."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
from helpers import F, copy, make_model, op_types
from onnx import helper
from readme import readme_block

from graphopt import api, models, pass_manager, plugins, verify
from graphopt.errors import GraphoptError, VerificationError
from graphopt.pass_manager import Pass, PassResult, register_pass


def _relu_neg() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["n1"]), helper.make_node("Neg", ["n1"], ["n2"]),
             helper.make_node("Identity", ["n2"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 3])], [helper.make_tensor_value_info("y", F, ["batch", 3])])


@pytest.fixture
def scratch_registry(monkeypatch):
    """Passes registered (and plugin files loaded) during the test are forgotten after it."""
    pass_manager.registered_passes()
    monkeypatch.setattr(pass_manager, "_REGISTRY", dict(pass_manager._REGISTRY))
    monkeypatch.setattr(pass_manager, "_SOURCES", dict(pass_manager._SOURCES))
    monkeypatch.setattr(plugins, "_FILES", set())


def test_readme_python_api_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_block("Python API"), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[1] == "outputs within tolerance: True"
    assert any(line.split()[:3] == ["dce", "-O1", "built-in"] for line in lines), lines
    assert lines[-1] == "['arm64', 'cuda', 'generic', 'x86_64']"
    saved = tmp_path / "bert_tiny.opt.onnx"
    onnx.checker.check_model(str(saved))
    before, after = (int(n) for n in lines[0].split()[::2][:2])
    assert after == len(onnx.load(str(saved)).graph.node) < before == len(models.load("bert_tiny").graph.node)
    fidelity = verify.verify(models.load("bert_tiny"), str(saved))
    assert fidelity.ok, fidelity.to_dict()


def test_a_model_proto_is_left_untouched_and_the_report_is_the_clis(tmp_path):
    model = _relu_neg()
    original = model.SerializeToString()
    result = api.optimize(model, passes=["eliminate-noop"])
    assert model.SerializeToString() == original
    assert op_types(result.model) == ["Relu", "Neg", "Neg"]
    assert result.fidelity.ok and result.report.fidelity is result.fidelity
    data = result.report.to_dict()
    assert [p["name"] for p in data["passes"]] == ["eliminate-noop", "dce"]
    assert data["source"] == "<ModelProto>" and data["fidelity"]["ok"] is True
    assert data["verification_inputs"]["source"] == "generated"
    size = result.save(tmp_path / "out.onnx")
    assert size == (tmp_path / "out.onnx").stat().st_size
    assert op_types(onnx.load(str(tmp_path / "out.onnx"))) == op_types(result.model)


def test_a_file_path_and_options(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_relu_neg(), str(path))
    result = api.optimize(path, opt_level=1, verify=False)
    assert result.fidelity is None
    assert op_types(result.model) == ["Relu", "Neg", "Neg"]
    assert api.optimize(str(path), passes="eliminate-noop", cleanup=False).report.to_dict()["passes"][0]["name"] == "eliminate-noop"
    assert [p.name for p in api.optimize(str(path), disable=["dce"], opt_level=1).report.passes] == ["constant-to-initializer", "eliminate-noop"]
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert api.optimize(str(path), inputs=inputs).fidelity.ok
    np.savez(tmp_path / "in.npz", **inputs)
    assert api.optimize(str(path), inputs=tmp_path / "in.npz").report.verification_inputs == {"source": str(tmp_path / "in.npz")}


def test_plugins_and_passes(scratch_registry, tmp_path):
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(readme_block("Writing a pass"))
    result = api.optimize(_relu_neg(), plugins=[str(plugin)], passes=["eliminate-double-neg"])
    assert op_types(result.model) == ["Relu", "Identity"]  # both Negs: one rewired, the dead one cleaned up
    info = api.passes()["eliminate-double-neg"]
    assert (info.level, info.source, info.description) == ("-O2", f"plugin {plugin}", "Neg(Neg(x)) -> x")
    assert set(api.targets()) == {"x86_64", "arm64", "cuda", "generic"}


def test_verification_failure_raises(scratch_registry):
    @register_pass
    class Wrong(Pass):
        name = "test-api-wrong"
        description = "test only: Relu becomes Neg"

        def run(self, graph, ctx):
            relus = [n for n in graph.nodes if n.op == "Relu"]
            for node in relus:
                node.op = "Neg"
            return PassResult(bool(relus))

    with pytest.raises(VerificationError, match="optimized model differs from the original: output 'y'"):
        api.optimize(_relu_neg(), passes=["test-api-wrong"])
    assert op_types(api.optimize(_relu_neg(), passes=["test-api-wrong"], verify=False).model)[0] == "Neg"


def test_errors_are_graphopt_errors():
    with pytest.raises(GraphoptError, match="unknown pass 'nope'"):
        api.optimize(_relu_neg(), passes=["nope"])
    with pytest.raises(GraphoptError, match="unknown target"):
        api.optimize(copy(_relu_neg()), target="riscv")
    with pytest.raises(GraphoptError, match="plugin missing.py: no such file"):
        api.optimize(_relu_neg(), plugins=["missing.py"])


def test_dims_specialize_like_the_cli():
    from graphopt import models

    result = api.optimize("zoo:digits_cnn", dims={"batch": 4})
    assert result.report.specialization.dims == {"batch": 4}
    assert [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim] == [4, 1, 8, 8]
    assert result.report.after.flops_exact and result.fidelity.ok
    assert result.report.verification_inputs["tries"] == 1  # all static now: nothing to search
    with pytest.raises(GraphoptError, match="--input-shape input: axis 1 is 1"):
        api.optimize(models.load("digits_cnn"), input_shapes={"input": [1, 3, 8, 8]})
