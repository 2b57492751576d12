"""Calibration: data readers and streaming activation statistics.

Shared by quantization, activation-based pruning and data-aware low-rank: each needs to know what
values the model's tensors take on real data, and none of them should have to run the model twice.

Data (`CalibrationData`) is a re-iterable stream of feed dicts, one per batch of the model:

* `from_path`: a `.npz` keyed by input name, a `.npy` (single-input models), or a folder of them.
  Samples are stacked along axis 0 and cut into batches of the model's batch dim (axis 0 of every
  input): a static batch N takes N samples per batch, a symbolic one ``batch_size``. Samples left
  over that do not fill a batch are dropped and counted in ``dropped``.
* `from_images`: a folder of images and a declared `Preprocess` (resize, crop, scale, mean/std,
  channel order, layout). Pillow is imported only here.
* `from_arrays`: arrays already in memory (kept by reference; batches are views where possible).
* `random_data`: seeded random feeds, a last resort: it warns that accuracy will not be
  representative of real data, and the object says so (``representative`` is False).

Files and images are read one at a time while iterating, so data larger than memory streams.

Statistics (`collect`) come from one onnxruntime pass with the requested tensors added as extra
graph outputs. Per tensor they keep count, min, max, a moving-average min/max and a histogram of
|x|, so memory is bins x tensors whatever the number of samples. `Statistics.range` then turns them
into a (lo, hi) range by minmax, moving_average, percentile, entropy (KL) or mse, without running
the model again; `collect` can also cache them on disk, keyed by model, data, bins and tensors.

How the histogram grows: its range is [0, hist_max] with a fixed number of bins. hist_max starts
at the first batch's max |x| and, when a larger value arrives, doubles as often as needed; old
counts are merged 2^k adjacent bins into one (``np.add.reduceat``). Because the new bins are exact
unions of old ones, the merged counts are what one histogram over the final range would have
counted; nothing is redistributed by guesswork. What is approximate is the resolution: values are
known only to their bin, and hist_max ends anywhere in [max, 2 max), so the data may cover as few
as half the bins. Thresholds derived from it are good to about one bin width.

Values that are not finite, or whose magnitude reaches 1e30 (or the dtype's max, for float16),
are sentinels rather than activations: attention masks add finfo(float32).min or -inf. They are
counted in ``ignored`` and kept out of every statistic; a tensor holding nothing else has no range.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt import verify
from graphopt.errors import GraphoptError, one_line

# Magnitudes at or above this are masks and sentinels, not activations (see module docstring).
SENTINEL_MAGNITUDE = 1e30

# onnxruntime's MinMax calibrator smooths per-batch min/max with this constant (moving_average=True).
MOVING_AVERAGE_CONSTANT = 0.01

DEFAULT_BINS = 2048

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# Part of the cache key: bump when the saved statistics change meaning or layout.
_CACHE_FORMAT = 1

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}

Progress = Callable[[int, int], None]


class RandomDataWarning(UserWarning):
    """Calibration runs on random data: the ranges it finds need not match real inputs."""


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype
    # Per axis: the fixed size, or the name a symbolic size goes by (verify._dim_keys).
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class _Chunk:
    """Some samples of every input, read when `load` is called (a file, an image, a random batch)."""

    samples: int
    load: Callable[[], dict[str, np.ndarray]]


def _input_specs(model: onnx.ModelProto) -> list[_InputSpec]:
    specs = []
    for vi in verify._real_inputs(model.graph):
        dims = tuple(verify._dim_keys(vi))
        if not dims:
            raise GraphoptError(f"input '{vi.name}' is a scalar; calibration data stacks samples along axis 0 of every input")
        specs.append(_InputSpec(vi.name, verify._np_dtype(vi), dims))
    if not specs:
        raise GraphoptError("the model has no inputs to calibrate with")
    return specs


def _samples_per_batch(specs: list[_InputSpec], batch_size: int) -> int:
    if batch_size < 1:
        raise GraphoptError(f"batch size must be at least 1, not {batch_size}")
    static = {s.dims[0] for s in specs if isinstance(s.dims[0], int)}
    if len(static) > 1:
        sizes = ", ".join(f"{s.name}: {s.dims[0]}" for s in specs)
        raise GraphoptError(f"the model's inputs disagree on the batch size (axis 0; {sizes})")
    # A static batch is what the model runs on; batch_size only fills a symbolic one.
    return static.pop() if static else batch_size


def _castable(arr: np.ndarray, dtype: np.dtype) -> bool:
    """Within a kind (float64 data for a float32 model) or up a kind (uint8 pixels for a float
    model); integers narrowed only when every value fits. Never float to int, never to bool."""
    if np.can_cast(arr.dtype, dtype, "safe"):
        return True
    if not np.can_cast(arr.dtype, dtype, "same_kind"):
        return False
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        return info.min <= int(arr.min()) and int(arr.max()) <= info.max
    return True


def _checked(arrays: dict[str, np.ndarray], specs: list[_InputSpec], source: str) -> tuple[dict[str, np.ndarray], int]:
    """The arrays of one source, each with its samples on axis 0, and how many samples they hold."""
    names = {s.name for s in specs}
    extra = sorted(set(arrays) - names)
    if extra:
        raise GraphoptError(f"{source}: {', '.join(repr(e) for e in extra)} not an input of the model (inputs: {', '.join(sorted(names))})")
    out = {}
    for spec in specs:
        if spec.name not in arrays:
            raise GraphoptError(f"{source}: input '{spec.name}' is missing")
        arr = arrays[spec.name]
        rank = len(spec.dims)
        if arr.ndim == rank - 1:
            arr = arr[np.newaxis]  # one sample saved without its batch axis
        if arr.ndim != rank:
            raise GraphoptError(f"{source}: input '{spec.name}' has rank {arr.ndim} (shape {list(arr.shape)}), the model expects rank {rank}")
        for axis in range(1, rank):
            want = spec.dims[axis]
            if isinstance(want, int) and arr.shape[axis] != want:
                raise GraphoptError(f"{source}: input '{spec.name}' has size {arr.shape[axis]} on axis {axis}, the model expects {want}")
        if not _castable(arr, spec.dtype):
            raise GraphoptError(f"{source}: input '{spec.name}' has dtype {arr.dtype}, which does not cast safely to the model's {spec.dtype}")
        out[spec.name] = arr
    counts = {name: a.shape[0] for name, a in out.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise GraphoptError(f"{source}: inputs hold different numbers of samples ({listed})")
    return out, next(iter(counts.values()))


class CalibrationData:
    """Feed dicts {input name: array}, one per batch of the model; iterable any number of times.

    ``len()`` is the number of batches, ``samples`` the samples they hold, ``batch_size`` the
    samples per batch, ``dropped`` the samples left over that fill no batch (callers may warn).
    """

    def __init__(
        self,
        chunks: Sequence[_Chunk],
        specs: list[_InputSpec],
        batch_size: int,
        *,
        source: str,
        representative: bool = True,
    ):
        self._chunks = list(chunks)
        self._specs = specs
        self.batch_size = batch_size
        self.source = source
        self.representative = representative
        total = sum(c.samples for c in self._chunks)
        self.samples = total - total % batch_size
        self.dropped = total % batch_size
        if not self.samples:
            raise GraphoptError(f"{source}: {total} calibration samples do not fill one batch of {batch_size}")
        self._digest: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [s.name for s in self._specs]

    def __len__(self) -> int:
        return self.samples // self.batch_size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        for chunk in self._chunks:
            arrays = chunk.load()
            if not arrays[self._specs[0].name].shape[0]:
                continue
            pending.append(arrays)
            have += chunk.samples
            while have >= self.batch_size:
                batch, pending = self._take(pending)
                have -= self.batch_size
                yield batch

    def _take(self, pending: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        need = self.batch_size
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in self._specs}
        rest = []
        for arrays in pending:
            count = arrays[self._specs[0].name].shape[0]
            use = min(count, need)
            if use:
                for name in parts:
                    parts[name].append(arrays[name][:use])
            if use < count:
                rest.append({name: a[use:] for name, a in arrays.items()})
            need -= use
        batch = {}
        for spec in self._specs:
            p = parts[spec.name]
            # One part: a view of the source, copied only when the dtype needs casting.
            batch[spec.name] = np.ascontiguousarray(p[0] if len(p) == 1 else np.concatenate(p), dtype=spec.dtype)
        return batch, rest

    def digest(self) -> str:
        """sha256 over every batch's input names, shapes, dtypes and bytes (read once, streamed)."""
        if self._digest is None:
            h = hashlib.sha256(f"batch {self.batch_size}\0".encode())
            for batch in self:
                for name in sorted(batch):
                    a = batch[name]
                    h.update(f"{name}\0{a.shape}\0{a.dtype.str}\0".encode())
                    if a.dtype.kind == "O":
                        h.update("\0".join(map(str, a.ravel())).encode())
                    else:
                        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
            self._digest = h.hexdigest()
        return self._digest

    def head(self, batches: int) -> CalibrationData:
        """The first `batches` batches (nothing is read until iterated)."""
        return _BatchRange(self, 0, min(batches, len(self)))

    def tail(self, batches: int) -> CalibrationData:
        """The last `batches` batches: held out from `head(len(self) - batches)`."""
        return _BatchRange(self, max(0, len(self) - batches), len(self))

    def __repr__(self) -> str:
        return f"CalibrationData({self.source!r}, batches={len(self)}, batch_size={self.batch_size}, dropped={self.dropped})"


