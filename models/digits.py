"""``digits_cnn``: a small CNN trained (plain numpy, on the fly) on scikit-learn's 8x8 digits.

    input [batch,1,8,8] -> Conv 1->8 3x3 -> BatchNormalization -> Relu -> MaxPool 2
                        -> Conv 8->16 3x3 -> BatchNormalization -> Relu -> Flatten -> Gemm 256->10

Trained with batch statistics (real BatchNormalization), after which the running statistics are set
to the exact population statistics of the training set. The trained weights are cached as .npz under
``$GRAPHOPT_CACHE_DIR`` (default ``~/.cache/graphopt``), keyed by ``WEIGHTS_VERSION``, so only the first
load trains. The held-out split (seed 0, 25 %) is what ``eval_data`` returns.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .builder import FLOAT, GraphBuilder

WEIGHTS_VERSION = "digits_cnn-v1"
SPLIT_SEED = 0
TEST_FRACTION = 0.25
BN_EPS = 1e-5

C1, C2, NUM_CLASSES = 8, 16, 10
EPOCHS = 25
BATCH = 32
LR = 3e-3


# --- data ------------------------------------------------------------------------------------
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED)
    return x_train, x_test, y_train, y_test


def eval_data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The held-out test images ({"input": [N,1,8,8] float32}) and their labels ([N] int64)."""
    _, x_test, _, y_test = _split()
    return {"input": np.ascontiguousarray(x_test)}, y_test


