"""Is the optimizer linear in graph size? Times -O3 on generated graphs of growing size.

    python benchmarks/scaling.py [--sizes 10000,50000,100000] [--json out.json]

Each graph repeats one block of real-world shapes (a small linear layer, a decomposed LayerNorm,
no-op Identity/Dropout, a cancelling Transpose pair, a Reshape chain, a constant subexpression,
a duplicated subexpression), so every pass in the pipeline has work in proportion to the size.
Prints microseconds per input node; flat numbers mean linear.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from graphopt.optimize import optimize

HIDDEN = 16


def build(target_nodes: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    block = 0
    shared_eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes_last")
    shape = numpy_helper.from_array(np.array([1, 4, HIDDEN // 4], np.int64), "shape3")
    flat = numpy_helper.from_array(np.array([1, HIDDEN], np.int64), "shape2")
    inits += [shared_eps, two, axes, shape, flat]
    while len(nodes) < target_nodes:
        p = f"b{block}/"
        w = numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.2, p + "w")
        b = numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32) * 0.1, p + "b")
        c = numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), p + "c")
        inits += [w, b, c]
        nodes += [
            helper.make_node("MatMul", [x, p + "w"], [p + "mm"], name=p + "mm"),
            helper.make_node("Add", [p + "mm", p + "b"], [p + "lin"], name=p + "add"),
            helper.make_node("Identity", [p + "lin"], [p + "id"], name=p + "id"),
            helper.make_node("Dropout", [p + "id"], [p + "drop"], name=p + "drop"),
            # a constant subexpression: (c * 2) + eps
            helper.make_node("Mul", [p + "c", "two"], [p + "c2"], name=p + "c2"),
            helper.make_node("Add", [p + "c2", "eps"], [p + "c3"], name=p + "c3"),
            helper.make_node("Mul", [p + "drop", p + "c3"], [p + "scaled"], name=p + "scaled"),
            # decomposed LayerNorm
            helper.make_node("ReduceMean", [p + "scaled"], [p + "mean"], axes=[-1], name=p + "mean"),
            helper.make_node("Sub", [p + "scaled", p + "mean"], [p + "d"], name=p + "d"),
            helper.make_node("Pow", [p + "d", "two"], [p + "sq"], name=p + "sq"),
            helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[-1], name=p + "var"),
            helper.make_node("Add", [p + "var", "eps"], [p + "ve"], name=p + "ve"),
            helper.make_node("Sqrt", [p + "ve"], [p + "std"], name=p + "std"),
            helper.make_node("Div", [p + "d", p + "std"], [p + "n"], name=p + "n"),
            # reshape chain and a cancelling transpose pair
            helper.make_node("Reshape", [p + "n", "shape3"], [p + "r3"], name=p + "r3"),
            helper.make_node("Transpose", [p + "r3"], [p + "t1"], perm=[0, 2, 1], name=p + "t1"),
            helper.make_node("Transpose", [p + "t1"], [p + "t2"], perm=[0, 2, 1], name=p + "t2"),
            helper.make_node("Reshape", [p + "t2", "shape2"], [p + "r2"], name=p + "r2"),
            # a duplicated subexpression
            helper.make_node("Relu", [p + "r2"], [p + "relu_a"], name=p + "relu_a"),
            helper.make_node("Relu", [p + "r2"], [p + "relu_b"], name=p + "relu_b"),
            helper.make_node("Add", [p + "relu_a", p + "relu_b"], [p + "out"], name=p + "out"),
        ]
        x = p + "out"
        block += 1
    graph = helper.make_graph(
        nodes,
        "scaling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, HIDDEN])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        model = build(size)
        nodes = len(model.graph.node)
        start = time.perf_counter()
        out, report = optimize(model, opt_level=3)
        total = time.perf_counter() - start
        rows.append(
            {
                "nodes_in": nodes,
                "nodes_out": len(out.graph.node),
                "seconds_total": round(total, 3),
                "seconds_passes": round(report.seconds, 3),
                "us_per_node_total": round(total / nodes * 1e6, 1),
                "us_per_node_passes": round(report.seconds / nodes * 1e6, 1),
                "passes": {r.name: round(r.seconds, 3) for r in report.passes},
            }
        )
    table = Table(title="-O3 time per node (flat = linear)", title_justify="left")
    for col in ("nodes in", "nodes out", "total s", "passes s", "us/node total", "us/node passes"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("nodes_in", "nodes_out", "seconds_total", "seconds_passes", "us_per_node_total", "us_per_node_passes")))
    Console().print(table)
    per_pass = Table(title="seconds per pass", title_justify="left")
    per_pass.add_column("pass")
    for r in rows:
        per_pass.add_column(str(r["nodes_in"]), justify="right")
    for name in rows[0]["passes"]:
        per_pass.add_row(name, *(str(r["passes"].get(name, "-")) for r in rows))
    Console().print(per_pass)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
