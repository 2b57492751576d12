"""The TVM backend against onnxruntime on this machine, in one run: for each model, onnxruntime
(ORT_ENABLE_ALL on graphopt's -O2 onnxruntime output, all cores), TVM untuned, and TVM tuned at
each budget of --budgets (each tuned from an empty database, its tuning time recorded), all
interleaved in a fresh shuffled order each round (bench.py's `_latency`), medians of per-round
ratios to onnxruntime and the ratio of the minimums.

    python benchmarks/tvm_backend.py --models resnet18 --budgets 64,320 --rounds 30 --json tvm.json
    python benchmarks/tvm_backend.py --models resnet18 --budgets 320 --int8     # and INT8: onnxruntime's, TVM's

With --int8, graphopt's static INT8 of each model (random calibration: this times it) runs in
onnxruntime and, lowered to integer conv2d/matmul (targets/backends/tvm_int8.py), in TVM, untuned
and tuned at the same budgets.

Models: resnet18, resnet50, mobilenetv2 (zoo, batch 1) and bert_tiny (the BERT-style encoder,
[1, 16]); bert_base is also accepted, and `external:NAME`, a trained model of benchmarks/external
(fetched into --external-cache, its symbolic dims fixed at the entry's realistic `dims`), such as
external:nudenet_320n (YOLOv8n at 1x3x320x320). TVM's threads are all cores, as onnxruntime's here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from graphopt import calibration, export, models, runtime, specialize, targets, verify  # noqa: E402
from graphopt.optimize import optimize_model  # noqa: E402
from graphopt.targets.backends import tvm as tvm_backend  # noqa: E402
from graphopt.targets.backends import tvm_tuning  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenetv2", "bert_tiny", "bert_base", "external:NAME")
EXTERNAL_CACHE = Path("~/.cache/graphopt/external").expanduser()


def _load(name: str) -> onnx.ModelProto:
    """A zoo model, or `external:NAME` with its symbolic dims fixed (the TVM backend wants static shapes)."""
    if not name.startswith("external:"):
        return models.load(name)
    from benchmarks.external import models as external

    entry = external.ENTRIES[name.removeprefix("external:")]
    proto = onnx.load(str(external.fetch(entry, EXTERNAL_CACHE)))
    specialize.specialize_proto(proto, dims=entry.dims)
    return proto


class _Library:
    """A TVM library behind the InferenceSession interface `_latency` times."""

    def __init__(self, path: Path):
        self.model = runtime.load(path)

    def get_inputs(self):
        return [argparse.Namespace(name=n) for n in self.model.inputs]

    def run(self, _names, feeds):
        return list(self.model(feeds).values())


def _int8_graph(name: str, target: str, backend: str):
    """graphopt's static INT8 of the model (random calibration: this benchmark times, the accuracy
    of INT8 is benchmarks/quantize.py's), for `backend`."""
    proto = _load(name)
    rng = np.random.default_rng(0)
    inputs, _ = tvm_backend.static_signature(proto)
    samples = {i["name"]: (rng.standard_normal([CALIBRATION_SAMPLES, *i["shape"][1:]]).astype(np.float32) if i["dtype"].startswith("float")
                           else rng.integers(0, 100, [CALIBRATION_SAMPLES, *i["shape"][1:]]).astype(i["dtype"])) for i in inputs}
    data = calibration.from_arrays(samples, proto)
    graph, _ = optimize_model(proto, target=target, opt_level=2, backend=backend, quantize="int8", calibration_data=data,
                              options={"quantize_gate": False, "calibration_method": "percentile"})
    return graph


CALIBRATION_SAMPLES = 4


def bench_model(name: str, budgets: list[int], rounds: int, work: Path, target: str, int8: bool = False) -> dict:
    from benchmarks.bench import _latency

    tgt = tvm_backend.for_tvm(targets.get(target))
    fp32_ort, _ = optimize_model(_load(name), target=target, opt_level=2)
    stem = name.replace(":", "_")
    ort_path = work / f"{stem}.ort.onnx"
    export.save(fp32_ort, ort_path)
    tvm_graph, _ = optimize_model(_load(name), target=target, opt_level=2, backend="tvm")
    graphs = {"tvm": export.to_proto(tvm_graph)}
    variants: dict = {"original": str(ort_path)}
    if int8:
        int8_ort = work / f"{stem}.int8.onnx"
        export.save(_int8_graph(name, target, "onnxruntime"), int8_ort)
        variants["onnxruntime int8"] = str(int8_ort)
        graphs["tvm int8"] = export.to_proto(_int8_graph(name, target, "tvm"))
    info: dict = {}

    def build(label: str, proto, db: Path | None) -> None:
        library = work / f"{stem}.{label.replace(' ', '_')}.so"
        start = time.perf_counter()
        tvm_backend.build(proto, tgt, db, library)
        info.setdefault(label, {})["compile_s"] = round(time.perf_counter() - start, 1)
        variants[label] = _Library(library)

    for kind, proto in graphs.items():
        build(f"{kind} untuned", proto, None)
        for budget in budgets:
            db = work / f"{stem}.{kind.replace(' ', '_')}.db{budget}"
            start = time.perf_counter()
            tuned = tvm_tuning.tune(proto, tgt, db, budget)
            label = f"{kind} tuned {budget}"
            info[label] = {"tuning_s": round(time.perf_counter() - start, 1), **tuned}
            build(label, proto, db)
    feeds = verify.make_inputs(onnx.load(str(ort_path), load_external_data=False))
    settings = argparse.Namespace(threads=os.cpu_count() or 1, warmup=2, runs=rounds, max_runs=rounds, min_time_s=0.0)
    lat, _ = _latency(variants, feeds, settings, shuffle=random.Random(0))
    base = lat["original"]
    rows = {}
    for label, e in lat.items():
        if e["error"]:
            rows[label] = {"failed": e["error"]}
            continue
        rows["onnxruntime" if label == "original" else label] = {
            "median_ms": round(e["ms"], 3), "ratio_vs_onnxruntime": round(1 / e["vs_original"], 3),
            "min_ratio": round(e["min_ms"] / base["min_ms"], 3), **info.get(label, {})}
    return {"model": name, "target": tvm_backend.tvm_target(tgt), "rounds": rounds, "variants": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--budgets", default="64,320", help="tuning trials per tuned variant, comma-separated")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--target", default="x86_64")
    parser.add_argument("--int8", action="store_true", help="also graphopt's static INT8 of each model: onnxruntime's and TVM's (integer conv2d/matmul)")
    parser.add_argument("--work", help="keep the libraries and tuning databases in this folder (default: a temporary one)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="graphopt-tvm-bench-") as tmp:
        if args.work:
            tmp = args.work
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            result = bench_model(name.strip(), [int(b) for b in args.budgets.split(",") if b], args.rounds, Path(tmp), args.target, args.int8)
            results.append(result)
            print(f"\n{name} ({args.rounds} rounds, TVM target {json.dumps(result['target'])})")
            print(f"{'variant':22s} {'median ms':>10s} {'vs ORT':>8s} {'min ratio':>9s} {'tuning s':>9s} {'trials':>7s}")
            for label, row in result["variants"].items():
                if "failed" in row:
                    print(f"{label:22s} failed: {row['failed']}")
                    continue
                print(f"{label:22s} {row['median_ms']:10.3f} {row['ratio_vs_onnxruntime']:7.2f}x {row['min_ratio']:8.2f}x "
                      f"{row.get('tuning_s', ''):>9} {row.get('trials', ''):>7}")
            if args.json_path:
                Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
