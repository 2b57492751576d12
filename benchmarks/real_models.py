#!/usr/bin/env python
"""graphopt -O3 vs onnxsim vs onnxslim on the real-model tier: node counts, and where graphopt is behind.

    python benchmarks/real_models.py                          # every available real model
    python benchmarks/real_models.py --models magika,silero_vad --json out.json
    python benchmarks/real_models.py --keep out/               # also write every tool's output there

For each model of ``tests/real_models/zoo.py`` whose package is installed:

* graphopt: ``graphopt.optimize.optimize(model, target=--target, opt_level=3)`` in this process;
* onnxsim: ``onnxsim.simplify(model)`` and onnxslim: ``onnxslim.slim(model)``, each in a child
  process (a crash or a hang of a peer must not end the run; --timeout seconds each), on the same
  model file. A peer that fails shows "failed: <first line of its error>";
* every tool's output is run in onnxruntime on the model's data sets and compared with the
  original's outputs (the tier's tolerances); one whose outputs differ is marked WRONG and left out
  of the comparison;
* nodes are counted with subgraphs (If/Loop/Scan bodies) included, like graphopt's ModelStats;
* the second table lists, per model, the op types graphopt's output has more of than the best peer
  (the peer with the fewest nodes), each classified as **shape** (shape arithmetic: Shape, Size,
  Gather/Slice/Concat/arithmetic on integer tensors, Unsqueeze, Squeeze, Reshape, Cast, Range,
  Expand, ConstantOfShape, Constant, ...) or **other** (compute and fusable patterns).
  An integer-typed ``Add``/``Mul``/``Gather``... is keyed ``Add:int`` so that it is never confused
  with float compute.

``--json FILE`` writes every figure (per-op histograms of each tool's output included).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench import first_error_line  # noqa: E402
from graphopt.ir import all_nodes  # noqa: E402
from graphopt.optimize import optimize  # noqa: E402
from tests.real_models import harness, zoo  # noqa: E402
from tests.real_models.shape_arithmetic import classify, op_keys  # noqa: E402

PEERS = ("onnxsim", "onnxslim")
TOOLS = ("graphopt",) + PEERS

out_console = Console(width=None if sys.stdout.isatty() else 180)
log = Console(stderr=True, highlight=False, soft_wrap=True)

_PEER_SCRIPT = r"""
import sys, onnx
tool, src, dst = sys.argv[1:4]
model = onnx.load(src)
if tool == "onnxsim":
    import onnxsim
    out, ok = onnxsim.simplify(model)
    if not ok:
        print("onnxsim: its check of the simplified model failed", file=sys.stderr)
else:
    import onnxslim
    out = onnxslim.slim(model)
