"""Bad input to `graphopt run`: every case exits 2 with one line on stderr, writes nothing, and
leaves the input file byte for byte as it was.

Each case builds its files in a fresh working folder and runs `graphopt run ... -o out.onnx --report
report.json` there (on an 80-column console, where rich would wrap a long line that is not printed
with soft wrapping). The folder's recursive listing must be the same afterwards: no output, no
report, no temporary files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import models
from bad_inputs.generate import small_model
from helpers import error_lines

EXIT_BAD_INPUT = 2
OUT_ARGS = ["-o", "out.onnx", "--report", "report.json"]


# ---------------------------------------------------------------------------------------------
# Helpers


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, str | None]:
    """Every entry below `folder` (hidden ones too): relative path -> sha256 for files, None otherwise."""
    entries: dict[str, str | None] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            entries[rel] = _sha256(path) if path.is_file() and not path.is_symlink() and not _is_fifo(path) else None
    return entries


def _is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(path.lstat().st_mode)


def _expect_bad_input(cli, work: Path, args: list, *, inputs: list[Path] = (), mentions: list[str] = (), timeout: float = 60) -> str:
    """Run the CLI in `work` and check the bad-input contract; returns the stderr line."""
    inputs = [Path(p) for p in inputs]
    before_listing = _listing(work)
    before_hashes = {p: _sha256(p) for p in inputs}
    proc = cli(*args, cwd=work, timeout=timeout)
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == EXIT_BAD_INPUT, report
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"expected exactly one line on stderr besides progress, got {len(lines)}:\n{report}"
    line = lines[0]
    for text in mentions:
        assert text in line, f"{text!r} not named in the error:\n{report}"
    # Nothing written: no output, no report, no leftover temporary files or folders.
    assert _listing(work) == before_listing, f"the working folder changed:\n{report}"
    for path, digest in before_hashes.items():
        assert path.exists(), f"{path} was removed"
        assert _sha256(path) == digest, f"{path} was modified"
    print(f"stderr: {line}")
    return line


def _save_small(path: Path) -> Path:
    onnx.save_model(small_model(), str(path))
    return path


def _save_external(path: Path) -> tuple[Path, Path]:
    """The small model with every initializer in `w.data` beside it."""
    onnx.save_model(
        small_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.data",
        size_threshold=0,
    )
    data = path.parent / "w.data"
    assert data.is_file()
    return path, data


def _set_location(path: Path, location: str) -> None:
    """Rewrite the external-data location of every external tensor in the model file at `path`."""
    proto = onnx.load_model(str(path), load_external_data=False)
    changed = 0
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
                changed += 1
    assert changed
    path.write_bytes(proto.SerializeToString())


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def bert_bytes() -> bytes:
    return models.load("bert_tiny").SerializeToString()


# ---------------------------------------------------------------------------------------------
# The input file


def test_sanity_the_small_model_runs(cli, work):
    """The helpers' model is good: the failures below come from what each case breaks."""
    model = _save_small(work / "small.onnx")
    proc = cli("run", model.name, *OUT_ARGS, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (work / "out.onnx").is_file()

    (work / "ext").mkdir()
    ext, _ = _save_external(work / "ext" / "m.onnx")
    proc = cli("run", ext, "-o", work / "ext-out.onnx", cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_path_does_not_exist(cli_narrow, work):
    # Long enough that a wrapped message would take two lines on an 80-column console.
    name = "no-such-model-" + "x" * 120 + ".onnx"
    _expect_bad_input(cli_narrow, work, ["run", name, *OUT_ARGS], mentions=[name])


@pytest.mark.parametrize("name", ["missing[v2].onnx", "missing[/bold].onnx", "missing[red].onnx"])
def test_path_with_brackets_is_named_verbatim(cli_narrow, work, name):
    # Square brackets in a path are not console markup: the message names the path as given.
    _expect_bad_input(cli_narrow, work, ["run", name, *OUT_ARGS], mentions=[name])


def test_path_is_a_directory(cli_narrow, work):
    (work / "adir.onnx").mkdir()
    _expect_bad_input(cli_narrow, work, ["run", "adir.onnx", *OUT_ARGS], mentions=["adir.onnx"])


def test_empty_file(cli_narrow, work):
    (work / "empty.onnx").write_bytes(b"")
    _expect_bad_input(cli_narrow, work, ["run", "empty.onnx", *OUT_ARGS], inputs=[work / "empty.onnx"], mentions=["empty.onnx"])


def test_text_file(cli_narrow, work):
    path = work / "notes.onnx"
    path.write_text("This is a README, not an ONNX model.\nIt has two lines.\n")
    _expect_bad_input(cli_narrow, work, ["run", path.name, *OUT_ARGS], inputs=[path], mentions=[path.name])


def test_truncated_model(cli_narrow, work, bert_bytes):
    path = work / "truncated.onnx"
    path.write_bytes(bert_bytes[: len(bert_bytes) // 2])
    _expect_bad_input(cli_narrow, work, ["run", path.name, *OUT_ARGS], inputs=[path], mentions=[path.name])


def _unknown_op_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.node[2].op_type = "NoSuchOp"
    return model


def _undefined_input_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.node[2].input[0] = "ghost"  # produced by no node, not an input or initializer
    return model


@pytest.mark.parametrize(
    "build,mention",
    [(_unknown_op_model, "NoSuchOp"), (_undefined_input_model, "ghost")],
    ids=["unknown-op", "undefined-input"],
)
def test_model_fails_onnx_checker(cli_narrow, work, build, mention):
    path = work / "invalid.onnx"
    path.write_bytes(build().SerializeToString())
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(path))
    line = _expect_bad_input(cli_narrow, work, ["run", path.name, *OUT_ARGS], inputs=[path], mentions=[path.name])
    assert "checker" in line or mention in line, line


def test_opset_newer_than_onnxruntime(cli_narrow, work):
    path = work / "opset30.onnx"
    onnx.save_model(small_model(opset=30), str(path))
    line = _expect_bad_input(cli_narrow, work, ["run", path.name, *OUT_ARGS], inputs=[path])
    assert "opset" in line and "30" in line, line


# ---------------------------------------------------------------------------------------------
# External data


def test_external_data_file_missing(cli_narrow, work):
    model, data = _save_external(work / "m.onnx")
    data.unlink()
    _expect_bad_input(cli_narrow, work, ["run", model.name, *OUT_ARGS], inputs=[model], mentions=["w.data"])


def test_external_data_truncated(cli_narrow, work):
    model, data = _save_external(work / "m.onnx")
    data.write_bytes(data.read_bytes()[:10])
    _expect_bad_input(cli_narrow, work, ["run", model.name, *OUT_ARGS], inputs=[model, data], mentions=["w.data"])


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../w.data"])
def test_external_data_location_escaping_the_folder(cli_narrow, work, location):
    folder = work / "a" / "b"
    folder.mkdir(parents=True)
    model, data = _save_external(folder / "m.onnx")
    _set_location(model, location)
    # For the relative escape into `work`, put a real data file there so only the check can refuse it.
    if location == "sub/../../w.data":
        shutil.copy(data, folder.parent / "w.data")
    line = _expect_bad_input(cli_narrow, work, ["run", model, *OUT_ARGS], inputs=[model, data], mentions=[location])
    assert "escapes" in line or "refused" in line, line


def test_external_data_escape_is_never_opened(cli_narrow, work):
    """The escaping location is a FIFO: opening it for reading would block, so a refusal that comes
    back at all (within the timeout) was made without reading it."""
    folder = work / "models"
    folder.mkdir()
    model, data = _save_external(folder / "m.onnx")
    os.mkfifo(work / "secret.data")
    _set_location(model, "../secret.data")
    line = _expect_bad_input(cli_narrow, work, ["run", model, *OUT_ARGS], inputs=[model, data], mentions=["../secret.data"], timeout=30)
    assert "escapes" in line or "refused" in line, line


# ---------------------------------------------------------------------------------------------
# Options


def test_unknown_target(cli_narrow, work):
    model = _save_small(work / "small.onnx")
    _expect_bad_input(cli_narrow, work, ["run", model.name, "--target", "riscv64", *OUT_ARGS], inputs=[model], mentions=["riscv64"])


@pytest.mark.parametrize("option", ["--passes", "--disable"])
def test_unknown_pass(cli_narrow, work, option):
    model = _save_small(work / "small.onnx")
    _expect_bad_input(cli_narrow, work, ["run", model.name, option, "dce,no-such-pass", *OUT_ARGS], inputs=[model], mentions=["no-such-pass"])


@pytest.mark.parametrize("spelling", ["same", "dotted", "absolute"])
def test_output_is_the_input(cli_narrow, work, spelling):
    model = _save_small(work / "small.onnx")
    out = {"same": "small.onnx", "dotted": "./sub/../small.onnx", "absolute": str(model)}[spelling]
    if spelling == "dotted":
        (work / "sub").mkdir()
    _expect_bad_input(cli_narrow, work, ["run", model.name, "-o", out, "--report", "report.json"], inputs=[model])


def test_output_folder_does_not_exist(cli_narrow, work):
    model = _save_small(work / "small.onnx")
    _expect_bad_input(
        cli_narrow, work, ["run", model.name, "-o", "no-such-folder/out.onnx", "--report", "report.json"], inputs=[model], mentions=["no-such-folder"]
    )
    assert not (work / "no-such-folder").exists()


def test_opt_level_out_of_range(cli_narrow, work):
    model = _save_small(work / "small.onnx")
    line = _expect_bad_input(cli_narrow, work, ["run", model.name, "-O", "7", *OUT_ARGS], inputs=[model])
    assert "7" in line, line


def test_output_is_a_directory(cli_narrow, work):
    # Another usage error click catches: same contract as -O 7.
    model = _save_small(work / "small.onnx")
    (work / "outdir").mkdir()
    _expect_bad_input(cli_narrow, work, ["run", model.name, "-o", "outdir", "--report", "report.json"], inputs=[model], mentions=["outdir"])


def test_output_is_the_inputs_external_data_file(cli_narrow, work):
    # Writing the result over the input's weight file would destroy the input just as surely.
    model, data = _save_external(work / "m.onnx")
    _expect_bad_input(cli_narrow, work, ["run", model.name, "-o", data.name, "--report", "report.json"], inputs=[model, data], mentions=[data.name])


def test_report_is_the_input(cli_narrow, work):
    model = _save_small(work / "small.onnx")
    _expect_bad_input(cli_narrow, work, ["run", model.name, "-o", "out.onnx", "--report", model.name], inputs=[model], mentions=[model.name])


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["compare", "small.onnx"]], ids=["inspect", "inspect-json", "compare"])
def test_other_commands_refuse_a_bad_file(cli_narrow, work, command):
    _save_small(work / "small.onnx")
    path = work / "notes.onnx"
    path.write_text("not a model\n")
    _expect_bad_input(cli_narrow, work, [*command, path.name], inputs=[path], mentions=[path.name])


def test_inputs_that_onnxruntime_rejects(cli_narrow, work):
    """Token ids outside the vocabulary make onnxruntime fail at run time: still one line, exit 2."""
    np.savez(
        work / "x.npz",
        input_ids=np.full((1, 16), 10**9, dtype=np.int64),
        attention_mask=np.ones((1, 16), dtype=np.int64),
    )
    line = _expect_bad_input(cli_narrow, work, ["run", "zoo:bert_tiny", "--inputs", "x.npz", *OUT_ARGS], inputs=[work / "x.npz"])
    assert "onnxruntime" in line, line


def test_quiet_bad_input_is_exactly_one_line(cli, tmp_path):
    """With -q there is no progress at all: stderr is the error line alone."""
    model = tmp_path / "m.onnx"
    onnx.save(small_model(), model)
    proc = cli("run", model, "-q", "-o", tmp_path / "missing" / "out.onnx", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [f"error: cannot write {tmp_path / 'missing' / 'out.onnx'}: folder {tmp_path / 'missing'} does not exist"]
