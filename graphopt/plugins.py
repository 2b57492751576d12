"""Passes from outside graphopt: plugin files and modules (`--plugin`), and installed packages.

A plugin is ordinary Python that registers passes with `@register_pass` when it is imported. An
installed package offers plugins through entry points in the `graphopt.passes` group; each names
a module (importing it registers its passes) or a Pass subclass (registered as it is). They are
loaded when the pass registry is first used, as pytest loads its plugins; as pytest's
PYTEST_DISABLE_PLUGIN_AUTOLOAD does, GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD=1 skips them.

Every failure is a one-line GraphoptError that names the plugin, and a plugin that fails leaves
none of its passes behind (see pass_manager.registering_from).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Iterable
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, register_pass, registered_passes, registering_from

ENTRY_POINT_GROUP = "graphopt.passes"
DISABLE_AUTOLOAD_ENV = "GRAPHOPT_DISABLE_PLUGIN_AUTOLOAD"

# Plugin files already imported, by resolved path: naming one twice must not register its passes twice.
_FILES: set[Path] = set()


def load_plugins(specs: Iterable[str] | None) -> None:
    """Load the given plugins after the built-in and installed ones (which load even with none
    given: a broken installed plugin is then reported before any model work)."""
    registered_passes()
    if isinstance(specs, str):  # one plugin, not a sequence of one-letter names
        specs = [specs]
    for spec in specs or ():
        load_plugin(spec)


def load_plugin(spec: str) -> None:
    """Import a plugin given as a file (`my_passes.py`) or a module name (`package.module`)."""
    # The built-ins and installed plugins first, so that a clash with them is blamed on this plugin.
    registered_passes()
    is_file = spec.endswith(".py") or os.sep in spec or "/" in spec
    path = Path(spec).expanduser().resolve() if is_file else None
    if path is not None:
        if not path.exists():
            raise GraphoptError(f"plugin {spec}: no such file")
        if not path.is_file():
            raise GraphoptError(f"plugin {spec}: not a file")
        if path in _FILES:
            return
    try:
        with registering_from(f"plugin {spec}"):
            if path is not None:
                _import_file(path)
            else:
                importlib.import_module(spec)
    except Exception as exc:  # noqa: BLE001 - whatever the plugin's code raised, said in one line
        raise GraphoptError(f"plugin {spec}: {_first_line(exc)}") from None
    if path is not None:
        _FILES.add(path)


def _import_file(path: Path) -> None:
    # A private module name, unique per path: a plugin file must not shadow (or be shadowed by) a
    # module of the same name, nor two plugin files named alike collide.
    name = f"_graphopt_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError("not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    # In sys.modules while it runs, as for any import (dataclasses and pickling look it up there).
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_installed() -> None:
    """Load the `graphopt.passes` entry points of every installed distribution."""
    if os.environ.get(DISABLE_AUTOLOAD_ENV):
        return
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry.dist.name if entry.dist is not None else "an unknown distribution"
        try:
            with registering_from(f"package {dist}"):
                loaded = entry.load()
                if isinstance(loaded, type) and issubclass(loaded, Pass):
                    register_pass(loaded)
                elif not isinstance(loaded, types.ModuleType):
                    raise TypeError(f"{entry.value} is neither a module nor a Pass subclass")
        except Exception as exc:  # noqa: BLE001 - a broken installed plugin, said in one line
            raise GraphoptError(
                f"installed plugin '{entry.name} = {entry.value}' (entry point of {dist}, group {ENTRY_POINT_GROUP}): "
                f"{_first_line(exc)}; set {DISABLE_AUTOLOAD_ENV}=1 to skip installed plugins"
            ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
