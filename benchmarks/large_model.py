"""Peak memory of `graphopt run` on a model whose weights (2.5 GB by default) live in external data.

    python benchmarks/large_model.py [--gb 2.5] [--dir DIR] [--verify]

Builds a stack of MatMul layers with seeded weights (plus no-ops and constant subexpressions for
the passes to remove), writes it with external data, runs the CLI on it in a child process and
reports the child's peak resident memory as a multiple of the weight bytes. The goal is < 2x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import export, ir

SIDE = 4096  # one 4096 x 4096 fp32 weight = 64 MiB


def build(path: Path, total_bytes: int) -> int:
    rng = np.random.default_rng(0)
    layers = max(1, round(total_bytes / (SIDE * SIDE * 4)))
    x = gs.Variable("x", dtype=np.float32, shape=[1, SIDE])
    nodes, current = [], x
    for i in range(layers):
        w = gs.Constant(f"layer{i}.weight", rng.standard_normal((SIDE, SIDE), dtype=np.float32) * (1 / SIDE**0.5))
        mm = gs.Variable(f"layer{i}.mm", dtype=np.float32)
        ident = gs.Variable(f"layer{i}.id", dtype=np.float32)
        scale = gs.Variable(f"layer{i}.scale", dtype=np.float32)
        out = gs.Variable(f"layer{i}.out", dtype=np.float32)
        two = gs.Constant(f"layer{i}.two", np.array(2.0, np.float32))
        half = gs.Constant(f"layer{i}.half", np.array(0.5, np.float32))
        nodes += [
            gs.Node("MatMul", f"layer{i}/MatMul", inputs=[current, w], outputs=[mm]),
            gs.Node("Identity", f"layer{i}/Identity", inputs=[mm], outputs=[ident]),
            gs.Node("Mul", f"layer{i}/scale", inputs=[two, half], outputs=[scale]),  # folds to 1.0
            gs.Node("Mul", f"layer{i}/Mul", inputs=[ident, scale], outputs=[out]),
        ]
        current = out
    current.shape = [1, SIDE]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[current], opset=17)
    model = ir.Model(graph=graph, ir_version=8, opset_imports={"": 17})
    export.save(model, path, external_data=True)
    return layers * SIDE * SIDE * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.5)
    parser.add_argument("--dir")
    parser.add_argument("--verify", action="store_true", help="also verify in onnxruntime (adds its sessions' memory)")
    parser.add_argument("--build-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        print(build(Path(args.build_only), int(args.gb * 1e9)))
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="graphopt-large-"))
    source = folder / "large.onnx"
    start = time.perf_counter()
    # Built in a child process: a child forked from a parent holding the weights would be charged
    # the parent's pages in its peak RSS until it execs.
    built = subprocess.run([sys.executable, __file__, "--gb", str(args.gb), "--build-only", str(source)], capture_output=True, text=True, check=True)
    weight_bytes = int(built.stdout.strip().splitlines()[-1])
    print(f"built {source} with {weight_bytes / 1e9:.2f} GB of weights in {time.perf_counter() - start:.1f} s")
    out = folder / "large.opt.onnx"
    cmd = [sys.executable, "-m", "graphopt.cli", "run", str(source), "-o", str(out)]
    if not args.verify:
        cmd.append("--no-verify")
    start = time.perf_counter()
    # wait4 gives this one child's peak RSS (RUSAGE_CHILDREN would also count the builder's).
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        log.seek(0)
        output = log.read()
    seconds = time.perf_counter() - start
    returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    print(output[-3000:])
    if returncode != 0:
        sys.exit(returncode)
    data = out.with_name(out.name + ".data")
    print(f"graphopt run: {seconds:.1f} s, exit {returncode}")
    print(f"output: {out.stat().st_size / 1e6:.2f} MB model + {data.stat().st_size / 1e9:.2f} GB external data ({data.name})")
    print(f"peak RSS {peak / 1e9:.2f} GB = {peak / weight_bytes:.2f}x the weight bytes (goal < 2x)")
    for f in (source, source.with_name(source.name + ".data"), out, data):
        if not args.dir:
            f.unlink(missing_ok=True)
    if not args.dir:
        os.rmdir(folder)


if __name__ == "__main__":
    main()
