"""A BERT encoder (HF ``BertModel``) in the shape the legacy torch.onnx exporter emits it.

What the exporter leaves and this builder reproduces, so optimizer passes have real work:
- embeddings: ``position_ids``/``token_type_ids`` buffers sliced to the sequence length read from
  ``Shape(input_ids)`` (Shape -> Gather -> Unsqueeze -> Slice, then Expand for the token types), three
  Gathers, two Adds;
- LayerNorm decomposed: ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta;
- extended attention mask: Unsqueeze, Unsqueeze, Cast, Sub(1 - mask), Mul(finfo(float32).min);
- Linear layers as MatMul against a pre-transposed ``onnx::MatMul_N`` weight, then Add(bias, x);
- head split/merge through shape arithmetic: Shape -> Gather -> Unsqueeze -> Concat -> Reshape;
- Transpose [0,2,1,3], K Transpose [0,1,3,2], Div by Constant sqrt(head_dim), Add mask, Softmax(-1);
- GELU decomposed: Div 1.4142135, Erf, Add 1, Mul x, Mul 0.5;
- scalar and shape-piece constants as Constant nodes, dropouts left as Identity nodes;
- pooler: Gather(index 0, axis 1) -> Gemm -> Tanh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from .builder import FLOAT, INT64, GraphBuilder

FLOAT32_MIN = float(np.finfo(np.float32).min)
INIT_STD = 0.02  # HF initializer_range


@dataclass(frozen=True)
class BertConfig:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    seq: int
    vocab: int
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


BERT_BASE = BertConfig(layers=12, hidden=768, heads=12, intermediate=3072, seq=128, vocab=30522)
BERT_TINY = BertConfig(layers=2, hidden=128, heads=2, intermediate=512, seq=16, vocab=1000, max_positions=64)


class _Bert:
    def __init__(self, cfg: BertConfig, name: str, seed: int):
        self.cfg = cfg
        self.b = GraphBuilder(name, seed)

    # --- pieces ---------------------------------------------------------------------------------
    def layer_norm(self, x: str, scope: str, prefix: str, output: str | None = None) -> str:
        b, h = self.b, self.cfg.hidden
        gamma = b.param(f"{prefix}.weight", b.normal([h], 0.05, mean=1.0))
        beta = b.param(f"{prefix}.bias", b.normal([h], 0.02))
        mean = b.node("ReduceMean", [x], scope, axes=[-1], keepdims=1)
        centered = b.node("Sub", [x, mean], scope)
        sq = b.node("Pow", [centered, b.const(scope, 2.0)], scope)
        var = b.node("ReduceMean", [sq], scope, axes=[-1], keepdims=1)
        var = b.node("Add", [var, b.const(scope, self.cfg.eps)], scope)
        std = b.node("Sqrt", [var], scope)
        y = b.node("Div", [centered, std], scope)
        y = b.node("Mul", [y, gamma], scope)
        return b.node("Add", [y, beta], scope, output=output)

    def linear(self, x: str, scope: str, prefix: str, cin: int, cout: int) -> str:
        b = self.b
        w = b.matmul_weight(b.normal([cin, cout], INIT_STD))  # stored as weight.T, like the exporter
        bias = b.param(f"{prefix}.bias", b.normal([cout], INIT_STD))
        y = b.node("MatMul", [x, w], scope)
        return b.node("Add", [bias, y], scope)

    def dim(self, x: str, scope: str, index: int) -> str:
        """``x.size(index)`` as the exporter traces it: Shape -> Gather(Constant index) (a scalar)."""
        b = self.b
        shape = b.node("Shape", [x], scope)
        return b.node("Gather", [shape, b.const(scope, index, np.int64)], scope, axis=0)

    def unsqueeze0(self, scalar: str, scope: str) -> str:
        b = self.b
        return b.node("Unsqueeze", [scalar, b.const(scope, [0], np.int64)], scope)

    def reshape_dynamic(self, x: str, scope: str, tail: list[int]) -> str:
        """``x.view(x.size()[:2] + tail)``: the batch and sequence sizes come from Shape(x)."""
        b = self.b
        batch = self.unsqueeze0(self.dim(x, scope, 0), scope)
        seq = self.unsqueeze0(self.dim(x, scope, 1), scope)
        pieces = [batch, seq] + [b.const(scope, [t], np.int64) for t in tail]
        shape = b.node("Concat", pieces, scope, axis=0)
        return b.node("Reshape", [x, shape], scope)

    # --- model ----------------------------------------------------------------------------------
    def embeddings(self, input_ids: str) -> str:
        b, c = self.b, self.cfg
        s = "/embeddings"
        word = b.param("embeddings.word_embeddings.weight", b.normal([c.vocab, c.hidden], INIT_STD))
        pos_table = b.param("embeddings.position_embeddings.weight", b.normal([c.max_positions, c.hidden], INIT_STD))
        type_table = b.param("embeddings.token_type_embeddings.weight", b.normal([c.type_vocab, c.hidden], INIT_STD))
        position_ids = b.param("embeddings.position_ids", np.arange(c.max_positions, dtype=np.int64)[None, :])
        token_type_ids = b.param("embeddings.token_type_ids", np.zeros((1, c.max_positions), dtype=np.int64))

        # input_shape = input_ids.size(); seq_length = input_shape[1]
        batch = self.dim(input_ids, s, 0)
        seq = self.dim(input_ids, s, 1)
        seq_1d = self.unsqueeze0(seq, s)
        # position_ids = self.position_ids[:, 0:seq_length]
        pos = b.node(
            "Slice",
            [position_ids, b.const(s, [0], np.int64), seq_1d, b.const(s, [1], np.int64), b.const(s, [1], np.int64)],
            s,
        )
        # token_type_ids = self.token_type_ids[:, :seq_length].expand(batch, seq_length)
        tt = b.node(
            "Slice",
            [token_type_ids, b.const(s, [0], np.int64), seq_1d, b.const(s, [1], np.int64), b.const(s, [1], np.int64)],
            s,
        )
        expand_shape = b.node("Concat", [self.unsqueeze0(batch, s), self.unsqueeze0(seq, s)], s, axis=0)
        tt = b.node("Expand", [tt, expand_shape], s)

        x = b.node("Gather", [word, input_ids], f"{s}/word_embeddings")
        t = b.node("Gather", [type_table, tt], f"{s}/token_type_embeddings")
        x = b.node("Add", [x, t], s)
        p = b.node("Gather", [pos_table, pos], f"{s}/position_embeddings")
        x = b.node("Add", [x, p], s)
        x = self.layer_norm(x, f"{s}/LayerNorm", "embeddings.LayerNorm")
        return b.node("Identity", [x], f"{s}/dropout")

    def extended_mask(self, mask: str) -> str:
        """``(1.0 - mask[:, None, None, :].to(float)) * finfo(float32).min``."""
        b = self.b
        m = b.node("Unsqueeze", [mask, b.const("", [1], np.int64)], "")
        m = b.node("Unsqueeze", [m, b.const("", [2], np.int64)], "")
        m = b.node("Cast", [m], "", to=FLOAT)
        m = b.node("Sub", [b.const("", 1.0), m], "")
        return b.node("Mul", [m, b.const("", FLOAT32_MIN)], "")

    def self_attention(self, x: str, mask: str, i: int) -> str:
        b, c = self.b, self.cfg
        head_dim = c.hidden // c.heads
        s = f"/encoder/layer.{i}/attention/self"
        p = f"encoder.layer.{i}.attention.self"
        q = self.linear(x, f"{s}/query", f"{p}.query", c.hidden, c.hidden)
        k = self.linear(x, f"{s}/key", f"{p}.key", c.hidden, c.hidden)
        k = self.reshape_dynamic(k, s, [c.heads, head_dim])
        k = b.node("Transpose", [k], s, perm=[0, 2, 1, 3])
        v = self.linear(x, f"{s}/value", f"{p}.value", c.hidden, c.hidden)
        v = self.reshape_dynamic(v, s, [c.heads, head_dim])
        v = b.node("Transpose", [v], s, perm=[0, 2, 1, 3])
        q = self.reshape_dynamic(q, s, [c.heads, head_dim])
        q = b.node("Transpose", [q], s, perm=[0, 2, 1, 3])
        kt = b.node("Transpose", [k], s, perm=[0, 1, 3, 2])
        scores = b.node("MatMul", [q, kt], s)
        scores = b.node("Div", [scores, b.const(s, math.sqrt(head_dim))], s)
        scores = b.node("Add", [scores, mask], s)
        probs = b.node("Softmax", [scores], s, axis=-1)
        probs = b.node("Identity", [probs], f"{s}/dropout")
        ctx = b.node("MatMul", [probs, v], s)
        ctx = b.node("Transpose", [ctx], s, perm=[0, 2, 1, 3])
        return self.reshape_dynamic(ctx, s, [c.hidden])

    def layer(self, x: str, mask: str, i: int, out_name: str | None) -> str:
        b, c = self.b, self.cfg
        s, p = f"/encoder/layer.{i}", f"encoder.layer.{i}"
        ctx = self.self_attention(x, mask, i)
        a = self.linear(ctx, f"{s}/attention/output/dense", f"{p}.attention.output.dense", c.hidden, c.hidden)
        a = b.node("Add", [a, x], f"{s}/attention/output")
        a = self.layer_norm(a, f"{s}/attention/output/LayerNorm", f"{p}.attention.output.LayerNorm")

        h = self.linear(a, f"{s}/intermediate/dense", f"{p}.intermediate.dense", c.hidden, c.intermediate)
        g = f"{s}/intermediate/intermediate_act_fn"
        e = b.node("Div", [h, b.const(g, 1.4142135381698608)], g)
        e = b.node("Erf", [e], g)
        e = b.node("Add", [e, b.const(g, 1.0)], g)
        h = b.node("Mul", [h, e], g)
        h = b.node("Mul", [h, b.const(g, 0.5)], g)

        o = self.linear(h, f"{s}/output/dense", f"{p}.output.dense", c.intermediate, c.hidden)
        o = b.node("Add", [o, a], f"{s}/output")
        # the exporter names the producing node's output after the graph output, where there is one
        return self.layer_norm(o, f"{s}/output/LayerNorm", f"{p}.output.LayerNorm", output=out_name)

    def pooler(self, x: str) -> str:
        b, h = self.b, self.cfg.hidden
        s = "/pooler"
        first = b.node("Gather", [x, b.const(s, 0, np.int64)], s, axis=1)
        w = b.param("pooler.dense.weight", b.normal([h, h], INIT_STD))
        bias = b.param("pooler.dense.bias", b.normal([h], INIT_STD))
        y = b.node("Gemm", [first, w, bias], f"{s}/dense", alpha=1.0, beta=1.0, transB=1)
        return b.node("Tanh", [y], f"{s}/activation", output="pooler_output")

    def build(self, doc: str) -> onnx.ModelProto:
        b, c = self.b, self.cfg
        input_ids = b.input("input_ids", INT64, [1, c.seq])
        attention_mask = b.input("attention_mask", INT64, [1, c.seq])
        x = self.embeddings(input_ids)
        mask = self.extended_mask(attention_mask)
        for i in range(c.layers):
            x = self.layer(x, mask, i, "last_hidden_state" if i == c.layers - 1 else None)
        pooled = self.pooler(x)
        b.output("last_hidden_state", FLOAT, [1, c.seq, c.hidden])
        b.output(pooled, FLOAT, [1, c.hidden])
        return b.build(doc)


def bert_base() -> onnx.ModelProto:
    return _Bert(BERT_BASE, "torch_jit_bert_base", seed=768).build(
        "BERT-base encoder (12 layers, hidden 768, seq 128; random weights), legacy torch.onnx export shape"
    )


def bert_tiny() -> onnx.ModelProto:
    return _Bert(BERT_TINY, "torch_jit_bert_tiny", seed=128).build(
        "BERT-tiny encoder (2 layers, hidden 128, seq 16; random weights), legacy torch.onnx export shape"
    )


# Not in the zoo: the BERT-shaped member of the cost model's calibration set (targets/calibrate.py),
# kept apart from bert_base and bert_tiny so that validating on those uses models it never saw.
BERT_SMALL = BertConfig(layers=4, hidden=256, heads=4, intermediate=1024, seq=64, vocab=5000, max_positions=128)


def bert_small() -> onnx.ModelProto:
    return _Bert(BERT_SMALL, "torch_jit_bert_small", seed=256).build(
        "BERT-small encoder (4 layers, hidden 256, seq 64; random weights), legacy torch.onnx export shape"
    )


def example_inputs(cfg: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed for a BERT zoo model: random token ids and an all-ones attention mask."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, cfg.vocab, size=(1, cfg.seq), dtype=np.int64),
        "attention_mask": np.ones((1, cfg.seq), dtype=np.int64),
    }
