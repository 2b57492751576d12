"""graphopt's model zoo: ONNX models built deterministically from code (seeded weights, no downloads).

    >>> from graphopt import models
    >>> models.available()
    ['bert_base', 'bert_tiny', 'digits_cnn', 'mobilenetv2', 'resnet18', 'resnet50']
    >>> m = models.load("resnet18")          # an onnx.ModelProto (opset 17, IR 8)

The graphs are shaped like torch.onnx exports (torch-style node and initializer names, BatchNormalization
left unfused, BERT's shape arithmetic and decomposed LayerNorm/GELU), so optimizer passes have real work.
``digits_cnn`` is really trained (on scikit-learn's digits); ``eval_data`` gives its held-out test set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.errors import GraphoptError

__all__ = ["available", "load", "describe", "eval_data"]


@dataclass(frozen=True)
class _Entry:
    build: Callable[[], onnx.ModelProto]
    description: str
    eval_data: Callable[[], tuple[dict[str, np.ndarray], np.ndarray]] | None = None
    # What building it will do the first time, if that is slow (None when it is not, or no longer).
    first_use: Callable[[], str | None] | None = None


def _bert_base() -> onnx.ModelProto:
    from .bert import bert_base

    return bert_base()


def _bert_tiny() -> onnx.ModelProto:
    from .bert import bert_tiny

    return bert_tiny()


def _resnet18() -> onnx.ModelProto:
    from .cnn import resnet18

    return resnet18()


def _resnet50() -> onnx.ModelProto:
    from .cnn import resnet50

    return resnet50()


def _mobilenetv2() -> onnx.ModelProto:
    from .cnn import mobilenetv2

    return mobilenetv2()


def _digits_cnn() -> onnx.ModelProto:
    from .digits import digits_cnn

    return digits_cnn()


def _digits_first_use() -> str | None:
    from .digits import cache_path

    if cache_path().is_file():
        return None
    return f"training zoo:digits_cnn on scikit-learn's digits (first use only, about 15 s; cached in {cache_path().parent})"


def _digits_eval() -> tuple[dict[str, np.ndarray], np.ndarray]:
    from .digits import eval_data as digits_eval_data

    return digits_eval_data()


_ZOO: dict[str, _Entry] = {
    "bert_base": _Entry(
        _bert_base,
        "BERT-base encoder, 12 layers, hidden 768, seq 128 (random weights; input_ids/attention_mask [1,128] int64)",
    ),
    "bert_tiny": _Entry(
        _bert_tiny,
        "BERT-tiny encoder, 2 layers, hidden 128, seq 16 (random weights; input_ids/attention_mask [1,16] int64)",
    ),
    "digits_cnn": _Entry(
        _digits_cnn,
        "small CNN trained on scikit-learn's 8x8 digits (input [batch,1,8,8] -> 10 logits; has eval data)",
        _digits_eval,
        _digits_first_use,
    ),
    "mobilenetv2": _Entry(
        _mobilenetv2,
        "torchvision MobileNetV2, BatchNormalization unfused, ReLU6 as Clip (random weights; input [1,3,224,224])",
    ),
    "resnet18": _Entry(
        _resnet18,
        "torchvision ResNet-18, BatchNormalization unfused (random weights; input [1,3,224,224])",
    ),
    "resnet50": _Entry(
        _resnet50,
        "torchvision ResNet-50, BatchNormalization unfused (random weights; input [1,3,224,224])",
    ),
}


def available() -> list[str]:
    """Names of the zoo models, sorted."""
    return sorted(_ZOO)


def _entry(name: str) -> _Entry:
    try:
        return _ZOO[name]
    except KeyError:
        raise GraphoptError(f"unknown zoo model '{name}'; known: {', '.join(available())}") from None


def load(name: str, notify: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """Builds the named zoo model (deterministic: same bytes every time; a fresh proto per call).

    `notify(text)` is told before slow first-time work (training), so a caller can say why it waits.
    """
    entry = _entry(name)
    if notify is not None and entry.first_use is not None:
        message = entry.first_use()
        if message:
            notify(message)
    return entry.build()


def describe(name: str) -> str:
    """A one-line description of the named zoo model."""
    return _entry(name).description


def eval_data(name: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """For a trained model, (input feed, labels) of its held-out evaluation data; None for the others."""
    fn = _entry(name).eval_data
    return None if fn is None else fn()
