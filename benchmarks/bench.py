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
  taken from `graphopt.optimize.optimize` on a fresh copy of the model, median of --repeat;
* onnxruntime latency of the original and of each tool's output is `graphopt.verify.latency_ms`
  (CPU provider, ORT_ENABLE_ALL as deployed, --threads intra-op threads, batch 1, inputs from
  `verify.make_inputs`): --rounds rounds, the order of the four models rotating each round, each
  round the median of --runs runs; the figure is the median of the round medians;
* fidelity: every output runs in onnxruntime with ORT's optimizer off (`verify.run`) on the same
  inputs as the original; the table shows graphopt's largest max-abs-error over all outputs.

A peer tool that fails, times out or writes a model onnxruntime rejects is shown as
"failed: <first line of its error>" and the run goes on. If graphopt itself crashes, its traceback
is printed to stderr and kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
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
from graphopt import ir, models, verify
from graphopt.optimize import optimize

TOOLS = ("graphopt", "onnxsim", "onnxslim")
HEADLINE = ("resnet50", "bert_base")  # left out by --quick unless named in --models
REPO = Path(__file__).resolve().parent.parent

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


def _first_line(text: str) -> str:
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
    try:
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
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


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - only informational
        return None


# ---------------------------------------------------------------------------------------------
# Running the CLIs