class _BatchRange(CalibrationData):
    """Batches start..stop-1 of another CalibrationData."""

    def __init__(self, parent: CalibrationData, start: int, stop: int):
        if stop <= start:
            raise GraphoptError(f"{parent.source}: no calibration batches in {start + 1}..{stop}")
        self._parent, self._start, self._stop = parent, start, stop
        self._specs = parent._specs
        self.batch_size = parent.batch_size
        self.source = f"{parent.source} (batches {start + 1}-{stop})"
        self.representative = parent.representative
        self.samples = (stop - start) * parent.batch_size
        self.dropped = 0
        self._digest = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(iter(self._parent), self._start, self._stop)


def _load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    # With its weights: statistics run the model.
    return verify.as_proto(model, weights=True)


def from_arrays(
    arrays: dict[str, np.ndarray], model: onnx.ModelProto | str, *, batch_size: int = 1, source: str = "calibration arrays"
) -> CalibrationData:
    """Arrays in memory, keyed by input name, samples stacked along axis 0 (kept by reference)."""
    specs = _input_specs(_load_model(model))
    per_batch = _samples_per_batch(specs, batch_size)
    checked, count = _checked(arrays, specs, source)
    return CalibrationData([_Chunk(count, lambda: checked)], specs, per_batch, source=source)


