#!/usr/bin/env python
"""graphopt vs onnxsim vs onnxslim on the model zoo: graph size, optimizer time, onnxruntime latency.

    python benchmarks/bench.py                                   # every zoo model
    python benchmarks/bench.py --models resnet18,bert_tiny --runs 30 --json out.json
    python benchmarks/bench.py --quick                           # no resnet50/bert_base, fewer runs

For each model, in one run:

* the zoo model is written once to a temporary folder, so all three tools read the same file;
* each optimizer is run as a whole CLI process (`graphopt run IN -o OUT -O3 --no-verify`,
  `onnxsim IN OUT`, `onnxslim IN OUT`), the three interleaved, --repeat times each; the figure is
  the median wall time (time.perf_counter around the process, start-up and file I/O included);
* graphopt's in-process optimizer time (Report.seconds: the pass pipeline only, no load/save) is
  taken from `graphopt.optimize.optimize` on a fresh load of the file, median of --repeat (in a
  fresh interpreter, so that it runs the same graphopt source as the CLI);
* onnxruntime latency of the original and of each tool's output: sessions configured like
  `graphopt.verify.latency_ms` (CPU provider, ORT_ENABLE_ALL as deployed, --threads intra-op threads,
  one inter-op thread), batch 1, inputs from `verify.make_inputs`; the four models are timed
  interleaved run by run (at least --runs runs each, more for fast models), so that the machine
  slowing down or speeding up mid-way hits all four alike; the figure is the median, the ratio the
  median of the paired original/that ratios;
* fidelity: every output runs in onnxruntime with ORT's optimizer off (`verify.run`) on the same
  inputs as the original; the table shows graphopt's largest max-abs-error over all outputs.

A peer tool that fails, times out or writes a model onnxruntime rejects is shown as
"failed: <first line of its error>" and the run goes on. If graphopt itself crashes, its traceback
is printed to stderr and kept in the JSON.

On a shared machine, the "others' CPU" columns say how much of the machine other work used while a
model was timed; --wait-quiet and --retry-busy wait for, and re-take, such timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

import graphopt
from graphopt import export, models, verify

TOOLS = ("graphopt", "onnxsim", "onnxslim")
BUSY = 0.10  # others' CPU share from which timings are flagged (and, with --retry-busy, taken again)
HEADLINE = ("resnet50", "bert_base")  # left out by --quick unless named in --models

out_console = Console(width=None if sys.stdout.isatty() else 160)
log = Console(stderr=True, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _executable(name: str) -> str | None:
    """The tool next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)|error|internal error)\b.*")


