"""Generate the bad-input corpus for `graphopt run`.

Every case lives in its own subfolder of the corpus folder (named like the case) and is run with the
corpus folder as the working directory, so `Case.args` and `Case.protected` are relative to it.
The contract every case must meet (tests/test_bad_input_corpus.py checks it through the real CLI):
exit 2, exactly one non-empty line on stderr that contains `Case.error`, no traceback, nothing
written (the folder's listing is unchanged: no output, no report, no temporary files), and every
file in `Case.protected` byte for byte as it was. Cases with `may_succeed` (bit-flipped models that
may still parse) may instead exit 0 with a valid model written to `Case.outputs[0]`.

    python -m tests.bad_inputs.generate DIR      # write the corpus to DIR and list its cases
"""

from __future__ import annotations

import functools
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = "out.onnx"
REPORT = "report.json"


@dataclass(frozen=True)
class Case:
    name: str
    # Arguments to `graphopt`, paths relative to the corpus folder (the working directory of the run).
    args: tuple[str, ...]
    # A substring the one-line error must contain (the problem, or the file, tensor or node it is
    # about); None for cases whose failure is not predictable (bit flips): any one line will do.
    error: str | None
    # Files (relative to the corpus folder) that must be byte-identical after the run.
    protected: tuple[str, ...] = ()
    # Further substrings the error must contain too (the node, the paths, the shapes involved).
    mentions: tuple[str, ...] = ()
    # Exit 0 with a valid model at outputs[0] is acceptable too (a bit flip the model survives).
    may_succeed: bool = False
    # What a successful run writes (relative to the corpus folder); removed again after checking.
    outputs: tuple[str, ...] = ()
    # RLIMIT_FSIZE in bytes for the run: the "disk" fills up while the output is written.
    fsize_limit: int | None = None
    # A run that hangs has opened something it must not (a FIFO): fail after this many seconds.
    timeout: float = 120
    # Why this case cannot be exercised on this machine (e.g. running as root); None: it can.
    skip: str | None = None


# ---------------------------------------------------------------------------------------------
# Models


