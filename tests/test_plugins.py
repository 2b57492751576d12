"""Pass plugins: --plugin files and modules, installed entry points, opt_level and placement in the
default pipelines, the cleanup that ends a --passes list, and the README's example run verbatim."""

from __future__ import annotations

import json
import subprocess
import textwrap
import tomllib
from pathlib import Path

import onnx
import pytest
from helpers import F, error_lines, make_model, op_types
from onnx import helper
from readme import readme_block

from graphopt import pass_manager, plugins, verify
from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, PassResult, register_pass, registered_passes
from graphopt.pipelines import _LEVEL_PASSES, build_pipeline, describe_passes, level_passes

EXIT_OK, EXIT_BAD_INPUT = 0, 2

# The pipelines as they were written out before opt_level decided them (plus fold-conv-affine,
# merge-slice and merge-concat, added since): deriving them must not change them.
O1 = ["constant-to-initializer", "eliminate-noop", "dce"]
O2 = [
    "constant-to-initializer",
    "fold-shapes",
    "fold-constants",
    "fuse-layernorm",
    "fold-conv-bn",
    "fold-conv-affine",
    "eliminate-noop",
    "merge-transpose",
    "merge-reshape",
    "merge-slice",
    "merge-concat",
    "cse",
    "dce",
]


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == EXIT_OK, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _assert_one_line_error(proc: subprocess.CompletedProcess, *mentions: str) -> str:
    assert proc.returncode == EXIT_BAD_INPUT, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    # Progress notes ("graphopt: loading ...") may come before it; the error is one line of its own.
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in mentions:
        assert word in lines[0], lines[0]
    return lines[0]


def _double_neg_model() -> onnx.ModelProto:
    """y = Neg(Neg(Relu(x))) + x: the outer Neg's readers can read Relu's output instead."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Neg", ["r"], ["n1"]),
        helper.make_node("Neg", ["n1"], ["n2"]),
        helper.make_node("Add", ["n2", "x"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 3])])


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with the README's plugin as my_passes.py and the double-Neg model as model.onnx."""
    (tmp_path / "my_passes.py").write_text(readme_block("Writing a pass"))
    onnx.save_model(_double_neg_model(), str(tmp_path / "model.onnx"))
    return tmp_path


def _assert_negs_gone(work: Path, out: str = "out.onnx") -> None:
    optimized = onnx.load(str(work / out))
    assert op_types(optimized) == ["Relu", "Add"]  # both Negs: the outer one rewired, the dead one removed
    fidelity = verify.verify(_double_neg_model(), optimized, rtol=0, atol=0)
    assert fidelity.ok, fidelity.to_dict()


@pytest.fixture
def scratch_registry(monkeypatch):
    """Passes registered (and plugin files loaded) during the test are forgotten after it, so they
    never reach the pipelines of other tests in this process."""
    registered_passes()
    monkeypatch.setattr(pass_manager, "_REGISTRY", dict(pass_manager._REGISTRY))
    monkeypatch.setattr(pass_manager, "_SOURCES", dict(pass_manager._SOURCES))
    monkeypatch.setattr(plugins, "_FILES", set())


def _pass(name: str, **attrs) -> type[Pass]:
    def run(self, graph, ctx):
        return PassResult(False)

    return type(name.title().replace("-", ""), (Pass,), {"name": name, "description": f"test pass {name}", "run": run, **attrs})


# ---------------------------------------------------------------------------------------------
# The README's example, verbatim


