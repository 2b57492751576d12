"""Property-based fuzzing of the -O3 pipeline (issue 10).

Random valid models (tests/fuzz/strategies.py) are optimized at -O3 for a drawn target; the result
must pass onnx.checker (full) and strict shape inference, keep the graph's inputs and outputs
(names, element types, order), compute what the original computes in onnxruntime, and be a fixed
point: optimizing it again changes no byte.

Profiles: "ci" (default; derandomized, CI_EXAMPLES examples per property) and "long" (2000 random
examples per property), chosen with GRAPHOPT_FUZZ_PROFILE=long. A failing example is printed as
the model's ONNX text; a failure the fuzzer finds becomes a hand-written test in
tests/test_regressions.py.
"""

from __future__ import annotations

import os

import onnx
from fuzz.strategies import DEFAULT_WEIGHTS, FuzzCase, models
from helpers import copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphopt import verify
from graphopt.optimize import optimize

# Examples per property in CI: the three properties take about 30 s on two cores (pytest -n 2),
# well inside the 90 s the fuzz tests may cost.
CI_EXAMPLES = 1000

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
PROFILE = os.environ.get("GRAPHOPT_FUZZ_PROFILE", "ci")
fuzz = settings(settings.get_profile(PROFILE))

RTOL, ATOL = 1e-4, 1e-5

# x86_64 mostly; every target now and then.
targets = st.sampled_from(["x86_64", "x86_64", "x86_64", "arm64", "cuda"])
batches = st.sampled_from([2, 3])


def interface(model: onnx.ModelProto) -> tuple:
    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    return sig(model.graph.input), sig(model.graph.output)


def check_o3(case: FuzzCase, target: str, batch: int) -> None:
    model = case.model
    # The generator's promise: a valid model that onnxruntime runs.
    onnx.checker.check_model(model, full_check=True)
    inputs = verify.make_inputs(model, batch=batch, seed=0)

    optimized, _ = optimize(copy(model), target=target, opt_level=3)
    onnx.checker.check_model(optimized, full_check=True)
    onnx.shape_inference.infer_shapes(optimized, strict_mode=True)
    assert interface(optimized) == interface(model)
    fidelity = verify.verify(model, optimized, inputs=inputs, rtol=RTOL, atol=ATOL)
    assert fidelity.ok, fidelity.to_dict()

    again, _ = optimize(copy(optimized), target=target, opt_level=3)
    assert again.SerializeToString() == optimized.SerializeToString(), "-O3 is not idempotent"


@fuzz
@given(case=models(), target=targets, batch=batches)
def test_o3_random_models(case, target, batch):
    check_o3(case, target, batch)


LAYOUT_HEAVY = dict.fromkeys(DEFAULT_WEIGHTS, 0) | {
    "layout": 4, "shape": 3, "noop": 2, "duplicate": 2, "const": 2, "binary": 2, "unary": 1, "matmul": 1,
}


@fuzz
@given(case=models(weights=LAYOUT_HEAVY), target=targets, batch=batches)
def test_o3_layout_shape_and_cleanup(case, target, batch):
    check_o3(case, target, batch)


FUSION_HEAVY = dict.fromkeys(DEFAULT_WEIGHTS, 0) | {
    "conv": 3, "layernorm": 3, "if": 2, "matmul": 2, "gemm": 1, "binary": 2, "duplicate": 1, "noop": 1, "unary": 1,
}


@fuzz
@given(case=models(weights=FUSION_HEAVY), target=targets, batch=batches)
def test_o3_fusions_and_control_flow(case, target, batch):
    check_o3(case, target, batch)