# --- numpy layers ----------------------------------------------------------------------------
def _im2col(x: np.ndarray) -> np.ndarray:
    """3x3, stride 1, pad 1: [N,C,H,W] -> [N*H*W, C*9] (C-major, then kh, kw, as weights reshape)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def _col2im(dcols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 9).transpose(0, 3, 4, 1, 2)
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, :, i : i + h, j : j + w] += d[:, :, k]
    return dxp[:, :, 1:-1, 1:-1]


def _conv_fwd(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, _, h, wd = x.shape
    cols = _im2col(x)
    out = cols @ w.reshape(w.shape[0], -1).T
    return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), cols


def _conv_bwd(dout: np.ndarray, cols: np.ndarray, w: np.ndarray, xshape) -> tuple[np.ndarray, np.ndarray]:
    d = dout.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
    dw = (d.T @ cols).reshape(w.shape)
    dx = _col2im(d @ w.reshape(w.shape[0], -1), xshape)
    return dx, dw


def _bn_fwd_train(x: np.ndarray, g: np.ndarray, b: np.ndarray):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    inv = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mean) * inv
    return xhat * g[None, :, None, None] + b[None, :, None, None], (xhat, inv)


def _bn_bwd(dy: np.ndarray, cache, g: np.ndarray):
    xhat, inv = cache
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    dg = (dy * xhat).sum(axis=(0, 2, 3))
    db = dy.sum(axis=(0, 2, 3))
    dxhat = dy * g[None, :, None, None]
    dx = (inv / m) * (
        m * dxhat - dxhat.sum(axis=(0, 2, 3), keepdims=True) - xhat * (dxhat * xhat).sum(axis=(0, 2, 3), keepdims=True)
    )
    return dx, dg, db


def _bn_eval(x: np.ndarray, p: dict, name: str) -> np.ndarray:
    scale = p[f"{name}.weight"] / np.sqrt(p[f"{name}.running_var"] + BN_EPS)
    shift = p[f"{name}.bias"] - p[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _pool_fwd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    idx = r.argmax(axis=-1)
    return np.take_along_axis(r, idx[..., None], axis=-1)[..., 0], idx


def _pool_bwd(dout: np.ndarray, idx: np.ndarray, xshape) -> np.ndarray:
    n, c, h, w = xshape
    d = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(d, idx[..., None], dout[..., None], axis=-1)
    return d.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(xshape)


def _forward_eval(p: dict, x: np.ndarray) -> np.ndarray:
    h, _ = _conv_fwd(x, p["conv1.weight"])
    h = np.maximum(_bn_eval(h, p, "bn1"), 0)
    h, _ = _pool_fwd(h)
    h, _ = _conv_fwd(h, p["conv2.weight"])
    h = np.maximum(_bn_eval(h, p, "bn2"), 0)
    return h.reshape(h.shape[0], -1) @ p["fc.weight"].T + p["fc.bias"]


# --- training --------------------------------------------------------------------------------
def _loss_and_grads(p: dict, xb: np.ndarray, yb: np.ndarray) -> tuple[float, dict]:
    """Mean softmax cross-entropy of a batch (BatchNormalization on batch statistics) and its gradients."""
    n = len(yb)
    c1, cols1 = _conv_fwd(xb, p["conv1.weight"])
    n1, bn1c = _bn_fwd_train(c1, p["bn1.weight"], p["bn1.bias"])
    r1 = np.maximum(n1, 0)
    p1, pidx = _pool_fwd(r1)
    c2, cols2 = _conv_fwd(p1, p["conv2.weight"])
    n2, bn2c = _bn_fwd_train(c2, p["bn2.weight"], p["bn2.bias"])
    r2 = np.maximum(n2, 0)
    flat = r2.reshape(n, -1)
    logits = flat @ p["fc.weight"].T + p["fc.bias"]
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(n), yb].mean())
    dlogits = np.exp(logp)
    dlogits[np.arange(n), yb] -= 1
    dlogits /= n
    g = {"fc.weight": dlogits.T @ flat, "fc.bias": dlogits.sum(axis=0)}
    dr2 = (dlogits @ p["fc.weight"]).reshape(r2.shape) * (n2 > 0)
    dc2, g["bn2.weight"], g["bn2.bias"] = _bn_bwd(dr2, bn2c, p["bn2.weight"])
    dp1, g["conv2.weight"] = _conv_bwd(dc2, cols2, p["conv2.weight"], p1.shape)
    dr1 = _pool_bwd(dp1, pidx, r1.shape) * (n1 > 0)
    dc1, g["bn1.weight"], g["bn1.bias"] = _bn_bwd(dr1, bn1c, p["bn1.weight"])
    _, g["conv1.weight"] = _conv_bwd(dc1, cols1, p["conv1.weight"], xb.shape)
    return loss, g


def train() -> dict[str, np.ndarray]:
    """Trains the CNN from a fixed seed; returns torch-named parameters and BN running statistics."""
    x_train, _, y_train, _ = _split()
    rng = np.random.default_rng(SPLIT_SEED)
    f32 = np.float32
    p = {
        "conv1.weight": (rng.standard_normal((C1, 1, 3, 3)) * np.sqrt(2.0 / 9)).astype(f32),
        "bn1.weight": np.ones(C1, f32),
        "bn1.bias": np.zeros(C1, f32),
        "conv2.weight": (rng.standard_normal((C2, C1, 3, 3)) * np.sqrt(2.0 / (C1 * 9))).astype(f32),
        "bn2.weight": np.ones(C2, f32),
        "bn2.bias": np.zeros(C2, f32),
        "fc.weight": (rng.standard_normal((NUM_CLASSES, C2 * 16)) * np.sqrt(1.0 / (C2 * 16))).astype(f32),
        "fc.bias": np.zeros(NUM_CLASSES, f32),
    }
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, step = 0.9, 0.999, 0
    n = len(x_train)
    steps_total = EPOCHS * ((n + BATCH - 1) // BATCH)
    for _epoch in range(EPOCHS):
        order = rng.permutation(n)
        for start in range(0, n, BATCH):
            ids = order[start : start + BATCH]
            xb, yb = x_train[ids], y_train[ids]
            _, g = _loss_and_grads(p, xb, yb)
            # Adam with a cosine-decayed step size
            step += 1
            lr = LR * 0.5 * (1 + np.cos(np.pi * step / steps_total))
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                mh = m[k] / (1 - b1**step)
                vh = v[k] / (1 - b2**step)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(f32)
    # running statistics: exact population statistics over the training set, layer by layer
    c1, _ = _conv_fwd(x_train, p["conv1.weight"])
    p["bn1.running_mean"] = c1.mean(axis=(0, 2, 3)).astype(f32)
    p["bn1.running_var"] = c1.var(axis=(0, 2, 3)).astype(f32)
    h, _ = _pool_fwd(np.maximum(_bn_eval(c1, p, "bn1"), 0))
    c2, _ = _conv_fwd(h, p["conv2.weight"])
    p["bn2.running_mean"] = c2.mean(axis=(0, 2, 3)).astype(f32)
    p["bn2.running_var"] = c2.var(axis=(0, 2, 3)).astype(f32)
    return {k: np.ascontiguousarray(val, dtype=f32) for k, val in p.items()}


# --- cache -----------------------------------------------------------------------------------
PARAM_NAMES = (
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
    "fc.weight", "fc.bias",
)  # fmt: skip


def cache_dir() -> Path:
    env = os.environ.get("GRAPHOPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphopt"


def cache_path() -> Path:
    return cache_dir() / f"{WEIGHTS_VERSION}.npz"


def trained_weights() -> dict[str, np.ndarray]:
    """The trained parameters: from the cache when it holds this version, else trained and cached."""
    path = cache_path()
    try:
        with np.load(path) as data:
            params = {k: data[k] for k in PARAM_NAMES}
        return params
    except (OSError, KeyError, ValueError):
        pass
    params = train()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digits_cnn-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **params)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # an unwritable cache only costs retraining next time
    return params


# --- ONNX ------------------------------------------------------------------------------------
def digits_cnn() -> onnx.ModelProto:
    p = trained_weights()
    b = GraphBuilder("torch_jit_digits_cnn")
    x = b.input("input", FLOAT, ["batch", 1, 8, 8])
    conv = dict(dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    x = b.node("Conv", [x, b.param("conv1.weight", p["conv1.weight"])], "/conv1", **conv)
    x = b.node(
        "BatchNormalization", [x] + [b.param(f"bn1.{k}", p[f"bn1.{k}"]) for k in ("weight", "bias", "running_mean", "running_var")],
        "/bn1", epsilon=BN_EPS, momentum=0.9,
    )  # fmt: skip
    x = b.node("Relu", [x], "/relu")
    x = b.node("MaxPool", [x], "/pool", ceil_mode=0, dilations=[1, 1], kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2])
    x = b.node("Conv", [x, b.param("conv2.weight", p["conv2.weight"])], "/conv2", **conv)
    x = b.node(
        "BatchNormalization", [x] + [b.param(f"bn2.{k}", p[f"bn2.{k}"]) for k in ("weight", "bias", "running_mean", "running_var")],
        "/bn2", epsilon=BN_EPS, momentum=0.9,
    )  # fmt: skip
    x = b.node("Relu", [x], "/relu_1")
    x = b.node("Flatten", [x], "", axis=1)
    out = b.node(
        "Gemm", [x, b.param("fc.weight", p["fc.weight"]), b.param("fc.bias", p["fc.bias"])], "/fc",
        output="output", alpha=1.0, beta=1.0, transB=1,
    )  # fmt: skip
    b.output(out, FLOAT, ["batch", NUM_CLASSES])
    return b.build(f"CNN trained on sklearn load_digits ({WEIGHTS_VERSION})")


def numpy_accuracy(params: dict[str, np.ndarray] | None = None) -> float:
    """Test-split accuracy of the numpy reference forward pass (a check on the exported graph)."""
    params = params or trained_weights()
    feed, labels = eval_data()
    return float((_forward_eval(params, feed["input"]).argmax(axis=1) == labels).mean())
