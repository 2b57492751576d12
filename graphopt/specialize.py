"""Shape specialization: fix a model's input shapes (`--input-shape`) or bind symbolic dims (`--dim`).

A deployment usually knows batch 1 and sequence 128. Written into the graph's inputs, those sizes
let shape inference make every shape downstream static, so fold-shapes and fold-constants remove
the Shape/Gather/Concat arithmetic that only existed to compute them at run time, FLOPs become
exact, and later passes see the static shapes they need.

Specialization edits only type information (ValueInfoProtos), never a node or a weight, so it is
cheap on the biggest models and the specialized model computes exactly what the original computes
on inputs of those shapes. A symbol is bound model-wide: ONNX writers use one dim_param name for
one size (the `seq` of input_ids and attention_mask), so every input, output and recorded
value_info carrying it, subgraphs included, gets the value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import all_graphs

Dim = int | str | None


@dataclass
class Specialization:
    """What specialization fixed: the inputs whose shape changed and the symbols it bound."""

    # input name -> (shape before, shape after); a dim is an int, a symbol name, or None (unnamed)
    inputs: dict[str, tuple[list[Dim], list[Dim]]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inputs or self.dims)

    def to_dict(self) -> dict:
        return {
            "dims": dict(self.dims),
            "inputs": {name: {"before": before, "after": after} for name, (before, after) in self.inputs.items()},
        }


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """`NAME:D0,D1,...` (onnx-simplifier's `--overwrite-input-shape` form). The name may itself
    contain ':' (tf2onnx writes `input:0`), so the dims are what follows the last one."""
    name, sep, dims = spec.rpartition(":")
    if not sep or not name:
        raise GraphoptError(f"--input-shape '{spec}': expected NAME:D0,D1,... (for example input:1,3,224,224)")
    try:
        values = [int(d) for d in dims.split(",")] if dims.strip() else []
    except ValueError:
        raise GraphoptError(f"--input-shape '{spec}': dims must be integers separated by commas") from None
    for value in values:
        if value < 1:
            raise GraphoptError(f"--input-shape '{spec}': every dim must be a positive integer, not {value}")
    return name, values


def parse_dim(spec: str) -> tuple[str, int]:
    """`SYMBOL=VALUE`."""
    symbol, sep, value = spec.rpartition("=")
    if not sep or not symbol:
        raise GraphoptError(f"--dim '{spec}': expected SYMBOL=VALUE (for example batch=1)")
    try:
        size = int(value)
    except ValueError:
        raise GraphoptError(f"--dim '{spec}': the value must be an integer") from None
    if size < 1:
        raise GraphoptError(f"--dim '{spec}': the value must be a positive integer")
    return symbol, size


def parse_all(input_shapes: Iterable[str] = (), dims: Iterable[str] = ()) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The CLI's repeated `--input-shape` and `--dim` options, parsed; a name given twice is an error."""
    shapes: dict[str, list[int]] = {}
    for spec in input_shapes:
        name, values = parse_input_shape(spec)
        if name in shapes and shapes[name] != values:
            raise GraphoptError(f"--input-shape given twice for input '{name}' with different shapes")
        shapes[name] = values
    bound: dict[str, int] = {}
    for spec in dims:
        symbol, value = parse_dim(spec)
        if symbol in bound and bound[symbol] != value:
            raise GraphoptError(f"--dim given twice for '{symbol}' with different values")
        bound[symbol] = value
    return shapes, bound


# dim_params exporters use to mean "unknown" rather than to name a size.
ANONYMOUS_DIMS = frozenset({"?"})


def _shape_of(vi: onnx.ValueInfoProto) -> list[Dim] | None:
    if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") and d.dim_param else None)
        for d in vi.type.tensor_type.shape.dim
    ]


def _fmt(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def specialize_proto(
    proto: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> Specialization:
    """Fix input shapes and bind symbols in `proto`, in place; returns what changed.

    Refused with a one-line GraphoptError naming the input: an unknown input, one that has a
    default (an initializer: its shape is the initializer's), a shape of another rank, a static dim
    it contradicts, a symbol given two different values, a `dims` symbol no input has.
    """
    input_shapes = dict(input_shapes or {})
    bound: dict[str, int] = dict(dims or {})
    if not input_shapes and not bound:
        return Specialization()
    graph = proto.graph
    defaults = {t.name for t in graph.initializer}
    real = {vi.name: vi for vi in graph.input if vi.name not in defaults}
    # Where each symbol got its value, to name both sides of a contradiction.
    origin = {symbol: f"--dim {symbol}={value}" for symbol, value in bound.items()}

    for name, shape in input_shapes.items():
        if name in defaults and name not in real:
            raise GraphoptError(f"--input-shape {name}: the input has a default value (an initializer), so its shape is fixed")
        if name not in real:
            raise GraphoptError(f"--input-shape {name}: the model has no input named '{name}' (inputs: {', '.join(real) or 'none'})")
        declared = _shape_of(real[name])
        if real[name].type.WhichOneof("value") != "tensor_type":
            raise GraphoptError(f"--input-shape {name}: the input is not a tensor")
        if declared is None:
            continue
        if len(declared) != len(shape):
            raise GraphoptError(
                f"--input-shape {name}: {len(shape)} dims given, but the input has rank {len(declared)} {_fmt(declared)}"
            )
        for axis, (have, want) in enumerate(zip(declared, shape)):
            if isinstance(have, int) and have > 0 and have != want:
                raise GraphoptError(
                    f"--input-shape {name}: axis {axis} is {have} in the model {_fmt(declared)}, not {want}"
                )
            # paddle2onnx writes "?" for every unknown dim: a placeholder, not one symbol shared by
            # all of them (PP-OCR's classifier input is [-1, 3, ?, ?] and takes 48 x 192 images).
            if isinstance(have, str) and have not in ANONYMOUS_DIMS:
                if have in bound and bound[have] != want:
                    raise GraphoptError(
                        f"--input-shape {name}: dim '{have}' (axis {axis}) would be {want}, but {origin[have]} makes it {bound[have]}"
                    )
                bound[have] = want
                origin.setdefault(have, f"--input-shape {name}")

    symbols = {d for vi in real.values() for d in (_shape_of(vi) or ()) if isinstance(d, str)}
    for symbol in dims or {}:
        if symbol not in symbols:
            known = ", ".join(sorted(symbols)) or "none"
            raise GraphoptError(f"--dim {symbol}: no input of the model has a dimension named '{symbol}' (symbolic dims: {known})")

    record = Specialization(dims={s: bound[s] for s in sorted(bound)})
    before = {name: _shape_of(vi) for name, vi in real.items()}
    for g in all_graphs(graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") != "tensor_type":
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in bound:
                    d.dim_value = bound[d.dim_param]  # setting the oneof's other field clears dim_param
    for name, shape in input_shapes.items():
        tensor_type = real[name].type.tensor_type
        tensor_type.shape.Clear()
        for value in shape:
            tensor_type.shape.dim.add().dim_value = value
    for name, vi in real.items():
        after = _shape_of(vi)
        if after != before[name]:
            record.inputs[name] = (before[name], after)
    return record


def describe(spec: Specialization) -> list[str]:
    """One line per specialized input, for the summary: `input_ids [batch, seq] -> [1, 128]`."""
    return [f"{name} {_fmt(before)} -> {_fmt(after)}" for name, (before, after) in spec.inputs.items()]