def small_model(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """y = relu(x @ W + b): nodes 'matmul', 'add', 'relu'; initializers W [4,4] and b [4]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((4,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["xwb"], name="add"),
            helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version  # onnx's default can be newer than the installed onnxruntime reads
    return model


def _graph_model(nodes, inputs, outputs, initializers=(), value_info=(), opsets=None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bad", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def _vi(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


@functools.cache
def _bert_bytes() -> bytes:
    from graphopt import models

    return models.load("bert_tiny").SerializeToString()


@functools.cache
def _bert_structure_bytes() -> int:
    """How many leading bytes of the serialized bert_tiny are structure (header and nodes), not weights.

    Protobuf writes fields in number order: the model's header fields, then its graph, whose nodes
    (field 1) come before everything else in it, initializers (field 5) included.
    """
    model = onnx.ModelProto.FromString(_bert_bytes())
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("opset_import")
    head.ClearField("metadata_props")
    head.graph.Clear()
    head.graph.node.extend(model.graph.node)
    structure = len(head.SerializeToString())
    return structure


def _write(path: Path, data: bytes | onnx.ModelProto) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return path


def _save_external(path: Path, location: str = "w.data") -> Path:
    """The small model with every initializer in the file `location` beside it; returns the data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        small_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return path.parent / location


def _set_location(path: Path, location: str) -> None:
    """Point every external tensor of the model file at `path` to `location` (written verbatim)."""
    proto = onnx.load_model(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


def _replace_bytes(data: bytes, old: bytes, new: bytes) -> bytes:
    """Swap a placeholder for raw bytes in a serialized model; same length, so no length prefix changes."""
    assert len(old) == len(new) and data.count(old) >= 1, (old, data.count(old))
    return data.replace(old, new)


# ---------------------------------------------------------------------------------------------
# Cases. Each builder writes its files under folder/name and returns its Case.

Builder = Callable[[Path, str], Case]
_BUILDERS: dict[str, Builder] = {}


def _case(name: str):
    def register(fn: Builder) -> Builder:
        assert name not in _BUILDERS, name
        _BUILDERS[name] = fn
        return fn

    return register


def _run(name: str, model: str, *extra: str, out: str | None = None, report: bool = True) -> tuple[str, ...]:
    """`run <name>/<model> -o <name>/out.onnx --report <name>/report.json`, paths in the case folder."""
    args = ["run", model if model.startswith("/") else f"{name}/{model}", "-o", out or f"{name}/{OUT}"]
    if report:
        args += ["--report", f"{name}/{REPORT}"]
    return tuple(args) + extra


def _small_case(
    folder: Path, name: str, model: onnx.ModelProto | bytes, error: str | None, *mentions: str, file: str = "model.onnx"
) -> Case:
    _write(folder / name / file, model)
    return Case(name, _run(name, file), error, protected=(f"{name}/{file}",), mentions=mentions)


# --- the file itself


@_case("empty-file")
def _empty(folder: Path, name: str) -> Case:
    return _small_case(folder, name, b"", "empty", "empty.onnx", file="empty.onnx")


@_case("directory")
def _directory(folder: Path, name: str) -> Case:
    (folder / name / "model.onnx").mkdir(parents=True)
    return Case(name, _run(name, "model.onnx"), "directory", mentions=(f"{name}/model.onnx",))


@_case("input-is-a-fifo")
def _input_fifo(folder: Path, name: str) -> Case:
    # Reading a FIFO nobody writes to would block forever: refused without opening it.
    (folder / name).mkdir(parents=True)
    os.mkfifo(folder / name / "model.onnx")
    return Case(name, _run(name, "model.onnx"), "not a regular file", mentions=(f"{name}/model.onnx",), timeout=30)


@_case("text-file")
def _text_file(folder: Path, name: str) -> Case:
    text = b"This is a README, not an ONNX model.\nIt has two lines.\n"
    return _small_case(folder, name, text, "not a valid ONNX model", "model.onnx")


# Cut points: inside the first field, inside the header, inside the graph's nodes, inside the weights,
# one byte short, and exactly on a field boundary (the file parses, but the opset imports are gone).
_CUTS: dict[str, Callable[[int, int], int]] = {  # (file size, boundary before the opsets) -> bytes kept
    "1": lambda n, b: 1,
    "10": lambda n, b: 10,
    "100": lambda n, b: 100,
    "quarter": lambda n, b: n // 4,
    "half": lambda n, b: n // 2,
    "minus-1": lambda n, b: n - 1,
    "before-opset": lambda n, b: b,
}


def _truncated(cut: str) -> Builder:
    def build(folder: Path, name: str) -> Case:
        data = _bert_bytes()
        model = onnx.ModelProto.FromString(data)
        # Everything but the trailing opset imports (field 8) and metadata: a clean field boundary.
        tail = onnx.ModelProto()
        tail.opset_import.extend(model.opset_import)
        tail.metadata_props.extend(model.metadata_props)
        boundary = len(data) - len(tail.SerializeToString())
        assert data[boundary:] == tail.SerializeToString()
        n = _CUTS[cut](len(data), boundary)
        return _small_case(folder, name, data[:n], "truncated.onnx", file="truncated.onnx")

    return build


for _cut in _CUTS:
    _case(f"truncated-{_cut}")(_truncated(_cut))


def _bitflip(seed: int, where: str) -> Builder:
    """Flip 1-8 seeded random bits of bert_tiny: anywhere (mostly weights) or in its structure."""

    def build(folder: Path, name: str) -> Case:
        data = bytearray(_bert_bytes())
        rng = random.Random(seed)
        end = _bert_structure_bytes() if where == "structure" else len(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(end)] ^= 1 << rng.randrange(8)
        _write(folder / name / "flipped.onnx", bytes(data))
        return Case(
            name,
            _run(name, "flipped.onnx"),
            None,
            protected=(f"{name}/flipped.onnx",),
            may_succeed=True,
            outputs=(f"{name}/{OUT}", f"{name}/{OUT}.session.json", f"{name}/{REPORT}"),
        )

    return build


for _seed in range(6):
    _case(f"bitflip-anywhere-{_seed}")(_bitflip(_seed, "anywhere"))
for _seed in range(12):
    _case(f"bitflip-structure-{_seed}")(_bitflip(100 + _seed, "structure"))


# --- the graph


@_case("cycle")
def _cycle(folder: Path, name: str) -> Case:
    # a reads b's output and b reads a's: no order of the two is topological.
    model = _graph_model(
        [
            helper.make_node("Add", ["x", "b_out"], ["a_out"], name="node_a"),
            helper.make_node("Relu", ["a_out"], ["b_out"], name="node_b"),
        ],
        [_vi("x", [1, 4])],
        [_vi("b_out", [1, 4])],
    )
    return _small_case(folder, name, model, "node_a", "b_out")


@_case("dangling-input")
def _dangling(folder: Path, name: str) -> Case:
    model = small_model()
    model.graph.node[2].input[0] = "ghost_tensor"  # produced by no node, not an input or initializer
    return _small_case(folder, name, model, "ghost_tensor", "relu")


@_case("duplicate-output")
def _duplicate_output(folder: Path, name: str) -> Case:
    model = _graph_model(
        [
            helper.make_node("Relu", ["x"], ["twice_written"], name="first_writer"),
            helper.make_node("Neg", ["x"], ["twice_written"], name="second_writer"),
            helper.make_node("Identity", ["twice_written"], ["y"], name="reader"),
        ],
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
    )
    return _small_case(folder, name, model, "twice_written")


def _unknown_domain(with_import: bool) -> Builder:
    def build(folder: Path, name: str) -> Case:
        opsets = {"": 17, "com.nobody": 1} if with_import else {"": 17}
        model = _graph_model(
            [
                helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("Frobnicate", ["r"], ["y"], name="frobnicator", domain="com.nobody"),
            ],
            [_vi("x", [1, 4])],
            [_vi("y", [1, 4])],
            opsets=opsets,
        )
        return _small_case(folder, name, model, "frobnicator", "com.nobody")

    return build


_case("unknown-domain-imported")(_unknown_domain(True))
_case("unknown-domain-not-imported")(_unknown_domain(False))


@_case("opset-too-new")
def _opset_too_new(folder: Path, name: str) -> Case:
    return _small_case(folder, name, small_model(opset=99), "opset 99")


# --- external data


@_case("external-data-missing")
def _external_missing(folder: Path, name: str) -> Case:
    data = _save_external(folder / name / "model.onnx")
    data.unlink()
    return Case(name, _run(name, "model.onnx"), "w.data", protected=(f"{name}/model.onnx",), mentions=("missing",))


@_case("external-data-truncated")
def _external_truncated(folder: Path, name: str) -> Case:
    data = _save_external(folder / name / "model.onnx")
    data.write_bytes(data.read_bytes()[:10])
    protected = (f"{name}/model.onnx", f"{name}/w.data")
    return Case(name, _run(name, "model.onnx"), "w.data", protected=protected, mentions=("truncated",))


def _escape(location: str) -> Builder:
    def build(folder: Path, name: str) -> Case:
        model = folder / name / "a" / "b" / "model.onnx"
        data = _save_external(model)
        _set_location(model, location)
        protected = (str(model.relative_to(folder)), str(data.relative_to(folder)))
        return Case(name, _run(name, "a/b/model.onnx"), "escapes", protected=protected, mentions=(location,), timeout=60)

    return build


_case("external-data-escape-relative")(_escape("../../etc/passwd"))
_case("external-data-escape-deep")(_escape("../../../../../../../../../../../../etc/passwd"))
_case("external-data-escape-absolute")(_escape("/etc/passwd"))


@_case("external-data-escape-fifo")
def _escape_fifo(folder: Path, name: str) -> Case:
    """The escaping location is a FIFO with no writer: opening it would block, so a refusal that
    comes back within the timeout was made without opening it."""
    model = folder / name / "model" / "model.onnx"
    _save_external(model)
    os.mkfifo(folder / name / "secret.fifo")
    _set_location(model, "../secret.fifo")
    protected = (f"{name}/model/model.onnx", f"{name}/model/w.data")
    args = _run(name, "model/model.onnx")
    return Case(name, args, "escapes", protected=protected, mentions=("../secret.fifo",), timeout=30)


@_case("external-data-fifo-inside")
def _fifo_inside(folder: Path, name: str) -> Case:
    """A FIFO inside the model's folder is not a data file either: refused without opening it."""
    model = folder / name / "model.onnx"
    _save_external(model)
    os.mkfifo(folder / name / "w.fifo")
    _set_location(model, "w.fifo")
    protected = (f"{name}/model.onnx", f"{name}/w.data")
    return Case(name, _run(name, "model.onnx"), "w.fifo", protected=protected, mentions=("not a regular file",), timeout=30)


# --- shapes that contradict the initializers


@_case("input-shape-contradicts-initializer")
def _input_vs_initializer(folder: Path, name: str) -> Case:
    # W is a graph input with a default (IR >= 4) declared [3, 3] while its initializer is [4, 4].
    model = small_model()
    model.graph.input.append(_vi("W", [3, 3]))
    return _small_case(folder, name, model, "'W'", "[3, 3]", "[4, 4]")


@_case("value-info-contradicts-initializer")
def _value_info_vs_initializer(folder: Path, name: str) -> Case:
    model = small_model()
    model.graph.value_info.append(_vi("b", [7]))  # the initializer b is [4]
    return _small_case(folder, name, model, "'b'", "[7]", "[4]")


@_case("value-info-contradicts-dtype")
def _value_info_dtype(folder: Path, name: str) -> Case:
    model = small_model()
    model.graph.value_info.append(_vi("W", [4, 4], TensorProto.INT64))  # the initializer W is float
    return _small_case(folder, name, model, "'W'", "int64", "float")


@_case("reshape-wrong-element-count")
def _reshape(folder: Path, name: str) -> Case:
    # x has 1*4 = 4 elements; the constant target [3, 3] asks for 9.
    model = _graph_model(
        [helper.make_node("Reshape", ["x", "target_shape"], ["y"], name="bad_reshape")],
        [_vi("x", [1, 4])],
        [_vi("y", [3, 3])],
        initializers=[numpy_helper.from_array(np.array([3, 3], dtype=np.int64), "target_shape")],
    )
    return _small_case(folder, name, model, "bad_reshape", "Reshape")


@_case("reshape-wrong-element-count-constant-node")
def _reshape_constant(folder: Path, name: str) -> Case:
    model = _graph_model(
        [
            helper.make_node(
                "Constant", [], ["target_shape"], name="target", value=numpy_helper.from_array(np.array([5], dtype=np.int64))
            ),
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Reshape", ["r", "target_shape"], ["y"], name="bad_reshape"),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", [5])],
    )
    return _small_case(folder, name, model, "bad_reshape", "Reshape")


@_case("reshape-wrong-element-count-constant-data")
def _reshape_constant_data(folder: Path, name: str) -> Case:
    # Both operands constant: fold-constants would evaluate this Reshape at compile time.
    model = _graph_model(
        [
            helper.make_node("Reshape", ["data", "target_shape"], ["r"], name="bad_reshape"),
            helper.make_node("Add", ["x", "r"], ["y"], name="add"),
        ],
        [_vi("x", [4, 2])],
        [_vi("y", [4, 2])],
        initializers=[
            numpy_helper.from_array(np.arange(6, dtype=np.float32), "data"),
            numpy_helper.from_array(np.array([4, 2], dtype=np.int64), "target_shape"),
        ],
    )
    return _small_case(folder, name, model, "bad_reshape", "Reshape")


@_case("reshape-inferred-dim-does-not-divide")
def _reshape_minus_one(folder: Path, name: str) -> Case:
    # 2*5 = 10 elements into [3, -1]: no whole number of rows of 3.
    model = _graph_model(
        [helper.make_node("Reshape", ["x", "target_shape"], ["y"], name="bad_reshape")],
        [_vi("x", [2, 5])],
        [_vi("y", [3, None])],
        initializers=[numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "target_shape")],
    )
    return _small_case(folder, name, model, "bad_reshape", "Reshape")


