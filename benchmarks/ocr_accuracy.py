#!/usr/bin/env python
"""INT8 on a real text recognizer, judged by reading: PP-OCRv6's recognizer (the rapidocr package
ships it) on rendered words, character and word accuracy, and onnxruntime latency.

    python benchmarks/ocr_accuracy.py                  # 64 calibration words, 200 evaluation words
    python benchmarks/ocr_accuracy.py --eval 400 --rounds 40 --json out.json

Words are the Zen of Python's (Python's `this` module: real English, deterministic), with numbers,
rendered with the DejaVu fonts at 48 px height in varied sizes, weights and shading, preprocessed as
rapidocr does ([-1, 1], 48 x 320). Output: CTC greedy decoding (argmax, repeats merged, blank 0)
against the model's own character list (its metadata), then character accuracy = 1 - edit distance
/ length, and exact-word accuracy. Calibration words and evaluation words are disjoint draws.

Variants: fp32 (graphopt -O3), graphopt `--quantize int8` (static, percentile), graphopt
`--quantize int8-dynamic`, onnxruntime `quantize_static` (QDQ, per-channel, percentile, only Conv
and MatMul: its best configuration in ../shared/notes/quantization-peers.md) and
`quantize_dynamic` (int8 per-channel), all on x86_64; latency at ORT_ENABLE_ALL, 1 thread,
interleaved in shuffled order, median ratio to fp32.
"""

from __future__ import annotations

import argparse
import codecs
import json
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from graphopt import calibration, export  # noqa: E402
from benchmarks.quantize import interleaved, ort_calibration_reader  # noqa: E402
from graphopt.optimize import optimize_model  # noqa: E402

console = Console(width=150)
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
HEIGHT, WIDTH = 48, 320


def words(count: int, seed: int) -> list[str]:
    import this

    vocabulary = sorted({w.strip(".,!*-'") for w in codecs.decode(this.s, "rot13").split()} - {""})
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            out.append(str(rng.randint(0, 99999)))
        elif kind < 0.5:
            out.append(f"{rng.choice(vocabulary)} {rng.choice(vocabulary)}")
        else:
            out.append(rng.choice(vocabulary))
    return out


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{FONTS[int(rng.integers(len(FONTS)))]}", int(rng.integers(24, 33)))
    image = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(v) for v in rng.integers(215, 256, 3)))
    ImageDraw.Draw(image).text((int(rng.integers(2, 10)), int(rng.integers(4, 10))), text, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
    pixels = np.asarray(image).astype(np.float32) * rng.uniform(0.9, 1.0, (HEIGHT, WIDTH, 1))
    x = (np.clip(pixels, 0, 255) / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def dataset(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    texts = words(count, seed)
    rng = np.random.default_rng(seed)
    return np.concatenate([render(t, rng) for t in texts]), texts


def decode(logits: np.ndarray, characters: list[str]) -> str:
    best = logits.argmax(-1)
    out, last = [], 0
    for i in best:
        if i != last and i != 0:
            out.append(characters[i] if i < len(characters) else "")
        last = i
    return "".join(out)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def scores(session, x, texts, characters) -> tuple[float, float]:
    errors = length = exact = 0
    for i, text in enumerate(texts):
        got = decode(session.run(None, {"x": x[i : i + 1]})[0][0], characters)
        errors += edit_distance(got, text)
        length += len(text)
        exact += got == text
    return 1 - errors / length, exact / len(texts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from tests.real_models import zoo

    original = zoo.load("rapidocr_rec").model
    characters = ["<blank>"] + next(p.value for p in original.metadata_props if p.key == "character").split("\n") + [" "]
    calib_x, _ = dataset(args.calibration, seed=1)
    eval_x, eval_texts = dataset(args.eval, seed=2)
    folder = Path(tempfile.mkdtemp(prefix="graphopt-ocr-"))
    from graphopt.specialize import specialize_proto

    specialize_proto(original, dims={"DynamicDimension.0": 1, "DynamicDimension.1": WIDTH})
    # The released model is opset 11; per-channel Q/DQ needs 13. graphopt's --quantize int8 converts
    # by itself, onnxruntime's quantizers do not, and fp32 must be the same graph: convert up front.
    original = onnx.version_converter.convert_version(original, 13)
    paths = {}
    for variant, quantize in (("fp32", None), ("graphopt int8", "int8"), ("graphopt int8-dynamic", "int8-dynamic")):
        work = onnx.ModelProto()
        work.CopyFrom(original)
        data = calibration.from_arrays({"x": calib_x}, original) if quantize == "int8" else None
        model, _ = optimize_model(work, target="x86_64", opt_level=3, quantize=quantize, calibration_data=data,
                                  options={"calibration_method": "percentile", "quantize_gate": False})
        paths[variant] = folder / f"{variant.replace(' ', '_')}.onnx"
        export.save(model, paths[variant])
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    try:
        quantize_static(str(paths["fp32"]), str(folder / "ort_static.onnx"), ort_calibration_reader("x", calib_x), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul"],
                        calibrate_method=CalibrationMethod.Percentile)
        paths["ort quantize_static (Conv+MatMul, percentile)"] = folder / "ort_static.onnx"
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result
        console.print(f"ort quantize_static failed: {str(exc).splitlines()[0]}")
    try:
        quantize_dynamic(str(paths["fp32"]), str(folder / "ort_dynamic.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        paths["ort quantize_dynamic (s8 per-channel)"] = folder / "ort_dynamic.onnx"
    except Exception as exc:  # noqa: BLE001
        console.print(f"ort quantize_dynamic failed: {str(exc).splitlines()[0]}")
    sessions = {}
    for variant, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sessions[variant] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    records = {v: dict(zip(("char_accuracy", "word_accuracy"), scores(s, eval_x, eval_texts, characters))) for v, s in sessions.items()}
    feed = {"x": eval_x[:1]}
    for v, e in interleaved(sessions, feed, args.rounds).items():
        records[v].update(e)
    table = Table(title=f"PP-OCRv6 recognizer, {args.eval} rendered words ({args.calibration} for calibration), onnxruntime {ort.__version__}, 1 thread",
                  title_justify="left")
    for col in ("variant", "char accuracy", "word accuracy", "latency", "vs fp32 (median, min)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v, r in records.items():
        table.add_row(v, f"{r['char_accuracy']:.4f}", f"{r['word_accuracy']:.3f}", f"{r['median_ms']:.2f} ms", f"{r['ratio']:.3f}, {r['min_ratio']:.3f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
