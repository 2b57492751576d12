"""Real trained models for graphopt's real-model test tier (issue 10).

Every model here comes with real trained weights from a PyPI package, never from a model hub: the
ONNX files that ``magika``, ``rapidocr``, ``ddddocr`` and ``silero-vad`` ship inside their wheels,
and models trained at load time on scikit-learn's bundled datasets and exported by ``skl2onnx``
and by ``torch.onnx`` (legacy TorchScript and dynamo exporters). The packages are in the ``test``
extra; a model whose package is missing raises `zoo.ModelUnavailable` and its tests skip.

    python -m tests.real_models.table            # the table: nodes before/after, worst error
    python -m pytest tests/test_real_models.py   # the tests
"""
