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

Variants: fp32 (graphopt -O3, of the released opset-11 model converted to opset 13 and specialized
to 1 x 320), graphopt `--quantize int8` (static, percentile), graphopt `--quantize int8-dynamic`
(both on that converted model, with the accuracy search when `--budget` is given), onnxruntime
`quantize_static` (QDQ, per-channel, percentile, only Conv and MatMul: its best configuration in
../shared/notes/quantization-peers.md), `quantize_dynamic` (int8 per-channel) and NNCF
(`nncf.quantize`, model_type TRANSFORMER: its best preset on the recognizer in the notes; --no-nncf
leaves it out), the peers on the fp32 variant's file; all on x86_64; latency at ORT_ENABLE_ALL, 1
thread, interleaved in shuffled order, median ratio to fp32. A peer that raises is shown as
"failed: <first line>". `measure()` is the whole measurement, for benchmarks/quantize.py's table.
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

from benchmarks.quantize import interleaved  # noqa: E402

console = Console(width=150)
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
HEIGHT, WIDTH = 48, 320


def words(count: int, seed: int) -> list[str]:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
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


class Unavailable(Exception):
    """The recognizer cannot be loaded here (rapidocr not installed)."""


def measure(calibration_count: int = 64, evaluation: int = 200, rounds: int = 30, *, nncf: bool = True, budget: str | None = None) -> dict[str, dict]:
    """{variant: {"from", "char_accuracy", "word_accuracy", "median_ms", "ratio", "min_ratio", and for
    graphopt's quantized variants with a `budget` "kept_float", "layers", ...}}, or {"from", "failed"}
    for a peer that raised. "from" is the model the tool quantized: "original" (the released model,
    specialized to 1 x 320 and converted to opset 13) or "graphopt fp32" (the fp32 variant's file).
    budget: graphopt's accuracy budget ("cos=0.99"; None: no search)."""
    from benchmarks.quantize import graphopt_variant, nncf_quantize, ort_quantize_dynamic, ort_quantize_static, sessions_for, try_peer
    from tests.real_models import zoo

    try:
        original = zoo.load("rapidocr_rec").model
    except zoo.ModelUnavailable as missing:
        raise Unavailable(str(missing)) from None
    characters = ["<blank>"] + next(p.value for p in original.metadata_props if p.key == "character").split("\n") + [" "]
    calib_x, _ = dataset(calibration_count, seed=1)
    eval_x, eval_texts = dataset(evaluation, seed=2)
    from graphopt.specialize import specialize_proto

    specialize_proto(original, dims={"DynamicDimension.0": 1, "DynamicDimension.1": WIDTH})
    # The released model is opset 11; per-channel Q/DQ needs 13. graphopt's --quantize int8 converts
    # by itself, onnxruntime's quantizers do not, and fp32 must be the same graph: convert up front.
    original = onnx.version_converter.convert_version(original, 13)
    folder = Path(tempfile.mkdtemp(prefix="graphopt-ocr-"))
    calib = {"x": calib_x}
    paths, failures, info = {}, {}, {}
    source = {"fp32": "original", "graphopt int8": "original", "graphopt int8-dynamic": "original"}
    paths["fp32"], _ = graphopt_variant(original, None, None, folder, "fp32", opt_level=3, budget=None)
    for quantize in ("int8", "int8-dynamic"):
        label = f"graphopt {quantize}"

        def ours(quantize=quantize, label=label):
            path, info[label] = graphopt_variant(original, quantize, calib, folder, label, opt_level=3, budget=budget)
            return path

        try_peer(paths, failures, label, ours)
    from onnxruntime.quantization import CalibrationMethod

    peers = {
        "ort quantize_static (Conv+MatMul, percentile)": lambda: ort_quantize_static(
            paths["fp32"], calib, folder / "ort_static.onnx", op_types_to_quantize=["Conv", "MatMul"], calibrate_method=CalibrationMethod.Percentile),
        "ort quantize_dynamic (s8 per-channel)": lambda: ort_quantize_dynamic(paths["fp32"], folder / "ort_dynamic.onnx"),
    }
    if nncf:
        peers["nncf (transformer)"] = lambda: nncf_quantize(paths["fp32"], calib, folder / "nncf.onnx", transformer=True)
    for variant, build in peers.items():
        source[variant] = "graphopt fp32"
        try_peer(paths, failures, variant, build)
    sessions = sessions_for(paths, failures)
    records = {v: {"from": source[v], **dict(zip(("char_accuracy", "word_accuracy"), scores(s, eval_x, eval_texts, characters))), **info.get(v, {})}
               for v, s in sessions.items()}
    for v, e in interleaved(sessions, {"x": eval_x[:1]}, rounds).items():
        records[v].update(e)
    for v, why in failures.items():
        records[v] = {"from": source[v], "failed": why}
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--budget", default=None, help="graphopt's accuracy budget for its quantized variants (cos=0.99; default: no search)")
    parser.add_argument("--no-nncf", dest="nncf", action="store_false", help="leave NNCF out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    records = measure(args.calibration, args.eval, args.rounds, nncf=args.nncf, budget=args.budget)
    table = Table(title=f"PP-OCRv6 recognizer, {args.eval} rendered words ({args.calibration} for calibration), onnxruntime {ort.__version__}, 1 thread",
                  title_justify="left")
    for col in ("variant", "from", "char accuracy", "word accuracy", "latency", "vs fp32 (median, min)", "kept float"):
        table.add_column(col, justify="left" if col in ("variant", "from") else "right")
    for v, r in records.items():
        if "failed" in r:
            table.add_row(v, r["from"], r["failed"], "", "", "", "")
            continue
        kept = f"{r['kept_float']}/{r['layers']}" if "kept_float" in r else "-"
        table.add_row(v, r["from"], f"{r['char_accuracy']:.4f}", f"{r['word_accuracy']:.3f}", f"{r['median_ms']:.2f} ms",
                      f"{r['ratio']:.3f}, {r['min_ratio']:.3f}", kept)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
