#!/usr/bin/env python
"""Work removal against fp32 and the quantizers, in one run per model: channel pruning at several
FLOPs budgets, alone and combined with graphopt's INT8, beside onnxruntime's `quantize_static` and
graphopt's INT8 alone: parameters, FLOPs, onnxruntime latency and the model's own metric.

    python benchmarks/pruning.py                                  # digits_cnn, resnet50, mobilenetv2, ppocr_rec
    python benchmarks/pruning.py --models digits_cnn,resnet18 --budgets 0.3,0.5 --rounds 30 --json out.json

Models, data and metric:
* digits_cnn (trained on scikit-learn's digits): calibration = the first 512 training digits,
  metric = accuracy on the 450 held-out test digits.
* resnet50, mobilenetv2 (graphopt's zoo, random weights): 16 standard-normal calibration images,
  metric = the least cosine of the logits to fp32's over 8 other such images (no accuracy exists).
* ppocr_rec: PP-OCRv6's recognizer (rapidocr), specialized to 1 x 320 and converted to opset 13 as
  benchmarks/ocr_accuracy.py does; calibration = 64 rendered words, metric = character accuracy
  (and exact words) on 200 other words. The trained MiniLM encoder has its own table,
  benchmarks/encoder_pruning.py (heads and FFN, paraphrase retrieval).

Variants: fp32 = graphopt -O2 (-O3 for the recognizer); "ort int8" = onnxruntime's
`quantize_static` (QDQ, per-channel; Conv+MatMul with percentile calibration for the recognizer,
its best there) of fp32's file; "graphopt int8" = `--quantize int8` on x86_64 (percentile, the gate
off so the INT8 model itself is timed; no accuracy search); "pruned F" = `--prune flops=F` with the
sensitivity search and refit on the calibration data; "pruned F + int8" = both in one run. FLOPs are
the Conv/Gemm/MatMul multiply-adds per sample prune-channels counts (an INT8 row has its float
row's). Latency: onnxruntime at ORT_ENABLE_ALL, 1 thread, batch 1, all variants of a model
interleaved in a fresh random order each round (benchmarks/quantize.py's `interleaved`): the median
of variant/fp32 over the rounds, and min/min. A variant that fails to build is a row saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.quantize import cosines, graphopt_variant, interleaved, ort_quantize_static, sessions_for, try_peer  # noqa: E402
from graphopt import loading  # noqa: E402
from graphopt import models as zoo  # noqa: E402

console = Console(width=160)
MODELS = ("digits_cnn", "resnet50", "mobilenetv2", "ppocr_rec")


def weight_flops(path: Path) -> tuple[int, int]:
    """(parameters, Conv/Gemm/MatMul FLOPs per sample as prune-channels counts them)."""
    from graphopt.analysis import shapes
    from graphopt.passes.sparsity import _flops

    proto = onnx.load(str(path))
    model = loading.from_proto(proto)
    shapes.infer_shapes(model)
    return sum(int(np.prod(i.dims)) for i in proto.graph.initializer), sum(_flops(n) for n in model.graph.nodes)


class _Task:
    """A model with its calibration samples, its evaluation inputs and its metric."""

    def __init__(self, name: str):
        self.name, self.opt_level, self.peer_options = name, 2, {}
        if name == "ppocr_rec":
            self._recognizer()
            return
        self.proto = zoo.load(name)
        self.input = self.proto.graph.input[0].name
        if name == "digits_cnn":
            from graphopt.models.digits import _split

            x_train, x_test, _, y_test = _split()
            self.calib, self.evaluation, self.labels = x_train[:512], x_test, y_test
            self.metric_name = "test accuracy"
        else:
            rng = np.random.default_rng(0)
            shape = [d.dim_value or 1 for d in self.proto.graph.input[0].type.tensor_type.shape.dim]
            self.calib = rng.standard_normal((16, *shape[1:])).astype(np.float32)
            self.evaluation = rng.standard_normal((8, *shape[1:])).astype(np.float32)
            self.labels = None
            self.metric_name = "min cosine to fp32"

    def _recognizer(self):
        import onnx.version_converter

        from benchmarks import ocr_accuracy
        from graphopt.specialize import specialize_proto
        from tests.real_models import zoo as real

        original = real.load("rapidocr_rec").model
        self.characters = ["<blank>"] + next(p.value for p in original.metadata_props if p.key == "character").split("\n") + [" "]
        specialize_proto(original, dims={"DynamicDimension.0": 1, "DynamicDimension.1": ocr_accuracy.WIDTH})
        self.proto = onnx.version_converter.convert_version(original, 13)
        self.input, self.opt_level = "x", 3
        self.calib, _ = ocr_accuracy.dataset(64, seed=1)
        self.evaluation, self.texts = ocr_accuracy.dataset(200, seed=2)
        self.labels = None
        self.metric_name = "characters (words)"
        from onnxruntime.quantization import CalibrationMethod

        self.peer_options = {"op_types_to_quantize": ["Conv", "MatMul"], "calibrate_method": CalibrationMethod.Percentile}

    def metric(self, session, reference: np.ndarray | None) -> tuple[float, str, np.ndarray | None]:
        """(value, shown, outputs) of one variant's session."""
        if self.name == "ppocr_rec":
            from benchmarks import ocr_accuracy

            chars, words = ocr_accuracy.scores(session, self.evaluation, self.texts, self.characters)
            return chars, f"{chars:.2%} ({words:.0%})", None
        out = np.concatenate([session.run(None, {self.input: self.evaluation[i:i + 1]})[0] for i in range(len(self.evaluation))])
        out = out.reshape(len(self.evaluation), -1)
        if self.labels is not None:
            accuracy = float(np.mean(out.argmax(1) == self.labels))
            return accuracy, f"{accuracy:.2%}", out
        value = 1.0 if reference is None else float(np.min(cosines(reference, out)))
        return value, f"{value:.4f}", out


