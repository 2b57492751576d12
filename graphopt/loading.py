"""Reading a model: load-time reading, validation and import into graphopt's IR.

`load_proto` reads a file with its external data and refuses what would break later (non-UTF-8
names, external data outside the model's folder or truncated, onnx.checker failures, declared types
that contradict initializers); `check` runs onnx.checker on a model of any size; `from_proto` turns
a checked ModelProto into an `ir.Model`. Importing this module also teaches onnx-graphsurgeon's
importer what it would otherwise lose (see below); `graphopt.export` does the same for its exporter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.importers import onnx_importer as _gs_onnx_importer

from graphopt.errors import GraphoptError, one_line
from graphopt.ir import Model, all_graphs, subgraphs_below


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
# What onnx-graphsurgeon (0.5, 0.6) loses on import, kept here (graphopt.export writes it back)
#
# * Values of optional, map or nested sequence type: gs keeps only an element dtype for them (a
#   TypeProto for optionals), and its exporter fails on optionals ("onnx_tensor" unbound) and
#   writes a nested sequence as a sequence of tensors. `from_proto` keeps each such value's full
#   TypeProto on the Variable (`onnx_type`), and the exporter writes it back.
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


def _import_attributes(onnx_attributes, *args, **kwargs):
    attrs = _gs_import_attributes(onnx_attributes, *args, **kwargs)
    for attr in onnx_attributes:
        value = attrs.get(attr.name)
        if attr.type in _LIST_ATTRIBUTES and not attr.ref_attr_name and value is not None and len(value) == 0:
            attrs[attr.name] = EmptyAttr(attr.type)
    return attrs


_gs_onnx_importer.OnnxImporter.import_attributes = staticmethod(_import_attributes)
