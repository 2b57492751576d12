"""Running graphopt's arm64 TVM libraries on an x86_64 machine: Debian's aarch64 cross compiler and
qemu-user, an aarch64 Python userland and the aarch64 TVM wheels, all without root (apt-get
download into a private folder, dpkg -x, pip download), cached in one folder.

    python -m tests.arm64_emulation DIR        # prepare DIR (about 230 MB downloaded), print its tools

then `PATH=DIR/bin:$PATH graphopt run MODEL --target arm64 --backend tvm -o model.so` links with the
cross compiler, and `run_library(DIR, "model.so", feeds)` runs the library under qemu-aarch64-static.
What was tried and measured is in ../shared/notes/arm64-emulation.md (onnxruntime's aarch64 wheels
do not run under qemu-user 7.2, so the reference is onnxruntime on x86_64).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# The cross toolchain (host packages), and qemu-user.
TOOL_PACKAGES = """qemu-user-static gcc-12-aarch64-linux-gnu binutils-aarch64-linux-gnu cpp-12-aarch64-linux-gnu
    libgcc-12-dev-arm64-cross libc6-dev-arm64-cross libc6-arm64-cross linux-libc-dev-arm64-cross libgcc-s1-arm64-cross
    libgomp1-arm64-cross libatomic1-arm64-cross libasan8-arm64-cross liblsan0-arm64-cross libtsan2-arm64-cross
    libubsan1-arm64-cross libhwasan0-arm64-cross libitm1-arm64-cross libstdc++6-arm64-cross""".split()
# An aarch64 Python 3.11 to run the TVM runtime in (about 11 MB).
PYTHON_PACKAGES = """libc6 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal libexpat1 zlib1g libssl3 libffi8
    libstdc++6 libgcc-s1 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libgomp1""".split()
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes", "psutil", "typing_extensions"]
READY = ".ready"


class Unavailable(Exception):
    """The emulation environment cannot be prepared here (no apt-get, no network, not x86_64)."""


def default_dir() -> Path:
    root = os.environ.get("GRAPHOPT_ARM64_EMULATION") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphopt" / "arm64-emulation"
    return Path(root)


def prepare(folder: Path | None = None) -> Path:
    """The prepared folder (downloading what it lacks): bin/ holds aarch64-linux-gnu-gcc and
    qemu-aarch64-static, root/ the aarch64 userland, site/ the aarch64 wheels unpacked."""
    folder = Path(folder or default_dir())
    if (folder / READY).exists():
        return folder
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None or os.uname().machine != "x86_64":
        raise Unavailable("needs Debian's apt-get and dpkg on an x86_64 machine")
    folder.mkdir(parents=True, exist_ok=True)
    tools, root = folder / "tools", folder / "root"
    _apt_download(folder / "apt-host", ["amd64", "arm64"], TOOL_PACKAGES, tools)
    _apt_download(folder / "apt-arm64", ["arm64"], PYTHON_PACKAGES, root, architecture="arm64")
    # The cross libc's linker scripts name /usr/aarch64-linux-gnu/...: point them into this folder.
    for script in (tools / "usr/aarch64-linux-gnu/lib").glob("*.so"):
        text = script.read_bytes()
        if b"GNU ld script" in text[:200]:
            script.write_bytes(text.replace(b" /usr/aarch64-linux-gnu", f" {tools}/usr/aarch64-linux-gnu".encode()))
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcc = bin_dir / "aarch64-linux-gnu-gcc"
    # The cross binutils load their own libbfd/libopcodes from the unpacked folder.
    gcc.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{tools}/usr/lib/x86_64-linux-gnu${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
                   f'exec "{tools}/usr/bin/aarch64-linux-gnu-gcc-12" "$@"\n')
    gcc.chmod(0o755)
    qemu = bin_dir / "qemu-aarch64-static"
    if not qemu.exists():
        qemu.symlink_to(tools / "usr/bin/qemu-aarch64-static")
    wheels, site = folder / "wheels", folder / "site"
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--platform", "manylinux2014_aarch64",
          "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "--implementation", "cp", "-d", str(wheels), *WHEELS])
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    (folder / READY).write_text("ok\n")
    return folder


def _apt_download(state: Path, architectures: list[str], packages: list[str], into: Path, architecture: str | None = None) -> None:
    (state / "lists/partial").mkdir(parents=True, exist_ok=True)
    (state / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
    options = [f"-oDir::State::Lists={state}/lists", f"-oDir::Cache={state}/cache", *[f"-oAPT::Architectures::={a}" for a in architectures]]
    if architecture:
        options.append(f"-oAPT::Architecture={architecture}")
    _run(["apt-get", *options, "update"], cwd=state)
    debs = state / "debs"
    debs.mkdir(exist_ok=True)
    _run(["apt-get", *options, "download", *packages], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(into)])


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(cmd[:3])} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


RUNNER = """
import sys
import numpy as np
import graphopt.runtime
model = graphopt.runtime.load(sys.argv[1])
outputs = model(dict(np.load(sys.argv[2])))
np.savez(sys.argv[3], **outputs)
"""


def run_library(folder: Path, library: str | Path, feeds: dict[str, np.ndarray], timeout: float = 900) -> dict[str, np.ndarray]:
    """The library's outputs on `feeds`, computed by the aarch64 TVM runtime under qemu-user, with
    graphopt.runtime's loader (it imports only json, numpy and tvm)."""
    import graphopt

    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="graphopt-arm64-") as tmp:
        tmp = Path(tmp)
        package = tmp / "pkg" / "graphopt"
        package.mkdir(parents=True)
        for name in ("__init__.py", "runtime.py"):
            shutil.copy(Path(graphopt.__file__).with_name(name), package / name)
        (tmp / "runner.py").write_text(RUNNER)
        np.savez(tmp / "inputs.npz", **feeds)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp / 'pkg'}:{folder / 'site'}", "PYTHONNOUSERSITE": "1", "HOME": str(tmp)}
        root = folder / "root"
        cmd = [str(folder / "bin/qemu-aarch64-static"), "-L", str(root), str(root / "usr/bin/python3.11"), str(tmp / "runner.py"),
               str(Path(library).resolve()), str(tmp / "inputs.npz"), str(tmp / "outputs.npz")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the library failed under emulation (exit {proc.returncode}): {proc.stderr[-2000:]}")
        with np.load(tmp / "outputs.npz") as outputs:
            return {name: outputs[name] for name in outputs.files}


if __name__ == "__main__":
    prepared = prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"cross compiler: {prepared / 'bin/aarch64-linux-gnu-gcc'}\nemulator: {prepared / 'bin/qemu-aarch64-static'}\n"
          f"aarch64 Python: {prepared / 'root/usr/bin/python3.11'} with {prepared / 'site'} on its path")