def test_readme_plugin_with_explicit_passes(cli, work):
    proc = cli("run", "model.onnx", "--plugin", "my_passes.py", "--passes", "eliminate-double-neg", "-o", "out.onnx", "--report", "r.json", cwd=work)
    _assert_ok(proc)
    _assert_negs_gone(work)
    report = json.loads((work / "r.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["eliminate-double-neg", "dce"]
    assert report["passes"][0]["stats"] == {"removed": 1}
    assert report["fidelity"]["ok"] is True


def test_readme_plugin_joins_the_O2_pipeline_before_cleanup(cli, work):
    proc = cli("run", "model.onnx", "--plugin", "my_passes.py", "-O2", "-o", "out.onnx", "--report", "r.json", cwd=work)
    _assert_ok(proc)
    _assert_negs_gone(work)
    names = [p["name"] for p in json.loads((work / "r.json").read_text())["passes"]]
    from graphopt import targets

    extra = {n for passes in targets.get("x86_64").extra_passes.values() for n in passes}  # the target's own, placed likewise
    assert [n for n in names if n not in extra][-3:] == ["eliminate-double-neg", "cse", "dce"]
    # -O1 does not run an opt_level 2 pass.
    _assert_ok(cli("run", "model.onnx", "--plugin", "my_passes.py", "-O1", "-o", "o1.onnx", "--report", "o1.json", cwd=work))
    assert "eliminate-double-neg" not in [p["name"] for p in json.loads((work / "o1.json").read_text())["passes"]]


def test_no_cleanup_leaves_exactly_the_named_passes(cli, work):
    proc = cli("run", "model.onnx", "--plugin", "my_passes.py", "--passes", "eliminate-double-neg", "--no-cleanup", "-o", "out.onnx", "--report", "r.json", cwd=work)
    _assert_ok(proc)
    assert [p["name"] for p in json.loads((work / "r.json").read_text())["passes"]] == ["eliminate-double-neg"]
    assert op_types(onnx.load(str(work / "out.onnx"))) == ["Relu", "Neg", "Add"]  # the dead inner Neg stays


def test_passes_lists_level_and_source(cli, work):
    (work / "opt_in.py").write_text(textwrap.dedent('''
        from graphopt.pass_manager import Pass, PassResult, register_pass

        @register_pass
        class OnlyWhenAsked(Pass):
            name = "only-when-asked"
            description = "an opt-in pass"

            def run(self, graph, ctx):
                return PassResult(False)
    '''))
    proc = cli("passes", "--plugin", "my_passes.py", "--plugin", "opt_in.py", cwd=work)
    _assert_ok(proc)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in proc.stdout.splitlines() if line.startswith("│")}
    assert rows["eliminate-double-neg"] == ["-O2", "plugin my_passes.py", "Neg(Neg(x)) -> x"]
    assert rows["only-when-asked"][:2] == ["opt-in", "plugin opt_in.py"]
    assert rows["dce"][:2] == ["-O1", "built-in"] and rows["cse"][:2] == ["-O2", "built-in"]


# ---------------------------------------------------------------------------------------------
# Installed packages: entry points in the graphopt.passes group


def _install(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """What pip would leave in site-packages: the modules and a dist-info importlib.metadata reads."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder on the CLI subprocesses' PYTHONPATH, discovered like site-packages."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    return folder


def test_readme_package_entry_point(cli, work, site, monkeypatch):
    # The README's pyproject table, verbatim, as the entry point an installed package declares.
    declared = tomllib.loads(readme_block("Writing a pass", "toml"))["project"]["entry-points"]["graphopt.passes"]
    _install(site, "my-passes", declared, {"my_passes": (work / "my_passes.py").read_text()})
    (work / "my_passes.py").unlink()  # only the installed copy exists now

    listing = cli("passes", cwd=work)
    _assert_ok(listing)
    row = next(line for line in listing.stdout.splitlines() if "eliminate-double-neg" in line)
    assert "-O2" in row and "package my-passes" in row, row

    _assert_ok(cli("run", "model.onnx", "--passes", "eliminate-double-neg", "-o", "out.onnx", cwd=work))
    _assert_negs_gone(work)
    _assert_ok(cli("run", "model.onnx", "-o", "o2.onnx", cwd=work))  # in -O2 with no flag at all
    _assert_negs_gone(work, "o2.onnx")

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    proc = cli("run", "model.onnx", "--passes", "eliminate-double-neg", "-o", "off.onnx", cwd=work)
    _assert_one_line_error(proc, "unknown pass 'eliminate-double-neg'")


def test_entry_point_naming_a_pass_class(cli, site, tmp_path):
    module = textwrap.dedent('''
        from graphopt.pass_manager import Pass, PassResult

        class NotDecorated(Pass):
            name = "not-decorated"
            description = "registered by its entry point"

            def run(self, graph, ctx):
                return PassResult(False)
    ''')
    _install(site, "class-passes", {"nd": "class_passes:NotDecorated"}, {"class_passes": module})
    proc = cli("passes", cwd=tmp_path)
    _assert_ok(proc)
    row = next(line for line in proc.stdout.splitlines() if "not-decorated" in line)
    assert "opt-in" in row and "package class-passes" in row, row


@pytest.mark.parametrize(
    ("target", "modules", "mentions"),
    [
        ("broken_passes", {"broken_passes": "import no_such_module_anywhere\n"}, ["ModuleNotFoundError", "no_such_module_anywhere"]),
        ("broken_passes:Missing", {"broken_passes": ""}, ["AttributeError", "Missing"]),
        ("broken_passes:VALUE", {"broken_passes": "VALUE = 3\n"}, ["neither a module nor a Pass subclass"]),
        ("broken_passes", {"broken_passes": readme_block("Writing a pass").replace("eliminate-double-neg", "dce")}, ["already registered"]),
    ],
    ids=["import-error", "missing-attribute", "not-a-pass", "name-taken"],
)
def test_broken_entry_point_is_one_line_naming_it(cli, site, tmp_path, monkeypatch, target, modules, mentions):
    _install(site, "broken-passes", {"bp": target}, modules)
    for command in (["passes"], ["run", "zoo:bert_tiny", "--no-verify", "-o", "out.onnx"]):
        line = _assert_one_line_error(cli(*command, cwd=tmp_path), "broken-passes", f"bp = {target}", *mentions)
        assert plugins.DISABLE_AUTOLOAD_ENV in line
    assert not (tmp_path / "out.onnx").exists()
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    _assert_ok(cli("passes", cwd=tmp_path))


# ---------------------------------------------------------------------------------------------
# --plugin errors: one line naming the plugin, exit 2


@pytest.mark.parametrize(
    ("spec", "source", "mentions"),
    [
        ("missing.py", None, ["no such file"]),
        ("no_such_plugin_module.sub", None, ["ModuleNotFoundError", "no_such_plugin_module"]),
        ("bad_syntax.py", "def broken(:\n", ["SyntaxError"]),
        ("bad_import.py", "import no_such_module_anywhere\n", ["ModuleNotFoundError", "no_such_module_anywhere"]),
        ("raises.py", "raise RuntimeError('plugin says no')\n", ["RuntimeError: plugin says no"]),
        ("taken.py", readme_block("Writing a pass").replace("eliminate-double-neg", "fold-constants"), ["pass name 'fold-constants' is already registered", "built-in"]),
        ("nameless.py", "from graphopt.pass_manager import Pass, register_pass\n@register_pass\nclass P(Pass):\n    pass\n", ["needs a name"]),
        ("bad_level.py", readme_block("Writing a pass").replace("opt_level = 2", "opt_level = 0"), ["opt_level 0"]),
    ],
    ids=["missing-file", "missing-module", "syntax", "import", "raises", "name-taken", "nameless", "bad-opt-level"],
)
def test_plugin_errors(cli, tmp_path, spec, source, mentions):
    if source is not None:
        (tmp_path / spec).write_text(source)
    line = _assert_one_line_error(cli("passes", "--plugin", spec, cwd=tmp_path), f"plugin {spec}", *mentions)
    assert line == _assert_one_line_error(cli("run", "zoo:bert_tiny", "--plugin", spec, "-o", "out.onnx", cwd=tmp_path))
    assert not (tmp_path / "out.onnx").exists()


def test_two_plugins_with_the_same_pass_name(cli, work):
    (work / "again.py").write_text(readme_block("Writing a pass"))
    _assert_one_line_error(
        cli("passes", "--plugin", "my_passes.py", "--plugin", "again.py", cwd=work),
        "plugin again.py", "'eliminate-double-neg' is already registered", "plugin my_passes.py",
    )


def test_plugin_by_module_name(cli, work, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(work))
    proc = cli("run", "model.onnx", "--plugin", "my_passes", "--passes", "eliminate-double-neg", "-o", "out.onnx", cwd=work)
    _assert_ok(proc)
    _assert_negs_gone(work)


def test_a_failed_plugin_leaves_no_pass_behind_and_a_file_loads_once(scratch_registry, tmp_path):
    half = tmp_path / "half.py"
    half.write_text(readme_block("Writing a pass") + "\nraise RuntimeError('broken after registering')\n")
    with pytest.raises(GraphoptError, match="broken after registering"):
        plugins.load_plugin(str(half))
    assert "eliminate-double-neg" not in registered_passes()
    half.write_text(readme_block("Writing a pass"))  # fixed: loads now, and a second time is a no-op
    plugins.load_plugin(str(half))
    plugins.load_plugin(str(half))
    assert describe_passes()["eliminate-double-neg"].source == f"plugin {half}"


# ---------------------------------------------------------------------------------------------
# opt_level and placement


def test_builtin_pipelines_are_unchanged_and_agree_with_opt_levels():
    passes = registered_passes()
    for name in _LEVEL_PASSES[2]:
        assert passes[name].opt_level in (1, 2, 3), name
        assert describe_passes()[name].source == "built-in"
    # Built-in passes added since keep their own level; the ones that were there keep their
    # levels and their order.
    assert level_passes(0) == []
    for level, before in ((1, O1), (2, O2), (3, O2)):
        names = level_passes(level)
        assert names == [n for n in _LEVEL_PASSES[2] if passes[n].opt_level <= level]
        assert [n for n in names if n in O2] == before
    assert build_pipeline(2).pass_names() == level_passes(2)


def test_a_pass_without_opt_level_is_opt_in(scratch_registry):
    register_pass(_pass("test-opt-in"))
    assert describe_passes()["test-opt-in"].level == "opt-in"
    assert all("test-opt-in" not in level_passes(level) for level in (1, 2, 3))
    assert build_pipeline(2, only=["test-opt-in"]).pass_names() == ["test-opt-in", "dce"]


def test_plugin_passes_go_before_the_trailing_cleanup(scratch_registry):
    register_pass(_pass("test-level-2", opt_level=2))
    register_pass(_pass("test-level-1", opt_level=1))
    assert level_passes(1)[-2:] == ["test-level-1", "dce"]
    assert level_passes(2)[-4:] == ["test-level-1", "test-level-2", "cse", "dce"]
    assert [n for n in level_passes(3) if registered_passes()[n].opt_level < 3] == level_passes(2)
    assert describe_passes()["test-level-2"].level == "-O2"


def test_run_after_places_a_pass_after_the_named_one(scratch_registry):
    register_pass(_pass("test-after-fold", opt_level=2, run_after="fold-constants"))
    register_pass(_pass("test-after-that", opt_level=1, run_after="test-after-fold"))
    order = level_passes(2)
    assert order[order.index("fold-constants") + 1 : order.index("fold-constants") + 3] == ["test-after-fold", "test-after-that"]
    # At -O1 the anchor does not run, and the pass keeps its place among those that do.
    o1 = level_passes(1)
    assert o1.index("constant-to-initializer") < o1.index("test-after-that") < o1.index("eliminate-noop")


@pytest.mark.parametrize(
    ("anchors", "message"),
    [
        ({"test-a": "no-such-pass"}, "pass 'test-a' (test_plugins) has run_after = 'no-such-pass', which is not a registered pass"),
        ({"test-a": "test-opt-in"}, "'test-opt-in', which is opt-in"),
        ({"test-a": "test-b", "test-b": "test-a"}, "run_after cycle"),
        ({"test-a": "test-b", "test-b": "nope"}, "pass 'test-b' (test_plugins) has run_after = 'nope'"),
    ],
    ids=["unknown", "opt-in", "cycle", "root-cause"],
)
def test_run_after_errors(scratch_registry, anchors, message):
    register_pass(_pass("test-opt-in"))
    for name, anchor in anchors.items():
        register_pass(_pass(name, opt_level=2, run_after=anchor))
    for call in (lambda: build_pipeline(2), describe_passes):
        with pytest.raises(GraphoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert build_pipeline(2, only=["cse"]).pass_names() == ["cse", "dce"]  # a custom list needs no placement


def test_opt_level_and_run_after_are_checked_at_registration(scratch_registry):
    for bad in (0, 4, "2", True):
        with pytest.raises(TypeError, match="opt_level"):
            register_pass(_pass("test-bad-level", opt_level=bad))
    with pytest.raises(TypeError, match="run_after"):
        register_pass(_pass("test-bad-anchor", opt_level=2, run_after=["dce"]))
    assert "test-bad-level" not in registered_passes()


# ---------------------------------------------------------------------------------------------
# Cleanup after a custom pipeline


@pytest.mark.parametrize(
    ("only", "kwargs", "expected"),
    [
        (["cse"], {}, ["cse", "dce"]),
        (["dce"], {}, ["dce"]),
        (["dce", "cse"], {}, ["dce", "cse", "dce"]),
        (["fold-constants", "dce"], {}, ["fold-constants", "dce"]),
        (["cse"], {"cleanup": False}, ["cse"]),
        (["cse"], {"disabled": ["dce"]}, ["cse"]),
    ],
)
def test_custom_pipeline_ends_with_dce(only, kwargs, expected):
    assert build_pipeline(2, only=only, **kwargs).pass_names() == expected
    assert build_pipeline(2, **{k: v for k, v in kwargs.items() if k == "cleanup"}).pass_names()[-1] == "dce"


def test_optimize_model_ends_a_custom_list_with_dce_unless_told_not_to():
    from graphopt.optimize import optimize

    def with_dead_neg() -> onnx.ModelProto:
        nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["unused"])]
        return make_model(nodes, [helper.make_tensor_value_info("x", F, [2])], [helper.make_tensor_value_info("y", F, [2])])

    assert op_types(optimize(with_dead_neg(), passes=["eliminate-noop"])[0]) == ["Relu"]
    assert op_types(optimize(with_dead_neg(), passes=["eliminate-noop"], cleanup=False)[0]) == ["Relu", "Neg"]
