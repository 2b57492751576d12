"""Run what `graphopt run --backend tvm` built: `load(path)` returns a callable with the ONNX
model's inputs and outputs.

    model = graphopt.runtime.load("resnet50.opt.so")      # or its manifest, resnet50.opt.so.json
    outputs = model({"input": x})                         # {output name: numpy array}

Needs Apache TVM's runtime (`pip install 'graphopt[tvm]'`, or the aarch64 wheels on an arm64
machine) and nothing else of graphopt's dependencies, so that the artifact can run where
onnxruntime does not: this module imports only the standard library, numpy and tvm.

It runs on every physical core the process may use, as onnxruntime does (`TVM_NUM_THREADS`, when
set, wins).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MANIFEST_FORMAT = "graphopt-tvm"  # targets/backends/tvm.py writes it


def physical_cores() -> int:
    """The physical cores among the CPUs this process may run on (hardware threads of one core
    count once); the number of CPUs where the topology cannot be read."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(allowed)
    return max(1, len(cores))


def use_physical_cores() -> int:
    """Sets `TVM_NUM_THREADS` to `physical_cores()` unless it is set already; returns the count.

    TVM sizes a thread's pool once, at its first parallel call, from that variable or else from
    half the logical CPUs (it assumes two hardware threads per core): on a machine with one
    thread per core, such as the 2-vCPU VMs here, every parallel loop ran on one core of two.
    Call it before anything runs; a pool that already exists keeps its size."""
    if not os.environ.get("TVM_NUM_THREADS"):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    return int(os.environ["TVM_NUM_THREADS"])


class CompiledModel:
    """A TVM library with its manifest: call it with {input name: array}."""

    def __init__(self, library: Path, manifest: dict):
        use_physical_cores()
        import tvm
        from tvm import relax

        self.manifest = manifest
        self.inputs = [i["name"] for i in manifest["inputs"]]
        self.outputs = [o["name"] for o in manifest["outputs"]]
        self.device = tvm.cuda(0) if manifest.get("device") == "cuda" else tvm.cpu(0)
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        self._tvm = tvm

    def __call__(self, feeds: dict | None = None, **named) -> dict[str, np.ndarray]:
        feeds = {**(feeds or {}), **named}
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs: {', '.join(missing)} (the model takes {', '.join(self.inputs)})")
        args = []
        for spec in self.manifest["inputs"]:
            x = np.ascontiguousarray(feeds[spec["name"]], dtype=spec["dtype"])
            if list(x.shape) != spec["shape"]:
                raise ValueError(f"input {spec['name']} has shape {list(x.shape)}; the library was built for {spec['shape']}")
            args.append(self._tvm.runtime.tensor(x, self.device))
        result = self._vm["main"](*args)
        values = list(result) if len(self.outputs) > 1 else [result]  # a tuple of tensors, or the one tensor
        return {name: v.numpy() for name, v in zip(self.outputs, values)}


def load(path: str | Path) -> CompiledModel:
    """The library at `path` (the .so, or its .json manifest beside it)."""
    path = Path(path)
    manifest_file = path if path.suffix == ".json" else path.with_name(path.name + ".json")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_file} is not a graphopt TVM manifest")
    return CompiledModel(manifest_file.with_name(manifest["library"]), manifest)
