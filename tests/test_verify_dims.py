"""find_inputs: choosing sizes for symbolic dims so that the original model runs; string inputs.

Every model here runs for real in onnxruntime: a size "works" when the model runs on it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import F, I64, const, copy, make_model
from onnx import TensorProto, helper
from real_models import zoo

from graphopt.errors import GraphoptError
from graphopt.optimize import optimize
from graphopt.verify import DEFAULT_DIM, find_inputs, load_inputs, make_inputs, run, verify

S = TensorProto.STRING


def _runs(model, inputs) -> bool:
    try:
        run(model, inputs)
    except GraphoptError:
        return False
    return True


def _reflect_pad_model(pad: int = 32):
    """x[1, T] -> reflect Pad of `pad` on both ends of T: T must exceed `pad`."""
    return make_model(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        [helper.make_tensor_value_info("x", F, [1, "T"])],
        [helper.make_tensor_value_info("y", F, [1, None])],
        [const("pads", np.array([0, pad, 0, pad], dtype=np.int64))],
    )


def _computed_pad_model(pad: int, shape=("T",)):
    """A reflect Pad whose amount is computed (Add of two constants), so the graph gives no hint:
    only the ladder can find a size above `pad`."""
    rank = len(shape)
    half = np.zeros(2 * rank, dtype=np.int64)
    half[rank - 1] = half[2 * rank - 1] = pad // 2
    return make_model(
        [
            helper.make_node("Add", ["half", "rest"], ["pads"]),
            helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"),
        ],
        [helper.make_tensor_value_info("x", F, list(shape)), helper.make_tensor_value_info("rest", I64, [2 * rank])],
        [helper.make_tensor_value_info("y", F, [None] * rank)],
        # "rest" is an input with a default (an initializer): not a constant to the hints either.
        [const("half", half), const("rest", pad - half)],
    )


def _unet_model(depth: int = 5, channels: int = 4):
    """Encoder of `depth` stride-2 steps (strided Conv and MaxPool alternating), decoder of Resize x2
    + Add with the encoder's skip connections: H and W must be multiples of 2**depth."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(name, src, cin, stride):
        inits.append(const(f"{name}.w", (0.1 * rng.standard_normal((channels, cin, 3, 3))).astype(np.float32)))
        nodes.append(helper.make_node(
            "Conv", [src, f"{name}.w"], [name], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]
        ))
        return name

    skips = [conv("e0", "x", 3, 1)]
    for level in range(1, depth + 1):
        if level % 2:
            skips.append(conv(f"e{level}", skips[-1], channels, 2))
        else:
            nodes.append(helper.make_node("MaxPool", [skips[-1]], [f"e{level}"], kernel_shape=[2, 2], strides=[2, 2]))
            skips.append(f"e{level}")
    inits.append(const("scales", np.array([1, 1, 2, 2], dtype=np.float32)))
    d = skips[-1]
    for level in range(depth - 1, -1, -1):
        nodes.append(helper.make_node("Resize", [d, "", "scales"], [f"u{level}"], mode="nearest"))
        nodes.append(helper.make_node("Add", [f"u{level}", skips[level]], [f"d{level}"]))
        d = f"d{level}"
    nodes.append(helper.make_node("Identity", [d], ["y"]))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", F, ["N", channels, "H", "W"])],
        inits,
    )


# --- the model's own hints ----------------------------------------------------------------------


def test_reflect_pad_needs_more_than_the_default():
    model = _reflect_pad_model(32)
    assert not _runs(model, make_inputs(model))

    found = find_inputs(model)
    assert found.dims["T"] > 32
    assert found.inputs["x"].shape == (1, found.dims["T"])
    assert found.tries == 2  # the default, then the Pad's hint
    np.testing.assert_array_equal(found.outputs["y"], run(model, found.inputs)["y"])
    assert found.outputs["y"].shape == (1, found.dims["T"] + 64)


def test_unet_needs_a_multiple_of_its_total_stride():
    model = _unet_model(depth=5)
    assert not _runs(model, make_inputs(model))
    # Not only large enough: 48 does not divide by 32, and the skip connections no longer line up.
    assert not _runs(model, make_inputs(model, dim_values={"H": 48, "W": 48}))

    found = find_inputs(model)
    h, w = found.dims["H"], found.dims["W"]
    assert h == w and h % 32 == 0
    assert found.dims["N"] == 1
    assert found.tries == 2
    assert found.outputs["y"].shape == (1, 4, h, w)