# --- names that are not UTF-8


_INVALID_UTF8 = b"\xff\xfe"


@_case("non-utf8-node-name")
def _non_utf8_node(folder: Path, name: str) -> Case:
    model = small_model()
    model.graph.node[1].name = "add_NAME_PLACEHOLDER"
    data = _replace_bytes(model.SerializeToString(), b"NAME_PLACEHOLDER", b"NAME_PLACEHOLD" + _INVALID_UTF8)
    return _small_case(folder, name, data, "UTF-8", "node 'add_NAME_PLACEHOLD")


@_case("non-utf8-tensor-name")
def _non_utf8_tensor(folder: Path, name: str) -> Case:
    model = small_model()
    # Rename the tensor between add and relu everywhere it appears (node output, node input).
    model.graph.node[1].output[0] = "TENSOR_PLACEHOLDER"
    model.graph.node[2].input[0] = "TENSOR_PLACEHOLDER"
    data = _replace_bytes(model.SerializeToString(), b"TENSOR_PLACEHOLDER", b"TENSOR_PLACEHOL\xc3" + _INVALID_UTF8)
    return _small_case(folder, name, data, "UTF-8", "node 'add'")


@_case("non-utf8-initializer-name")
def _non_utf8_initializer(folder: Path, name: str) -> Case:
    model = small_model()
    model.graph.initializer[1].name = "INIT_PLACEHOLDER"
    model.graph.node[1].input[1] = "INIT_PLACEHOLDER"
    data = _replace_bytes(model.SerializeToString(), b"INIT_PLACEHOLDER", b"INIT_PLACEHOLDE\x80")
    return _small_case(folder, name, data, "UTF-8", "node 'add'")


