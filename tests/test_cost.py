"""FLOP and byte counts of graphopt.analysis.cost, each checked against a number worked out by hand."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.cost import NodeCost, graph_cost, node_cost, tensor_nbytes

F32 = TensorProto.FLOAT
OPSET = 18


def _vi(name, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _import(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return gs.import_onnx(model)


def _only_node(graph: gs.Graph, op: str) -> gs.Node:
    [node] = [n for n in graph.nodes if n.op == op]
    return node


# ---------------------------------------------------------------------------------------------
# Matrix products and convolutions


def test_conv_with_groups_bias_strides_and_pads():
    # X [1,4,8,8], W [6, 4/2, 3, 3], stride 2, pad 1 -> Y [1,6,4,4] ((8 + 2 - 3) // 2 + 1 = 4).
    g = _import(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1])],
        [_vi("x", [1, 4, 8, 8])],
        [_vi("y", None)],
        [_init("w", [6, 2, 3, 3]), _init("b", [6])],
    )
    conv = _only_node(g, "Conv")
    assert conv.outputs[0].shape == [1, 6, 4, 4]
    # MACs = N * Cout * prod(out) * Cin/group * prod(kernel) = 1*6*16 * 2*9 = 1728; bias adds 96.
    assert node_cost(conv) == NodeCost(
        flops=2 * 1728 + 96,
        bytes_read=(256 + 108 + 6) * 4,
        bytes_written=96 * 4,
        known=True,
    )


def test_conv_without_bias_has_no_bias_adds():
    g = _import(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        [_vi("x", [2, 3, 5, 5])],
        [_vi("y", None)],
        [_init("w", [4, 3, 3, 3])],
    )
    # Y [2,4,3,3]: 2*4*9 outputs, each 3*9 MACs.
    assert node_cost(_only_node(g, "Conv")).flops == 2 * (2 * 4 * 9) * 27


def test_conv_transpose_counts_mac_per_input_pixel():
    # X [1,2,3,3], W [Cin=2, Cout=4, 3, 3], stride 2 -> Y [1,4,7,7]; bias adds one per output element.
    g = _import(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2])],
        [_vi("x", [1, 2, 3, 3])],
        [_vi("y", None)],
        [_init("w", [2, 4, 3, 3]), _init("b", [4])],
    )
    node = _only_node(g, "ConvTranspose")
    assert node.outputs[0].shape == [1, 4, 7, 7]
    assert node_cost(node).flops == 2 * (1 * 2 * 9) * 4 * 9 + 4 * 49


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "attrs"),
    [([3, 5], [4, 5], {"transB": 1}), ([5, 3], [5, 4], {"transA": 1}), ([3, 5], [5, 4], {})],
)
def test_gemm_with_transposes_and_c(a_shape, b_shape, attrs):
    g = _import(
        [helper.make_node("Gemm", ["a", "b", "c"], ["y"], **attrs)],
        [_vi("a", a_shape)],
        [_vi("y", None)],
        [_init("b", b_shape), _init("c", [4])],
    )
    # M=3, K=5, N=4: 2*M*K*N MAC flops + M*N adds of C.
    assert node_cost(_only_node(g, "Gemm")).flops == 2 * 3 * 5 * 4 + 3 * 4


def test_gemm_without_c():
    g = _import(
        [helper.make_node("Gemm", ["a", "b"], ["y"], transB=1)],
        [_vi("a", [3, 5]), _vi("b", [4, 5])],
        [_vi("y", None)],
    )
    assert node_cost(_only_node(g, "Gemm")).flops == 2 * 3 * 5 * 4


def test_batched_matmul_with_broadcast():
    # [2,1,3,4] @ [5,4,6] -> [2,5,3,6]: the batch dims broadcast to 2*5.
    g = _import(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        [_vi("a", [2, 1, 3, 4]), _vi("b", [5, 4, 6])],
        [_vi("y", None)],
    )
    node = _only_node(g, "MatMul")
    assert node.outputs[0].shape == [2, 5, 3, 6]
    assert node_cost(node).flops == 2 * (2 * 5) * 3 * 4 * 6


def test_matmul_with_vector_operand():
    # [4] @ [2,4,6] -> [2,6]: the vector is promoted to [1,4].
    g = _import(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        [_vi("a", [4]), _vi("b", [2, 4, 6])],
        [_vi("y", None)],
    )
    assert node_cost(_only_node(g, "MatMul")).flops == 2 * 2 * 1 * 4 * 6


def test_einsum_batched_contraction_matches_matmul():
    g = _import(
        [helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik")],
        [_vi("a", [2, 3, 4]), _vi("b", [2, 4, 5])],
        [_vi("y", None)],
    )
    assert node_cost(_only_node(g, "Einsum")).flops == 2 * 2 * 3 * 4 * 5


# ---------------------------------------------------------------------------------------------
# Elementwise, normalization, reductions, pooling, data movement


def test_elementwise_add_with_broadcast():
    g = _import(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [_vi("a", [2, 3, 4]), _vi("b", [4])],
        [_vi("y", None)],
    )
    # One add per output element; reads 24 + 4 floats, writes 24.
    assert node_cost(_only_node(g, "Add")) == NodeCost(flops=24, bytes_read=112, bytes_written=96, known=True)


def test_variadic_sum_counts_inputs_minus_one_per_element():
    g = _import(
        [helper.make_node("Sum", ["a", "b", "c"], ["y"])],
        [_vi("a", [2, 3]), _vi("b", [2, 3]), _vi("c", [3])],
        [_vi("y", None)],
    )
    assert node_cost(_only_node(g, "Sum")).flops == 2 * 6


def test_same_tensor_twice_is_read_once():
    g = _import(
        [helper.make_node("Mul", ["a", "a"], ["y"])],
        [_vi("a", [2, 3])],
        [_vi("y", None)],
    )
    cost = node_cost(_only_node(g, "Mul"))
    assert (cost.flops, cost.bytes_read) == (6, 24)


@pytest.mark.parametrize(
    ("node", "in_shape", "flops"),
    [
        (helper.make_node("Softmax", ["x"], ["y"], axis=-1), [2, 5], 5 * 10),
        (helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1), [2, 5], 5 * 10),
        (helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0), [2, 3, 4], 24),
        (helper.make_node("GlobalAveragePool", ["x"], ["y"]), [1, 2, 6, 6], 72),
        # 3x3 windows over 6x6 without padding: a 4x4 output per channel.
        (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3]), [1, 2, 6, 6], 2 * 16 * 9),
        (helper.make_node("Sigmoid", ["x"], ["y"]), [2, 5], 10),
        (helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0]), [2, 5], 0),
    ],
    ids=lambda v: v.op_type if isinstance(v, onnx.NodeProto) else None,
)
def test_per_element_rules(node, in_shape, flops):
    initializers = [_init("s", [in_shape[-1]])] if "s" in node.input else []
    g = _import([node], [_vi("x", in_shape)], [_vi("y", None)], initializers)
    cost = node_cost(_only_node(g, node.op_type))
    assert cost.flops == flops
    assert cost.known


def test_batch_normalization_two_per_element():
    g = _import(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
        [_vi("x", [2, 3, 4, 4])],
        [_vi("y", None)],
        [_init(name, [3]) for name in ("s", "b", "m", "v")],
    )
    assert node_cost(_only_node(g, "BatchNormalization")).flops == 2 * 96


def test_data_movement_counts_bytes_but_no_flops():
    g = _import(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [_vi("x", [2, 3, 4])],
        [_vi("y", None)],
        [numpy_helper.from_array(np.array([6, 4], dtype=np.int64), "shape")],
    )
    assert node_cost(_only_node(g, "Reshape")) == NodeCost(
        flops=0, bytes_read=24 * 4 + 2 * 8, bytes_written=24 * 4, known=True
    )


# ---------------------------------------------------------------------------------------------
# Symbolic dims


def _symbolic_matmul_add() -> gs.Graph:
    return _import(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [_vi("x", ["batch", 3, 4])],
        [_vi("y", None)],
        [_init("w", [4, 5])],
    )


def test_symbolic_batch_without_mapping_is_unknown():
    g = _symbolic_matmul_add()
    cost = node_cost(_only_node(g, "MatMul"))
    # Only the weight's size can be known.
    assert cost == NodeCost(flops=0, bytes_read=4 * 5 * 4, bytes_written=0, known=False)
    total = graph_cost(g)
    assert total["flops"] == 0
    assert total["unknown_nodes"] == 2
    assert total["known"] is False


def test_symbolic_batch_with_mapping_is_exact():
    g = _symbolic_matmul_add()
    dims = {"batch": 2}
    assert node_cost(_only_node(g, "MatMul"), dims) == NodeCost(
        flops=2 * 2 * 3 * 4 * 5,
        bytes_read=(2 * 3 * 4 + 4 * 5) * 4,
        bytes_written=2 * 3 * 5 * 4,
        known=True,
    )
    total = graph_cost(g, dims)
    assert total["known"] is True
    assert total["unknown_nodes"] == 0
    assert total["flops"] == 2 * 2 * 3 * 4 * 5 + 2 * 3 * 5
    assert total["by_op"]["Relu"] == {"count": 1, "flops": 30, "bytes": 2 * 30 * 4}


def test_unmapped_symbolic_dim_only_in_one_graph_node_leaves_others_known():
    g = _import(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["z"], ["w"])],
        [_vi("x", ["n", 3]), _vi("z", [2, 3])],
        [_vi("y", None), _vi("w", None)],
    )
    total = graph_cost(g)
    assert (total["flops"], total["unknown_nodes"], total["nodes"]) == (6, 1, 2)


# ---------------------------------------------------------------------------------------------
# Subgraphs


def _branch(name: str, nodes, weight: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_vi(f"{name}_out", [2, 4])], [_init(weight, [3, 4])])


def test_if_charges_the_costlier_branch():
    then_branch = _branch("then", [helper.make_node("MatMul", ["x", "wt"], ["then_out"])], "wt")
    else_branch = _branch(
        "else",
        [
            helper.make_node("MatMul", ["x", "we"], ["mm"]),
            helper.make_node("Relu", ["mm"], ["else_out"]),
        ],
        "we",
    )
    g = _import(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [_vi("cond", [], TensorProto.BOOL), _vi("x", [2, 3])],
        [_vi("y", None)],
    )
    if_node = _only_node(g, "If")
    assert node_cost(if_node).flops == 0
    total = graph_cost(g)
    matmul = 2 * 2 * 3 * 4
    # The else branch (MatMul + 8 Relus) is costlier than then (MatMul alone).
    assert total["flops"] == matmul + 8
    assert total["by_op"]["MatMul"]["count"] == 1
    assert total["by_op"]["If"]["count"] == 1
    assert total["by_op"]["Relu"]["flops"] == 8
    assert total["known"] is True
    assert total["uncounted_ops"] == set()


def test_loop_body_is_counted_once():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w"], ["h_out"]),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("h_in", [2, 4])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("h_out", [2, 4])],
    )
    g = _import(
        [helper.make_node("Loop", ["trip", "cond", "h0"], ["h"], body=body)],
        [_vi("cond", [], TensorProto.BOOL), _vi("h0", [2, 4])],
        [_vi("h", None)],
        [numpy_helper.from_array(np.array(10, dtype=np.int64), "trip"), _init("w", [4, 4])],
    )
    assert graph_cost(g)["flops"] == 2 * 2 * 4 * 4


def test_op_without_rule_is_listed_as_uncounted():
    # Strict shape inference rejects unregistered ops, so build the gs graph directly, as a pass would.
    x = gs.Variable("x", dtype=np.float32, shape=[2, 3])
    y = gs.Variable("y", dtype=np.float32, shape=[2, 3])
    node = gs.Node("FancyOp", inputs=[x], outputs=[y], domain="com.example")
    g = gs.Graph(nodes=[node], inputs=[x], outputs=[y])
    cost = node_cost(g.nodes[0])
    # Shapes are known, so the cost is known; there is just no rule for its flops.
    assert cost == NodeCost(flops=0, bytes_read=24, bytes_written=24, known=True)
    total = graph_cost(g)
    assert total["uncounted_ops"] == {"com.example::FancyOp"}
    assert total["by_op"]["com.example::FancyOp"]["count"] == 1


def test_op_without_rule_and_unknown_output_shape_is_unknown():
    x = gs.Variable("x", dtype=np.float32, shape=[2, 3])
    y = gs.Variable("y", dtype=np.float32, shape=None)
    node = gs.Node("FancyOp", inputs=[x], outputs=[y], domain="com.example")
    assert node_cost(node) == NodeCost(flops=0, bytes_read=24, bytes_written=0, known=False)


def test_com_microsoft_fused_kernels_count_as_the_ops_they_fuse():
    a = gs.Variable("a", dtype=np.float32, shape=[4, 2, 3, 5])
    b = gs.Variable("b", dtype=np.float32, shape=[4, 2, 7, 5])  # transposed by transB
    y = gs.Variable("y", dtype=np.float32, shape=[4, 2, 3, 7])
    fused = gs.Node("FusedMatMul", inputs=[a, b], outputs=[y], domain="com.microsoft", attrs={"transB": 1, "alpha": 0.5})
    assert node_cost(fused).flops == 2 * 8 * 3 * 5 * 7
    x = gs.Variable("x", dtype=np.float32, shape=[1, 3, 8, 8])
    w = gs.Constant("w", np.zeros((6, 3, 3, 3), np.float32))
    out = gs.Variable("out", dtype=np.float32, shape=[1, 6, 6, 6])
    conv = gs.Node("Conv", inputs=[x, w], outputs=[out])
    fused_conv = gs.Node("FusedConv", inputs=[x, w], outputs=[out], domain="com.microsoft", attrs={"activation": "Relu"})
    assert node_cost(fused_conv) == node_cost(conv) and node_cost(conv).flops > 0


# ---------------------------------------------------------------------------------------------
# Bytes


def test_float16_tensor_bytes():
    g = _import(
        [helper.make_node("Relu", ["x"], ["y"])],
        [_vi("x", [2, 3, 5], TensorProto.FLOAT16)],
        [_vi("y", None, TensorProto.FLOAT16)],
    )
    relu = _only_node(g, "Relu")
    assert tensor_nbytes(g.inputs[0]) == 2 * 3 * 5 * 2
    assert node_cost(relu) == NodeCost(flops=30, bytes_read=60, bytes_written=60, known=True)


def test_bytes_of_packed_untyped_and_string_tensors():
    assert tensor_nbytes(gs.Variable("b", dtype=TensorProto.BFLOAT16, shape=[3, 4])) == 24
    # int4 packs two to a byte.
    int4 = helper.tensor_dtype_to_np_dtype(TensorProto.INT4)
    assert tensor_nbytes(gs.Variable("q", dtype=int4, shape=[5])) == 3
    assert tensor_nbytes(gs.Variable("s", dtype=np.dtype(object), shape=[2])) is None
    assert tensor_nbytes(gs.Variable("u", dtype=None, shape=[2])) is None
    assert tensor_nbytes(gs.Variable("n", dtype=np.float32, shape=["n", 2]), {"n": 3}) == 24
    assert tensor_nbytes(gs.Constant("c", np.zeros((2, 2), dtype=np.int64))) == 32
    assert tensor_nbytes(gs.Variable("scalar", dtype=np.float32, shape=[])) == 4


# ---------------------------------------------------------------------------------------------
# Attention and compile-time constants


def _gs_node(op, inputs, outputs, domain=None, **attrs):
    xs = [gs.Variable(n, dtype=np.float32, shape=s) for n, s in inputs]
    ys = [gs.Variable(n, dtype=np.float32, shape=s) for n, s in outputs]
    return gs.Node(op, inputs=xs, outputs=ys, domain=domain, attrs=attrs)


def test_onnx_attention_4d_counts_both_products_and_softmax():
    # B=2, H=4, S_q=8, S_kv=16, D=32, D_v=32: scores 2*4*8*16 = 1024.
    node = _gs_node("Attention", [("q", [2, 4, 8, 32]), ("k", [2, 4, 16, 32]), ("v", [2, 4, 16, 32])], [("y", [2, 4, 8, 32])])
    assert node_cost(node).flops == 2 * 1024 * 32 + 2 * 1024 * 32 + 5 * 1024


def test_onnx_attention_3d_uses_the_head_attributes():
    node = _gs_node(
        "Attention", [("q", [1, 8, 128]), ("k", [1, 8, 128]), ("v", [1, 8, 64])], [("y", [1, 8, 128])],
        q_num_heads=4, kv_num_heads=4,
    )
    scores = 1 * 4 * 8 * 8
    assert node_cost(node).flops == 2 * scores * 32 + 2 * scores * 16 + 5 * scores


def test_com_microsoft_attention_counts_the_projection_too():
    node = _gs_node("Attention", [("x", [1, 16, 64]), ("w", [64, 192]), ("b", [192])], [("y", [1, 16, 64])],
                    domain="com.microsoft", num_heads=2)
    scores = 1 * 2 * 16 * 16
    assert node_cost(node).flops == 2 * 16 * 64 * 192 + 16 * 192 + 2 * scores * 32 * 2 + 5 * scores
    mha = _gs_node("MultiHeadAttention", [("q", [1, 16, 64]), ("k", [1, 4, 64]), ("v", [1, 4, 64])], [("y", [1, 16, 64])],
                   domain="com.microsoft", num_heads=2)
    scores = 1 * 2 * 16 * 4
    assert node_cost(mha).flops == 2 * scores * 32 * 2 + 5 * scores
    assert graph_cost(gs.Graph(nodes=[mha], inputs=mha.inputs, outputs=mha.outputs))["uncounted_ops"] == set()


def test_nodes_computed_from_constants_alone_cost_nothing_and_are_known():
    # Range(0, Cast(Gather(Shape(x), 1)), 1): the length of a static x, computed at load time.
    g = _import(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "one"], ["n"]),
            helper.make_node("Range", ["zero", "n", "step"], ["r"]),
            helper.make_node("Cast", ["r"], ["rf"], to=F32),
            helper.make_node("Reshape", ["rf", "five"], ["row"]),
            helper.make_node("Add", ["x", "row"], ["y"]),
        ],
        [_vi("x", [3, 5])],
        [_vi("y", None)],
        [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
         numpy_helper.from_array(np.array(1, np.int64), "step"), numpy_helper.from_array(np.array([5], np.int64), "five")],
    )
    # onnx's inference cannot tell Range's length from a computed limit; the rule makes that moot.
    assert _only_node(g, "Range").outputs[0].shape[0] != 5
    total = graph_cost(g)
    assert total["unknown_nodes"] == 0 and total["known"]
    assert total["flops"] == 15  # the Add alone


def test_random_ops_are_never_compile_time_constants():
    g = _import(
        [helper.make_node("RandomNormal", [], ["r"], shape=[3, 5]), helper.make_node("Add", ["x", "r"], ["y"])],
        [_vi("x", [3, 5])],
        [_vi("y", None)],
    )
    assert graph_cost(g)["by_op"]["Add"]["flops"] == 15
    assert graph_cost(g)["by_op"]["RandomNormal"]["bytes"] == 60