def _run_process(cmd: list[str], timeout: float) -> tuple[int | None, float, str]:
    """Run cmd in its own process group; (returncode or None on timeout, wall seconds, output).

    On timeout the whole group is killed, so a tool's own child processes do not outlive it.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return None, time.perf_counter() - t0, out.decode("utf-8", "replace")
    return proc.returncode, time.perf_counter() - t0, out.decode("utf-8", "replace")


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
        res[tool] = {"output": dst, "runs_s": [], "error": None if exe else f"{tool} not found on PATH"}
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
            rc, secs, out = _run_process(r["command"], args.timeout)
            if rc is None:
                r["error"] = f"timed out after {args.timeout:g} s"
            elif rc != 0:
                r["error"] = _first_line(out) or f"exit status {rc}"
                r["returncode"] = rc
                r["output_tail"] = out[-4000:]
            elif not dst.exists():
                r["error"] = f"exit status 0 but wrote no {dst.name}"
                r["output_tail"] = out[-4000:]
            else:
                r["runs_s"].append(secs)
            log.print(f"{secs:.2f} s" if not r["error"] else f"[red]failed[/red]: {r['error']}")
    for r in res.values():
        r["seconds"] = statistics.median(r["runs_s"]) if r["runs_s"] and not r["error"] else None
    return res


# ---------------------------------------------------------------------------------------------
# One model


def _in_process(src: Path, args: argparse.Namespace) -> dict:
    """graphopt.optimize on a fresh load of the file: Report.seconds (pipeline only), median of --repeat."""
    secs, nodes = [], None
    try:
        for _ in range(args.repeat):
            proto = ir.load_proto(src)  # consumed by optimize
            result, report = optimize(proto, target=args.target, opt_level=args.opt_level, source=str(src))
            secs.append(report.seconds)
            nodes = report.after.nodes
            del proto, result
    except Exception as exc:  # noqa: BLE001 - a graphopt crash is a finding, not the end of the run
        tb = traceback.format_exc()
        log.print(f"[red]graphopt crashed in-process on {src.name}:[/red]")
        log.print(tb, markup=False)
        return {"seconds": None, "runs_s": secs, "nodes": None, "error": _first_line(tb) or repr(exc), "traceback": tb}
    return {"seconds": statistics.median(secs), "runs_s": secs, "nodes": nodes, "error": None}


def _bench_model(name: str, work: Path, args: argparse.Namespace) -> dict:
    rec: dict[str, Any] = {"model": name, "description": models.describe(name)}
    t0 = time.perf_counter()
    proto = models.load(name)
    rec["build_s"] = time.perf_counter() - t0
    src = work / f"{name}.onnx"
    ir.save(proto, src)
    del proto
    rec["bytes"] = _file_bytes(src)
    rec["nodes"] = {"original": _nodes_in_file(src)}
    log.print(f"[bold]{name}[/bold]: built in {rec['build_s']:.1f} s, {rec['bytes'] / 2**20:.1f} MiB, {rec['nodes']['original']} nodes")

    # Optimizer time: the CLIs as whole processes, then graphopt in-process.
    clis = _time_clis(src, work, args)
    log.print("  graphopt in-process ...", end=" ")
    inproc = _in_process(src, args)
    log.print(f"{inproc['seconds']:.2f} s" if inproc["seconds"] is not None else "[red]crashed[/red]")
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
                entry["error"] = f"cannot load its output: {verify._first_line(exc)}"
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
            rec["fidelity"][tool] = {"error": verify._first_line(exc)}
            rec["optimizer"][tool]["error"] = rec["optimizer"][tool].get("error") or f"onnxruntime: {verify._first_line(exc)}"
            outputs.pop(tool)
    del reference

    # Latency: rounds with the order rotating, median of round medians.
    variants = {"original": src, **outputs}
    lat: dict[str, dict] = {v: {"rounds_ms": [], "error": None} for v in variants}
    order = list(variants)
    # Fast models get more runs, so that a round lasts at least --min-round-s and timer noise averages out.
    probe = verify.latency_ms(src, inputs, threads=args.threads, warmup=args.warmup, runs=5)
    runs = max(args.runs, min(args.max_runs, math.ceil(args.min_round_s * 1e3 / max(probe, 1e-6))))
    rec["latency_runs"] = runs
    log.print(f"  latency: {args.rounds} round(s) x {runs} runs, {args.threads} threads ...", end=" ")
    for rnd in range(args.rounds):
        k = rnd % len(order)
        for v in order[k:] + order[:k]:
            if lat[v]["error"]:
                continue
            try:
                ms = verify.latency_ms(variants[v], inputs, threads=args.threads, warmup=args.warmup, runs=runs)
                lat[v]["rounds_ms"].append(ms)
            except Exception as exc:  # noqa: BLE001
                lat[v]["error"] = verify._first_line(exc)
    for v in lat.values():
        v["ms"] = statistics.median(v["rounds_ms"]) if v["rounds_ms"] and not v["error"] else None
    rec["latency"] = lat
    log.print("done")
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
        "in-process = graphopt Report.seconds (pass pipeline only). max abs err: graphopt output vs original, all outputs.",
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
    for rec in records:
        if rec.get("error"):
            t.add_row(rec["model"], _fail(rec["error"]), *[""] * 8)
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
        )
    return t


def _latency_table(records: list[dict], args: argparse.Namespace) -> Table:
    t = Table(
        title=f"onnxruntime {ort.__version__} latency (CPU, ORT_ENABLE_ALL, {args.threads} intra-op threads, batch 1)",
        title_justify="left",
        caption=f"median of {args.rounds} round(s) (order rotating), each the median of >= {args.runs} runs "
        f"(more for fast models: >= {args.min_round_s:g} s a round); (x) = original / that, >1 = faster than the original.",
        caption_justify="left",
    )
    t.add_column("model", no_wrap=True)
    for col in ("original", "graphopt (x)", "onnxsim (x)", "onnxslim (x)"):
        t.add_column(col, justify="right")
    for rec in records:
        if rec.get("error"):
            t.add_row(rec["model"], _fail(rec["error"]), "", "", "")
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
                ms = lat[tool]["ms"]
                cells.append(f"{_ms(ms)} ({_ratio(base, ms)})")
        t.add_row(rec["model"], *cells)
    return t


# ---------------------------------------------------------------------------------------------
# Main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated zoo models (default: all: {', '.join(models.available())})")
    p.add_argument("--runs", type=int, help="onnxruntime runs per latency round, at least (default 30; --quick 10)")
    p.add_argument("--rounds", type=int, help="latency rounds, order rotating; median of round medians (default 3; --quick 1)")
    p.add_argument("--min-round-s", type=float, default=None, help="fast models get more runs so a latency round lasts this long (default 1; --quick 0.2)")
    p.add_argument("--max-runs", type=int, default=20000, help="cap on runs per latency round (default 20000)")
    p.add_argument("--warmup", type=int, default=3, help="untimed onnxruntime runs before each round (default 3)")
    p.add_argument("--repeat", type=int, help="runs of each optimizer CLI (and of the in-process optimizer); median (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("-O", "--opt-level", type=int, default=3, choices=range(0, 4), help="graphopt level (default 3)")
    p.add_argument("--target", default="x86_64", help="graphopt target (default x86_64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one optimizer process (default 600)")
    p.add_argument("--json", type=Path, help="write every figure here (rewritten after each model)")
    p.add_argument("--keep", type=Path, help="keep the model files in this folder instead of a temporary one")
    p.add_argument("--quick", action="store_true", help="skip resnet50 and bert_base (unless named in --models) and use fewer runs")
    a = p.parse_args(argv)
    a.runs = a.runs if a.runs is not None else (10 if a.quick else 30)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    a.repeat = a.repeat if a.repeat is not None else (1 if a.quick else 3)
    a.min_round_s = a.min_round_s if a.min_round_s is not None else (0.2 if a.quick else 1.0)
    for flag in ("runs", "rounds", "repeat", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be at least 1")
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
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxsim": _version("onnxsim"),
        "onnxslim": _version("onnxslim"),
        "executables": {t: _executable(t) for t in TOOLS},
        "settings": {
            "models": args.model_list,
            "opt_level": args.opt_level,
            "target": args.target,
            "repeat": args.repeat,
            "runs": args.runs,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "min_round_s": args.min_round_s,
            "max_runs": args.max_runs,
            "threads": args.threads,
            "timeout_s": args.timeout,
            "quick": args.quick,
        },
    }


def _write_json(path: Path, env: dict, records: list[dict]) -> None:
    data = _json_safe({"environment": env, "models": records})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    env = _environment(args)
    log.print(
        f"graphopt bench: {', '.join(args.model_list)} | -O{args.opt_level} | optimizer repeat {args.repeat} | "
        f"latency {args.rounds}x{args.runs} runs, {args.threads} threads | onnxruntime {ort.__version__}, "
        f"onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']} | {env['cpu_count']} CPUs"
    )
    records: list[dict] = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="graphopt-bench-")
    base = args.keep if args.keep else Path(tmp.name)
    try:
        for name in args.model_list:
            work = base / name
            work.mkdir(exist_ok=True)
            try:
                records.append(_bench_model(name, work, args))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken model must not lose the others
                tb = traceback.format_exc()
                log.print(f"[red]{name} failed:[/red]")
                log.print(tb, markup=False)
                records.append({"model": name, "error": _first_line(tb) or repr(exc), "traceback": tb})
            finally:
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
            if args.json:
                _write_json(args.json, env, records)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out_console.print(_structure_table(records, args))
    out_console.print(_latency_table(records, args))
    out_console.print(
        f"{env['cpu']}, {env['cpu_count']} CPUs; onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, "
        f"onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']}, graphopt {env['graphopt']} ({(env['git_commit'] or '?')[:10]}"
        f"{', dirty tree' if env['git_dirty'] else ''})",
        highlight=False,
    )
    if args.json:
        out_console.print(f"figures written to {args.json}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
