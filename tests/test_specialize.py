"""Shape specialization (--input-shape, --dim): the rewrite, its refusals, and what it lets fold."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import verify
from graphopt.errors import GraphoptError
from graphopt.optimize import optimize
from graphopt.specialize import parse_all, parse_dim, parse_input_shape, specialize_proto


def _shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def _two_input_model() -> onnx.ModelProto:
    """ids [batch, seq], mask [batch, seq] -> Add -> out [batch, seq]; plus a value_info carrying seq."""
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ids_f", "mask"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq"])],
        value_info=[helper.make_tensor_value_info("ids_f", TensorProto.FLOAT, ["batch", "seq"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dim_binds_a_symbol_everywhere():
    model = _two_input_model()
    spec = specialize_proto(model, dims={"seq": 128})
    assert [_shape(vi) for vi in model.graph.input] == [["batch", 128], ["batch", 128]]
    assert _shape(model.graph.output[0]) == ["batch", 128]
    assert _shape(model.graph.value_info[0]) == ["batch", 128]
    assert spec.dims == {"seq": 128}
    assert spec.inputs == {"ids": (["batch", "seq"], ["batch", 128]), "mask": (["batch", "seq"], ["batch", 128])}
    onnx.checker.check_model(model, full_check=True)


def test_input_shape_binds_its_symbols_for_every_input_sharing_them():
    model = _two_input_model()
    spec = specialize_proto(model, input_shapes={"ids": [1, 16]})
    assert [_shape(vi) for vi in model.graph.input] == [[1, 16], [1, 16]]
    assert spec.dims == {"batch": 1, "seq": 16}


def test_unnamed_dims_are_fixed_for_that_input_only():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    spec = specialize_proto(model, input_shapes={"x": [5, 3]})
    assert _shape(model.graph.input[0]) == [5, 3]
    assert spec.inputs["x"] == ([None, 3], [5, 3])


def test_paddles_question_mark_dims_are_placeholders_not_one_symbol():
    # paddle2onnx (PP-OCR's classifier): x [-1, 3, ?, ?] takes 48 x 192 images.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "?", "?"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    spec = specialize_proto(model, input_shapes={"x": [2, 3, 48, 192]})
    assert _shape(model.graph.input[0]) == [2, 3, 48, 192]
    assert "?" not in spec.dims
    assert _shape(model.graph.output[0]) == [-1, 3, "?", "?"]  # no value bound to "?" spreads


@pytest.mark.parametrize(
    "shapes, dims, message",
    [
        ({"nope": [1, 2]}, None, "no input named 'nope'"),
        ({"ids": [1, 2, 3]}, None, "3 dims given, but the input has rank 2"),
        ({"ids": [1, 4], "mask": [1, 8]}, None, "dim 'seq' (axis 1) would be 8"),
        ({"ids": [1, 4]}, {"seq": 8}, "--dim seq=8 makes it 8"),
        (None, {"sequence": 8}, "no input of the model has a dimension named 'sequence' (symbolic dims: batch, seq)"),
    ],
)
def test_contradictions_are_refused_naming_the_input(shapes, dims, message):
    with pytest.raises(GraphoptError) as err:
        specialize_proto(_two_input_model(), shapes, dims)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_static_dim_cannot_be_changed():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 224, 224])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    with pytest.raises(GraphoptError, match=r"--input-shape x: axis 1 is 3 in the model \[n, 3, 224, 224\], not 4"):
        specialize_proto(model, {"x": [1, 4, 224, 224]})


def test_an_input_with_a_default_cannot_be_specialized():
    model = _two_input_model()
    model.graph.initializer.append(helper.make_tensor("mask", TensorProto.FLOAT, [1, 2], [0.0, 0.0]))
    with pytest.raises(GraphoptError, match="has a default value"):
        specialize_proto(model, {"mask": [1, 2]})


@pytest.mark.parametrize(
    "spec, expected",
    [("input:0:1,3", ("input:0", [1, 3])), ("x:7", ("x", [7])), ("scalar:", ("scalar", []))],
)
def test_parse_input_shape(spec, expected):
    assert parse_input_shape(spec) == expected


@pytest.mark.parametrize("spec", ["noshape", ":1,2", "x:1,a", "x:0,3", "x:-1"])
def test_parse_input_shape_refuses(spec):
    with pytest.raises(GraphoptError, match="--input-shape"):
        parse_input_shape(spec)


@pytest.mark.parametrize("spec", ["batch", "=3", "batch=x", "batch=0"])
def test_parse_dim_refuses(spec):
    with pytest.raises(GraphoptError, match="--dim"):
        parse_dim(spec)


def test_parse_all_refuses_two_values_for_one_name():
    with pytest.raises(GraphoptError, match="given twice"):
        parse_all((), ("batch=1", "batch=2"))
    assert parse_all(("x:1,2",), ("b=3",)) == ({"x": [1, 2]}, {"b": 3})


# ---------------------------------------------------------------------------------------------
# What specialization lets fold: a torch-exported encoder


def _export_encoder(dynamic: bool, exporter: str = "legacy") -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    from torch import nn

    class Encoder(nn.Module):
        """A BERT-shaped encoder layer: its attention reshapes with x.size(), as HF models do."""

        def __init__(self, vocab=50, hidden=32, heads=4):
            super().__init__()
            self.heads = heads
            self.embed = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(64, hidden)
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.out = nn.Linear(hidden, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.ff = nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, hidden))

        def forward(self, ids, mask):
            b, s = ids.size()
            positions = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, s)
            x = self.embed(ids) + self.pos(positions)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            split = lambda t: t.view(b, s, self.heads, -1).transpose(1, 2)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            scores = q @ k.transpose(-1, -2) / (q.size(-1) ** 0.5)
            scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e4
            attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
            x = self.norm(x + self.out(attended))
            return self.norm(x + self.ff(x))

    torch.manual_seed(0)
    module = Encoder().eval()
    ids = torch.randint(0, 50, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
        dynamic_shapes = {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}} if dynamic else None
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (ids, mask), dynamo=True, input_names=["ids", "mask"],
                                        output_names=["hidden"], dynamic_shapes=dynamic_shapes, verbose=False)
        return program.model_proto
    buffer = io.BytesIO()
    dynamic_axes = {"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}} if dynamic else None
    torch.onnx.export(module, (ids, mask), buffer, dynamo=False, input_names=["ids", "mask"],
                      output_names=["hidden"], dynamic_axes=dynamic_axes, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def _nodes_after(model: onnx.ModelProto) -> int:
    optimized, _ = optimize(model, target="x86_64", opt_level=2)
    return len(optimized.graph.node)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_dims_fold_a_dynamic_torch_encoder_to_its_static_export(exporter):
    static = _nodes_after(_export_encoder(dynamic=False, exporter=exporter))
    dynamic = _export_encoder(dynamic=True, exporter=exporter)
    unspecialized = _nodes_after(_copy(dynamic))

    specialized = _copy(dynamic)
    spec = specialize_proto(specialized, dims={"batch": 2, "seq": 16})
    assert spec.dims == {"batch": 2, "seq": 16}
    reference = _copy(specialized)
    optimized, report = optimize(specialized, target="x86_64", opt_level=2)
    assert len(optimized.graph.node) <= static < unspecialized
    assert report.after.flops_exact
    # Same outputs as the original dynamic model at those sizes.
    inputs = verify.make_inputs(reference)
    assert {k: v.shape for k, v in inputs.items()} == {"ids": (2, 16), "mask": (2, 16)}
    assert verify.compare(verify.run(dynamic, inputs), verify.run(optimized, inputs)).ok


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_run_with_dims_writes_a_static_model_and_reports_it(cli, tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(_export_encoder(dynamic=True), src)
    out = tmp_path / "enc.opt.onnx"
    proc = cli("run", src, "-o", out, "--dim", "batch=1", "--dim", "seq=8", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "specialized input ids [batch, seq] -> [1, 8]" in proc.stdout
    written = onnx.load(out)
    assert [_shape(vi) for vi in written.graph.input] == [[1, 8], [1, 8]]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["specialization"]["dims"] == {"batch": 1, "seq": 8}
    assert report["specialization"]["inputs"]["mask"] == {"before": ["batch", "seq"], "after": [1, 8]}
    assert report["after"]["flops_exact"] is True
    # The result runs at exactly those sizes, like the original.
    feeds = {"ids": np.zeros((1, 8), np.int64), "mask": np.ones((1, 8), np.int64)}
    assert verify.compare(verify.run(str(src), feeds), verify.run(str(out), feeds)).ok


def test_cli_refuses_a_contradicting_shape_in_one_line(cli, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_two_input_model(), src)
    proc = cli("run", src, "-o", tmp_path / "o.onnx", "--input-shape", "ids:1,2,3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --input-shape ids: 3 dims given, but the input has rank 2 [batch, seq]"
    assert not (tmp_path / "o.onnx").exists()


def test_cli_inspect_counts_exact_flops_once_dims_are_bound(cli, tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(_export_encoder(dynamic=True), src)
    loose = json.loads(cli("inspect", src, "--json").stdout)
    bound = json.loads(cli("inspect", src, "--json", "--dim", "batch=1", "--dim", "seq=16").stdout)
    assert loose["stats"]["flops_exact"] is False
    assert bound["stats"]["flops_exact"] is True
    assert bound["ops"]["MatMul"]["flops"] > 0
    assert bound["stats"]["flops"] > loose["stats"]["flops"]