# --- where the output goes


@_case("output-is-input")
def _output_is_input(folder: Path, name: str) -> Case:
    _write(folder / name / "model.onnx", small_model())
    args = _run(name, "model.onnx", out=f"{name}/model.onnx")
    return Case(name, args, "file of the input model", protected=(f"{name}/model.onnx",))


@_case("output-is-input-dotted")
def _output_is_input_dotted(folder: Path, name: str) -> Case:
    _write(folder / name / "model.onnx", small_model())
    (folder / name / "sub").mkdir()
    args = _run(name, "model.onnx", out=f"{name}/sub/../model.onnx")
    return Case(name, args, "file of the input model", protected=(f"{name}/model.onnx",))


@_case("output-folder-is-a-file")
def _output_in_file(folder: Path, name: str) -> Case:
    # A regular file used as a folder: no one, root included, can create a file inside it.
    _write(folder / name / "model.onnx", small_model())
    _write(folder / name / "file.onnx", b"just a file\n")
    return Case(
        name,
        _run(name, "model.onnx", out=f"{name}/file.onnx/out.onnx"),
        "is not a folder",
        protected=(f"{name}/model.onnx", f"{name}/file.onnx"),
        mentions=(f"{name}/file.onnx",),
    )


@_case("report-folder-is-a-file")
def _report_in_file(folder: Path, name: str) -> Case:
    # Found before any work: the output must not be written when the report cannot be.
    _write(folder / name / "model.onnx", small_model())
    _write(folder / name / "file.json", b"{}\n")
    args = ("run", f"{name}/model.onnx", "-o", f"{name}/{OUT}", "--report", f"{name}/file.json/report.json")
    protected = (f"{name}/model.onnx", f"{name}/file.json")
    return Case(name, args, "is not a folder", protected=protected, mentions=(f"{name}/file.json",))


