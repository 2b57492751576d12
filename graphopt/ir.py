"""graphopt's IR: a thin layer over onnx-graphsurgeon.

`Model` holds one `onnx_graphsurgeon.Graph` (the mutable graph passes rewrite) plus what gs does not
keep for us: the IR version, every opset import, metadata, and the defaults of graph inputs that also
have an initializer (IR >= 4), which gs would otherwise silently turn into constants.

Subgraphs (If/Loop/Scan bodies) are `gs.Graph` objects held in node attributes. A value a subgraph
takes from an outer scope is the very same `gs.Tensor` object as in the outer graph, so a
`replace_all_uses` on the outer value also rewires the subgraph.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.importers import onnx_importer as _gs_onnx_importer
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from graphopt.errors import GraphoptError, one_line

# Protobuf cannot serialize a message of 2 GiB or more, so bigger models must keep weights outside.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Tensors at least this big go to the external data file when a model is saved with external data.
EXTERNAL_DATA_MIN_BYTES = 1024

# gs leaves the domain of default-domain nodes as None.
DEFAULT_DOMAINS = ("", "ai.onnx", None)

# Ops whose result differs between two evaluations with equal inputs: never merged, folded, or
# taken for constants.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


@dataclass
class Model:
    graph: gs.Graph
    ir_version: int
    opset_imports: dict[str, int]
    # Initializers that are also graph inputs (IR >= 4): defaults a caller may override, never constants.
    input_defaults: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    functions: list[onnx.FunctionProto] = field(default_factory=list)

    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset version."""
        for domain in DEFAULT_DOMAINS:
            if domain in self.opset_imports:
                return self.opset_imports[domain]
        return 1

    def graphs(self) -> Iterator[gs.Graph]:
        """The main graph and every subgraph below it, outer graphs before inner ones."""
        yield self.graph
        yield from subgraphs_below(self.graph)


def used_constants(model: Model) -> Iterator[gs.Constant]:
    """Each constant some node of the model reads, once (however many nodes share it)."""
    seen: set[int] = set()
    for graph in model.graphs():
        for node in graph.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    yield t


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    graphs: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            graphs.append(value)
        elif isinstance(value, (list, tuple)):
            graphs.extend(v for v in value if isinstance(v, gs.Graph))
    return graphs


def subgraphs_below(graph: gs.Graph) -> Iterator[gs.Graph]:
    for node in graph.nodes:
        for sub in subgraphs_of(node):
            yield sub
            yield from subgraphs_below(sub)


# ---------------------------------------------------------------------------------------------
# Loading


def load(path: str | os.PathLike, *, fold_input_defaults: bool = False) -> Model:
    """Load, check and import a model file. Raises GraphoptError with a one-line reason."""
    proto = load_proto(path)
    return from_proto(proto, fold_input_defaults=fold_input_defaults)