def first_error_line(text: str) -> str:
    """The line of a tool's stderr/stdout that says what went wrong.

    A Python traceback starts with "Traceback (most recent call last):", which says nothing, so for
    one we take the exception line at its end; otherwise the first line that looks like an error,
    else the first non-empty line.
    """
    lines = [_ANSI.sub("", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return ""
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        for ln in reversed(lines):
            if _EXC_LINE.match(ln):
                return ln
        return lines[-1]
    for ln in lines:
        if _EXC_LINE.match(ln):
            return ln
    return lines[0]


def _count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes, subgraphs (If/Loop/Scan bodies) included, like graphopt's own ModelStats."""
    n = 0
    for node in graph.node:
        n += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                n += _count_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                n += sum(_count_nodes(g) for g in attr.graphs)
    return n


def _nodes_in_file(path: Path) -> int:
    return _count_nodes(onnx.load_model(str(path), load_external_data=False).graph)


def _file_bytes(path: Path) -> int:
    """The model file plus any external-data file written beside it."""
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _git(*args: str) -> str | None:
    """git, run where the imported graphopt lives (None when that is not a git checkout)."""
    try:
        p = subprocess.run(["git", *args], cwd=Path(graphopt.__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _source_fingerprint() -> str:
    """A hash of the graphopt source this process imports (package, passes, targets, models), to
    tell whether the code changed while a long run went on."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for pkg in ("graphopt", "graphopt.passes", "graphopt.targets", "graphopt.models"):
        try:
            roots = list(importlib.import_module(pkg).__path__)
        except Exception:  # noqa: BLE001 - informational only
            continue
        for root in roots:
            for f in sorted(Path(root).rglob("*.py")):
                try:
                    h.update(f"{pkg}/{f.relative_to(root)}".encode())
                    h.update(f.read_bytes())
                except OSError:
                    pass
    return h.hexdigest()[:12]


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - only informational
        return None


class _OthersCPU:
    """How busy the machine was with work not ours during a measurement: (all CPU time spent, from
    /proc/stat, minus this process's and its reaped children's) / (wall time x CPUs). A figure well
    above 0 means something else was running and the timings taken meanwhile are suspect."""

    def __init__(self) -> None:
        self.start = self._snap()

    @staticmethod
    def _snap() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def fraction(self) -> float | None:
        end = self._snap()
        if self.start is None or end is None or end[2] - self.start[2] <= 0:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, others / ((end[2] - self.start[2]) * (os.cpu_count() or 1)))


def _wait_quiet(limit_s: float, threshold: float = BUSY) -> float | None:
    """Wait (up to limit_s) until other work takes under `threshold` of the machine over a 1 s look.
    Returns how long it waited, or None when it gave up."""
    if limit_s <= 0:
        return 0.0
    t0 = time.monotonic()
    announced = False
    while True:
        probe = _OthersCPU()
        time.sleep(1.0)
        busy = probe.fraction()
        if busy is None or busy < threshold:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= limit_s:
            log.print(f"  [yellow]machine still busy ({busy * 100:.0f}% others' CPU) after {limit_s:g} s; measuring anyway[/yellow]")
            return None
        if not announced:
            log.print(f"  waiting for the machine to be quiet ({busy * 100:.0f}% others' CPU) ...")
            announced = True


# ---------------------------------------------------------------------------------------------
# Running the CLIs


def _run_process(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int | None, float, float, str]:
    """Run cmd in its own process group; (returncode or None on timeout, wall s, CPU s, output).

    CPU seconds are user + system of the process and the children it waited for (less sensitive to
    other load on the machine than wall time). On timeout the whole group is killed, so a tool's own
    child processes do not outlive it.
    """
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return None, time.perf_counter() - t0, 0.0, out.decode("utf-8", "replace")
    except BaseException:  # Ctrl-C or SIGTERM: the child is in its own session, so it must be ended here
        _kill_group(proc)
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return proc.returncode, wall, cpu, out.decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tool_command(tool: str, exe: str, src: Path, dst: Path, args: argparse.Namespace) -> list[str]:
    if tool == "graphopt":
        return [exe, "run", str(src), "-o", str(dst), f"-O{args.opt_level}", "-t", args.target, "--no-verify"]
    return [exe, str(src), str(dst)]


def _time_clis(src: Path, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Each tool --repeat times, interleaved (graphopt, onnxsim, onnxslim, graphopt, ...) so that a
    drift in machine speed hits all three alike. A tool that fails once is not run again."""
    res: dict[str, dict] = {}
    for tool in TOOLS:
        exe = _executable(tool)
        dst = work / f"{src.stem}.{tool}.onnx"
        res[tool] = {"output": dst, "runs_s": [], "cpu_runs_s": [], "error": None if exe else f"{tool} not found on PATH"}
        if exe:
            res[tool]["command"] = _tool_command(tool, exe, src, dst, args)
    for i in range(args.repeat):
        for tool in TOOLS:
            r = res[tool]
            if r["error"]:
                continue
            dst: Path = r["output"]
            dst.unlink(missing_ok=True)
            dst.with_name(dst.name + ".data").unlink(missing_ok=True)
            log.print(f"  [{i + 1}/{args.repeat}] {tool} ...", end=" ")
            # GRAPHOPT_DEBUG: a graphopt crash prints its traceback instead of one line (nothing else changes)
            env = dict(os.environ, GRAPHOPT_DEBUG="1") if tool == "graphopt" else None
            rc, secs, cpu, out = _run_process(r["command"], args.timeout, env)
            if rc is None:
                r["error"] = f"timed out after {args.timeout:g} s"
            elif rc != 0:
                r["error"] = first_error_line(out) or f"exit status {rc}"
                r["returncode"] = rc
                r["output_tail"] = out[-4000:]
            elif not dst.exists():
                r["error"] = f"exit status 0 but wrote no {dst.name}"
                r["output_tail"] = out[-4000:]
            else:
                r["runs_s"].append(secs)
                r["cpu_runs_s"].append(cpu)
            log.print(f"{secs:.2f} s" if not r["error"] else f"[red]failed[/red]: {r['error']}")
            if tool == "graphopt" and r["error"] and r.get("output_tail"):
                log.print(r["output_tail"], markup=False)
    for r in res.values():
        r["seconds"] = statistics.median(r["runs_s"]) if r["runs_s"] and not r["error"] else None
        r["cpu_seconds"] = statistics.median(r["cpu_runs_s"]) if r["cpu_runs_s"] and not r["error"] else None
    return res


# ---------------------------------------------------------------------------------------------
# One model


# Run in a fresh interpreter, so that it uses the same graphopt source as the CLI runs just before it
# (the code on disk may change while a long benchmark runs) and its memory goes back when it ends.
_IN_PROCESS = r"""
import json, sys
from graphopt import loading
from graphopt.optimize import optimize
src, target, level, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
secs, nodes = [], None
for _ in range(repeat):
    proto = loading.load_proto(src)  # consumed by optimize
    result, report = optimize(proto, target=target, opt_level=level, source=src)
    secs.append(report.seconds)
    nodes = report.after.nodes
    del proto, result
print("BENCH-RESULT " + json.dumps({"runs_s": secs, "nodes": nodes}))
"""


def _in_process(src: Path, args: argparse.Namespace) -> dict:
    """graphopt.optimize on a fresh load of the file: Report.seconds (the pass pipeline only), median
    of --repeat. A crash is a finding, not the end of the run: its traceback goes to stderr and JSON."""
    cmd = [sys.executable, "-c", _IN_PROCESS, str(src), args.target, str(args.opt_level), str(args.repeat)]
    rc, _, _, out = _run_process(cmd, args.timeout * args.repeat)
    result = next((ln[len("BENCH-RESULT "):] for ln in reversed(out.splitlines()) if ln.startswith("BENCH-RESULT ")), None)
    if rc == 0 and result is not None:
        data = json.loads(result)
        return {"seconds": statistics.median(data["runs_s"]), "runs_s": data["runs_s"], "nodes": data["nodes"], "error": None}
    error = f"timed out after {args.timeout * args.repeat:g} s" if rc is None else (first_error_line(out) or f"exit status {rc}")
    log.print(f"[red]graphopt crashed in-process on {src.name}:[/red]")
    log.print(out[-8000:], markup=False)
    return {"seconds": None, "runs_s": [], "nodes": None, "error": error, "traceback": out[-8000:]}


def _ort_session(
    path: Path,
    threads: int,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_model_filepath: Path | None = None,
) -> ort.InferenceSession:
    """Configured as graphopt.verify.latency_ms does it: CPU provider, ORT_ENABLE_ALL (what a deployment
    runs with) unless `level` says otherwise, `threads` intra-op threads, one inter-op thread.
    `optimized_model_filepath`: where ORT writes the graph its optimizer made (SessionOptions')."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if optimized_model_filepath is not None:
        so.optimized_model_filepath = str(optimized_model_filepath)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _latency(
    variants: dict[str, Any], inputs: dict, args: argparse.Namespace, shuffle: random.Random | None = None
) -> tuple[dict[str, dict], int]:
    """Median latency of each variant, the variants interleaved run by run (rotating which goes first,
    or in an order drawn from `shuffle` each run when given), so that a change in machine speed during
    the measurement hits all of them alike.

    A variant is a model path (run in `_ort_session(path, args.threads)`) or an object that runs like
    an InferenceSession (`get_inputs()` with `.name`s, `run(None, feed)`): a session configured
    otherwise, or another runtime behind that interface.

    `vs_original` is the median over iterations of original_i / variant_i (paired, like the ratio of
    two interleaved benchmarks), >1 = faster than the original. Runs: at least --runs, more for fast
    models so that each variant gets at least --min-time-s of timed runs (capped at --max-runs).
    """
    lat: dict[str, dict] = {v: {"ms": None, "vs_original": None, "error": None} for v in variants}
    sessions: dict[str, ort.InferenceSession] = {}
    feeds: dict[str, dict] = {}
    for v, path in variants.items():
        try:
            sess = path if hasattr(path, "run") else _ort_session(path, args.threads)
            feed = {i.name: inputs[i.name] for i in sess.get_inputs() if i.name in inputs}
            for _ in range(max(1, args.warmup)):
                sess.run(None, feed)
            sessions[v], feeds[v] = sess, feed
        except Exception as exc:  # noqa: BLE001 - a model ORT rejects is that tool's failure
            lat[v]["error"] = verify.first_error_line(exc)
    if not sessions:
        return lat, 0
    probe_name = "original" if "original" in sessions else next(iter(sessions))
    probe = []
    for _ in range(5):
        t0 = time.perf_counter()
        sessions[probe_name].run(None, feeds[probe_name])
        probe.append(time.perf_counter() - t0)
    per_run = max(statistics.median(probe), 1e-7)
    runs = max(args.runs, min(args.max_runs, math.ceil(args.min_time_s / per_run)))
    names = list(sessions)
    samples: dict[str, list[float]] = {v: [] for v in names}
    for i in range(runs):
        k = i % len(names)
        order = names[k:] + names[:k]
        if shuffle is not None:
            shuffle.shuffle(order)
        for v in order:
            if lat[v]["error"]:
                continue
            t0 = time.perf_counter()
            try:
                sessions[v].run(None, feeds[v])
            except Exception as exc:  # noqa: BLE001
                lat[v]["error"] = verify.first_error_line(exc)
                continue
            samples[v].append((time.perf_counter() - t0) * 1e3)
    base = samples.get("original") if "original" in names and not lat["original"]["error"] else None
    for v in names:
        xs = samples[v]
        if lat[v]["error"] or not xs:
            continue
        q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else [xs[0]] * 9
        lat[v].update(ms=statistics.median(xs), mean_ms=statistics.fmean(xs), min_ms=min(xs), p10_ms=q[0], p90_ms=q[-1], runs=len(xs))
        if base is not None:
            lat[v]["vs_original"] = statistics.median(b / x for b, x in zip(base, xs) if x > 0)
            lat[v]["vs_original_of_medians"] = lat["original"]["ms"] / lat[v]["ms"] if "ms" in lat["original"] and lat["original"]["ms"] else None
    del sessions
    return lat, runs


def _bench_model(name: str, work: Path, args: argparse.Namespace) -> dict:
    rec: dict[str, Any] = {"model": name, "description": models.describe(name)}
    t0 = time.perf_counter()
    proto = models.load(name)
    rec["build_s"] = time.perf_counter() - t0
    src = work / f"{name}.onnx"
    export.save(proto, src)
    del proto
    rec["bytes"] = _file_bytes(src)
    rec["nodes"] = {"original": _nodes_in_file(src)}
    log.print(f"[bold]{name}[/bold]: built in {rec['build_s']:.1f} s, {rec['bytes'] / 2**20:.1f} MiB, {rec['nodes']['original']} nodes")

    # Optimizer time: the CLIs as whole processes, then graphopt in-process. Taken again (up to
    # --retry-busy times) while other work kept the machine busy; the quietest attempt is kept.
    rec["graphopt_source"] = _source_fingerprint()
    best = None
    for attempt in range(args.retry_busy + 1):
        _wait_quiet(args.wait_quiet)
        others = _OthersCPU()
        clis = _time_clis(src, work, args)
        log.print("  graphopt in-process ...", end=" ")
        inproc = _in_process(src, args)
        log.print(_secs(inproc["seconds"]) if inproc["seconds"] is not None else "[red]crashed[/red]")
        busy = others.fraction()
        if best is None or (busy or 0.0) < best[0]:
            best = ((busy or 0.0), busy, clis, inproc)
        if busy is None or busy < BUSY or attempt == args.retry_busy:
            break
        log.print(f"  [yellow]others' CPU {busy * 100:.0f}% while timing the optimizers; again[/yellow]")
    _, rec["others_cpu_optimizers"], clis, inproc = best
    rec["graphopt_in_process"] = inproc

    rec["optimizer"] = {}
    outputs: dict[str, Path] = {}
    for tool, r in clis.items():
        entry = {k: v for k, v in r.items() if k not in ("output",)}
        entry["command"] = " ".join(r.get("command", []))
        if not r["error"]:
            try:
                rec["nodes"][tool] = _nodes_in_file(r["output"])
                entry["bytes"] = _file_bytes(r["output"])
                outputs[tool] = r["output"]
            except Exception as exc:  # noqa: BLE001 - an unreadable output is that tool's failure
                entry["error"] = f"cannot load its output: {verify.first_error_line(exc)}"
        rec["optimizer"][tool] = entry
    if inproc["nodes"] is not None and "graphopt" in rec["nodes"] and inproc["nodes"] != rec["nodes"]["graphopt"]:
        log.print(f"  [yellow]note:[/yellow] in-process graphopt gave {inproc['nodes']} nodes, the CLI {rec['nodes']['graphopt']}")

    # Fidelity of every output against the original (ORT optimizer off, same inputs).
    inputs = verify.make_inputs(src)
    reference = verify.run(src, inputs, threads=args.threads)
    rec["fidelity"] = {}
    for tool, path in list(outputs.items()):
        try:
            fid = verify.compare(reference, verify.run(path, inputs, threads=args.threads))
            worst = max((o.max_abs_error for o in fid.outputs), default=float("nan"), key=lambda v: math.inf if math.isnan(v) else v)
            rec["fidelity"][tool] = {"ok": fid.ok, "max_abs_error": worst, "detail": fid.to_dict()}
        except Exception as exc:  # noqa: BLE001
            rec["fidelity"][tool] = {"error": verify.first_error_line(exc)}
            rec["optimizer"][tool]["error"] = rec["optimizer"][tool].get("error") or f"onnxruntime: {verify.first_error_line(exc)}"
            outputs.pop(tool)
    del reference

    # Latency: all variants interleaved run by run.
    best = None
    for attempt in range(args.retry_busy + 1):
        _wait_quiet(args.wait_quiet)
        log.print(f"  latency ({args.threads} threads) ...", end=" ")
        others = _OthersCPU()
        lat, runs = _latency({"original": src, **outputs}, inputs, args)
        busy = others.fraction()
        log.print(f"{runs} interleaved runs each")
        if best is None or (busy or 0.0) < best[0]:
            best = ((busy or 0.0), busy, lat, runs)
        if busy is None or busy < BUSY or attempt == args.retry_busy:
            break
        log.print(f"  [yellow]others' CPU {busy * 100:.0f}% while timing onnxruntime; again[/yellow]")
    _, rec["others_cpu_latency"], rec["latency"], rec["latency_runs"] = best
    rec["total_s"] = time.perf_counter() - t0
    # The sources of truth are kept; the paths are only useful with --keep.
    for tool in TOOLS:
        rec["optimizer"][tool].pop("output", None)
    return rec


# ---------------------------------------------------------------------------------------------
# Tables


def _fail(msg: str, width: int = 48) -> str:
    msg = msg if len(msg) <= width else msg[: width - 1] + "…"
    return f"[red]failed:[/red] {_escape(msg)}"


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _nodes_cell(rec: dict, tool: str) -> str:
    err = rec["optimizer"][tool].get("error") if tool in rec["optimizer"] else None
    if err:
        return "[red]failed[/red]"  # the reason is in the CLI time column
    n = rec["nodes"].get(tool)
    if n is None:
        return "-"
    n0 = rec["nodes"]["original"]
    return f"{n} ({(n - n0) / n0 * 100:+.0f}%)" if n0 else str(n)


def _secs(s: float) -> str:
    if s < 0.01:
        return f"{s * 1e3:.1f} ms"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def _ms(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    if ms < 100:
        return f"{ms:.2f} ms"
    return f"{ms:.1f} ms"


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    cell = f"{x * 100:.0f}%"
    return f"[yellow]{cell}[/yellow]" if x >= BUSY else cell


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def _time_cell(rec: dict, tool: str) -> str:
    r = rec["optimizer"][tool]
    if r.get("error"):
        return _fail(r["error"], 40)
    s = r.get("seconds")
    if s is None:
        return "-"
    if tool == "graphopt":
        return _secs(s)
    g = rec["optimizer"]["graphopt"].get("seconds") if not rec["optimizer"]["graphopt"].get("error") else None
    return f"{_secs(s)} ({_ratio(s, g)})"


def _structure_table(records: list[dict], args: argparse.Namespace) -> Table:
    t = Table(
        title=f"structure and optimizer time (graphopt -O{args.opt_level}, target {args.target})",
        title_justify="left",
        caption=f"CLI = whole process wall time, median of {args.repeat}; (x) = peer time / graphopt time, >1 = graphopt faster. "
        "in-process = graphopt Report.seconds (pass pipeline only). max abs err: graphopt output vs original, all outputs. "
        "others' CPU: share of the machine busy with work not this benchmark's meanwhile (>= 10%: timings suspect).",
        caption_justify="left",
    )
    t.add_column("model", no_wrap=True)
    t.add_column("nodes\noriginal", justify="right")
    t.add_column("nodes\ngraphopt", justify="right")
    t.add_column("nodes\nonnxsim", justify="right")
    t.add_column("nodes\nonnxslim", justify="right")
    t.add_column("graphopt\nCLI", justify="right")
    t.add_column("onnxsim\nCLI (x)", justify="right")
    t.add_column("onnxslim\nCLI (x)", justify="right")
    t.add_column("graphopt\nin-process", justify="right")
    t.add_column("graphopt\nmax abs err", justify="right")
    t.add_column("others'\nCPU", justify="right")
    for rec in records:
        if rec.get("error"):
            t.add_row(rec["model"], _fail(rec["error"]), *[""] * 9)
            continue
        ip = rec["graphopt_in_process"]
        ip_cell = _secs(ip["seconds"]) if ip["seconds"] is not None else _fail(ip["error"] or "crashed", 30)
        fid = rec["fidelity"].get("graphopt")
        if fid is None:
            fid_cell = "-"
        elif "error" in fid:
            fid_cell = _fail(fid["error"], 30)
        else:
            fid_cell = f"{fid['max_abs_error']:.1e} " + ("[green]ok[/green]" if fid["ok"] else "[red]MISMATCH[/red]")
        t.add_row(
            rec["model"],
            str(rec["nodes"]["original"]),
            _nodes_cell(rec, "graphopt"),
            _nodes_cell(rec, "onnxsim"),
            _nodes_cell(rec, "onnxslim"),
            _time_cell(rec, "graphopt"),
            _time_cell(rec, "onnxsim"),
            _time_cell(rec, "onnxslim"),
            ip_cell,
            fid_cell,
            _pct(rec.get("others_cpu_optimizers")),
        )
    return t


def _latency_table(records: list[dict], args: argparse.Namespace) -> Table:
    t = Table(
        title=f"onnxruntime {ort.__version__} latency (CPU, ORT_ENABLE_ALL, {args.threads} intra-op threads, batch 1)",
        title_justify="left",
        caption=f"median of >= {args.runs} runs, the four models interleaved run by run (fast models get more runs: "
        f">= {args.min_time_s:g} s each); (x) = median of paired original/that ratios, >1 = faster than the original.",
        caption_justify="left",
    )
    t.add_column("model", no_wrap=True)
    for col in ("original", "graphopt (x)", "onnxsim (x)", "onnxslim (x)", "runs", "others' CPU"):
        t.add_column(col, justify="right")
    for rec in records:
        if rec.get("error"):
            t.add_row(rec["model"], _fail(rec["error"]), "", "", "", "", "")
            continue
        lat = rec["latency"]
        base = lat["original"]["ms"]
        cells = [_ms(base) if base is not None else _fail(lat["original"]["error"] or "?")]
        for tool in TOOLS:
            err = rec["optimizer"][tool].get("error")
            if err:
                cells.append(_fail(err, 40))
            elif tool not in lat:
                cells.append("-")
            elif lat[tool]["error"]:
                cells.append(_fail("onnxruntime: " + lat[tool]["error"], 40))
            else:
                r = lat[tool]["vs_original"]
                cells.append(f"{_ms(lat[tool]['ms'])} ({r:.2f}x)" if r is not None else _ms(lat[tool]["ms"]))
        t.add_row(rec["model"], *cells, str(rec.get("latency_runs", "-")), _pct(rec.get("others_cpu_latency")))
    return t


# ---------------------------------------------------------------------------------------------
# Main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated zoo models (default: all: {', '.join(models.available())})")
    p.add_argument("--runs", type=int, help="onnxruntime runs per model, at least (default 30; --quick 10)")
    p.add_argument("--min-time-s", type=float, default=None, help="fast models get more runs, so each model runs at least this long (default 2; --quick 0.5)")
    p.add_argument("--max-runs", type=int, default=20000, help="cap on latency runs per model (default 20000)")
    p.add_argument("--warmup", type=int, default=3, help="untimed onnxruntime runs per model before timing (default 3)")
    p.add_argument("--repeat", type=int, help="runs of each optimizer CLI (and of the in-process optimizer); median (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("-O", "--opt-level", type=int, default=3, choices=range(0, 4), help="graphopt level (default 3)")
    p.add_argument("--target", default="x86_64", help="graphopt target (default x86_64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one optimizer process (default 600)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before timing each model, wait up to this long for other work on the machine to stop (default 0: don't)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="take a model's timings again, up to N times, when other work took >= 10%% of the machine meanwhile (default 0)")
    p.add_argument("--json", type=Path, help="write every figure here (rewritten after each model)")
    p.add_argument("--keep", type=Path, help="keep the model files in this folder instead of a temporary one")
    p.add_argument("--quick", action="store_true", help="skip resnet50 and bert_base (unless named in --models) and use fewer runs")
    a = p.parse_args(argv)
    a.runs = a.runs if a.runs is not None else (10 if a.quick else 30)
    a.repeat = a.repeat if a.repeat is not None else (1 if a.quick else 3)
    a.min_time_s = a.min_time_s if a.min_time_s is not None else (0.5 if a.quick else 2.0)
    for flag in ("runs", "repeat", "threads", "max_runs"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    known = models.available()
    if a.models:
        a.model_list = [m.strip() for m in a.models.split(",") if m.strip()]
        unknown = [m for m in a.model_list if m not in known]
        if unknown:
            p.error(f"unknown zoo model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    else:
        a.model_list = [m for m in known if not (a.quick and m in HEADLINE)]
    return a


def _environment(args: argparse.Namespace) -> dict:
    status = _git("status", "--porcelain")
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "graphopt": graphopt.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "graphopt_path": str(Path(graphopt.__file__).resolve().parent),
        "graphopt_source": _source_fingerprint(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxsim": _version("onnxsim"),
        "onnxslim": _version("onnxslim"),
        # onnxsim imports torch when it is installed, which adds to its start-up time
        "torch": _version("torch"),
        "executables": {t: _executable(t) for t in TOOLS},
        "settings": {
            "models": args.model_list,
            "opt_level": args.opt_level,
            "target": args.target,
            "repeat": args.repeat,
            "runs": args.runs,
            "warmup": args.warmup,
            "min_time_s": args.min_time_s,
            "max_runs": args.max_runs,
            "threads": args.threads,
            "timeout_s": args.timeout,
            "wait_quiet_s": args.wait_quiet,
            "retry_busy": args.retry_busy,
            "quick": args.quick,
        },
    }


def _write_json(path: Path, env: dict, records: list[dict]) -> None:
    data = _json_safe({"environment": env, "models": records})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    os.replace(tmp, path)


def run_each_model(bench_model, args: argparse.Namespace, env: dict, *, prefix: str) -> list[dict]:
    """`bench_model(name, work_dir, args)` for each of args.model_list, in a scratch folder each
    (kept under --keep DIR), a failure recorded instead of ending the run, the JSON rewritten
    after every model so an interrupted run keeps what it measured."""
    records: list[dict] = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix=prefix)
    base = args.keep if args.keep else Path(tmp.name)
    try:
        for name in args.model_list:
            work = base / name
            work.mkdir(exist_ok=True)
            try:
                records.append(bench_model(name, work, args))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken model must not lose the others
                tb = traceback.format_exc()
                log.print(f"[red]{name} failed:[/red]")
                log.print(tb, markup=False)
                records.append({"model": name, "error": first_error_line(tb) or repr(exc), "traceback": tb})
            finally:
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
                # Models of hundreds of MiB: free one before the next is built.
                gc.collect()
            if args.json:
                _write_json(args.json, env, records)
    finally:
        if tmp is not None:
            tmp.cleanup()
    env["graphopt_source_at_end"] = _source_fingerprint()
    if args.json:
        _write_json(args.json, env, records)
    return records


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Killed with SIGTERM, still remove the temporary folder (its models can be hundreds of MiB).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = _environment(args)
    log.print(
        f"graphopt bench: {', '.join(args.model_list)} | -O{args.opt_level} | optimizer repeat {args.repeat} | "
        f"latency >= {args.runs} runs, {args.threads} threads | onnxruntime {ort.__version__}, "
        f"onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']} | {env['cpu_count']} CPUs"
    )
    records = run_each_model(_bench_model, args, env, prefix="graphopt-bench-")
    out_console.print(_structure_table(records, args))
    out_console.print(_latency_table(records, args))
    print_provenance(env, records, args, f"onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']}, torch {env['torch'] or 'not installed'}")
    return 0


def print_provenance(env: dict, records: list[dict], args: argparse.Namespace, tools: str) -> None:
    """The closing lines of a benchmark: the machine and versions (`tools` names the peers), a
    warning when graphopt's source changed during the run, and where the JSON went."""
    out_console.print(
        f"{env['cpu']}, {env['cpu_count']} CPUs; onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, {tools}, "
        f"graphopt {env['graphopt']} (source {env['graphopt_source']}"
        + (f", git {env['git_commit'][:10]}{' + uncommitted changes' if env['git_dirty'] else ''}" if env["git_commit"] else ", not a git checkout")
        + ")",
        highlight=False,
    )
    seen = {env["graphopt_source"], env["graphopt_source_at_end"]} | {r["graphopt_source"] for r in records if "graphopt_source" in r}
    if len(seen) > 1:
        out_console.print(
            "[yellow]warning:[/yellow] graphopt's source changed while this ran (fingerprints "
            f"{', '.join(sorted(seen))}); the models were not all measured with the same code",
            highlight=False,
        )
    if args.json:
        out_console.print(f"figures written to {args.json}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
