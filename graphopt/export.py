"""Writing a model: export from graphopt's IR to ONNX, and atomic, streamed saving.

`export` turns an `ir.Model` into an `Exported` (a ModelProto whose main-graph initializers are
streamed one by one, so no second copy of the weights is ever held); `save` writes it atomically,
with external data past the protobuf limit; `to_proto` builds one whole ModelProto and
`structure_proto` one without its big weights (for shape inference and onnx.checker);
`approx_nbytes` estimates the serialized size. Importing this module also teaches
onnx-graphsurgeon's exporter what it cannot write by itself (see below).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from graphopt.errors import GraphoptError
from graphopt.ir import DEFAULT_DOMAINS, Model, all_graphs, all_nodes, toposort, used_constants
from graphopt.loading import EmptyAttr, check


# Protobuf cannot serialize a message of 2 GiB or more, so bigger models must keep weights outside.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Tensors at least this big go to the external data file when a model is saved with external data.
EXTERNAL_DATA_MIN_BYTES = 1024


# ---------------------------------------------------------------------------------------------
# What onnx-graphsurgeon (0.5, 0.6) cannot export, exported here (see graphopt.loading for what
# its importer loses and is kept there)
#
# * Values of optional, map or nested sequence type: `from_proto` keeps each such value's full
#   TypeProto on the Variable (`onnx_type`), and the exporter writes it back.
# * Constants of strings whose values were loaded into numpy (a pass read them): gs always
#   exports through raw_data, which ONNX forbids for strings. They go through numpy_helper.
# * Attributes imported as `EmptyAttr` (an empty list attribute) are exported with their type.

_gs_export_value_info = OnnxExporter.export_value_info_proto
_gs_export_tensor = OnnxExporter.export_tensor_proto


def _export_value_info(tensor: gs.Tensor, do_type_check: bool) -> onnx.ValueInfoProto:
    kind = getattr(tensor, "type", "tensor_type")
    if isinstance(tensor, gs.Constant) or kind in (None, "tensor_type"):
        return _gs_export_value_info(tensor, do_type_check)
    kept = getattr(tensor, "onnx_type", None)
    if kept is not None:
        return onnx.helper.make_value_info(tensor.name, kept)
    if kind == "optional_type" and isinstance(tensor.dtype, onnx.TypeProto):
        return onnx.helper.make_value_info(tensor.name, onnx.helper.make_optional_type_proto(tensor.dtype))
    if kind in ("sequence_type", "sparse_tensor_type"):
        return _gs_export_value_info(tensor, do_type_check)
    return onnx.helper.make_empty_tensor_value_info(tensor.name)


def _export_tensor(tensor: gs.Constant) -> onnx.TensorProto:
    if not isinstance(tensor._values, (LazyValues, SparseValues)) and np.dtype(tensor.dtype).kind in "OSU":
        return onnx.numpy_helper.from_array(np.asarray(tensor.values, dtype=object), tensor.name)
    return _gs_export_tensor(tensor)


# gs's own exporter calls these through the class for subgraphs and attributes, so they are
# replaced there rather than wrapped in functions of ours.
OnnxExporter.export_value_info_proto = staticmethod(_export_value_info)
OnnxExporter.export_tensor_proto = staticmethod(_export_tensor)
_gs_export_attributes = OnnxExporter.export_attributes


def _export_attributes(attrs: dict) -> list[onnx.AttributeProto]:
    exported = []
    for key, value in attrs.items():
        if isinstance(value, EmptyAttr):
            exported.append(onnx.helper.make_attribute(key, [], attr_type=value.attr_type))
        else:
            exported.extend(_gs_export_attributes({key: value}))
    return exported


OnnxExporter.export_attributes = staticmethod(_export_attributes)


# ---------------------------------------------------------------------------------------------
# Exporting and saving


@dataclass
class Exported:
    """A model as ONNX, its main-graph initializers kept apart so they can be streamed one by one.

    `proto` is complete except for `graph.initializer`; `initializers` yields those tensors.
    """

    proto: onnx.ModelProto
    constants: list[gs.Constant]
    defaults: list[onnx.TensorProto]

    def initializers(self) -> Iterator[onnx.TensorProto]:
        for constant in self.constants:
            yield OnnxExporter.export_tensor_proto(constant)
        yield from self.defaults


def _value_info(tensor: gs.Variable) -> onnx.ValueInfoProto:
    """The tensor's record; its type alone when its shape has a dim that onnx's inference could
    only name (`unk__N`) or not know at all. Such a shape says less than onnxruntime infers itself
    and costs speed: each unk__ name is a dim of its own to onnxruntime, which then cannot see that
    two tensors have one shape (a MiniLM-class encoder ran 13% slower with them recorded)."""
    if tensor.shape is not None and tensor.dtype is not None and any(
        d is None or (isinstance(d, str) and d.startswith("unk__")) for d in tensor.shape
    ):
        try:
            return onnx.helper.make_tensor_value_info(tensor.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)), None)
        except (TypeError, KeyError, ValueError):
            pass  # a dtype gs keeps that numpy does not name: its own exporter knows what to write
    return OnnxExporter.export_value_info_proto(tensor, do_type_check=False)


def export(model: Model) -> Exported:
    for g in model.graphs():
        toposort(g)
    graph = model.graph
    tensors = graph.tensors()
    constants = [t for t in tensors.values() if isinstance(t, gs.Constant) and not isinstance(t._values, SparseValues)]
    sparse = [
        OnnxExporter.export_sparse_tensor_proto(t)
        for t in tensors.values()
        if isinstance(t, gs.Constant) and isinstance(t._values, SparseValues)
    ]
    boundary = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    value_info = [
        _value_info(t)
        for t in tensors.values()
        if isinstance(t, gs.Variable) and t.name not in boundary and (t.dtype is not None or t.shape is not None)
    ]
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    live_inputs = {t.name for t in graph.inputs}
    constant_names = {t.name for t in constants}
    defaults = [d for name, d in model.input_defaults.items() if name in live_inputs and name not in constant_names]
    if model.ir_version < 4:
        # IR 3 requires every initializer to be listed as a graph input as well.
        for constant in constants:
            if constant.name not in live_inputs:
                dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(constant.dtype))
                inputs.append(onnx.helper.make_tensor_value_info(constant.name, dtype, list(constant.shape)))
    onnx_graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in graph.nodes],
        graph.name,
        inputs,
        outputs,
        sparse_initializer=sparse,
        value_info=value_info,
        doc_string=graph.doc_string,
    )
    proto = onnx.helper.make_model(onnx_graph, functions=model.functions)
    del proto.opset_import[:]
    # New nodes from a domain the model did not import get version 1 of it; known domains keep theirs.
    for node in all_nodes(onnx_graph):
        domain = node.domain
        if domain not in model.opset_imports and not (domain in DEFAULT_DOMAINS and _has_default(model)):
            model.opset_imports[domain] = 1
    for domain, version in sorted(model.opset_imports.items()):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    proto.ir_version = model.ir_version
    proto.producer_name = model.producer_name
    proto.producer_version = model.producer_version
    proto.domain = model.domain
    proto.model_version = model.model_version
    proto.doc_string = model.doc_string
    for key, value in model.metadata_props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return Exported(proto, constants, defaults)


# Hand-written protobuf framing: the Python protobuf API can only serialize a whole message at
# once, which would hold a second copy of every weight; ONNX files are plain protobuf, and a
# message's fields may be written in any order, so the graph is framed here and its initializers
# appended one by one.
_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
# Page-aligned offsets, so a runtime may map a tensor straight from the data file.
_EXTERNAL_ALIGNMENT = 4096


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_key(number: int) -> bytes:
    return _varint((number << 3) | 2)  # wire type 2: length-delimited


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _write_streamed(f, exported: Exported, data=None, data_name: str | None = None) -> None:
    """Write `exported` to `f`; with `data`, tensors of EXTERNAL_DATA_MIN_BYTES or more go there."""
    # First the sizes (the graph's length prefix comes before its initializers), then the bytes.
    records: list[tuple[onnx.TensorProto, onnx.TensorProto | None]] = []  # (tensor, external stub)
    offset = 0
    for tensor in exported.initializers():
        nbytes = _tensor_nbytes(tensor)
        stub = None
        if data is not None and nbytes is not None and nbytes >= EXTERNAL_DATA_MIN_BYTES:
            offset = -(-offset // _EXTERNAL_ALIGNMENT) * _EXTERNAL_ALIGNMENT
            stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(nbytes))):
                stub.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
            offset += nbytes
        records.append((tensor, stub))
    sizes = [(stub or tensor).ByteSize() for tensor, stub in records]
    graph_bytes = exported.proto.graph.SerializeToString()
    key = _field_key(_INITIALIZER_FIELD)
    framed = sum(len(key) + len(_varint(size)) + size for size in sizes)
    f.write(_head_bytes(exported.proto))
    f.write(_field_key(_GRAPH_FIELD) + _varint(len(graph_bytes) + framed))
    f.write(graph_bytes)
    position = 0
    for (tensor, stub), size in zip(records, sizes):
        f.write(key + _varint(size))
        if stub is None:
            f.write(tensor.SerializeToString())
            continue
        f.write(stub.SerializeToString())
        start = int(stub.external_data[1].value)
        data.write(b"\0" * (start - position))
        raw = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
        data.write(raw)
        position = start + len(raw)


def _head_bytes(proto: onnx.ModelProto) -> bytes:
    """Every field of the model except its graph, serialized (the graph is small only without weights)."""
    head = onnx.ModelProto()
    head.CopyFrom(proto)
    head.ClearField("graph")
    return head.SerializeToString()


# Weights at least this big are left out of structure_proto (typed inputs stand in for them).
STRUCTURE_WEIGHT_MIN_BYTES = 4096


def structure_proto(model: Model, *, value_info: bool = True) -> onnx.ModelProto:
    """The model without the bytes of its big weights, which become typed graph inputs; with
    `value_info=False`, without the recorded shapes that inference can recompute.

    All that shape inference and onnx.checker need, built without copying a weight: checking the
    written file instead would make the checker parse every weight again.
    """
    exported = export(model)
    proto = exported.proto
    if not value_info:
        # In subgraphs too: a body records the outer values it reads, and those records go stale
        # (and would override what inference finds for the outer graph) just the same. Kept: what
        # ops outside the default domain produce (a fused com.microsoft Attention), which onnx's
        # inference cannot redo; without it every shape after such a node would be lost.
        for graph in all_graphs(proto.graph):
            opaque = {name for node in graph.node if node.domain not in DEFAULT_DOMAINS for name in node.output}
            kept = [vi for vi in graph.value_info if vi.name in opaque]
            del graph.value_info[:]
            graph.value_info.extend(kept)
    listed = {i.name for i in proto.graph.input}
    for tensor in exported.initializers():
        nbytes = _tensor_nbytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or (nbytes is not None and nbytes >= STRUCTURE_WEIGHT_MIN_BYTES):
            if tensor.name not in listed:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            proto.graph.initializer.append(tensor)
    # Typed inputs standing in for initializers are only valid from IR 4 on.
    proto.ir_version = max(proto.ir_version, 4)
    return proto


def to_proto(model: Model) -> onnx.ModelProto:
    """The model as one ModelProto (this copies every weight into it; `save` streams instead)."""
    exported = export(model)
    exported.proto.graph.initializer.extend(exported.initializers())
    return exported.proto


def _has_default(model: Model) -> bool:
    return any(d in model.opset_imports for d in DEFAULT_DOMAINS)


def approx_nbytes(model: Model | onnx.ModelProto) -> int:
    """Serialized size, estimated from tensor shapes (exact ByteSize() costs a pass over every byte)."""
    if isinstance(model, Model):
        total = sum(len(d.raw_data) for d in model.input_defaults.values())
        total += 128 * sum(len(graph.nodes) for graph in model.graphs())
        return total + sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize + 64 for t in used_constants(model))
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        total += (_tensor_nbytes(tensor) or 0) + 64
    return total + 128 * sum(1 for _ in all_nodes(model.graph))


def save(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    validate: Callable[[Path], None] | None = None,
) -> int:
    """Write a model atomically and return its size in bytes (model file plus external data).

    The model goes to a temporary folder beside `path`, is checked there with onnx.checker (and by
    `validate(tmp_path)`, which may raise to abandon the write), and only then renamed into place.
    With external_data=None, weights go to `<name>.data` when the model would not fit in one
    protobuf (2 GiB). Saving a ModelProto with external data moves tensor bytes out of it, so save
    last.
    """
    path = Path(path)
    out_dir = path.parent if str(path.parent) else Path(".")
    if not out_dir.is_dir():
        raise GraphoptError(f"cannot write {path}: folder {out_dir} does not exist")
    if path.exists() and not path.is_file():
        # The rename below would replace a directory entry like /dev/full, not write into it.
        raise GraphoptError(f"cannot write {path}: it is not a regular file")
    exported = None
    if isinstance(model, Model):
        try:
            check(structure_proto(model))
        except GraphoptError as exc:
            raise GraphoptError(f"refusing to write an invalid model (a graphopt bug): {exc}") from None
        exported = export(model)
    if external_data is None:
        external_data = approx_nbytes(model) > PROTOBUF_LIMIT_BYTES
    data_name = path.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=out_dir))
    except OSError as exc:
        raise GraphoptError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        tmp_model = tmp_dir / path.name
        if exported is not None:
            with open(tmp_model, "wb") as f:
                if external_data:
                    with open(tmp_dir / data_name, "wb") as data:
                        _write_streamed(f, exported, data, data_name)
                        data.flush()
                        os.fsync(data.fileno())
                else:
                    _write_streamed(f, exported)
                f.flush()
                os.fsync(f.fileno())
        elif external_data:
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_DATA_MIN_BYTES,
            )
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        if exported is None:  # a ModelProto from elsewhere: check what was written
            try:
                check(None, tmp_model)
            except GraphoptError as exc:
                raise GraphoptError(f"refusing to write an invalid model (a graphopt bug): {exc}") from None
        if validate is not None:
            validate(tmp_model)
        size = sum(p.stat().st_size for p in tmp_dir.iterdir())
        if external_data:
            os.replace(tmp_dir / data_name, out_dir / data_name)
        os.replace(tmp_model, path)
        return size
    except OSError as exc:
        raise GraphoptError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            for leftover in tmp_dir.iterdir():
                leftover.unlink()
            tmp_dir.rmdir()
