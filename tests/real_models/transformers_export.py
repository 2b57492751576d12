"""Transformer encoders as real exporters emit them: transformers' BertModel, seeded random weights.

No model hub is reachable, so the models are built from transformers' model classes with a config
and weights drawn from seeded torch generators (transformers' ``_init_weights`` with std 1/sqrt(hidden),
then distinct random biases and LayerNorm scales, see `bert_model`). The graph is
what matters: it is exactly the one torch's TorchScript or dynamo exporter writes for the real
checkpoint of that size, only the numbers differ. The real-model tier (zoo.py) uses small configs;
a benchmark builds the full sizes with the same code:

    from tests.real_models.transformers_export import bert_encoder_proto, bert_feeds, BERT_BASE, MINILM_L6
    model = bert_encoder_proto("legacy", "eager", **BERT_BASE)       # bert-base-uncased, 12 layers
    model = bert_encoder_proto("legacy", "sdpa", **MINILM_L6)        # all-MiniLM-L6-v2's BertModel
    feeds = bert_feeds(batch=2, sequence=128, vocab=BERT_BASE["vocab"])

``exporter`` is "legacy" (``torch.onnx.export(dynamo=False)``, dynamic batch and sequence) or
"dynamo" (``torch.onnx.export(dynamo=True)``, dynamic batch and sequence unless ``static=True``);
``attention`` is transformers' ``attn_implementation``: "eager" (explicit MatMul/Div/Add/Softmax)
or "sdpa" (``scaled_dot_product_attention``, which the exporters decompose into their own form).
ATTENTION_FORMS.md describes the attention subgraph each combination produces.
"""

from __future__ import annotations

import numpy as np
import onnx

from .zoo import Feeds, ModelUnavailable, _export_legacy, _torch_session

# The full-size configurations (bert-base-uncased; sentence-transformers/all-MiniLM-L6-v2's encoder).
BERT_BASE = dict(layers=12, hidden=768, heads=12, intermediate=3072, vocab=30522, max_position=512)
MINILM_L6 = dict(layers=6, hidden=384, heads=12, intermediate=1536, vocab=30522, max_position=512)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("last_hidden_state", "pooler_output")


def _transformers():
    try:
        import transformers
    except ImportError as missing:  # pragma: no cover - the zoo checks `needs` first
        raise ModelUnavailable("transformers is not installed (pip install -e '.[test]')") from missing
    return transformers


def bert_model(attention: str = "eager", layers: int = 2, hidden: int = 64, heads: int = 4, intermediate: int = 128,
               vocab: int = 1000, max_position: int = 128, seed: int = 0):
    """A transformers BertModel in eval mode, its weights drawn from torch's generators seeded with ``seed``.

    Seeds torch's global generator (as ``zoo._torch_session`` does); call it inside that session for
    single-threaded, quiet construction.
    """
    transformers = _transformers()
    import torch

    # initializer_range 1/sqrt(hidden), not BERT's 0.02: attention scores of order 1, as in a trained
    # model, so that a softmax is far from uniform and a lost 1/sqrt(d) scale shows in the outputs.
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_position, attn_implementation=attention,
        initializer_range=hidden**-0.5,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    assert model.config._attn_implementation == attention, model.config._attn_implementation
    # transformers initializes every bias to 0 and every LayerNorm to (1, 0); the TorchScript exporter
    # would then share the identical tensors through Identity nodes, which no trained checkpoint
    # gives. Distinct values, as a trained model has.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif "LayerNorm.weight" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def bert_feeds(batch: int = 2, sequence: int = 16, vocab: int = 1000, *, padding: int = 5, seed: int = 0,
               token_type_ids: bool = True) -> Feeds:
    """Token ids, a real padding pattern and two segments, all int64 [batch, sequence].

    Every row after the first is padded at its end: its last ``padding`` tokens have attention_mask 0
    and input id 0 (BERT's [PAD]); row 0 is unpadded. The ids start with 101 ([CLS]) where the vocab has
    it; token_type_ids mark the second half of each row's real tokens as segment 1.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, sequence), dtype=np.int64)
    ids[:, 0] = 101 if vocab > 101 else 1
    mask = np.ones((batch, sequence), dtype=np.int64)
    types = np.zeros((batch, sequence), dtype=np.int64)
    for row in range(batch):
        real = sequence if row == 0 else max(1, sequence - padding)
        mask[row, real:] = 0
        ids[row, real:] = 0
        types[row, real // 2 : real] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if token_type_ids:
        feeds["token_type_ids"] = types
    return feeds


def bert_encoder_proto(exporter: str = "legacy", attention: str = "eager", layers: int = 2, hidden: int = 64,
                       heads: int = 4, intermediate: int = 128, seed: int = 0, *, vocab: int = 1000,
                       max_position: int = 128, opset: int | None = None, batch: int = 2, sequence: int = 16,
                       static: bool = False) -> onnx.ModelProto:
    """BertModel(input_ids, attention_mask, token_type_ids) -> (last_hidden_state, pooler_output) as ONNX.

    exporter "legacy": TorchScript exporter, opset 17 by default, batch and sequence dynamic axes.
    exporter "dynamo": dynamo exporter, its default opset (20 in torch 2.13) unless ``opset`` is given, batch and
    sequence dynamic (``static=True``: the example's [batch, sequence] fixed). The example inputs used
    for tracing are ``bert_feeds(batch, sequence, vocab)``. Seeded and single-threaded: the same
    arguments give the same weights and graph every time.
    """
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
    transformers_logging = _transformers().logging
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # transformers warns through its own logger, not `warnings`
    try:
        with _torch_session(seed) as torch:
            model = bert_model(attention, layers, hidden, heads, intermediate, vocab, max_position, seed)
            example = {k: torch.from_numpy(v) for k, v in bert_feeds(batch, sequence, vocab).items()}
            return _export(torch, model, tuple(example[name] for name in INPUTS), exporter, opset, static, max_position)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _export(torch, model, args, exporter: str, opset: int | None, static: bool, max_position: int) -> onnx.ModelProto:
    with torch.no_grad():
        if exporter == "legacy":
            axes = {0: "batch", 1: "sequence"}
            return _export_legacy(
                torch, model, args,
                dict(input_names=list(INPUTS), output_names=list(OUTPUTS),
                     dynamic_axes={**{n: axes for n in INPUTS}, OUTPUTS[0]: axes, OUTPUTS[1]: {0: "batch"}}),
                opset_version=opset or 17,
            )
        kwargs = {} if opset is None else {"opset_version": opset}
        if not static:
            dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("sequence", min=2, max=max_position)}
            kwargs["dynamic_shapes"] = {name: dims for name in INPUTS}
        program = torch.onnx.export(
            model, args, dynamo=True, verbose=False, input_names=list(INPUTS), output_names=list(OUTPUTS), **kwargs,
        )
        return program.model_proto
