#!/usr/bin/env python
"""graphopt's static INT8 against onnxruntime's `quantize_static`, on the same calibration data.

    python benchmarks/quantize.py                       # zoo resnet18, resnet50, mobilenetv2, digits_cnn
    python benchmarks/quantize.py --models resnet18 --rounds 40 --json out.json

Per model, in one process:
* fp32: graphopt -O2 (what quantization starts from);
* graphopt int8: `--quantize int8` (percentile calibration, the CLI default), on x86_64, with its
  measured gate off so that the int8 model itself is timed (where it is not faster, the gate keeps
  fp32: digits_cnn);
* ort quantize_static: QDQ, per-channel int8 weights, uint8 activations (the configuration
  onnxruntime's docs recommend for x86), MinMax calibration (its default), on the original model.
Both calibrate on the same samples: digits_cnn's first 128 digits; for the random-weight zoo CNNs,
16 standard-normal images (their weights are random, so there is no real data to prefer).
Fidelity is measured on inputs neither calibration saw: cosine of the logits and top-1 agreement
with fp32, and for digits_cnn the accuracy on its held-out digits. Latency: onnxruntime at
ORT_ENABLE_ALL, 1 intra-op thread, the variants interleaved in a fresh random order each round,
median of the per-round ratios to fp32 (and the ratio of the minimums).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import graphopt.models as zoo  # noqa: E402
from graphopt import calibration, export  # noqa: E402
from graphopt.optimize import optimize_model  # noqa: E402

console = Console(width=150)


def data_for(name: str, proto: onnx.ModelProto):
    """(calibration samples, evaluation inputs, labels or None), keyed by the model's input."""
    input_name = proto.graph.input[0].name
    if name == "digits_cnn":
        feeds, labels = zoo.eval_data(name)
        x = feeds[input_name]
        return x[:128], x[200:], labels[200:]
    rng = np.random.default_rng(0)
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return rng.standard_normal((16, *shape[1:])).astype(np.float32), rng.standard_normal((8, *shape[1:])).astype(np.float32), None


def graphopt_variants(proto, calib, input_name, folder: Path) -> dict[str, Path]:
    paths = {}
    for variant, quantize in (("fp32", None), ("graphopt int8", "int8")):
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        data = calibration.from_arrays({input_name: calib}, proto)
        model, _ = optimize_model(work, target="x86_64", opt_level=2, quantize=quantize, calibration_data=data,
                                  options={"calibration_method": "percentile", "quantize_gate": False})
        paths[variant] = folder / f"{variant.replace(' ', '_')}.onnx"
        export.save(model, paths[variant])
    return paths


def ort_calibration_reader(input_name: str, samples: np.ndarray):
    """onnxruntime's calibration interface over `samples`, one sample per batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def ort_quantize_static(proto, calib, input_name, folder: Path) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, out = folder / "original.onnx", folder / "ort_quantize_static.onnx"
    onnx.save(proto, src)
    quantize_static(str(src), str(out), ort_calibration_reader(input_name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def interleaved(sessions: dict, feed: dict, rounds: int) -> dict[str, dict]:
    """{variant: median_ms, ratio, min_ratio} against the "fp32" variant: bench.py's `_latency`
    (variants interleaved, a fresh shuffled order each round), 1 thread, exactly `rounds` rounds."""
    from benchmarks.bench import _latency

    named = {("original" if v == "fp32" else v): s for v, s in sessions.items()}
    settings = argparse.Namespace(threads=1, warmup=3, runs=rounds, max_runs=rounds, min_time_s=0.0)
    lat, _ = _latency(named, feed, settings, shuffle=random.Random(0))
    base = lat["original"]
    return {
        ("fp32" if v == "original" else v): {"median_ms": e["ms"], "ratio": 1 / e["vs_original"], "min_ratio": e["min_ms"] / base["min_ms"]}
        for v, e in lat.items() if not e["error"]
    }


def bench(name: str, rounds: int) -> dict:
    proto = zoo.load(name)
    input_name = proto.graph.input[0].name
    calib, evaluation, labels = data_for(name, proto)
    with tempfile.TemporaryDirectory(prefix="graphopt-quant-") as tmp:
        folder = Path(tmp)
        paths = graphopt_variants(proto, calib, input_name, folder)
        try:
            paths["ort quantize_static"] = ort_quantize_static(proto, calib, input_name, folder)
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not the end of the run
            console.print(f"{name}: ort quantize_static failed: {str(exc).splitlines()[0]}")
        sessions = {}
        for variant, path in paths.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            sessions[variant] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        record = {"model": name, "variants": {}}
        outputs = {v: np.concatenate([s.run(None, {input_name: evaluation[i : i + 1]})[0] for i in range(len(evaluation))])
                   for v, s in sessions.items()}
        reference = outputs["fp32"]
        for v, out in outputs.items():
            a, b = reference.reshape(len(evaluation), -1), out.reshape(len(evaluation), -1)
            cosine = float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
            entry = {"min_cosine": cosine, "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1)))}
            if labels is not None:
                entry["accuracy"] = float(np.mean(out.argmax(1) == labels))
            record["variants"][v] = entry
        feed = {input_name: evaluation[:1]}
        lat = interleaved(sessions, feed, rounds)
        for v, e in lat.items():
            record["variants"][v].update(e)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenetv2,digits_cnn")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    records = []
    for name in args.models.split(","):
        records.append(bench(name, args.rounds))
        console.print(f"{name} done", highlight=False)
    table = Table(title=f"INT8 on x86_64 (onnxruntime {ort.__version__}, 1 thread, {args.rounds} interleaved rounds)", title_justify="left")
    for col in ("model", "variant", "latency", "vs fp32 (median, min)", "min cosine", "top-1 agree", "accuracy"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in records:
        for v, e in r["variants"].items():
            table.add_row(r["model"], v, f"{e['median_ms']:.2f} ms", f"{e['ratio']:.3f}, {e['min_ratio']:.3f}", f"{e['min_cosine']:.5f}",
                          f"{e['top1_agreement']:.1%}", f"{e['accuracy']:.4f}" if "accuracy" in e else "-")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