@_case("report-folder-missing")
def _report_folder_missing(folder: Path, name: str) -> Case:
    _write(folder / name / "model.onnx", small_model())
    args = ("run", f"{name}/model.onnx", "-o", f"{name}/{OUT}", "--report", f"{name}/no-such-folder/report.json")
    return Case(name, args, "does not exist", protected=(f"{name}/model.onnx",), mentions=(f"{name}/no-such-folder",))


@_case("dump-ir-folder-inside-a-file")
def _dump_ir_in_file(folder: Path, name: str) -> Case:
    _write(folder / name / "model.onnx", small_model())
    _write(folder / name / "file.onnx", b"just a file\n")
    args = _run(name, "model.onnx", "--dump-ir", f"{name}/file.onnx/ir")
    return Case(name, args, "dump", protected=(f"{name}/model.onnx", f"{name}/file.onnx"), mentions=(f"{name}/file.onnx/ir",))


@_case("output-folder-read-only")
def _output_read_only(folder: Path, name: str) -> Case:
    _write(folder / name / "model.onnx", small_model())
    ro = folder / name / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    skip = None
    probe = ro / ".probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        skip = "chmod 0555 does not stop this user from writing (running as root or with CAP_DAC_OVERRIDE)"
    except OSError:
        pass
    args = _run(name, "model.onnx", out=f"{name}/ro/out.onnx", report=False)
    return Case(name, args, "is not writable", protected=(f"{name}/model.onnx",), mentions=(f"{name}/ro",), skip=skip)


