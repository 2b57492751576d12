"""ONNX backend conformance: every backend test model of the onnx wheel, optimized at -O3 per target.

    python -m tests.conformance.suite --target all              # everything, every target
    python -m tests.conformance.suite --target arm64 --sample 10 --json out.json

A case is one model with its data sets (inputs and expected outputs) and tolerances:

* ``node``: the node cases `onnx.backend.test.case.node.collect_testcases(None)` builds in memory
  (their files are not in the wheel); tolerances from the case (rtol 1e-3, atol 1e-7 from `expect`);
* ``simple``, ``pytorch-converted``, ``pytorch-operator``: ``onnx/backend/test/data/<source>/<case>/``
  (``model.onnx`` and ``test_data_set_*/{input,output}_*.pb``), tolerances from ``data.json`` when
  the case has one, else 1e-3 / 1e-7 (`onnx.backend.test.loader`);
* ``light``: ``data/light/light_<model>.onnx``, fed the runner's dummy inputs (``arange(n) / n`` in
  each input's shape) and compared with ``light_<model>_output_0.pb``, with the tolerances of the
  matching ``data/real/test_<model>/data.json`` (as `onnx.backend.test.runner` does).

For each case the original model runs first in onnxruntime (CPUExecutionProvider). A case whose
original onnxruntime cannot load, cannot run, or runs to outputs outside the case's tolerances is
*skipped* with that reason: it says nothing about graphopt. Every other case runs
``optimize(model, target=..., opt_level=3)``; the optimized model must pass ``onnx.checker`` (when
the original does) and give the expected outputs within the case's tolerances, or the case *fails*.

Both models run with onnxruntime's own graph optimizations switched off, as in `graphopt.verify`,
so that onnxruntime rewriting the graph can neither hide nor cause a difference. Outputs are
compared the way onnx's backend runner compares them: same count, same shape, same dtype, strings
exactly, numbers with ``np.testing.assert_allclose(actual, expected, rtol, atol)`` (NaN equal to
NaN), sequences element by element, an empty optional as None.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

SOURCES = ("node", "simple", "pytorch-converted", "pytorch-operator", "light")
TARGETS = ("x86_64", "arm64", "cuda")
OPT_LEVEL = 3
# The deterministic sample the CI tier runs for every target but x86_64: every 10th case, plus
# every `light` model (the only real architectures in the set).
CI_SAMPLE_EVERY = 10

DATA_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data"
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-7

PASSED, SKIPPED, FAILED = "passed", "skipped", "failed"


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    id: str  # "<source>/<name>", unique over all sources
    name: str
    source: str
    rtol: float
    atol: float
    # The model file (light) or the case folder (other on-disk sources); None for node cases.
    path: str | None = None

    def load(self) -> tuple[onnx.ModelProto, list[tuple[list[Any], list[Any]]]]:
        """A fresh copy of the model (optimize consumes it) and its data sets [(inputs, expected)].

        Inputs are in the order of the model's graph inputs; expected outputs in the order of its
        graph outputs.
        """
        if self.source == "node":
            tc = _node_cases()[self.name]
            model = onnx.ModelProto()
            model.CopyFrom(tc.model)
            data = [([_normalize(x) for x in ins], [_normalize(x) for x in outs]) for ins, outs in tc.data_sets]
            return model, data
        if self.source == "light":
            return _load_light(self.path)
        return _load_case_dir(self.path)


@functools.cache
def _node_cases() -> dict[str, Any]:
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators overflow casts and divide by zero on purpose
        collected = node_cases.collect_testcases(None)
    return {tc.name: tc for tc in collected}


@functools.cache
def all_cases() -> tuple[Case, ...]:
    """Every case, in a fixed order: node cases by name, then each on-disk source by name."""
    from onnx.backend.test.loader import load_model_tests

    cases = [
        Case(f"node/{tc.name}", tc.name, "node", tc.rtol, tc.atol)
        for tc in sorted(_node_cases().values(), key=lambda tc: tc.name)
    ]
    for source in ("simple", "pytorch-converted", "pytorch-operator"):
        found = sorted(load_model_tests(str(DATA_DIR), kind=source), key=lambda tc: tc.name)
        cases += [Case(f"{source}/{tc.name}", tc.name, source, tc.rtol, tc.atol, tc.model_dir) for tc in found]
    # The light models are the `real` cases whose url points into the wheel.
    for tc in sorted(load_model_tests(str(DATA_DIR), kind="real"), key=lambda tc: tc.name):
        prefix = "onnx/backend/test/data/light/"
        if tc.url and tc.url.startswith(prefix):
            path = DATA_DIR / "light" / tc.url[len(prefix):]
            if path.is_file():
                cases.append(Case(f"light/{path.stem}", path.stem, "light", tc.rtol, tc.atol, str(path)))
    ids = Counter(c.id for c in cases)
    duplicated = [i for i, n in ids.items() if n > 1]
    if duplicated:
        raise RuntimeError(f"duplicate case ids: {duplicated[:5]}")
    return tuple(cases)


@functools.cache
def cases_by_id() -> dict[str, Case]:
    return {c.id: c for c in all_cases()}


def select(cases: tuple[Case, ...] | list[Case], every: int | None = None) -> list[Case]:
    """A deterministic sample: every `every`-th case in the fixed order, plus every light model."""
    if not every or every <= 1:
        return list(cases)
    return [c for i, c in enumerate(cases) if i % every == 0 or c.source == "light"]


def _normalize(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if value is None or isinstance(value, np.ndarray):
        return value
    return np.asarray(value)  # numpy scalars


def _read_typed(path: str, type_proto: onnx.TypeProto) -> Any:
    """A test-data file as the runner reads it: by the type of the graph input or output it is for."""
    with open(path, "rb") as f:
        content = f.read()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(content)
        return [_normalize(v) for v in numpy_helper.to_list(seq)]
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(content)
        return _normalize(numpy_helper.to_optional(opt))
    tensor = onnx.TensorProto()
    tensor.ParseFromString(content)
    return numpy_helper.to_array(tensor)


def _load_case_dir(case_dir: str):
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    data = []
    for ds in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
        inputs = [_read_typed(os.path.join(ds, f"input_{i}.pb"), model.graph.input[i].type) for i in range(n_in)]
        outputs = [_read_typed(os.path.join(ds, f"output_{i}.pb"), model.graph.output[i].type) for i in range(n_out)]
        data.append((inputs, outputs))
    return model, data


def _dummy_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    """onnx.backend.test.runner.Runner.generate_dummy_data(random=False)."""
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise NotImplementedError(f"dummy data is float only; input '{vi.name}' is not")
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = np.prod(shape)
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _load_light(path: str):
    model = onnx.load(path)
    inits = {t.name for t in model.graph.initializer}
    # Graph inputs that are initializers too (IR 3 lists them all) are not fed; the rest get dummies.
    # Inputs are listed positionally over all graph inputs, None for the ones not fed.
    inputs = [None if vi.name in inits else _dummy_input(vi) for vi in model.graph.input]
    prefix = os.path.splitext(path)[0]
    outputs = [_read_typed(f"{prefix}_output_{i}.pb", model.graph.output[i].type) for i in range(len(model.graph.output))]
    return model, [(inputs, outputs)]


# ---------------------------------------------------------------------------------------------
# Running and comparing


class Mismatch(AssertionError):
    """Outputs differ from the expected ones; the message is one line."""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(exc).__name__
    line = _drop_source_location(line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _drop_source_location(text: str) -> str:
    """onnxruntime prefixes messages with its source file and C++ signature; keep the message."""
    import re

    m = re.search(r"/onnxruntime_src/\S+:\d+ ", text)
    if not m:
        return text
    i = text.find("(", m.end())
    if i < 0:
        return text
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            break
    rest = text[j + 1:]
    rest = re.sub(r"^( const)?( \[with [^\]]*\])?\s*", "", rest)
    return text[: m.start()] + rest


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(names: list[str], inputs: list[Any]) -> dict[str, Any]:
    """Data-set inputs by name: the i-th value feeds the i-th graph input (None: not fed)."""
    if len(inputs) > len(names):
        raise ValueError(f"data set has {len(inputs)} inputs, the model {len(names)}")
    return {name: value for name, value in zip(names, inputs) if value is not None}


def _run(sess, output_names: list[str], feeds: dict[str, Any]) -> list[Any]:
    return sess.run(output_names, feeds)


def assert_similar(expected: list[Any], actual: list[Any], rtol: float, atol: float, where: str = "output") -> None:
    """onnx.backend.test.runner.Runner.assert_similar_outputs, raising one-line Mismatch errors."""
    if len(actual) != len(expected):
        raise Mismatch(f"{len(actual)} outputs, expected {len(expected)}")
    for i, (ref, out) in enumerate(zip(expected, actual)):
        label = f"{where} {i}"
        if ref is None or out is None:
            if (ref is None) != (out is None):
                raise Mismatch(f"{label}: {'empty optional' if out is None else type(out).__name__}, expected "
                               f"{'an empty optional' if ref is None else type(ref).__name__}")
            continue
        if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
            if not isinstance(ref, (list, tuple)) or not isinstance(out, (list, tuple)):
                raise Mismatch(f"{label}: {type(out).__name__}, expected {type(ref).__name__}")
            assert_similar(list(ref), list(out), rtol, atol, where=f"{label} element")
            continue
        ref, out = np.asarray(ref), np.asarray(out)
        if out.shape != ref.shape:
            raise Mismatch(f"{label}: shape {list(out.shape)}, expected {list(ref.shape)}")
        if ref.dtype == object or out.dtype == object:
            if not np.array_equal(out, ref):
                raise Mismatch(f"{label}: strings differ ({int(np.count_nonzero(out != ref))} of {ref.size})")
            continue
        if out.dtype != ref.dtype:
            raise Mismatch(f"{label}: dtype {out.dtype}, expected {ref.dtype}")
        r = rtol
        if out.dtype.name == "bfloat16" or out.dtype.kind == "V" or "float8" in out.dtype.name or "float4" in out.dtype.name:
            if out.dtype.name == "bfloat16":
                r = max(rtol, 2**-6)  # two bfloat16 ULPs, as the runner allows
            out, ref = out.astype(np.float32), ref.astype(np.float32)
        try:
            np.testing.assert_allclose(out, ref, rtol=r, atol=atol)
        except AssertionError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = "; ".join(ln for ln in lines if ln.startswith(("Mismatched", "Max absolute", "Max relative")))
            raise Mismatch(f"{label}: not within rtol={r:g} atol={atol:g}: {detail or lines[0]}") from None


@dataclass
class Verdict:
    """What onnxruntime makes of the original model: None when it reproduces the expected outputs."""

    skip: str | None
    checker_ok: bool


@functools.cache
def original_verdict(case_id: str) -> Verdict:
    """Run the original model in onnxruntime once per case (cached across targets)."""
    case = cases_by_id()[case_id]
    model, data = case.load()  # a failure here is the harness's, not onnxruntime's: not a skip
    try:
        onnx.checker.check_model(model)
        checker_ok = True
    except Exception:  # noqa: BLE001 - the checker's verdict only decides whether we check ours
        checker_ok = False
    try:
        sess = _session(model)
    except Exception as exc:  # noqa: BLE001
        return Verdict(f"onnxruntime cannot load the original: {_first_line(exc)}", checker_ok)
    outputs = [o.name for o in model.graph.output]
    for inputs, expected in data:
        try:
            actual = _run(sess, outputs[: len(expected)], _feeds([vi.name for vi in model.graph.input], inputs))
        except Exception as exc:  # noqa: BLE001
            return Verdict(f"onnxruntime cannot run the original: {_first_line(exc)}", checker_ok)
        try:
            assert_similar(expected, actual, case.rtol, case.atol)
        except Mismatch as exc:
            return Verdict(f"onnxruntime's outputs for the original are not the expected ones: {exc}", checker_ok)
    return Verdict(None, checker_ok)


@dataclass
class Result:
    case: str
    source: str
    target: str
    status: str  # passed | skipped | failed
    reason: str | None = None  # why skipped, or the error when failed
    seconds: float = 0.0


def run_case(case: Case, target: str) -> Result:
    """Skip (onnxruntime fails the original), or optimize at -O3 and compare with the expected outputs."""
    from graphopt.optimize import optimize

    start = time.perf_counter()

    def result(status: str, reason: str | None = None) -> Result:
        return Result(case.id, case.source, target, status, reason, round(time.perf_counter() - start, 4))

    try:
        verdict = original_verdict(case.id)
    except Exception as exc:  # noqa: BLE001
        return result(FAILED, f"the harness cannot load the case: {type(exc).__name__}: {_first_line(exc)}")
    if verdict.skip is not None:
        return result(SKIPPED, verdict.skip)
    model, data = case.load()
    # The optimized model keeps the original's interface: fed and read by the original's names.
    input_names = [vi.name for vi in model.graph.input]
    output_names = [o.name for o in model.graph.output]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized, _ = optimize(model, target=target, opt_level=OPT_LEVEL)
    except Exception as exc:  # noqa: BLE001 - any exception is graphopt's failure here
        return result(FAILED, f"optimize raised {type(exc).__name__}: {_first_line(exc)}")
    if verdict.checker_ok:
        try:
            onnx.checker.check_model(optimized)
        except Exception as exc:  # noqa: BLE001
            return result(FAILED, f"optimized model fails onnx.checker: {_first_line(exc)}")
    try:
        sess = _session(optimized)
    except Exception as exc:  # noqa: BLE001
        return result(FAILED, f"onnxruntime cannot load the optimized model: {_first_line(exc)}")
    for n, (inputs, expected) in enumerate(data):
        try:
            actual = _run(sess, output_names[: len(expected)], _feeds(input_names, inputs))
        except Exception as exc:  # noqa: BLE001
            return result(FAILED, f"onnxruntime cannot run the optimized model: {_first_line(exc)}")
        try:
            assert_similar(expected, actual, case.rtol, case.atol)
        except Mismatch as exc:
            where = f"data set {n}: " if len(data) > 1 else ""
            return result(FAILED, f"{where}{exc}")
    return result(PASSED)


# ---------------------------------------------------------------------------------------------
# Command line


def skip_group(reason: str) -> str:
    """A coarse class of skip reasons for the summary (the full reason stays in the JSON)."""
    import re

    text = reason
    # Names of nodes, ops and types vary per case; keep what kind of failure it was.
    text = re.sub(r"Could not find an implementation for .*", "Could not find an implementation for <op>", text)
    text = re.sub(r"(Node|node) \([^)]*\)", "node (...)", text)
    text = re.sub(r"'[^']*'", "'...'", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    return text if len(text) <= 160 else text[:157] + "..."


def _work(args: tuple[str, tuple[str, ...]]) -> list[dict]:
    case_id, targets = args
    case = cases_by_id()[case_id]
    return [asdict(run_case(case, t)) for t in targets]


def run_all(cases: list[Case], targets: tuple[str, ...], jobs: int = 1, progress=None) -> list[dict]:
    work = [(c.id, targets) for c in cases]
    results: list[dict] = []
    if jobs <= 1:
        for item in work:
            results += _work(item)
            if progress:
                progress()
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _node_cases()  # collected once, inherited by the forked workers
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for chunk in pool.map(_work, work, chunksize=4):
            results += chunk
            if progress:
                progress()
    return results


def summarize(results: list[dict], targets: tuple[str, ...]) -> dict:
    out = {}
    for target in targets:
        mine = [r for r in results if r["target"] == target]
        skipped = [r for r in mine if r["status"] == SKIPPED]
        failed = [r for r in mine if r["status"] == FAILED]
        out[target] = {
            "run": len(mine),
            "passed": sum(r["status"] == PASSED for r in mine),
            "skipped": len(skipped),
            "failed": len(failed),
            "skip_reasons": dict(Counter(skip_group(r["reason"]) for r in skipped).most_common()),
            "failures": [{"case": r["case"], "error": r["reason"]} for r in failed],
            "skips": [{"case": r["case"], "reason": r["reason"]} for r in skipped],
            "seconds": round(sum(r["seconds"] for r in mine), 2),
        }
    return out


def _print(summary: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    overview = Table(title=f"ONNX backend conformance at -O{OPT_LEVEL}", title_justify="left")
    for col in ("target", "run", "passed", "skipped", "failed", "seconds"):
        overview.add_column(col, justify="left" if col == "target" else "right")
    for target, s in summary.items():
        style = "red" if s["failed"] else "green"
        overview.add_row(target, str(s["run"]), str(s["passed"]), str(s["skipped"]),
                         f"[{style}]{s['failed']}[/{style}]", f"{s['seconds']:.1f}")
    for target, s in summary.items():
        if s["skip_reasons"]:
            table = Table(title=f"{target}: skipped ({s['skipped']}), onnxruntime fails the original", title_justify="left")
            table.add_column("count", justify="right")
            table.add_column("reason")
            for reason, count in s["skip_reasons"].items():
                table.add_row(str(count), escape(reason))
            console.print(table)
        if s["failures"]:
            table = Table(title=f"{target}: failed ({s['failed']})", title_justify="left")
            table.add_column("case")
            table.add_column("error")
            for f in s["failures"]:
                table.add_row(escape(f["case"]), escape(f["error"] or ""))
            console.print(table)
    console.print(overview)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance.suite",
        description="Optimize every ONNX backend test model at -O3 and check it still gives the expected outputs.",
    )
    parser.add_argument("--target", default="all", choices=("all",) + TARGETS)
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="run every N-th case (in a fixed order) plus every light model")
    parser.add_argument("--source", action="append", choices=SOURCES, help="only these sources (repeatable)")
    parser.add_argument("-k", "--filter", default=None, help="only cases whose id contains this text")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the per-case results and summary here")
    args = parser.parse_args(argv)

    from onnx_graphsurgeon.logger import G_LOGGER
    from rich.console import Console

    G_LOGGER.severity = G_LOGGER.ERROR  # gs warns about every model without an ai.onnx opset
    console = Console()
    targets = TARGETS if args.target == "all" else (args.target,)
    cases = select(all_cases(), args.sample)
    if args.source:
        cases = [c for c in cases if c.source in args.source]
    if args.filter:
        cases = [c for c in cases if args.filter in c.id]
    console.print(f"{len(cases)} cases x {len(targets)} target(s), {args.jobs} job(s)", highlight=False)
    start = time.perf_counter()
    results = run_all(cases, targets, jobs=args.jobs)
    summary = summarize(results, targets)
    _print(summary, console)
    console.print(f"wall time {time.perf_counter() - start:.1f} s", highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"opt_level": OPT_LEVEL, "summary": summary, "results": results}, f, indent=1)
    return 1 if any(s["failed"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