def _read_array_file(path: Path, specs: list[_InputSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise GraphoptError(f"{path}: a .npy file holds one array, the model has {len(specs)} inputs; use a .npz keyed by input name")
            # Memory-mapped: batches are read from disk as they are needed.
            return {specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except GraphoptError:
        raise
    except Exception as exc:
        raise GraphoptError(f"{path}: cannot read calibration data: {one_line(exc)}") from None


def from_path(path: str | os.PathLike, model: onnx.ModelProto | str, *, batch_size: int = 1) -> CalibrationData:
    """A `.npz` keyed by input name, a `.npy` for a single-input model, or a folder of them (sorted
    by name). Every file holds one or more samples along axis 0 (a file may also hold a single
    sample without that axis). Every fed input must be present and no other name; non-batch dims
    must match the model's static dims, and a symbolic one may differ between files that each hold
    whole batches (one sequence length per file); dtypes are cast to the model's when that is safe.
    A .npz is read when checked and again when iterated, one file at a time."""
    path = Path(path)
    specs = _input_specs(_load_model(model))
    per_batch = _samples_per_batch(specs, batch_size)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise GraphoptError(f"{path}: no .npz or .npy files in the folder")
    elif path.is_file():
        if path.suffix not in (".npz", ".npy"):
            raise GraphoptError(f"{path}: calibration data must be a .npz, a .npy, or a folder of them")
        files = [path]
    else:
        raise GraphoptError(f"{path}: no such file or folder")

    chunks = []
    sample_shapes: dict[str, tuple[int, ...]] = {}
    mixed, partial = None, False
    for file in files:
        arrays, count = _checked(_read_array_file(file, specs), specs, str(file))
        for name, a in arrays.items():
            # Symbolic non-batch dims (a sequence length) may differ between files as long as no
            # batch takes samples from two of them (text calibrates on sentences of many lengths).
            first = sample_shapes.setdefault(name, a.shape[1:])
            if first != a.shape[1:]:
                mixed = mixed or (file, name, a.shape[1:], first)
        if count % per_batch:
            partial = True
        del arrays

        def load(file: Path = file) -> dict[str, np.ndarray]:
            return _checked(_read_array_file(file, specs), specs, str(file))[0]

        chunks.append(_Chunk(count, load))
    if mixed and partial:
        file, name, shape, first = mixed
        raise GraphoptError(f"{file}: input '{name}' has sample shape {list(shape)}, earlier files have {list(first)}; "
                            f"files of different shapes must each hold whole batches of {per_batch}")
    return CalibrationData(chunks, specs, per_batch, source=str(path))


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes an input tensor, in this order: RGB -> resize -> center crop -> x
    scale -> channel order -> (x - mean) / std -> layout -> the model's dtype.

    size: an int resizes the shorter side to it (aspect kept, the other side rounded); (h, w)
    resizes to exactly that; None keeps the image's size. Resizing is bilinear.
    crop: (h, w) center crop, offsets rounded like torchvision's CenterCrop; None for none.
    mean, std: per channel, in the order of `channels`, applied after `scale`.
    input: the input to feed; None picks the model's single input.
    """

    size: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1 / 255
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channels: str = "RGB"
    input: str | None = None

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise GraphoptError(f"image layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channels not in ("RGB", "BGR"):
            raise GraphoptError(f"image channel order must be RGB or BGR, not {self.channels!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise GraphoptError(f"image mean and std need 3 values each (one per channel), got {len(self.mean)} and {len(self.std)}")
        if any(s == 0 for s in self.std):
            raise GraphoptError("image std must not be 0")

    def resized_hw(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of an image of the given size after the resize."""
        if isinstance(self.size, int):
            if width <= height:
                return round(height * self.size / width), self.size
            return self.size, round(width * self.size / height)
        return (height, width) if self.size is None else tuple(self.size)

    def output_hw(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of an image of the given size after resize and crop."""
        h, w = self.resized_hw(width, height)
        if self.crop is None:
            return h, w
        ch, cw = self.crop
        if ch > h or cw > w:
            raise GraphoptError(f"image crop {ch}x{cw} is larger than the {h}x{w} image it cuts from")
        return ch, cw

    def apply(self, image, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
        """A PIL image as one sample (no batch axis) in this preprocessing's layout."""
        Image = _pillow()
        image = image.convert("RGB")
        if self.size is not None:
            rh, rw = self.resized_hw(*image.size)
            image = image.resize((rw, rh), Image.Resampling.BILINEAR)
        if self.crop is not None:
            h, w = self.crop
            if h > image.height or w > image.width:
                raise GraphoptError(f"image crop {h}x{w} is larger than the {image.height}x{image.width} image it cuts from")
            top = int(round((image.height - h) / 2.0))
            left = int(round((image.width - w) / 2.0))
            image = image.crop((left, top, left + w, top + h))
        pixels = np.asarray(image, dtype=np.float32) * np.float32(self.scale)
        if self.channels == "BGR":
            pixels = pixels[..., ::-1]
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=dtype)


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise GraphoptError("calibrating from images needs Pillow: pip install pillow") from None
    return Image


def from_images(folder: str | os.PathLike, model: onnx.ModelProto | str, preprocess: Preprocess, *, batch_size: int = 1) -> CalibrationData:
    """Every jpg/jpeg/png/bmp in `folder` (sorted by name), one sample each, as `preprocess` says.
    Image headers are read up front, so an unreadable file or a size the model cannot take is an
    error before anything runs; pixels are decoded one image at a time while iterating."""
    Image = _pillow()
    folder = Path(folder)
    if not folder.is_dir():
        raise GraphoptError(f"{folder}: no such folder")
    specs = _input_specs(_load_model(model))
    spec = _image_input(specs, preprocess.input)
    per_batch = _samples_per_batch(specs, batch_size)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise GraphoptError(f"{folder}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in the folder")

    channel_axis = 1 if preprocess.layout == "NCHW" else 3
    chunks = []
    for file in files:
        try:
            with Image.open(file) as image:
                h, w = preprocess.output_hw(*image.size)
        except GraphoptError as exc:
            raise GraphoptError(f"{file}: {exc}") from None
        except Exception as exc:
            raise GraphoptError(f"{file}: cannot read image: {one_line(exc)}") from None
        shape = [1, 3, h, w] if channel_axis == 1 else [1, h, w, 3]
        for axis in range(1, 4):
            want = spec.dims[axis]
            if isinstance(want, int) and want != shape[axis]:
                what = "channels" if axis == channel_axis else f"size {shape[axis]}"
                raise GraphoptError(
                    f"{file}: preprocessed image has {what} on axis {axis} of input '{spec.name}' ({preprocess.layout}), the model expects {want}"
                )

        def load(file: Path = file) -> dict[str, np.ndarray]:
            try:
                with Image.open(file) as image:
                    return {spec.name: preprocess.apply(image, spec.dtype)[np.newaxis]}
            except Exception as exc:
                raise GraphoptError(f"{file}: cannot read image: {one_line(exc)}") from None

        chunks.append(_Chunk(1, load))
    return CalibrationData(chunks, [spec], per_batch, source=str(folder))


def _image_input(specs: list[_InputSpec], name: str | None) -> _InputSpec:
    if name is None:
        if len(specs) != 1:
            raise GraphoptError(f"the model has {len(specs)} inputs ({', '.join(s.name for s in specs)}); images feed a model with one")
        spec = specs[0]
    else:
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            raise GraphoptError(f"input '{name}' is not an input of the model (inputs: {', '.join(s.name for s in specs)})")
        if len(specs) != 1:
            others = ", ".join(s.name for s in specs if s.name != name)
            raise GraphoptError(f"images feed only input '{name}'; the model also needs {others}")
    if len(spec.dims) != 4 or spec.dtype.kind != "f":
        raise GraphoptError(f"input '{spec.name}' is not image-like (a rank-4 float tensor)")
    return spec


def random_data(model: onnx.ModelProto | str, samples: int = 16, *, seed: int = 0, batch_size: int = 1) -> CalibrationData:
    """Seeded random feeds (verify.make_inputs' values), generated batch by batch; a last resort.

    Warns (RandomDataWarning) that accuracy will not be representative, and the result has
    ``representative`` False so a caller can say it again where it reports."""
    proto = _load_model(model)
    specs = _input_specs(proto)
    per_batch = _samples_per_batch(specs, batch_size)
    # make_inputs' machinery, built once: axis 0 is the batch here, whatever its name looks like.
    gen = verify._Generator(proto)
    dim_values = {}
    for spec in specs:
        key = spec.dims[0]
        if isinstance(key, str):
            dim_values[key] = per_batch
    shapes = gen.shapes(dim_values, per_batch)
    chunks = [_Chunk(per_batch, lambda i=i: gen.generate(shapes, seed + i)) for i in range(max(0, samples) // per_batch)]
    warnings.warn(
        "calibrating on random data: accuracy will not be representative of real data; pass real samples for calibration",
        RandomDataWarning,
        stacklevel=2,
    )
    data = CalibrationData(chunks, specs, per_batch, source=f"random data (seed {seed})", representative=False)
    data.dropped = max(0, samples) % per_batch  # asked for but not generated: they fill no batch
    return data


# ---------------------------------------------------------------------------------------------
# Statistics


class Statistics:
    """Streaming statistics of some tensors over calibration data: per tensor count, ignored,
    min, max, moving-average min/max and a histogram of |x| (see the module docstring)."""

    _ARRAYS = ("count", "ignored", "min", "max", "ma_min", "ma_max", "hist_max")

    def __init__(self, tensors: Sequence[str], bins: int = DEFAULT_BINS):
        if bins < 2:
            raise GraphoptError(f"histogram bins must be at least 2, not {bins}")
        self.tensors = list(tensors)
        self.bins = bins
        self._index = {name: i for i, name in enumerate(self.tensors)}
        n = len(self.tensors)
        self.count = np.zeros(n, np.int64)
        self.ignored = np.zeros(n, np.int64)
        self.min = np.full(n, np.inf)
        self.max = np.full(n, -np.inf)
        self.ma_min = np.full(n, np.nan)
        self.ma_max = np.full(n, np.nan)
        self.hist_max = np.zeros(n)
        self.hist = np.zeros((n, bins), np.int64)
        self.batches = 0
        self.samples = 0

    def row(self, tensor: str) -> int:
        """The index of `tensor` in the per-tensor arrays (count, ignored, min, max, hist, ...)."""
        try:
            return self._index[tensor]
        except KeyError:
            raise GraphoptError(f"no statistics for tensor '{tensor}'") from None

    def add(self, tensor: str, values: np.ndarray) -> None:
        """Fold one batch of a tensor's values in."""
        k = self.row(tensor)
        x = np.asarray(values).ravel()
        if not x.size:
            return
        magnitude = np.abs(x)
        limit = min(SENTINEL_MAGNITUDE, float(np.finfo(x.dtype).max))
        keep = magnitude < limit  # False for NaN and inf too
        kept = int(np.count_nonzero(keep))
        self.ignored[k] += x.size - kept
        if not kept:
            return
        if kept < x.size:
            x, magnitude = x[keep], magnitude[keep]
        lo, hi, top = float(x.min()), float(x.max()), float(magnitude.max())
        self.count[k] += kept
        self.min[k] = min(self.min[k], lo)
        self.max[k] = max(self.max[k], hi)
        if np.isnan(self.ma_min[k]):
            self.ma_min[k], self.ma_max[k] = lo, hi
        else:
            self.ma_min[k] += MOVING_AVERAGE_CONSTANT * (lo - self.ma_min[k])
            self.ma_max[k] += MOVING_AVERAGE_CONSTANT * (hi - self.ma_max[k])
        self._grow(k, top)
        if self.hist_max[k] == 0:
            self.hist[k, 0] += kept  # all zeros so far: bin 0 of whatever range comes later
        else:
            self.hist[k] += np.histogram(magnitude, self.bins, range=(0.0, self.hist_max[k]))[0]

    def _grow(self, k: int, top: float) -> None:
        old = self.hist_max[k]
        if top <= old:
            return
        if old == 0:
            self.hist_max[k] = top  # counts so far are zeros, in bin 0 of any range
            return
        factor = 1
        while old * factor < top:
            factor *= 2
        merged = np.add.reduceat(self.hist[k], np.arange(0, self.bins, factor))
        self.hist[k] = 0
        self.hist[k, : merged.size] = merged
        self.hist_max[k] = old * factor

    def histogram(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        """Counts of |x| and their bin edges (bins + 1 of them, from 0 to hist_max)."""
        k = self.row(tensor)
        return self.hist[k].copy(), np.linspace(0.0, self.hist_max[k], self.bins + 1)

    def range(self, tensor: str, method: str = "minmax", **params: float) -> tuple[float, float] | None:
        """(lo, hi) for `tensor`, or None when it held no finite value.

        minmax: exact min and max. moving_average: per-batch min/max smoothed with 0.01.
        percentile (`percentile`, default 99.999), entropy (`levels`, default 128) and mse
        (`levels`, default 127 for signed tensors, 255 for non-negative ones) find a threshold t
        on the |x| histogram and give (-t, t), or (0, t) when the tensor is never negative.
        """
        k = self.row(tensor)
        if not self.count[k]:
            return None
        if method == "minmax":
            return _no_params(method, params, (float(self.min[k]), float(self.max[k])))
        if method == "moving_average":
            return _no_params(method, params, (float(self.ma_min[k]), float(self.ma_max[k])))
        signed = self.min[k] < 0
        top = max(abs(float(self.min[k])), abs(float(self.max[k])))
        hist, width = self.hist[k], self.hist_max[k] / self.bins
        if top == 0:
            t = 0.0
        elif method == "percentile":
            t = _percentile_threshold(hist, width, float(params.pop("percentile", 99.999)))
        elif method == "entropy":
            t = _entropy_threshold(hist, width, int(params.pop("levels", 128)))
        elif method == "mse":
            t = _mse_threshold(hist, width, int(params.pop("levels", 127 if signed else 255)))
        else:
            raise GraphoptError(f"unknown calibration method {method!r} (methods: minmax, moving_average, percentile, entropy, mse)")
        if params:
            raise GraphoptError(f"calibration method {method} takes no parameter {', '.join(params)}")
        t = float(min(t, top))  # a threshold from a bin edge may pass the largest value in its bin
        return (-t, t) if signed else (0.0, t)

    def ranges(self, method: str = "minmax", **params: float) -> dict[str, tuple[float, float] | None]:
        return {name: self.range(name, method, **params) for name in self.tensors}

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """One .npz, written atomically (a temp file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": _CACHE_FORMAT, "bins": self.bins, "batches": self.batches, "samples": self.samples, **(meta or {})}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    header=np.array(json.dumps(header)),
                    tensors=np.array(self.tensors, dtype=str),
                    hist=self.hist,
                    **{name: getattr(self, name) for name in self._ARRAYS},
                )
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[Statistics, dict]:
        """Statistics saved by `save`, and the header saved with them."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(str(npz["header"]))
                stats = cls([str(t) for t in npz["tensors"]], int(header["bins"]))
                stats.hist = npz["hist"]
                for name in cls._ARRAYS:
                    setattr(stats, name, npz[name])
        except Exception as exc:
            raise GraphoptError(f"{path}: cannot read calibration statistics: {one_line(exc)}") from None
        stats.batches, stats.samples = int(header["batches"]), int(header["samples"])
        return stats, header


def _no_params(method: str, params: dict, result: tuple[float, float]) -> tuple[float, float]:
    if params:
        raise GraphoptError(f"calibration method {method} takes no parameter {', '.join(params)}")
    return result


def _used_bins(hist: np.ndarray) -> int:
    """Bins up to and including the last non-empty one."""
    nonzero = np.flatnonzero(hist)
    return int(nonzero[-1]) + 1 if nonzero.size else 0


def _percentile_threshold(hist: np.ndarray, width: float, percentile: float) -> float:
    """np.percentile's linear interpolation between the two ranks around p, each rank's value
    placed within its bin as if the bin's values were evenly spread: within one bin width."""
    if not 0 < percentile <= 100:
        raise GraphoptError(f"percentile must be in (0, 100], not {percentile}")
    cdf = np.cumsum(hist)
    rank = (cdf[-1] - 1) * percentile / 100
    below = math.floor(rank)

    def value_at(r: int) -> float:
        b = int(np.searchsorted(cdf, r, side="right"))
        before = cdf[b - 1] if b else 0
        return float((b + (r - before + 0.5) / hist[b]) * width)

    lo = value_at(below)
    return lo if rank == below else lo + (rank - below) * (value_at(below + 1) - lo)


def _entropy_threshold(hist: np.ndarray, width: float, levels: int = 128) -> float:
    """TensorRT's KL calibration: for each candidate i (levels..bins), P = hist[:i] with the
    counts beyond folded into its last bin; Q = hist[:i] merged into `levels` groups, each group's
    count spread evenly back over its bins that are non-empty in P; the i minimizing KL(P || Q) wins,
    threshold = its upper bin edge."""
    used = _used_bins(hist)
    if used <= levels:
        return used * width  # every value already has a level of its own
    counts = hist[:used].astype(np.float64)
    beyond = counts[::-1].cumsum()[::-1]  # beyond[i] = sum(counts[i:])
    best_i, best_kl = used, math.inf
    for i in range(levels, used + 1):
        ref = counts[:i]
        p = ref.copy()
        if i < used:
            p[-1] += beyond[i]
        nonzero = p > 0
        starts = np.arange(levels) * (i // levels)  # the last group takes the remainder
        merged = np.add.reduceat(ref, starts)
        spread_over = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(merged, spread_over, out=np.zeros(levels), where=spread_over > 0)
        q = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * width


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if not q.any():
        return math.inf  # every count of P sits beyond the candidate threshold
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    # Q can be empty where P is not (a bin holding only folded-in outliers): a large, finite
    # penalty, like the smoothing of the reference implementations.
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))


def _mse_threshold(hist: np.ndarray, width: float, levels: int) -> float:
    """Expected squared error of quantizing to `levels` steps of t / levels, per candidate t at
    each bin's upper edge: values within t are off by a uniform rounding error (step^2 / 12), values
    beyond are clipped to t ((center - t)^2); all candidates at once from cumulative sums."""
    used = _used_bins(hist)
    counts = hist[:used].astype(np.float64)
    centers = (np.arange(used) + 0.5) * width
    t = np.arange(1, used + 1) * width
    inside = np.cumsum(counts)
    n_out = counts.sum() - inside

    def beyond(values: np.ndarray) -> np.ndarray:
        # sum over bins j >= i+1 of values[j], for candidate t = (i + 1) * width
        tail = values[::-1].cumsum()[::-1]
        return np.append(tail[1:], 0.0)

    s1, s2 = beyond(counts * centers), beyond(counts * centers**2)
    clip_error = s2 - 2 * t * s1 + t**2 * n_out
    rounding_error = inside * (t / levels) ** 2 / 12
    return float(t[int(np.argmin(clip_error + rounding_error))])


# ---------------------------------------------------------------------------------------------
# Collecting


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model  # inference failing leaves what the model declares
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return types


def default_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float activation of the main graph whose type is known: fed inputs, node outputs
    (Constant nodes' excepted: they are weights) and graph outputs, in graph order."""
    types = _value_types(model)
    g = model.graph
    names = [vi.name for vi in verify._real_inputs(g)]
    names += [out for node in g.node if node.op_type != "Constant" for out in node.output if out]
    names += [vi.name for vi in g.output]
    return [n for n in dict.fromkeys(names) if types.get(n) in _FLOAT_TYPES]


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy that also outputs `tensors` (graph inputs excepted: their values are the feeds);
    the model itself where it outputs them all already (no copy of the weights, no shape inference)."""
    present = {vi.name for vi in model.graph.output} | {vi.name for vi in model.graph.input}
    missing = [name for name in dict.fromkeys(tensors) if name not in present]
    if not missing:
        return model
    types = _value_types(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in missing:
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return copy


def _check_tensors(model: onnx.ModelProto, tensors: Iterable[str]) -> list[str]:
    types = _value_types(model)
    g = model.graph
    weights = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    produced = {o for n in g.node for o in n.output} | {vi.name for vi in verify._real_inputs(g)}
    checked = []
    for name in dict.fromkeys(tensors):
        if name in weights:
            raise GraphoptError(f"tensor '{name}' is a weight, not an activation; calibration observes activations")
        if name not in produced:
            raise GraphoptError(f"tensor '{name}' is not in the model's main graph")
        if types.get(name) not in _FLOAT_TYPES:
            raise GraphoptError(f"tensor '{name}' is not a float tensor of known type; calibration observes float activations")
        checked.append(name)
    return checked


def default_cache_dir() -> Path:
    """$GRAPHOPT_CACHE_DIR/calibration, else ~/.cache/graphopt/calibration."""
    base = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphopt")
    return Path(base) / "calibration"


def cache_key(model: onnx.ModelProto, data: CalibrationData, tensors: Sequence[str] | None, bins: int) -> str:
    h = hashlib.sha256(f"graphopt calibration {_CACHE_FORMAT}\0bins {bins}\0".encode())
    h.update(hashlib.sha256(model.SerializeToString()).digest())
    h.update(data.digest().encode())
    h.update(("\0".join(tensors) if tensors is not None else "\0default").encode())
    return h.hexdigest()


def collect(
    model: onnx.ModelProto | str,
    data: CalibrationData,
    tensors: Sequence[str] | None = None,
    *,
    bins: int = DEFAULT_BINS,
    progress: Progress | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int = 2,
) -> Statistics:
    """Statistics of `tensors` (default: `default_tensors`) over `data`, in one onnxruntime pass.

    ORT runs with its graph optimizations off, so every tensor name survives. `progress(done,
    total)` is called with the batches done. With `cache_dir` (see `default_cache_dir`), the
    statistics are saved there, keyed by model bytes, data digest, bins and tensor list, and a
    later call with the same key loads them without running the model."""
    proto = _load_model(model)
    names = default_tensors(proto) if tensors is None else _check_tensors(proto, tensors)
    if not names:
        raise GraphoptError("the model has no float activations of known type to calibrate")

    cache_path = None
    if cache_dir is not None:
        key = cache_key(proto, data, None if tensors is None else names, bins)
        cache_path = Path(cache_dir) / f"{key}.npz"
        if cache_path.is_file():
            with contextlib.suppress(GraphoptError):  # unreadable: collect again and overwrite
                stats, header = Statistics.load(cache_path)
                if header.get("key") == key and stats.tensors == names:
                    return stats

    stats = Statistics(names, bins)
    sess = verify._session(with_outputs(proto, names), threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fed = set(data.inputs)
    fetched = [n for n in names if n not in fed]
    total = len(data)
    if progress:
        progress(0, total)
    for done, feeds in enumerate(data, 1):
        try:
            values = sess.run(fetched, feeds) if fetched else []
        except Exception as exc:
            raise GraphoptError(f"onnxruntime failed to run the model on calibration batch {done}: {one_line(exc)}") from None
        for name in names:
            if name in fed:
                stats.add(name, feeds[name])
        for name, value in zip(fetched, values):
            stats.add(name, value)
        del values
        stats.batches += 1
        stats.samples += data.batch_size
        if progress:
            progress(done, total)

    if cache_path is not None:
        try:
            stats.save(cache_path, {"key": key, "source": data.source})
        except OSError as exc:
            warnings.warn(f"calibration statistics not cached in {cache_path.parent}: {one_line(exc)}", stacklevel=2)
    return stats


@contextlib.contextmanager
def progress_bar(description: str = "calibrating", console=None) -> Iterator[Progress]:
    """A `progress` callback drawing a transient rich bar on stderr; silent when not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    with RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# ---------------------------------------------------------------------------------------------
# From ranges and weights to int8 parameters (what quantization passes write)


def weight_int8(w: np.ndarray, axis: int, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales): symmetric, one scale per index of `axis` (an output channel
    or column), the largest magnitude mapped to `levels` (127; -128 unused, so negation stays
    exact; 63 for the target's 7-bit weights, `Hardware.int8_weight_levels`)."""
    w = np.asarray(w, np.float64)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    scale = np.maximum(np.abs(w).max(axis=reduce) / float(levels), 1e-12)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -levels, levels).astype(np.int8)
    return q, scale.astype(np.float32)


def int8_weight_levels(target) -> int:
    """The target's symmetric int8 weight magnitude (see weight_int8); 127 without a target."""
    hardware = getattr(target, "hardware", None)
    return hardware.int8_weight_levels if hardware is not None else 127


def activation_int8(lo: float, hi: float, signedness: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of a per-tensor activation range for "u8s8" (uint8, asymmetric) or
    "s8s8" (int8: symmetric, or zero point -128 for a range that is never negative)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signedness == "u8s8":
        scale = max((hi - lo) / 255.0, 1e-12)
        zero = int(np.clip(round(-lo / scale), 0, 255))
        return np.array(scale, np.float32), np.array(zero, np.uint8)
    if lo == 0.0:
        # Never negative: all 256 levels, zero point at the bottom (and a Relu before it is dropped).
        return np.array(max(hi / 255.0, 1e-12), np.float32), np.array(-128, np.int8)
    return np.array(max(max(-lo, hi) / 127.0, 1e-12), np.float32), np.array(0, np.int8)


@dataclass(frozen=True)
class ChannelStatistics:
    """One tensor's values per index of a channel axis, over every other axis and every batch (float64)."""

    mean: np.ndarray
    mean_square: np.ndarray
    abs_max: np.ndarray
    # Up to `rows` of the tensor's rows ([n, channels], float32), spread over the batches: what a
    # rewrite can try its quantization error on without running the model again.
    rows: np.ndarray | None = None
    # The mean of the tensor quantized and dequantized with the scale it was given (`quantized=`):
    # what the layer reading it sees on average, clipping included.
    quantized_mean: np.ndarray | None = None


def channel_statistics(
    model: onnx.ModelProto | str,
    data: CalibrationData,
    tensors: Sequence[str],
    *,
    axis: int | Mapping[str, int] = -1,
    threads: int = 2,
    rows: int = 0,
    quantized: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, ChannelStatistics]:
    """Per-channel mean, E[x^2] and max |x| of each tensor along `axis` (the input channel of the
    op that reads it), shape [tensor.shape[axis]].

    One onnxruntime pass like `collect`'s, with running sums only, so memory is the channels, not
    the samples. Data-aware weight quantization weighs each weight row's error by E[x^2] (a
    channel whose activations are 10x larger makes its weights' rounding error 100x costlier);
    smoothing balances max |x| against the weights'; bias correction needs the mean. Sentinels
    (see the module docstring) are left out of the sums, the maxima and the counts."""
    proto = _load_model(model)
    names = _check_tensors(proto, tensors)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    maxima: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    kept_rows: dict[str, list[np.ndarray]] = {}
    quantized = quantized or {}
    quantized_sums: dict[str, np.ndarray] = {}
    rows_per_batch = -(-rows // max(1, len(data))) if rows else 0
    fed = set(data.inputs)
    fetched = [n for n in names if n not in fed]
    sess = verify._session(with_outputs(proto, names), threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL) if fetched else None
    for done, feeds in enumerate(data, 1):
        try:
            values = sess.run(fetched, feeds) if fetched else []
        except Exception as exc:
            raise GraphoptError(f"onnxruntime failed to run the model on calibration batch {done}: {one_line(exc)}") from None
        for name, value in [(n, feeds[n]) for n in names if n in fed] + list(zip(fetched, values)):
            value = np.asarray(value)
            if value.ndim == 0:
                raise GraphoptError(f"tensor '{name}' is a scalar; it has no channels")
            channel_axis = axis if isinstance(axis, int) else axis.get(name, -1)
            flat = np.moveaxis(value, channel_axis, -1).reshape(-1, value.shape[channel_axis]).astype(np.float64)
            kept = np.isfinite(flat) & (np.abs(flat) < SENTINEL_MAGNITUDE)
            flat = np.where(kept, flat, 0.0)
            if name in sums and sums[name].shape[0] != flat.shape[1]:
                raise GraphoptError(f"tensor '{name}' has {flat.shape[1]} channels on axis {channel_axis} in batch {done}, {sums[name].shape[0]} before")
            if name in quantized:
                passed_on = np.where(kept, fake_quantized(flat, *quantized[name]), 0.0)
                quantized_sums[name] = quantized_sums.get(name, 0.0) + passed_on.sum(axis=0)
            sums[name] = sums.get(name, 0.0) + flat.sum(axis=0)
            squares[name] = squares.get(name, 0.0) + np.einsum("ij,ij->j", flat, flat)
            maxima[name] = np.maximum(maxima.get(name, 0.0), np.abs(flat).max(axis=0, initial=0.0))
            counts[name] = counts.get(name, 0) + kept.sum(axis=0)
            if rows_per_batch:
                step = max(1, flat.shape[0] // rows_per_batch)
                kept_rows.setdefault(name, []).append(flat[::step][:rows_per_batch].astype(np.float32))
        del values
    return {name: ChannelStatistics(sums[name] / np.maximum(counts[name], 1), squares[name] / np.maximum(counts[name], 1), maxima[name],
                                    np.concatenate(kept_rows[name])[:rows] if name in kept_rows else None,
                                    quantized_sums[name] / np.maximum(counts[name], 1) if name in quantized_sums else None)
            for name in names if name in sums}


def tensor_batches(model: onnx.ModelProto, data: CalibrationData, tensors: Sequence[str], *, threads: int = 2,
                   batches: int | None = None, first: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """{tensor: value} for each calibration batch (`batches` of them from batch `first` on), in one
    onnxruntime session without graph rewrites; a tensor that is a model input is the batch's own feed."""
    import onnxruntime as ort

    from graphopt import verify

    names = list(dict.fromkeys(tensors))
    fed = set(data.inputs)
    fetched = [n for n in names if n not in fed]
    sess = verify._session(with_outputs(model, fetched), threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL) if fetched else None
    for done, feeds in enumerate(itertools.islice(data, first, None), first + 1):
        if batches is not None and done > first + batches:
            return
        try:
            values = dict(zip(fetched, sess.run(fetched, feeds))) if fetched else {}
        except Exception as exc:
            raise GraphoptError(f"onnxruntime failed to run the model on calibration batch {done}: {one_line(exc)}") from None
        values.update({n: feeds[n] for n in names if n in fed})
        yield values


def fake_quantized(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """x through QuantizeLinear and DequantizeLinear with a per-tensor (scale, zero point), whose
    dtype (uint8 or int8) sets the levels: rounding half to even, as onnxruntime does."""
    levels = np.iinfo(np.asarray(zero).dtype)
    s, z = float(scale), float(zero)
    return (np.clip(np.round(x / s) + z, levels.min, levels.max) - z) * s


def conv_patches(x: np.ndarray, node, rng: np.random.Generator, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D Conv's input `x` [N, C, H, W] as rows of its receptive fields ([rows, C*kh*kw], the
    layout of the weight's rows), at most `max_rows` of them sampled without replacement, and the
    output positions they were taken at (flat indices into [N, H_out, W_out]). What a layer's
    refit and its data-aware low-rank split see of its input; written here because onnxruntime
    has no im2col op and numpy's sliding_window_view does not take strides, pads and dilations
    at once without a copy per batch."""
    n, c, h, w = x.shape
    weight = node.inputs[1].values
    kh, kw = weight.shape[2:]
    top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    picks = rng.choice(n * out_h * out_w, size=min(max_rows, n * out_h * out_w), replace=False)
    b, rest = np.divmod(picks, out_h * out_w)
    oy, ox = np.divmod(rest, out_w)
    ys = oy[:, None] * sh + np.arange(kh)[None, :] * dh  # [rows, kh]
    xs = ox[:, None] * sw + np.arange(kw)[None, :] * dw  # [rows, kw]
    patches = padded[b[:, None, None, None], np.arange(c)[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
    return patches.reshape(len(picks), -1), picks