def test_shallow_unet_runs_on_the_default_in_one_try():
    found = find_inputs(_unet_model(depth=3))  # 8 divides by 2**3
    assert found.tries == 1
    assert found.dims == {"N": 1, "H": DEFAULT_DIM, "W": DEFAULT_DIM}


def test_inputs_sharing_a_symbol_get_one_value():
    model = make_model(
        [
            helper.make_node("Pad", ["a", "pads"], ["padded"], mode="reflect"),
            helper.make_node("Add", ["a", "b"], ["sum"]),
        ],
        [helper.make_tensor_value_info("a", F, ["T"]), helper.make_tensor_value_info("b", F, ["T"])],
        [helper.make_tensor_value_info("padded", F, [None]), helper.make_tensor_value_info("sum", F, ["T"])],
        [const("pads", np.array([16, 16], dtype=np.int64))],
    )
    found = find_inputs(model)
    assert list(found.dims) == ["T"]
    assert found.inputs["a"].shape == found.inputs["b"].shape == (found.dims["T"],)
    assert found.dims["T"] > 16


def test_static_dim_of_another_input_is_a_hint():
    model = make_model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [helper.make_tensor_value_info("x", F, [1, "n", 16]), helper.make_tensor_value_info("y", F, [1, 32, 16])],
        [helper.make_tensor_value_info("z", F, [1, 32, 16])],
    )
    assert not _runs(model, make_inputs(model))
    found = find_inputs(model)
    assert found.dims == {"n": 32}
    assert found.tries == 2


def test_initializer_behind_an_input_names_the_size():
    # "m" is an overridable default declared [1, "seq"]: its initializer says seq is 5.
    model = make_model(
        [helper.make_node("Mul", ["x", "m"], ["y"])],
        [helper.make_tensor_value_info("x", F, [1, "seq"]), helper.make_tensor_value_info("m", F, [1, "seq"])],
        [helper.make_tensor_value_info("y", F, [1, "seq"])],
        [const("m", np.ones((1, 5), dtype=np.float32))],
    )
    found = find_inputs(model)
    assert found.dims == {"seq": 5}
    assert list(found.inputs) == ["x"]


def test_conv_channels_and_reshape_target_are_hints():
    w = np.ones((2, 6, 1, 1), dtype=np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["img", "w"], ["c"], kernel_shape=[1, 1]),
            helper.make_node("Reshape", ["flat", "shape"], ["r"]),
        ],
        [helper.make_tensor_value_info("img", F, [1, "C", 4, 4]), helper.make_tensor_value_info("flat", F, [1, "L"])],
        [helper.make_tensor_value_info("c", F, [1, 2, 4, 4]), helper.make_tensor_value_info("r", F, [-1, 16, 20])],
        [const("w", w), const("shape", np.array([-1, 16, 20], dtype=np.int64))],
    )
    found = find_inputs(model)
    assert found.dims["C"] == 6
    assert found.dims["L"] % 320 == 0
    assert found.tries == 2


def test_unnamed_dims_are_reported_by_input_and_axis():
    model = make_model(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        [helper.make_tensor_value_info("x", F, [None, None])],
        [helper.make_tensor_value_info("y", F, [None, None])],
        [const("pads", np.array([0, 20, 0, 20], dtype=np.int64))],
    )
    found = find_inputs(model)
    assert set(found.dims) == {"x:0", "x:1"}
    assert found.dims["x:0"] == 1 and found.dims["x:1"] > 20
    # dim_values takes the same names.
    assert find_inputs(model, dim_values={"x:1": 30}).inputs["x"].shape == (1, 30)
    assert make_inputs(model, dim_values={"x:1": 30})["x"].shape == (1, 30)


# --- the ladder, its bounds, and failures --------------------------------------------------------


def test_ladder_finds_a_size_no_hint_gives():
    model = _computed_pad_model(1000)
    found = find_inputs(model)
    # The default, then the ladder 1, 32, ..., 512 fail; the hint candidate is the default again.
    assert found.dims == {"T": 1024}
    assert found.tries == 9


def test_tries_are_bounded():
    model = _computed_pad_model(1000)
    with pytest.raises(GraphoptError, match=r"\(3 tried;"):
        find_inputs(model, max_tries=3)
    with pytest.raises(GraphoptError):
        find_inputs(model, max_tries=0)


