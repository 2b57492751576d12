"""Shared test helpers: build small models, optimize them, and check the result is still correct."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt import verify
from graphopt.optimize import optimize

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=(), opset=17, ir_version=8, value_info=(), domains=None):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def const(name, array):
    return numpy_helper.from_array(array, name)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def optimize_checked(model, *, passes=None, opt_level=2, rtol=1e-4, atol=1e-5, inputs=None, **kwargs):
    """Optimize a copy of `model`; assert checker, strict shape inference and numerical equivalence."""
    optimized, report = optimize(copy(model), passes=passes, opt_level=opt_level, **kwargs)
    onnx.checker.check_model(optimized, full_check=True)
    onnx.shape_inference.infer_shapes(optimized, strict_mode=True)
    fidelity = verify.verify(model, optimized, inputs=inputs, rtol=rtol, atol=atol)
    assert fidelity.ok, fidelity.to_dict()
    return optimized, report


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of a CLI's stderr that are not progress ("graphopt: <phase>: done in ...")."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("graphopt: ")]