@_case("output-in-proc")
def _output_in_proc(folder: Path, name: str) -> Case:
    # procfs refuses new files even to root.
    _write(folder / name / "model.onnx", small_model())
    skip = None if Path("/proc/self").is_dir() else "no /proc on this system"
    args = _run(name, "model.onnx", out="/proc/self/out.onnx")
    return Case(name, args, "/proc/self/out.onnx", protected=(f"{name}/model.onnx",), skip=skip)


@_case("output-is-dev-full")
def _output_dev_full(folder: Path, name: str) -> Case:
    # A device is not a file graphopt may replace (the write goes to a temporary file and a rename).
    _write(folder / name / "model.onnx", small_model())
    skip = None if Path("/dev/full").exists() else "no /dev/full on this system"
    args = _run(name, "model.onnx", out="/dev/full")
    return Case(name, args, "not a regular file", protected=(f"{name}/model.onnx",), mentions=("/dev/full",), skip=skip)


@_case("report-is-dev-full")
def _report_dev_full(folder: Path, name: str) -> Case:
    _write(folder / name / "model.onnx", small_model())
    skip = None if Path("/dev/full").exists() else "no /dev/full on this system"
    args = ("run", f"{name}/model.onnx", "-o", f"{name}/{OUT}", "--report", "/dev/full")
    return Case(name, args, "not a regular file", protected=(f"{name}/model.onnx",), mentions=("/dev/full",), skip=skip)


@_case("disk-full")
def _disk_full(folder: Path, name: str) -> Case:
    # The run may write at most 64 KiB per file (RLIMIT_FSIZE): bert_tiny's ~2 MiB output fills the "disk".
    _write(folder / name / "model.onnx", _bert_bytes())
    skip = None if sys.platform.startswith("linux") else "RLIMIT_FSIZE behaves this way only on Linux here"
    return Case(
        name,
        _run(name, "model.onnx"),
        "cannot write",
        protected=(f"{name}/model.onnx",),
        mentions=(f"{name}/{OUT}",),
        fsize_limit=64 * 1024,
        skip=skip,
    )


# ---------------------------------------------------------------------------------------------


def case_names() -> list[str]:
    return list(_BUILDERS)


def generate(folder: str | os.PathLike, names: list[str] | None = None) -> list[Case]:
    """Write the corpus (or the named cases) into `folder`, one subfolder per case; returns the cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in names if names is not None else case_names():
        if (folder / name).exists():
            raise FileExistsError(f"{folder / name} exists; generate into an empty folder")
        case = _BUILDERS[name](folder, name)
        assert case.name == name
        cases.append(case)
    return cases


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m tests.bad_inputs.generate DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    for case in generate(folder):
        note = f"  [skipped here: {case.skip}]" if case.skip else ""
        print(f"{case.name}: (cd {folder} && graphopt {' '.join(case.args)}){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