def test_candidates_with_huge_inputs_are_skipped():
    # Needs T > 9000 on both axes of a square image: 16000 x 16000 floats would be 1 GB.
    model = _computed_pad_model(9000, shape=(1, "T", "T"))
    with pytest.raises(GraphoptError, match=r"\(9 tried;"):
        find_inputs(model)


def test_all_static_inputs_take_one_try():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("y", F, [2, 3])],
    )
    found = find_inputs(model)
    assert found.tries == 1 and found.dims == {}

    failing = make_model(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
        [helper.make_tensor_value_info("x", F, [1, 8])],
        [helper.make_tensor_value_info("y", F, [1, 72])],
        [const("pads", np.array([0, 32, 0, 32], dtype=np.int64))],
    )
    with pytest.raises(GraphoptError, match=r"\(1 tried;"):
        find_inputs(failing)


def test_default_sizes_that_run_give_make_inputs_inputs():
    emb = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["emb", "ids"], ["h"], axis=0), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("ids", I64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", F, ["batch", "seq", 8])],
        [const("emb", emb)],
    )
    found = find_inputs(model, seed=3)
    assert found.tries == 1
    assert found.dims == {"batch": 1, "seq": DEFAULT_DIM}
    expected = make_inputs(model, seed=3)
    assert found.inputs.keys() == expected.keys()
    np.testing.assert_array_equal(found.inputs["ids"], expected["ids"])
    np.testing.assert_array_equal(found.outputs["y"], run(model, expected)["y"])


def test_caller_dims_are_kept():
    model = _unet_model(depth=5)
    found = find_inputs(model, dim_values={"H": 64})
    assert found.dims["H"] == 64 and found.dims["W"] % 32 == 0
    assert found.inputs["x"].shape[2] == 64

    pad = _reflect_pad_model(32)
    assert find_inputs(pad, dim_values={"T": 40}).dims == {"T": 40}


def test_caller_dims_that_fail_raise_instead_of_changing():
    with pytest.raises(GraphoptError, match=r"\(1 tried;.*x\[1, 8\]"):
        find_inputs(_reflect_pad_model(32), dim_values={"T": 8})
    # H cannot be made to work (40 does not divide by 32) and is never changed, whatever W becomes.
    with pytest.raises(GraphoptError, match=r"x\[1, 3, 40, 8\]"):
        find_inputs(_unet_model(depth=5), dim_values={"H": 40})


def test_model_that_never_runs_raises_one_line_with_the_ways_out():
    # Reshape to a fixed 7x3 from [1, L, 5]: no L works.
    model = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", F, [1, "L", 5])],
        [helper.make_tensor_value_info("y", F, [7, 3])],
        [const("shape", np.array([7, 3], dtype=np.int64))],
    )
    with pytest.raises(GraphoptError) as info:
        find_inputs(model)
    message = str(info.value)
    assert "\n" not in message
    assert "every tried size" in message
    assert "--dim" in message and "--input-shape" in message and "--inputs" in message
    assert "Reshape" in message  # onnxruntime's own error, from the first try
    assert "x[1, 8, 5]" in message  # the first try is make_inputs' default
    assert "(10 tried;" in message  # the default, the ladder; the hint candidate is the default again


def test_model_that_does_not_load_raises_at_once():
    model = _reflect_pad_model(32)
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(GraphoptError, match="cannot load the model"):
        find_inputs(model)


def test_verify_uses_sizes_the_original_runs_on():
    model = _unet_model(depth=5)
    fidelity = verify(model, copy(model))
    assert fidelity.ok
    assert fidelity.outputs[0].name == "y"


# --- string inputs -------------------------------------------------------------------------------


def _label_encoder_model():
    return make_model(
        [helper.make_node("LabelEncoder", ["x"], ["y"], domain="ai.onnx.ml",
                          keys_strings=["red", "green", "blue"], values_int64s=[1, 2, 3], default_int64=-1)],
        [helper.make_tensor_value_info("x", S, ["n"])],
        [helper.make_tensor_value_info("y", I64, ["n"])],
        domains={"ai.onnx.ml": 2},
    )