def bench_model(name: str, budgets: list[float], rounds: int) -> list[dict]:
    task = _Task(name)
    calib = {task.input: task.calib}
    paths, failures, seconds, flops_of = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="graphopt-prune-bench-") as tmp:
        folder = Path(tmp)

        def build(label, quantize=None, options=None, start_from=None):
            def run():
                start = time.perf_counter()
                source = task.proto if start_from is None else onnx.load(str(paths[start_from]))
                path, _ = graphopt_variant(source, quantize, calib if (quantize or options) else None, folder, label,
                                           opt_level=task.opt_level, budget=None, options=options)
                seconds[label] = time.perf_counter() - start + (seconds.get(start_from) or 0.0)
                return path
            try_peer(paths, failures, label, run)

        build("fp32")
        try_peer(paths, failures, "ort int8", lambda: ort_quantize_static(paths["fp32"], calib, folder / "ort_int8.onnx", **task.peer_options))
        build("graphopt int8", "int8")
        for budget in budgets:
            pruned = f"pruned {budget:.0%}"
            build(pruned, options={"prune": f"flops={budget}"})
            if pruned in paths:
                # INT8 of the pruned model, as --prune with --quantize does in one run (the search is not repeated).
                build(f"{pruned} + int8", "int8", start_from=pruned)
                flops_of[f"{pruned} + int8"] = pruned
        flops_of.update({"ort int8": "fp32", "graphopt int8": "fp32"})
        sizes = {label: weight_flops(path) for label, path in paths.items()}
        sessions = sessions_for(paths, failures)
        _, _, reference = task.metric(sessions["fp32"], None)
        rows = []
        for label, s in sessions.items():
            value, shown, _ = task.metric(s, reference)
            params, _ = sizes[label]
            flops = sizes[flops_of.get(label, label)][1] if flops_of.get(label, label) in sizes else 0
            rows.append({"model": name, "variant": label, "params": params / sizes["fp32"][0], "flops": flops / sizes["fp32"][1],
                         "metric": value, "shown": shown, "metric_name": task.metric_name, "build_s": seconds.get(label)})
        latency = interleaved(sessions, {task.input: task.evaluation[:1]}, rounds)
        for row in rows:
            row.update(latency.get(row["variant"], {}))
        rows += [{"model": name, "variant": label, "failed": why} for label, why in failures.items()]
    return rows


def table(rows: list[dict]) -> Table:
    out = Table(title="work removal: ratios to fp32 (latency: median of paired ratios, min/min)")
    for column in ("model", "variant", "params", "FLOPs", "latency", "min", "metric", "build s"):
        out.add_column(column, justify="left" if column in ("model", "variant", "metric") else "right")
    for r in rows:
        if "failed" in r:
            out.add_row(r["model"], r["variant"], "", "", "", "", f"failed: {r['failed']}", "")
            continue
        out.add_row(r["model"], r["variant"], f"{r['params']:.2f}x", f"{r['flops']:.2f}x", f"{r.get('ratio', float('nan')):.2f}x",
                    f"{r.get('min_ratio', float('nan')):.2f}x", f"{r['shown']} {r['metric_name']}",
                    "" if r["build_s"] is None else f"{r['build_s']:.0f}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default="0.2,0.3")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), budgets, args.rounds)
        console.print(table([r for r in rows if r["model"] == name.strip()]))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    console.print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