onnx.save(out, dst)
"""


def _run_peer(tool: str, src: Path, dst: Path, timeout: float) -> tuple[onnx.ModelProto | None, str | None, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PEER_SCRIPT, tool, str(src), str(dst)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not dst.exists():
        return None, first_error_line(proc.stderr or proc.stdout) or f"exit code {proc.returncode}", seconds
    return onnx.load(str(dst)), None, seconds


def _bench(name: str, work: Path, args: argparse.Namespace) -> dict:
    real = zoo.load(name)
    src = work / f"{name}.onnx"
    onnx.save(real.model, str(src))
    rec: dict[str, Any] = {"model": name, "exporter": real.exporter, "nodes": {}, "errors": {}, "seconds": {}, "ops": {}}
    rec["nodes"]["original"] = sum(1 for _ in all_nodes(real.model.graph))
    outputs: dict[str, onnx.ModelProto] = {}
    start = time.perf_counter()
    try:
        optimized, _report = optimize(zoo.load(name).model, target=args.target, opt_level=3)
        outputs["graphopt"] = optimized
    except Exception:  # noqa: BLE001 - a graphopt crash is shown, and the run goes on
        tb = traceback.format_exc()
        log.print(f"[red]graphopt failed on {name}:[/red]")
        log.print(tb, markup=False)
        rec["errors"]["graphopt"] = first_error_line(tb)
    rec["seconds"]["graphopt"] = time.perf_counter() - start
    for tool in PEERS:
        model, error, seconds = _run_peer(tool, src, work / f"{name}.{tool}.onnx", args.timeout)
        rec["seconds"][tool] = seconds
        if error:
            rec["errors"][tool] = error
        else:
            outputs[tool] = model
    rec["shape_nodes"] = {"original": sum(v for k, v in op_keys(real.model).items() if classify(k) == "shape")}
    rec["wrong"] = {}
    entry = zoo.ENTRIES[name]
    for tool, model in outputs.items():
        # Every tool's output against the original on the model's data sets, with its tolerances.
        try:
            bad = [
                o.name for feeds in harness.data_sets(real)
                for o in harness.compare(real.model, model, feeds, rtol=entry.rtol, atol=entry.atol).outputs
                if not o.within_tolerance
            ]
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run is wrong too
            bad = [f"does not run: {first_error_line(str(exc))}"]
        if bad:
            rec["wrong"][tool] = sorted(set(bad))
    for tool, model in outputs.items():
        rec["nodes"][tool] = sum(1 for _ in all_nodes(model.graph))
        rec["ops"][tool] = dict(sorted(op_keys(model).items()))
        rec["shape_nodes"][tool] = sum(v for k, v in rec["ops"][tool].items() if classify(k) == "shape")
    if args.keep and "graphopt" in outputs:
        onnx.save(outputs["graphopt"], str(args.keep / f"{name}.graphopt.onnx"))
    # A peer whose outputs differ from the original's is no yardstick.
    peers = [t for t in PEERS if t in rec["nodes"] and t not in rec["wrong"]]
    rec["shape_gap"] = (
        rec["shape_nodes"]["graphopt"] - min(rec["shape_nodes"][p] for p in peers) if peers and "graphopt" in rec["nodes"] else None
    )
    rec["best_peer"] = min(peers, key=lambda t: rec["nodes"][t]) if peers else None
    rec["gap"] = {}
    if rec["best_peer"] and "graphopt" in rec["ops"]:
        mine, theirs = collections.Counter(rec["ops"]["graphopt"]), collections.Counter(rec["ops"][rec["best_peer"]])
        more = {k: mine[k] - theirs.get(k, 0) for k in mine if mine[k] > theirs.get(k, 0)}
        rec["gap"] = {k: {"more": v, "class": classify(k)} for k, v in sorted(more.items(), key=lambda kv: (-kv[1], kv[0]))}
    return rec


def _nodes_cell(rec: dict, tool: str) -> str:
    if tool in rec["errors"]:
        msg = rec["errors"][tool]
        msg = msg if len(msg) <= 60 else msg[:59] + "…"
        return f"[red]failed:[/red] {escape(msg)}"
    n = rec["nodes"].get(tool)
    if n is None:
        return "-"
    best = min((rec["nodes"][t] for t in TOOLS if t in rec["nodes"]), default=None)
    cell = f"[bold]{n}[/bold]" if n == best else str(n)
    cell = f"{cell} ({rec['shape_nodes'][tool]})"
    if tool in rec["wrong"]:
        cell += f" [red]WRONG: {escape(', '.join(rec['wrong'][tool]))[:40]}[/red]"
    return cell


def _nodes_table(records: list[dict], args: argparse.Namespace) -> Table:
    t = Table(
        title=f"real models: nodes (subgraphs included); graphopt -O3 --target {args.target}",
        title_justify="left",
        caption="nodes (of which shape arithmetic); bold = fewest; WRONG: outputs differ from the original's on the model's data "
        "(such a peer is left out of the gaps). shape gap: graphopt's shape-arithmetic nodes minus the fewest "
        "of either peer (> 0: graphopt leaves more). other gap: ops other than shape arithmetic that graphopt has more of than "
        "the best peer (the peer with the fewest nodes), mostly fusions.",
        caption_justify="left",
    )
    t.add_column("model", no_wrap=True)
    t.add_column("exporter")
    for col in ("original", "graphopt", "onnxsim", "onnxslim"):
        t.add_column(col, justify="right", overflow="fold")
    t.add_column("best peer")
    t.add_column("shape gap", justify="right")
    t.add_column("other gap", justify="right")
    for rec in records:
        if rec.get("error"):
            t.add_row(rec["model"], "", f"[red]failed:[/red] {escape(rec['error'])}", *[""] * 6)
            continue
        shape_gap = rec["shape_gap"] or 0
        other_gap = sum(v["more"] for v in rec["gap"].values() if v["class"] == "other")
        t.add_row(
            rec["model"], escape(rec["exporter"]), f"{rec['nodes']['original']} ({rec['shape_nodes']['original']})",
            *[_nodes_cell(rec, tool) for tool in TOOLS],
            rec["best_peer"] or "-",
            (f"[red]{shape_gap:+d}[/red]" if shape_gap > 0 else f"{shape_gap:+d}") if rec["best_peer"] else "-",
            str(other_gap) if rec["best_peer"] else "-",
        )
    return t


def _gap_table(records: list[dict]) -> Table:
    t = Table(title="ops graphopt has more of than the best peer", title_justify="left")
    t.add_column("model", no_wrap=True)
    t.add_column("best peer")
    t.add_column("shape arithmetic (op: more)", overflow="fold")
    t.add_column("other (op: more)", overflow="fold")
    for rec in records:
        if rec.get("error") or not rec.get("best_peer"):
            continue
        shape = ", ".join(f"{k} +{v['more']}" for k, v in rec["gap"].items() if v["class"] == "shape")
        other = ", ".join(f"{k} +{v['more']}" for k, v in rec["gap"].items() if v["class"] == "other")
        t.add_row(rec["model"], rec["best_peer"], escape(shape) or "-", escape(other) or "-")
    return t


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/real_models.py", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated names (default: every available real model)")
    p.add_argument("--target", default="x86_64", help="graphopt target (default x86_64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a peer may take on one model (default 600)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    p.add_argument("--keep", type=Path, default=None, help="folder to keep the tools' outputs in")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n] or zoo.names()
    unknown = [n for n in names if n not in zoo.ENTRIES]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(zoo.names())}")
    args.model_list = names
    return args


def _write_json(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"models": records}, indent=2, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    skipped: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-real-") as tmp:
        for name in args.model_list:
            missing = zoo.ENTRIES[name].available()
            if missing:
                skipped.append((name, missing))
                continue
            log.print(f"{name} ...")
            work = Path(args.keep or tmp)
            try:
                records.append(_bench(name, work, args))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken model must not lose the others
                tb = traceback.format_exc()
                log.print(tb, markup=False)
                records.append({"model": name, "error": first_error_line(tb) or repr(exc)})
            if args.json:
                _write_json(args.json, records)
    out_console.print(_nodes_table(records, args))
    out_console.print(_gap_table(records))
    for name, why in skipped:
        out_console.print(f"skipped {name}: {why}", highlight=False)
    if args.json:
        _write_json(args.json, records)
        out_console.print(f"figures written to {args.json}", highlight=False)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
