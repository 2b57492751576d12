"""Shared fixtures for the CLI tests: run the real `graphopt` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Generous: the slowest CLI call in the suite (resnet18 at -O2 with verification) takes a few seconds.
CLI_TIMEOUT_S = 120


def _cli_env(tmp_cache: Path, columns: int) -> dict[str, str]:
    env = dict(os.environ)
    # Plain, deterministic output: no colour codes, a fixed console width.
    for var in ("FORCE_COLOR", "CLICOLOR_FORCE", "GRAPHOPT_DEBUG", "PYTHONWARNINGS"):
        env.pop(var, None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = str(columns)
    env["LINES"] = "50"
    env["TERM"] = "dumb"
    # zoo:digits_cnn trains into a cache: never the user's ~/.cache/graphopt.
    env["GRAPHOPT_CACHE_DIR"] = str(tmp_cache)
    return env


def _runner(tmp_cache: Path, columns: int) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, cwd: str | os.PathLike | None = None, exe: list[str] | None = None, timeout: float = CLI_TIMEOUT_S,
            env_path: str | None = None):
        """env_path: a folder put first on PATH (tools the command looks up, such as a cross compiler)."""
        cmd = (exe or [sys.executable, "-m", "graphopt.cli"]) + [str(a) for a in args]
        env = _cli_env(tmp_cache, columns)
        if env_path:
            env["PATH"] = f"{env_path}{os.pathsep}{env.get('PATH', '')}"
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        # Whatever happens, a user never sees a Python traceback without --debug.
        assert "Traceback" not in proc.stdout, f"traceback on stdout of {cmd}:\n{proc.stdout}"
        assert "Traceback" not in proc.stderr, f"traceback on stderr of {cmd}:\n{proc.stderr}"
        return proc

    return run


@pytest.fixture(scope="session")
def _cli_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("graphopt-cache")


@pytest.fixture(scope="session")
def cli(_cli_cache):
    """`cli(*args, cwd=...)` runs `python -m graphopt.cli ARGS` and returns the CompletedProcess.

    The console is 200 columns wide, so tables do not wrap names.
    """
    return _runner(_cli_cache, 200)


@pytest.fixture(scope="session")
def cli_narrow(_cli_cache):
    """Like `cli` on an 80-column console (what rich assumes for a pipe): long lines would wrap."""
    return _runner(_cli_cache, 80)