def load_proto(path: str | os.PathLike, *, files: set[Path] | None = None) -> onnx.ModelProto:
    """Read, bounds-check and onnx.checker a model file with its external data.

    `files`, when given, receives the resolved paths of every file the model consists of, so a
    caller can refuse to overwrite any of them.
    """
    path = Path(path)
    if not path.exists():
        raise GraphoptError(f"{path}: no such file")
    if path.is_dir():
        raise GraphoptError(f"{path}: is a directory, not an ONNX model file")
    if not path.is_file():
        # A FIFO or device: reading it could block forever or never end.
        raise GraphoptError(f"{path}: is not a regular file (a FIFO, socket or device), not an ONNX model file")
    if path.stat().st_size == 0:
        raise GraphoptError(f"{path}: file is empty")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise GraphoptError(f"{path}: not a valid ONNX model (protobuf parse failed: {one_line(exc)})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise GraphoptError(f"{path}: not an ONNX model (no graph or IR version in the file)")
    _check_utf8(proto, path)
    data_files = _load_external_data(proto, path.parent)
    check(None, path)
    _check_declared_types(proto.graph, path)
    if files is not None:
        files.update(data_files | {path.resolve()})
    return proto


def _check_utf8(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse names (any string field) that are not UTF-8, naming the field and the node.

    protobuf hands such a string back as bytes instead of failing the parse; left in the model, it
    would surface much later as an internal error wherever the name is used.
    """

    def walk(message, where: str, node: str | None) -> None:
        for fd in message.DESCRIPTOR.fields:
            if fd.type == fd.TYPE_STRING:
                value = getattr(message, fd.name)
                items = [(f"[{i}]", v) for i, v in enumerate(value)] if not isinstance(value, (str, bytes)) else [("", value)]
                for index, item in items:
                    if isinstance(item, bytes):
                        raise GraphoptError(
                            f"{path}: not a valid ONNX model: {where}.{fd.name}{index} is not valid UTF-8 ({item!r})", node=node
                        )
            elif fd.type == fd.TYPE_MESSAGE:
                value = getattr(message, fd.name)
                if hasattr(value, "DESCRIPTOR"):  # a singular message field
                    if message.HasField(fd.name):
                        walk(value, f"{where}.{fd.name}", node)
                    continue
                for i, sub in enumerate(value):
                    label = node
                    if isinstance(sub, onnx.NodeProto):
                        # The node's own name may be the bad one: show it with its bytes escaped.
                        name = sub.name
                        label = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name or f"#{i}"
                    walk(sub, f"{where}.{fd.name}[{i}]", label)

    walk(proto, "model", None)


def _check_declared_types(graph: onnx.GraphProto, path: Path) -> None:
    """A graph input, output or value_info naming an initializer must agree with it on type and shape.

    Neither onnx.checker nor (non-strict) shape inference compares them; onnxruntime refuses some
    such models, and a pass trusting the declared shape would rewrite the graph wrongly.
    """
    initializers = {t.name: t for t in graph.initializer}
    for kind, infos in (("graph input", graph.input), ("graph output", graph.output), ("value_info", graph.value_info)):
        for vi in infos:
            init = initializers.get(vi.name)
            if init is None or vi.type.WhichOneof("value") != "tensor_type":
                continue
            tt = vi.type.tensor_type
            declared = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else None
            type_differs = tt.elem_type not in (0, init.data_type)
            shape_differs = declared is not None and (
                len(declared) != len(init.dims) or any(d is not None and d != n for d, n in zip(declared, init.dims))
            )
            if type_differs or shape_differs:
                shown = "[" + ", ".join("?" if d is None else str(d) for d in declared) + "]" if declared is not None else "unknown shape"
                raise GraphoptError(
                    f"{path}: {kind} '{vi.name}' declares {_dtype_name(tt.elem_type)} {shown} but its initializer is "
                    f"{_dtype_name(init.data_type)} {list(init.dims)}"
                )
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                _check_declared_types(sub, path)


def _dtype_name(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type {data_type}"


def _external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if onnx.external_data_helper.uses_external_data(tensor):
            yield tensor


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> set[Path]:
    base = base_dir.resolve()
    files: set[Path] = set()
    for tensor in _external_tensors(proto):
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        target = (base / location).resolve()
        # A model must not make us read files outside its own folder (e.g. "../../etc/passwd").
        if location.is_absolute() or base not in target.parents:
            raise GraphoptError(
                f"external data location '{info.location}' of tensor '{tensor.name}' escapes the model's folder; refused"
            )
        if not target.is_file():
            what = "is not a regular file" if target.exists() else "is missing"
            raise GraphoptError(f"external data file '{info.location}' of tensor '{tensor.name}' {what}")
        files.add(target)
        size = target.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if end > size:
            raise GraphoptError(
                f"external data file '{info.location}' is truncated: tensor '{tensor.name}' needs bytes up to {end}, file has {size}"
            )
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise GraphoptError(f"cannot read external data: {one_line(exc)}") from None
    return files


def check(proto: onnx.ModelProto | None, path: Path | None = None) -> None:
    """onnx.checker on a model of any size; a failure is a GraphoptError naming the problem.

    With a path the checker reads the file itself, which costs no serialized copy of the weights.
    """
    try:
        if path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        where = f"{path}: " if path is not None else ""
        raise GraphoptError(f"{where}model fails onnx.checker: {one_line(exc)}") from None




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


def from_proto(proto: onnx.ModelProto, *, fold_input_defaults: bool = False) -> Model:
    """Import a checked ModelProto, taking ownership of it: its tensors are shared, not copied."""
    input_defaults: dict[str, onnx.TensorProto] = {}
    if proto.ir_version >= 4 and not fold_input_defaults:
        input_names = {i.name for i in proto.graph.input}
        overridable = [i for i, init in enumerate(proto.graph.initializer) if init.name in input_names]
        # gs would import these as constants; take them out so they stay graph inputs.
        for index in overridable:  # in file order, so that they are written back in that order
            default = onnx.TensorProto()
            default.CopyFrom(proto.graph.initializer[index])
            input_defaults[default.name] = default
        for index in reversed(overridable):
            del proto.graph.initializer[index]
    _merge_io_value_info(proto.graph)
    graph = gs.import_onnx(proto)
    _keep_value_types(proto.graph, graph)
    opsets = {imp.domain: imp.version for imp in proto.opset_import}
    return Model(
        graph=graph,
        ir_version=proto.ir_version,
        opset_imports=opsets,
        input_defaults=input_defaults,
        producer_name=proto.producer_name,
        producer_version=proto.producer_version,
        domain=proto.domain,
        model_version=proto.model_version,
        doc_string=proto.doc_string,
        metadata_props={p.key: p.value for p in proto.metadata_props},
        functions=list(proto.functions),
    )


# ---------------------------------------------------------------------------------------------
# What onnx-graphsurgeon (0.5, 0.6) loses or cannot export, kept and exported here
#
# * Values of optional, map or nested sequence type: gs keeps only an element dtype for them (a
#   TypeProto for optionals), and its exporter fails on optionals ("onnx_tensor" unbound) and
#   writes a nested sequence as a sequence of tensors. `from_proto` keeps each such value's full
#   TypeProto on the Variable (`onnx_type`), and the exporter writes it back.
# * Constants of strings whose values were loaded into numpy (a pass read them): gs always
#   exports through raw_data, which ONNX forbids for strings. They go through numpy_helper.
# * Attributes of type TYPE_PROTO(S), SPARSE_TENSOR(S) and TENSORS (Optional's `type`, Constant's
#   `sparse_value`): gs drops them on import with a warning, leaving an invalid node. They are
#   imported as the protos themselves, which gs's exporter (onnx.helper.make_attribute) writes back.
#   (GRAPHS stays unsupported: no standard op has one, and its bodies would be opaque to passes.)

for _kind, _field in {
    "TYPE_PROTO": "tp",
    "TYPE_PROTOS": "type_protos",
    "SPARSE_TENSOR": "sparse_tensor",
    "SPARSE_TENSORS": "sparse_tensors",
    "TENSORS": "tensors",
}.items():
    _gs_onnx_importer.ONNX_PYTHON_ATTR_MAPPING.setdefault(_kind, _field)


def _keep_value_types(proto_graph: onnx.GraphProto, graph: gs.Graph) -> None:
    types: dict[str, onnx.TypeProto] = {}

    for g in all_graphs(proto_graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") not in (None, "tensor_type"):
                types[vi.name] = vi.type
    if not types:
        return
    for g in [graph, *subgraphs_below(graph)]:
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name in types:
                tensor.onnx_type = types[tensor.name]


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


# * A graph input or output that value_info repeats: gs imports it from the value_info entry alone,
#   so an entry with less in it (ddddocr's quantized model repeats its output "387" with no shape)
#   hid the declared shape, and even -O0 wrote an output onnx.checker rejects. `_merge_io_value_info`
#   folds such entries into the declaration, which wins where both say something.
# * An empty list attribute (ReduceMax axes=[] from torch's TorchScript exporter): gs imports a bare
#   [], whose type onnx.helper.make_attribute cannot infer, so every export of the model failed. It
#   is imported as an `EmptyAttr`, an empty list that remembers its type, and exported with it.


def _merge_io_value_info(graph: onnx.GraphProto) -> None:
    declared = {vi.name: vi for vi in list(graph.input) + list(graph.output)}
    kept = []
    for vi in graph.value_info:
        io = declared.get(vi.name)
        if io is None:
            kept.append(vi)
        elif io.type.WhichOneof("value") is None:
            io.type.CopyFrom(vi.type)
        elif io.type.WhichOneof("value") == "tensor_type" and vi.type.WhichOneof("value") == "tensor_type":
            mine, theirs = io.type.tensor_type, vi.type.tensor_type
            if not mine.elem_type:
                mine.elem_type = theirs.elem_type
            if not mine.HasField("shape") and theirs.HasField("shape"):
                mine.shape.CopyFrom(theirs.shape)
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _merge_io_value_info(sub)


class EmptyAttr(list):
    """An empty list attribute value that remembers its onnx.AttributeProto type (INTS, FLOATS, ...)."""

    def __init__(self, attr_type: int):
        super().__init__()
        self.attr_type = attr_type


_LIST_ATTRIBUTES = {
    onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS, onnx.AttributeProto.TENSORS,
    onnx.AttributeProto.SPARSE_TENSORS, onnx.AttributeProto.TYPE_PROTOS, onnx.AttributeProto.GRAPHS,
}
_gs_import_attributes = _gs_onnx_importer.OnnxImporter.import_attributes
_gs_export_attributes = OnnxExporter.export_attributes


def _import_attributes(onnx_attributes, *args, **kwargs):
    attrs = _gs_import_attributes(onnx_attributes, *args, **kwargs)
    for attr in onnx_attributes:
        value = attrs.get(attr.name)
        if attr.type in _LIST_ATTRIBUTES and not attr.ref_attr_name and value is not None and len(value) == 0:
            attrs[attr.name] = EmptyAttr(attr.type)
    return attrs


def _export_attributes(attrs: dict) -> list[onnx.AttributeProto]:
    exported = []
    for key, value in attrs.items():
        if isinstance(value, EmptyAttr):
            exported.append(onnx.helper.make_attribute(key, [], attr_type=value.attr_type))
        else:
            exported.extend(_gs_export_attributes({key: value}))
    return exported


_gs_onnx_importer.OnnxImporter.import_attributes = staticmethod(_import_attributes)
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
        OnnxExporter.export_value_info_proto(t, do_type_check=False)
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
    """The model without the bytes of its big weights, which become typed graph inputs.

    All that shape inference and onnx.checker need, built without copying a weight: checking the
    written file instead would make the checker parse every weight again.
    """
    exported = export(model)
    proto = exported.proto
    if not value_info:
        # In subgraphs too: a body records the outer values it reads, and those records go stale
        # (and would override what inference finds for the outer graph) just the same.
        for graph in all_graphs(proto.graph):
            del graph.value_info[:]
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


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and every subgraph below it (If/Loop/Scan bodies, at any depth)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_graphs(sub)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a GraphProto, those of its subgraphs (at any depth) included."""
    for g in all_graphs(graph):
        yield from g.node


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


# ---------------------------------------------------------------------------------------------
# Helpers passes use


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor known at compile time: an initializer or the output of a Constant node."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        # Load lazily-held weights without caching them on the tensor: gs would otherwise keep a
        # numpy copy next to the proto's bytes, and every weight would live in memory twice.
        if isinstance(tensor._values, LazyValues):
            return tensor._values.load()
        return tensor.values
    node = producer(tensor)
    if node is not None and node.op == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.attrs) == 1:
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def constant_bytes(tensor: gs.Constant) -> bytes:
    """The raw little-endian bytes of a constant, without caching a numpy copy on the tensor."""
    if isinstance(tensor._values, LazyValues):
        proto = tensor._values.tensor
        if proto.HasField("raw_data"):
            return proto.raw_data
    return np.ascontiguousarray(constant_value(tensor)).tobytes()


def constant_fingerprint(tensor: gs.Constant) -> tuple:
    """A key equal for two constants exactly when dtype, shape and bytes are equal."""
    data = constant_bytes(tensor)
    return (str(tensor.dtype), tuple(tensor.shape), hashlib.blake2b(data, digest_size=16).digest())


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is a known non-negative integer, else None."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    shape = tensor.shape
    if shape is None:
        return None
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return tuple(int(d) for d in shape)
    return None


def check_shapes(model: Model) -> None:
    """Contradictions onnx.checker and shape inference let through, found once the "shapes" analysis
    has annotated the graph: a Reshape whose constant target cannot hold its input's elements (it
    would fail only when run). Raises GraphoptError naming the node."""
    for graph in model.graphs():
        for node in graph.nodes:
            if node.op != "Reshape" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
                continue
            shape = static_shape(node.inputs[0])
            target = constant_value(node.inputs[1])
            if shape is None or target is None or np.ndim(target) != 1 or np.asarray(target).dtype.kind not in "iu":
                continue
            problem = _reshape_problem(shape, [int(d) for d in target], bool(node.attrs.get("allowzero", 0)))
            if problem:
                raise GraphoptError(f"Reshape {problem}", node=node.name or node.op)


def _reshape_problem(shape: tuple[int, ...], target: list[int], allowzero: bool) -> str | None:
    count = int(np.prod(shape, dtype=np.int64))
    dims = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= len(shape):
                return f"target {target} copies dimension {i} of its rank-{len(shape)} input {list(shape)}"
            d = shape[i]
        elif d < -1:
            return f"target {target} has the negative dimension {d}"
        dims.append(d)
    if dims.count(-1) > 1:
        return f"target {target} has more than one -1"
    known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
    if -1 in dims:
        if known and count % known:
            return f"cannot reshape {list(shape)} ({count} elements) to {target}: {count} is not a multiple of {known}"
    elif known != count:
        return f"cannot reshape {list(shape)} ({count} elements) to {target} ({known} elements)"
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every consumer of `old` read `new` instead (in subgraphs too).

    A graph output keeps its name: if `old` is an output of `graph`, `new`'s producer is made to
    produce `old` directly. Returns False (changing nothing) when that is impossible: `new` has no
    producer in this graph (a graph input, constant or outer-scope value) or is itself an output.
    """
    if old is new:
        return True
    if is_graph_output(graph, old):
        new_producer = producer(new)
        if (
            new_producer is None
            or isinstance(new, gs.Constant)
            or is_graph_output(graph, new)
            or any(t is new for t in graph.inputs)
            # an outer-scope producer cannot be made to produce this subgraph's output
            or not any(n is new_producer for n in graph.nodes)
        ):
            return False
        # `old` becomes the producer's output; `new`'s other consumers read `old`.
        old.inputs.clear()
        redirect_uses(new, old)
        index = next(i for i, t in enumerate(new_producer.outputs) if t is new)
        new_producer.outputs[index] = old
        if old.dtype is None:
            old.dtype = new.dtype
        if old.shape is None:
            old.shape = new.shape
        return True
    redirect_uses(old, new)
    return True


# gs keeps producer/consumer lists in sync through its own list type, which finds the entry to
# drop with list.remove, i.e. with gs's deep Node.__eq__: rewiring the consumers of a tensor read by
# k nodes then costs O(k^2) slow comparisons. These helpers edit the lists directly, by identity.


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`node.inputs[index] = tensor`, without gs's quadratic bookkeeping."""
    old = node.inputs[index]
    if old is tensor:
        return
    consumers_of_old = old.outputs
    for i, n in enumerate(consumers_of_old):
        if n is node:
            list.__delitem__(consumers_of_old, i)
            break
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)


