"""A regular (non-editable) install must ship every package: the editable one hides a missing entry."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]) if relative.parts else name)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_the_target_data_files_are_in_the_wheel(tmp_path):
    """targets/data/*.toml (the hardware descriptions) are package data: a wheel must carry them."""
    import shutil
    import subprocess
    import sys
    import zipfile

    import pytest

    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "data/*.toml" in config["package-data"]["graphopt.targets"]
    for item in ["pyproject.toml", "README.md", *set(config["package-dir"].values())]:
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy2
        copy(ROOT / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / item).is_dir() else {}))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("graphopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"graphopt/targets/data/{p.name}" for p in (ROOT / "targets" / "data").glob("*.toml")}
    assert {"graphopt/targets/data/x86_64.toml", "graphopt/targets/data/arm64.toml",
            "graphopt/targets/data/cuda.toml", "graphopt/targets/data/generic.toml"} <= expected
    assert expected <= names, sorted(expected - names)
    assert "graphopt/targets/hardware.py" in names