def test_string_inputs_use_the_models_words():
    model = _label_encoder_model()
    feeds = make_inputs(model, dim_values={"n": 200})
    text = feeds["x"]
    assert text.dtype == object and text.shape == (200,)
    words = {w for s in text for w in s.split()}
    assert words == {"red", "green", "blue"}
    labels = run(model, feeds)["y"]
    assert {1, 2, 3} <= set(labels.tolist())  # single-word elements hit the keys
    np.testing.assert_array_equal(make_inputs(model, dim_values={"n": 200})["x"], text)  # seeded
    assert make_inputs(model, seed=1, dim_values={"n": 200})["x"].tolist() != text.tolist()


def test_string_inputs_fall_back_to_fixed_words_and_stopwords_come_last():
    identity = make_model(
        [helper.make_node("Identity", ["s"], ["y"])],
        [helper.make_tensor_value_info("s", S, [4])],
        [helper.make_tensor_value_info("y", S, [4])],
    )
    feeds = make_inputs(identity)
    assert all(isinstance(s, str) and s for s in feeds["s"])
    np.testing.assert_array_equal(run(identity, feeds)["y"], feeds["s"])

    normalizer = make_model(
        [helper.make_node("StringNormalizer", ["s"], ["y"], stopwords=["zzz", "qqq"], locale="C")],
        [helper.make_tensor_value_info("s", S, [1, 6])],
        [helper.make_tensor_value_info("y", S, [1, None])],
    )
    words = {w for s in make_inputs(normalizer)["s"].ravel() for w in s.split()}
    assert words <= {"zzz", "qqq"}  # the only words this model has


def test_load_inputs_takes_text_arrays(tmp_path):
    model = _label_encoder_model()
    path = tmp_path / "text.npz"
    np.savez(path, x=np.array(["blue", "red", "pink"]))  # a str array: .npz cannot hold objects unpickled
    feeds = load_inputs(path, model)
    assert feeds["x"].dtype == object
    assert run(model, feeds)["y"].tolist() == [3, 1, -1]


# --- the real models ---------------------------------------------------------------------------


# What the found sizes must satisfy: silero's STFT window is 256 samples (its recurrent state's
# batch must stay 1 to match the audio's), rapidocr's H and W must divide by its total stride.
REAL_MODEL_DIMS = {
    "silero_vad": lambda d: d["input:1"] >= 256 and d["input:0"] == d["state:1"] == 1,
    "silero_vad_op15": lambda d: d["sequence"] >= 256 and d["batch"] == 1,
    "silero_vad_op18": lambda d: d["sequence"] >= 256 and d["batch"] == 1,
    "rapidocr_det": lambda d: d["DynamicDimension.1"] == d["DynamicDimension.2"] and d["DynamicDimension.1"] % 32 == 0,
    "skl_text": lambda d: d == {"text:0": 1},
}


@pytest.mark.parametrize("name", list(REAL_MODEL_DIMS))
def test_real_models_run_on_found_inputs(name):
    try:
        model = zoo.load(name).model
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    found = find_inputs(model)
    assert REAL_MODEL_DIMS[name](found.dims), found.dims
    assert set(found.outputs) == {o.name for o in model.graph.output}
    if name == "skl_text":
        assert found.tries == 1  # runs on make_inputs' sizes: nothing else is tried
    else:
        assert 2 <= found.tries <= 12
        assert not _runs(model, make_inputs(model))


def test_skl_text_verifies_on_generated_inputs():
    try:
        model = zoo.load("skl_text").model
    except zoo.ModelUnavailable as missing:
        pytest.skip(str(missing))
    feeds = make_inputs(model, dim_values={"text:0": 5})
    # The TfIdfVectorizer saw words it counts: not every row got the same probabilities.
    probabilities = run(model, feeds)["output_probability"]
    assert len({tuple(sorted(row.items())) for row in probabilities}) > 1
    optimized, _ = optimize(copy(model), opt_level=2)
    assert verify(model, optimized).ok


def test_structure_from_a_given_proto_session_from_the_model(tmp_path):
    # As the CLI does: the original file runs, inputs follow a copy whose T was made static.
    model = _reflect_pad_model(32)
    path = tmp_path / "pad.onnx"
    onnx.save(model, path)
    specialized = copy(model)
    specialized.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 48
    found = find_inputs(str(path), proto=specialized)
    assert found.tries == 1 and found.dims == {}
    assert found.inputs["x"].shape == (1, 48)