def redirect_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of `old` (in this graph and in subgraphs) reads `new` instead; O(consumers)."""
    if old is new:
        return
    for node in {id(n): n for n in old.outputs}.values():
        for i, t in enumerate(node.inputs):
            if t is old:
                list.__setitem__(node.inputs, i, new)
                list.append(new.outputs, node)
    list.clear(old.outputs)


def make_constant(name: str, value: np.ndarray) -> gs.Constant:
    # np.ascontiguousarray would turn a scalar into shape (1,)
    return gs.Constant(name, np.asarray(value, order="C"))


class NameAllocator:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: Model):
        self._used: set[str] = set()
        for graph in model.graphs():
            self._used.update(graph.tensors().keys())
            self._used.update(n.name for n in graph.nodes if n.name)
        self._counters: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        n = self._counters.get(base, 0)
        while True:
            candidate = f"{base}_{n}" if n else base
            n += 1
            if candidate not in self._used:
                self._counters[base] = n
                self._used.add(candidate)
                return candidate


def remove_nodes(graph: gs.Graph, dead: list[gs.Node]) -> None:
    """Disconnect and drop nodes in one sweep, in time linear in their edges.

    (Removing one by one from graph.nodes, or through gs's own list bookkeeping, is quadratic.)
    """
    if not dead:
        return
    # Nodes inside the bodies of a dead If/Loop/Scan die with it: they must stop counting as
    # consumers of the outer values they read, or those values look used forever.
    everything = list(_with_nested(dead))
    dead_ids = {id(n) for n in everything}
    touched: dict[int, gs.Tensor] = {}
    for node in everything:
        for t in list(node.inputs) + list(node.outputs):
            touched[id(t)] = t
        list.clear(node.inputs)
        list.clear(node.outputs)
    for t in touched.values():
        list.__setitem__(t.outputs, slice(None), [n for n in t.outputs if id(n) not in dead_ids])
        list.__setitem__(t.inputs, slice(None), [n for n in t.inputs if id(n) not in dead_ids])
    graph.nodes = [n for n in graph.nodes if id(n) not in dead_ids]


def _with_nested(nodes: list[gs.Node]) -> Iterator[gs.Node]:
    for node in nodes:
        yield node
        for sub in subgraphs_of(node):
            yield from _with_nested(sub.nodes)


def outer_uses(node: gs.Node) -> list[gs.Tensor]:
    """Tensors that the subgraphs of `node` (at any depth) read, wherever they are produced."""
    used: list[gs.Tensor] = []
    for sub in subgraphs_of(node):
        for inner in sub.nodes:
            used.extend(t for t in inner.inputs if not t.is_empty())
            used.extend(outer_uses(inner))
        used.extend(sub.outputs)
    return used


def toposort(graph: gs.Graph) -> None:
    """Sort `graph.nodes` topologically in place, keeping the existing order wherever it is valid.

    Hand-written rather than gs.Graph.toposort: that one recurses once per node (deep graphs hit
    Python's recursion limit) and rescans subgraphs per node; this is Kahn's algorithm, linear
    apart from the heap that keeps the result deterministic.
    """
    import heapq

    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    deps: list[set[int]] = []
    for node in nodes:
        producers = set()
        for tensor in list(node.inputs) + outer_uses(node):
            for p in tensor.inputs:
                j = index.get(id(p))
                if j is not None and j != index[id(node)]:
                    producers.add(j)
        deps.append(producers)
    users: list[list[int]] = [[] for _ in nodes]
    pending = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, n in enumerate(pending) if n > 0)
        raise GraphoptError("graph has a cycle", node=stuck.name or stuck.op)
    if order != list(range(len(nodes))):
        graph.nodes = [nodes[i] for i in order]
