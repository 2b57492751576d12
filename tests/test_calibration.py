"""Tests for graphopt.calibration: data readers, streaming statistics, range methods and the cache."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import calibration
from graphopt.calibration import Preprocess, RandomDataWarning, collect, from_arrays, from_images, from_path, random_data
from graphopt.errors import GraphoptError

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx's default can be newer than the installed onnxruntime accepts
    onnx.checker.check_model(model)
    return model


def _identity(shape, name="x"):
    return _model(
        [helper.make_node("Identity", [name], ["y"])],
        [helper.make_tensor_value_info(name, F, shape)],
        [helper.make_tensor_value_info("y", F, shape)],
    )


def _chain(width=16, batch=1):
    """x -> Relu -> r -> Mul 2 -> m -> Add 0.5 -> y"""
    return _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Mul", ["r", "two"], ["m"]),
            helper.make_node("Add", ["m", "half"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", F, [batch, width])],
        [helper.make_tensor_value_info("y", F, [batch, width])],
        [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(0.5), "half")],
    )


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(("shape", "batch_size", "batches"), [([1, 3, 8, 8], 1, 64), ([4, 3, 8, 8], 1, 16), (["N", 3, 8, 8], 8, 8)])
def test_npz_is_split_into_the_models_batches(tmp_path, shape, batch_size, batches):
    samples = np.arange(64 * 3 * 8 * 8, dtype=np.float32).reshape(64, 3, 8, 8)
    np.savez(tmp_path / "data.npz", x=samples)
    data = from_path(tmp_path / "data.npz", _identity(shape), batch_size=batch_size)
    assert len(data) == batches and data.samples == 64 and data.dropped == 0
    got = list(data)
    assert len(got) == batches
    assert {b["x"].shape for b in got} == {(64 // batches, 3, 8, 8)}
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), samples)


def test_remainder_that_fills_no_batch_is_dropped_and_counted(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((10, 3, 8, 8), np.float32))
    data = from_path(tmp_path / "data.npz", _identity([4, 3, 8, 8]))
    assert (len(data), data.samples, data.dropped) == (2, 8, 2)
    assert len(list(data)) == 2


def test_wrong_dim_missing_and_extra_inputs_are_refused(tmp_path):
    model = _identity([1, 3, 8, 8])
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 8, 9), np.float32))
    with pytest.raises(GraphoptError) as exc:
        from_path(tmp_path / "wrong.npz", model)
    assert "input 'x' has size 9 on axis 3, the model expects 8" in _one_line(exc)

    np.savez(tmp_path / "missing.npz", other=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(GraphoptError) as exc:
        from_path(tmp_path / "missing.npz", model)
    assert "'other'" in _one_line(exc) and "not an input" in str(exc.value)

    model2 = _model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [helper.make_tensor_value_info(n, F, [1, 4]) for n in ("x", "z")],
        [helper.make_tensor_value_info("y", F, [1, 4])],
    )
    np.savez(tmp_path / "half.npz", x=np.zeros((2, 4), np.float32))
    with pytest.raises(GraphoptError) as exc:
        from_path(tmp_path / "half.npz", model2)
    assert "input 'z' is missing" in _one_line(exc)


def test_dtypes_are_cast_only_when_safe(tmp_path):
    model = _identity([1, 4])
    np.savez(tmp_path / "f64.npz", x=np.ones((3, 4), np.float64))
    assert {b["x"].dtype for b in from_path(tmp_path / "f64.npz", model)} == {np.dtype(np.float32)}
    int_model = _model(
        [helper.make_node("Identity", ["ids"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
    )
    np.savez(tmp_path / "float_ids.npz", ids=np.ones((3, 4), np.float32))
    with pytest.raises(GraphoptError) as exc:
        from_path(tmp_path / "float_ids.npz", int_model)
    assert "dtype float32" in _one_line(exc)
    np.savez(tmp_path / "big_ids.npz", ids=np.full((3, 4), 2**40, np.int64))
    with pytest.raises(GraphoptError):
        from_path(tmp_path / "big_ids.npz", int_model)


def test_npy_and_a_folder_of_files(tmp_path):
    model = _identity(["N", 4])
    rng = np.random.default_rng(0)
    single = rng.standard_normal((6, 4)).astype(np.float32)
    np.save(tmp_path / "single.npy", single)
    data = from_path(tmp_path / "single.npy", model, batch_size=3)
    np.testing.assert_array_equal(np.concatenate(list(b["x"] for b in data)), single)

    folder = tmp_path / "folder"
    folder.mkdir()
    parts = [rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 1, 2)]
    np.savez(folder / "a.npz", x=parts[0])
    np.save(folder / "b.npy", parts[1][0])  # one sample, saved without its batch axis
    np.savez(folder / "c.npz", x=parts[2])
    (folder / "notes.txt").write_text("ignored")
    data = from_path(folder, model, batch_size=4)
    assert (len(data), data.dropped) == (1, 2)
    (batch,) = list(data)
    np.testing.assert_array_equal(batch["x"], np.concatenate(parts)[:4])


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_images_are_preprocessed_as_declared(tmp_path):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    _png(tmp_path / "a.png", first)
    _png(tmp_path / "b.png", rng.integers(0, 256, (20, 16, 3), dtype=np.uint8))
    _png(tmp_path / "c.png", rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)

    nchw = Preprocess(size=(8, 8), mean=mean, std=std, channels="BGR")
    data = from_images(tmp_path, _identity([1, 3, 8, 8]), nchw)
    batches = list(data)
    assert len(batches) == 3 and {b["x"].shape for b in batches} == {(1, 3, 8, 8)}

    from PIL import Image

    resized = np.asarray(Image.fromarray(first).resize((8, 8), Image.Resampling.BILINEAR), np.float32)
    expected = (resized[..., ::-1] / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(batches[0]["x"][0], expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)

    nhwc = Preprocess(size=8, crop=(6, 4), layout="NHWC", scale=1.0)
    data = from_images(tmp_path, _identity(["N", 6, 4, 3]), nhwc, batch_size=3)
    (batch,) = list(data)
    assert batch["x"].shape == (3, 6, 4, 3)
    # a.png is 10x12 (h x w): shorter side to 8 gives 8x10, the center 6x4 starts at (1, 3).
    small = np.asarray(Image.fromarray(first).resize((10, 8), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_allclose(batch["x"][0], small[1:7, 3:7], atol=1e-5)

    with pytest.raises(GraphoptError) as exc:
        from_images(tmp_path, _identity([1, 3, 8, 8]), Preprocess(size=(8, 9)))
    assert "input 'x'" in _one_line(exc) and "axis 3" in str(exc.value)


def test_unreadable_image_is_named(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(GraphoptError) as exc:
        from_images(tmp_path, _identity([1, 3, 4, 4]), Preprocess())
    assert "broken.jpg" in _one_line(exc)


def test_missing_pillow_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # makes `import PIL` fail
    with pytest.raises(GraphoptError) as exc:
        from_images(tmp_path, _identity([1, 3, 4, 4]), Preprocess())
    assert "pip install pillow" in _one_line(exc)


def test_random_data_warns_that_it_is_not_representative():
    with pytest.warns(RandomDataWarning, match="not be representative"):
        data = random_data(_identity(["N", 4]), samples=10, seed=3, batch_size=4)
    assert not data.representative and (len(data), data.dropped) == (2, 2)
    first, again = list(data), list(data)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, again))
    assert {b["x"].shape for b in first} == {(4, 4)}


def test_digest_changes_with_the_data():
    model = _identity([1, 4])
    a = np.zeros((4, 4), np.float32)
    b = a.copy()
    b[3, 3] = 1
    assert from_arrays(a_dict := {"x": a}, model).digest() == from_arrays(a_dict, model).digest()
    assert from_arrays({"x": a}, model).digest() != from_arrays({"x": b}, model).digest()


# ---------------------------------------------------------------------------------------------
# Statistics


def _reference(x):
    r = np.maximum(x, 0)
    m = r * np.float32(2)
    return {"x": x, "r": r, "m": m, "y": m + np.float32(0.5)}


def test_minmax_is_exact_and_percentile_within_one_bin():
    rng = np.random.default_rng(1)
    # Batches of growing scale: the histogram must grow its range several times.
    x = (rng.standard_normal((12, 16)) * np.repeat(np.arange(1, 5), 3)[:, None]).astype(np.float32)
    stats = collect(_chain(), from_arrays({"x": x}, _chain()), bins=512)
    assert stats.tensors == ["x", "r", "m", "y"]
    for name, values in _reference(x).items():
        assert stats.range(name, "minmax") == (float(values.min()), float(values.max()))
        assert stats.count[stats.tensors.index(name)] == values.size
        counts, edges = stats.histogram(name)
        assert counts.sum() == values.size and edges[-1] >= np.abs(values).max()
        width = edges[1] - edges[0]
        for p in (50.0, 90.0, 99.0):
            lo, hi = stats.range(name, "percentile", percentile=p)
            assert abs(hi - np.percentile(np.abs(values), p)) <= width * 1.001, (name, p)
            assert lo == (-hi if values.min() < 0 else 0.0)


def test_moving_average_lags_behind_minmax():
    x = np.concatenate([np.full((1, 16), s, np.float32) * np.linspace(-1, 1, 16, dtype=np.float32) for s in (1, 10, 1, 1)])
    stats = collect(_chain(), from_arrays({"x": x}, _chain()), tensors=["x"])
    lo, hi = stats.range("x", "minmax")
    ma_lo, ma_hi = stats.range("x", "moving_average")
    assert (lo, hi) == (-10.0, 10.0)
    assert -1.2 < ma_lo < -1.0 and 1.0 < ma_hi < 1.2  # 1 + 0.01 * 9, then pulled back towards 1


def _quantization_mse(values, t):
    step = t / 127
    return float(np.mean((values - np.clip(np.round(values / step), -127, 127) * step) ** 2))


def test_entropy_mse_percentile_clip_outliers_but_not_uniform():
    width = 4096
    model = _identity([1, width])
    rng = np.random.default_rng(2)
    gauss = rng.standard_normal((64, width)).astype(np.float32)
    gauss[10, 5] = 60.0  # one huge outlier in 262144 values
    uniform = rng.uniform(-1, 1, (64, width)).astype(np.float32)
    for values, clipped in ((gauss, True), (uniform, False)):
        stats = collect(model, from_arrays({"x": values}, model), tensors=["x"])
        top = float(np.abs(values).max())
        for method in ("entropy", "mse", "percentile"):
            lo, hi = stats.range("x", method)
            assert lo == -hi and 0 < hi <= top
            if not clipped:
                assert hi > 0.9 * top, (method, hi, top)
            elif method != "mse":
                assert hi < 0.2 * top, (method, hi, top)
            else:
                # MSE weighs the outlier's clipping error against every value's rounding error,
                # so it clips less; check it against brute-force fake quantization.
                candidates = np.linspace(1, top, 120)
                errors = [_quantization_mse(values, t) for t in candidates]
                assert hi < 0.6 * top and _quantization_mse(values, hi) <= 1.02 * min(errors), (hi, candidates[np.argmin(errors)])
    non_negative = collect(_chain(), from_arrays({"x": gauss[:, :16]}, _chain()), tensors=["r"])
    assert non_negative.range("r", "entropy")[0] == 0.0


def test_masks_do_not_break_calibration():
    model = _model(
        [helper.make_node("Add", ["x", "mask"], ["y"])],
        [helper.make_tensor_value_info(n, F, [1, 8]) for n in ("x", "mask")],
        [helper.make_tensor_value_info("y", F, [1, 8])],
    )
    low = np.finfo(np.float32).min
    mask = np.zeros((3, 8), np.float32)
    mask[0, :2] = -np.inf
    mask[1, 4:] = low
    mask[2, :] = low  # a batch that is all mask
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    stats = collect(model, from_arrays({"x": x, "mask": mask}, model))
    for name in ("mask", "y"):
        assert stats.ignored[stats.tensors.index(name)] == 2 + 4 + 8
        for method in ("minmax", "moving_average", "percentile", "entropy", "mse"):
            rng = stats.range(name, method)
            assert rng is not None and np.all(np.isfinite(rng)), (name, method, rng)
    assert stats.range("mask", "minmax") == (0.0, 0.0)
    only_mask = calibration.Statistics(["m"])
    only_mask.add("m", np.array([-np.inf, low, np.nan], np.float32))
    assert only_mask.range("m", "entropy") is None and only_mask.ignored[0] == 3


def test_tensors_must_be_float_activations():
    with pytest.raises(GraphoptError) as exc:
        collect(_chain(), from_arrays({"x": np.ones((1, 16), np.float32)}, _chain()), tensors=["two"])
    assert "'two'" in _one_line(exc) and "weight" in str(exc.value)
    with pytest.raises(GraphoptError) as exc:
        collect(_chain(), from_arrays({"x": np.ones((1, 16), np.float32)}, _chain()), tensors=["nope"])
    assert "'nope'" in _one_line(exc)


def test_cache_skips_onnxruntime_until_bins_or_data_change(tmp_path, monkeypatch):
    model = _chain()
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    sessions = []
    real = onnxruntime.InferenceSession

    def counting(*args, **kwargs):
        sessions.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    first = collect(model, from_arrays({"x": x}, model), cache_dir=tmp_path)
    assert len(sessions) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again = collect(model, from_arrays({"x": x}, model), cache_dir=tmp_path)
    assert len(sessions) == 1
    assert again.tensors == first.tensors and again.batches == 4
    for name in first.tensors:
        for method in ("minmax", "moving_average", "entropy", "mse"):
            assert again.range(name, method) == first.range(name, method)
    collect(model, from_arrays({"x": x}, model), bins=1024, cache_dir=tmp_path)
    assert len(sessions) == 2
    collect(model, from_arrays({"x": x + 1}, model), cache_dir=tmp_path)
    assert len(sessions) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_progress_is_reported_per_batch():
    model = _chain()
    seen = []
    collect(model, from_arrays({"x": np.ones((5, 16), np.float32)}, model), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 5) for i in range(6)]

    from rich.console import Console

    quiet, loud = io.StringIO(), io.StringIO()
    for out, terminal in ((quiet, False), (loud, True)):
        with calibration.progress_bar("calibrating", Console(file=out, force_terminal=terminal)) as update:
            for i in range(3):
                update(i + 1, 3)
    assert quiet.getvalue() == "" and "calibrating" in loud.getvalue()


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    assert calibration.default_cache_dir() == tmp_path / "calibration"
    monkeypatch.delenv("GRAPHOPT_CACHE_DIR")
    assert calibration.default_cache_dir().parts[-3:] == (".cache", "graphopt", "calibration")


def _peak_bytes(model, samples):
    x = np.random.default_rng(4).standard_normal((samples, 64)).astype(np.float32)
    data = from_arrays({"x": x}, model)
    tracemalloc.start()
    try:
        collect(model, data, bins=256)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_samples_grow():
    model = _chain(width=64)
    _peak_bytes(model, 4)  # warm up: imports and onnxruntime's first-use allocations
    small, large = _peak_bytes(model, 16), _peak_bytes(model, 512)
    print(f"\ncollect peak Python memory: 16 samples {small / 1024:.1f} KiB, 512 samples {large / 1024:.1f} KiB")
    assert large < 1.5 * small


# ---------------------------------------------------------------------------------------------
# graphopt calibrate


def test_calibrate_cli_shows_ranges_and_reuses_its_cache(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    import graphopt.models as zoo_models
    from graphopt import calibration
    from graphopt.cli import cli

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    feeds, _ = zoo_models.eval_data("digits_cnn")
    data = tmp_path / "digits.npz"
    np.savez(data, **{k: v[:64] for k, v in feeds.items()})
    first = CliRunner().invoke(cli, ["calibrate", "zoo:digits_cnn", "--data", str(data), "--method", "entropy", "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    assert summary["samples"] == 64 and summary["representative"] and not summary["from_cache"]
    relu = next(r for r in summary["tensors"] if "relu" in r["tensor"].lower())
    assert relu["min"] >= 0 and 0 < relu["range"][1] <= relu["max"]
    runs = []
    monkeypatch.setattr(calibration.verify, "_session", lambda *a, **k: runs.append(a) or (_ for _ in ()).throw(AssertionError("ran the model")))
    second = CliRunner().invoke(cli, ["calibrate", "zoo:digits_cnn", "--data", str(data), "--method", "minmax", "--json"])
    assert second.exit_code == 0, second.output
    again = json.loads(second.output)
    assert again["from_cache"] and not runs
    minmax = next(r for r in again["tensors"] if r["tensor"] == relu["tensor"])
    assert minmax["range"] == [relu["min"], relu["max"]]


def test_calibrate_cli_refuses_ambiguous_or_missing_data(tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    result = CliRunner().invoke(cli, ["calibrate", "zoo:digits_cnn"])
    assert result.exit_code == 2 and "exactly one of --data" in result.output
    result = CliRunner().invoke(cli, ["calibrate", "zoo:digits_cnn", "--random", "4", "--no-cache"])
    assert result.exit_code == 0 and "not be representative" in result.output


def test_files_of_different_sequence_lengths_calibrate_a_dynamic_model(tmp_path):
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "seq",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for i, length in enumerate((12, 40, 7)):
        np.savez(tmp_path / f"{i}.npz", ids=np.arange(length, dtype=np.int64)[None])
    data = calibration.from_path(tmp_path, model)
    assert [b["ids"].shape for b in data] == [(1, 12), (1, 40), (1, 7)]
    # Two samples a batch would stack a 12 with a 40: refused, naming the file and the rule.
    with pytest.raises(GraphoptError, match=r"1\.npz: input 'ids' has sample shape \[40\], earlier files have \[12\]; .*whole batches of 2"):
        calibration.from_path(tmp_path, model, batch_size=2)
