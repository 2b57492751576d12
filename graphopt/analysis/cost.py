"""Per-node cost: floating-point operations and bytes moved, from the shapes inference left on the graph.

The counts are a target-independent estimate that a per-target cost model weighs; they are not a
prediction of run time. Integer ops (MatMulInteger, ConvInteger, QLinear*) are counted like float ones.

FLOP rules (a multiply-accumulate counts 2, as in onnx-tool's FLOPs = 2 * MACs; fvcore counts 1)
-------------------------------------------------------------------------------------------------
Conv, ConvInteger, QLinearConv
    2 * N * Cout * prod(out spatial) * (Cin/group) * prod(kernel), where Cin/group and the kernel
    come from the weight's shape [Cout, Cin/group, k...]; + N * Cout * prod(out spatial) when a bias
    is given. Strides, pads and dilations act through the output shape.
ConvTranspose
    2 * N * Cin * prod(in spatial) * (Cout/group) * prod(kernel) (fvcore's convention: every input
    pixel scatters one kernel-sized patch), + N * Cout * prod(out spatial) for the bias. The output
    spatial size is not used for the MACs because with strides > 1 it would count multiplications by
    the zeros a strided transposed convolution conceptually inserts.
MatMul, MatMulInteger, QLinearMatMul
    2 * prod(broadcast batch dims) * M * K * N (1-D operands are promoted as numpy.matmul does).
Gemm
    2 * M * K * N (after transA/transB), + M * N when C is given. alpha and beta scaling is not
    counted: kernels fold it into the epilogue.
Einsum
    A naive single loop nest over all labels: with P = product of every label's size (ellipsis dims
    broadcast), (k - 1) * P multiplies for k operands plus P adds when some label is summed out.
    For two operands this equals the MatMul rule; for three or more it overstates what a
    contraction-order-optimizing kernel does.
RNN, GRU, LSTM
    The input and recurrent matrix products, 2 * dirs * seq * batch * G * H * (I + H) with G = 1, 3, 4
    gates, + 2 * dirs * seq * batch * G * H for the two biases. Gate nonlinearities (O(H) per step
    against O(H * (I + H))) are not counted.
Normalization, per element of the output
    BatchNormalization 2 (inference folds mean/var/scale/bias into one multiply-add);
    LayerNormalization, InstanceNormalization, GroupNormalization, MeanVarianceNormalization 5
    (1 for the mean, 2 for the variance's square-accumulate, 2 for normalize-and-affine once the
    reciprocal std and the affine are folded per group); RMSNormalization 4; LpNormalization 3;
    LRN 2 * size + 2.
Elementwise, 1 per output element
    Arithmetic, comparison, logic, bitwise, activations and transcendentals alike (Add, Mul, Div,
    Pow, Relu, Sigmoid, Tanh, Erf, Exp, Gelu, Clip, Where, QuantizeLinear, ...). Transcendentals
    deliberately cost the same as an add: their real cost relative to an add differs by an order of
    magnitude between a CPU's polynomial expansion and a GPU's special-function unit, so weighing
    them is left to the per-target model, which sees the per-op breakdown. Variadic Sum/Max/Min cost
    (inputs - 1) per output element, Mean costs inputs per output element (the adds plus one
    divide). DynamicQuantizeLinear costs 3 (a min/max scan plus the quantize).
Softmax, LogSoftmax
    5 per element (max, subtract, exp, sum, divide or log).
Reductions, 1 per input element
    Reduce*, ArgMax, ArgMin, Hardmax, CumSum, GlobalAveragePool, GlobalMaxPool, GlobalLpPool.
Windowed pooling (MaxPool, AveragePool, LpPool)
    Output elements * prod(kernel_shape): one operation per element of each window.
Resize, Upsample
    0 for mode "nearest" (a gather); otherwise one multiply-accumulate per interpolation tap,
    2 * taps per output element with taps = 2**d for linear and 4**d for cubic, d being the number
    of axes whose size changes.
Data movement (Reshape, Transpose, Gather*, Scatter*, Concat, Slice, Squeeze, Unsqueeze, Shape,
Identity, Cast, Expand, Pad, Flatten, Split, Tile, Constant, Dropout, ...)
    0 flops; their bytes are counted.
If, Loop, Scan
    0 flops of their own; their own bytes are what crosses the subgraph boundary (inputs and
    outputs). graph_cost adds the subgraphs (see there).
Computed from constants alone (graph_cost only)
    0 flops and 0 bytes, known: a node of ai.onnx whose inputs are all constants, or results of such
    nodes (Shape and Size of a tensor of known shape count as constants), runs once when a runtime loads the model (and graphopt's folding removes it), never per
    inference. Random ops and nodes with subgraphs are never counted as such.
Attention (ai.onnx, opset 23), MultiHeadAttention and Attention (com.microsoft)
    Per (batch, head): 2 * S_q * S_kv * D for Q @ K^T, 2 * S_q * S_kv * D_v for the probabilities
    times V, and 5 * S_q * S_kv for the softmax; S_kv includes ai.onnx Attention's past_key. The
    com.microsoft Attention also projects its input: 2 * B * S * in * 3H, + B * S * 3H for the bias.
    Masks, scaling and the output projection (a separate MatMul) are not counted.
com.microsoft fused kernels
    FusedConv, FusedMatMul (with transA/transB) and FusedGemm count as Conv, MatMul and Gemm (the
    fused activation is not counted); SkipLayerNormalization 6 per element, its Simplified (RMS)
    form 5, SimplifiedLayerNormalization 4; Gelu, FastGelu, BiasGelu, QuickGelu, BiasAdd 1;
    DynamicQuantizeLSTM as LSTM (its int8 W and R are stored transposed: [dirs, I, 4H], [dirs, H, 4H]);
    DynamicQuantizeMatMul and MatMulIntegerToFloat as MatMul.
Anything else, including every other op of a domain other than ai.onnx (com.microsoft, ai.onnx.ml, ...)
    0 flops; graph_cost lists it in "uncounted_ops" so a caller can tell "free" from "no rule".

Bytes
-----
bytes_read is the size of every distinct input tensor (constants included; an omitted optional input
is no tensor), bytes_written that of every distinct output: element count * itemsize, with sub-byte
types (int4, uint4, float4, int2, uint2, float6) packed as ONNX stores them. A tensor fed to two
operands of one node (Mul(x, x)) is read once. String and unknown dtypes have no byte size.

Known
-----
A dimension is known when it is a non-negative int, or a symbolic name mapped in `symbolic_dims`.
NodeCost.known is False when any shape the FLOP rule needs, or any input/output size, is not
known. Then flops is 0 (a rule needs all of its dims) and the bytes are the sum over the tensors
whose size is known: each field counts what could be known, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import DEFAULT_DOMAINS, NONDETERMINISTIC_OPS, subgraphs_of

SymbolicDims = dict[str, int] | None


@dataclass(frozen=True)
class NodeCost:
    flops: int
    bytes_read: int
    bytes_written: int
    known: bool


# ---------------------------------------------------------------------------------------------
# Shapes and sizes


class _Unknown(Exception):
    """A dimension a rule needs is symbolic without a mapping, or missing."""


def _resolve_shape(tensor: gs.Tensor, symbolic_dims: SymbolicDims) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None:
        return None
    dims: list[int] = []
    for d in shape:
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
            # ONNX writers use -1 (and gs None) for "unknown"; neither is a size.
            if d < 0:
                return None
            dims.append(int(d))
        elif isinstance(d, str) and symbolic_dims and d in symbolic_dims:
            dims.append(int(symbolic_dims[d]))
        else:
            return None
    return tuple(dims)


# numpy (via ml_dtypes) gives these one byte per element; ONNX packs them.
_PACKED_BITS = {
    "int4": 4,
    "uint4": 4,
    "float4_e2m1fn": 4,
    "int2": 2,
    "uint2": 2,
    "float6_e2m3fn": 6,
    "float6_e3m2fn": 6,
}


def _bits_per_element(dtype: object) -> int | None:
    if dtype is None:
        return None
    # gs keeps the TensorProto enum for types numpy lacks (bfloat16, float8).
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
        except (KeyError, ValueError):
            return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    if dt.kind in ("O", "U", "S"):
        return None
    return _PACKED_BITS.get(dt.name, dt.itemsize * 8)


def tensor_nbytes(tensor: gs.Tensor, symbolic_dims: SymbolicDims = None) -> int | None:
    """Bytes the tensor occupies, or None when its shape or dtype is not known (or is a string)."""
    bits = _bits_per_element(tensor.dtype)
    if bits is None:
        return None
    shape = _resolve_shape(tensor, symbolic_dims)
    if shape is None:
        return None
    return -(-math.prod(shape) * bits // 8)


def _distinct(tensors: Sequence[gs.Tensor]) -> list[gs.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if t is None or t.is_empty() or id(t) in seen:
            continue
        seen.add(id(t))
        out.append(t)
    return out


def _sum_bytes(tensors: Sequence[gs.Tensor], symbolic_dims: SymbolicDims) -> tuple[int, bool]:
    total, known = 0, True
    for t in _distinct(tensors):
        n = tensor_nbytes(t, symbolic_dims)
        if n is None:
            known = False
        else:
            total += n
    return total, known


class _Shapes:
    """Shape lookups for a rule: a missing or unmapped dim raises _Unknown instead of returning None."""

    def __init__(self, symbolic_dims: SymbolicDims):
        self.symbolic_dims = symbolic_dims

    def __call__(self, tensor: gs.Tensor | None) -> tuple[int, ...]:
        if tensor is None or tensor.is_empty():
            raise _Unknown
        shape = _resolve_shape(tensor, self.symbolic_dims)
        if shape is None:
            raise _Unknown
        return shape

    def numel(self, tensor: gs.Tensor | None) -> int:
        return math.prod(self(tensor))


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    if i < len(node.inputs) and not node.inputs[i].is_empty():
        return node.inputs[i]
    return None


def _present_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if not t.is_empty()]


def _broadcast(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*shapes))
    except ValueError as exc:
        raise _Unknown from exc


def _out_numel(node: gs.Node, shape: _Shapes) -> int:
    """Output 0's element count; for a broadcasting op whose output lacks a shape, the inputs' broadcast."""
    try:
        return shape.numel(node.outputs[0])
    except _Unknown:
        return math.prod(_broadcast([shape(t) for t in _present_inputs(node)]))


# ---------------------------------------------------------------------------------------------
# FLOP rules. Each takes the node and a _Shapes and returns flops, raising _Unknown when a needed
# dim is not known.

Rule = Callable[[gs.Node, _Shapes], int]


def _conv_rule(weight_index: int, bias_index: int | None) -> Rule:
    def rule(node: gs.Node, shape: _Shapes) -> int:
        w = shape(_input(node, weight_index))
        y = shape(node.outputs[0])
        out_elems = math.prod(y)  # N * Cout * prod(out spatial)
        flops = 2 * out_elems * w[1] * math.prod(w[2:])
        if bias_index is not None and _input(node, bias_index) is not None:
            flops += out_elems
        return flops

    return rule


def _conv_transpose(node: gs.Node, shape: _Shapes) -> int:
    x = shape(node.inputs[0])
    w = shape(_input(node, 1))  # [Cin, Cout/group, k...]
    flops = 2 * math.prod(x) * w[1] * math.prod(w[2:])  # N * Cin * prod(in spatial) * ...
    if _input(node, 2) is not None:
        flops += shape.numel(node.outputs[0])
    return flops


def _matmul_rule(a_index: int, b_index: int) -> Rule:
    def rule(node: gs.Node, shape: _Shapes) -> int:
        a = shape(_input(node, a_index))
        b = shape(_input(node, b_index))
        if not a or not b:
            raise _Unknown
        a2 = (1, *a) if len(a) == 1 else a
        b2 = (*b, 1) if len(b) == 1 else b
        batch = _broadcast([a2[:-2], b2[:-2]])
        m, k, n = a2[-2], a2[-1], b2[-1]
        return 2 * math.prod(batch) * m * k * n

    return rule


def _fused_matmul(node: gs.Node, shape: _Shapes) -> int:
    # com.microsoft FusedMatMul: MatMul with transA/transB on the last two axes (and alpha).
    a, b = shape(node.inputs[0]), shape(node.inputs[1])
    if len(a) < 2 or len(b) < 2:
        return _matmul_rule(0, 1)(node, shape)
    if node.attrs.get("transA", 0):
        a = a[:-2] + (a[-1], a[-2])
    if node.attrs.get("transB", 0):
        b = b[:-2] + (b[-1], b[-2])
    batch = _broadcast([a[:-2], b[:-2]])
    return 2 * math.prod(batch) * a[-2] * a[-1] * b[-1]


def _gemm(node: gs.Node, shape: _Shapes) -> int:
    a = shape(node.inputs[0])
    b = shape(_input(node, 1))
    if len(a) != 2 or len(b) != 2:
        raise _Unknown
    m, k = (a[1], a[0]) if node.attrs.get("transA", 0) else a
    n = b[0] if node.attrs.get("transB", 0) else b[1]
    flops = 2 * m * k * n
    if _input(node, 2) is not None:
        flops += m * n
    return flops


def _einsum(node: gs.Node, shape: _Shapes) -> int:
    equation = str(node.attrs.get("equation", "")).replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    operands = _present_inputs(node)
    if len(terms) != len(operands):
        raise _Unknown
    sizes: dict[str, int] = {}
    ellipses: list[tuple[int, ...]] = []
    for term, tensor in zip(terms, operands):
        dims = shape(tensor)
        labels = term.replace("...", "")
        n_ellipsis = len(dims) - len(labels)
        if n_ellipsis < 0 or (n_ellipsis and "..." not in term):
            raise _Unknown
        before = term.split("...")[0] if "..." in term else term
        ellipses.append(dims[len(before) : len(before) + n_ellipsis])
        label_dims = dims[: len(before)] + dims[len(before) + n_ellipsis :]
        for label, d in zip(labels, label_dims):
            # A label of size 1 broadcasts against the same label elsewhere.
            sizes[label] = max(sizes.get(label, 1), d)
    if "->" in equation:
        output_labels = set(rhs.replace("...", ""))
    else:
        # Implicit output: the labels that occur exactly once.
        output_labels = {c for c in sizes if lhs.count(c) == 1}
    product = math.prod(sizes.values()) * math.prod(_broadcast(ellipses))
    summed = any(c not in output_labels for c in sizes)
    return (len(operands) - 1) * product + (product if summed else 0)


def _attention_core(batch: int, heads: int, q_seq: int, kv_seq: int, head: int, v_head: int) -> int:
    # Q @ K^T and probabilities @ V, each a multiply-accumulate per (query, key, channel); softmax 5
    # per score, as the Softmax rule counts it.
    scores = batch * heads * q_seq * kv_seq
    return 2 * scores * head + 2 * scores * v_head + 5 * scores


def _heads_and_size(shape3or4: tuple[int, ...], heads_attr) -> tuple[int, int, int, int]:
    """(batch, heads, seq, head size) of a [B, H, S, D] or [B, S, H*D] tensor."""
    if len(shape3or4) == 4:
        b, h, s, d = shape3or4
        return b, h, s, d
    if len(shape3or4) == 3 and heads_attr:
        b, s, hidden = shape3or4
        return b, int(heads_attr), s, hidden // int(heads_attr)
    raise _Unknown


def _attention(node: gs.Node, shape: _Shapes) -> int:
    """ai.onnx Attention (opset 23): Q, K, V as [B, H, S, D] or [B, S, H*D] with q/kv_num_heads."""
    b, heads, q_seq, head = _heads_and_size(shape(node.inputs[0]), node.attrs.get("q_num_heads"))
    _, _, kv_seq, _ = _heads_and_size(shape(_input(node, 1)), node.attrs.get("kv_num_heads"))
    _, _, _, v_head = _heads_and_size(shape(_input(node, 2)), node.attrs.get("kv_num_heads"))
    past = _input(node, 4)  # past_key [B, H, past, D]: attended to as well
    if past is not None:
        kv_seq += shape(past)[2]
    return _attention_core(b, heads, q_seq, kv_seq, head, v_head)


def _ms_multihead_attention(node: gs.Node, shape: _Shapes) -> int:
    """com.microsoft MultiHeadAttention: query [B, S, H*D], key/value [B, L, H*D] (or packed)."""
    heads = int(node.attrs.get("num_heads", 0)) or 1
    q = shape(node.inputs[0])
    if len(q) != 3:
        raise _Unknown
    b, q_seq, hidden = q
    k = shape(_input(node, 1)) if _input(node, 1) is not None else q
    kv_seq = k[1] if len(k) == 3 else k[2]
    return _attention_core(b, heads, q_seq, kv_seq, hidden // heads, hidden // heads)


def _ms_attention(node: gs.Node, shape: _Shapes) -> int:
    """com.microsoft Attention: input [B, S, in] times weights [in, 3*hidden], then self-attention."""
    heads = int(node.attrs.get("num_heads", 0)) or 1
    x = shape(node.inputs[0])
    w = shape(_input(node, 1))
    if len(x) != 3 or len(w) != 2:
        raise _Unknown
    b, seq, _ = x
    hidden = w[1] // 3
    projection = 2 * b * seq * w[0] * w[1] + (b * seq * w[1] if _input(node, 2) is not None else 0)
    return projection + _attention_core(b, heads, seq, seq, hidden // heads, hidden // heads)


def _recurrent_rule(gates: int) -> Rule:
    def rule(node: gs.Node, shape: _Shapes) -> int:
        x = shape(node.inputs[0])
        w = shape(_input(node, 1))  # [dirs, gates * H, I]
        r = shape(_input(node, 2))  # [dirs, gates * H, H]
        if len(x) != 3 or len(w) != 3 or len(r) != 3:
            raise _Unknown
        seq, batch = (x[1], x[0]) if node.attrs.get("layout", 0) else (x[0], x[1])
        dirs, gh, i = w
        h = r[2]
        steps = dirs * seq * batch
        flops = 2 * steps * gh * (i + h)
        if _input(node, 3) is not None:
            flops += 2 * steps * gates * h
        return flops

    return rule


def _dynamic_quantize_lstm(node: gs.Node, shape: _Shapes) -> int:
    # com.microsoft DynamicQuantizeLSTM: an LSTM whose int8 weights are stored transposed,
    # W [dirs, I, 4H] and R [dirs, H, 4H].
    x, w, r = shape(node.inputs[0]), shape(_input(node, 1)), shape(_input(node, 2))
    if len(x) != 3 or len(w) != 3 or len(r) != 3:
        raise _Unknown
    dirs, i, gh = w
    steps = dirs * x[0] * x[1]
    flops = 2 * steps * gh * (i + r[1])
    if _input(node, 3) is not None:
        flops += 2 * steps * gh
    return flops


def _per_output_element(factor: int) -> Rule:
    def rule(node: gs.Node, shape: _Shapes) -> int:
        return factor * _out_numel(node, shape)

    return rule


def _per_input_element(factor: int) -> Rule:
    def rule(node: gs.Node, shape: _Shapes) -> int:
        return factor * shape.numel(node.inputs[0])

    return rule


def _variadic(extra: int) -> Rule:
    # n operands need n - 1 binary ops per output element; Mean adds a divide (extra = 1).
    def rule(node: gs.Node, shape: _Shapes) -> int:
        n = len(_present_inputs(node))
        return (n - 1 + extra) * _out_numel(node, shape)

    return rule


def _window_pool(node: gs.Node, shape: _Shapes) -> int:
    kernel = node.attrs.get("kernel_shape")
    if not kernel:
        raise _Unknown
    return shape.numel(node.outputs[0]) * math.prod(int(k) for k in kernel)


def _lrn(node: gs.Node, shape: _Shapes) -> int:
    return (2 * int(node.attrs.get("size", 1)) + 2) * shape.numel(node.outputs[0])


def _resize(node: gs.Node, shape: _Shapes) -> int:
    mode = node.attrs.get("mode", "nearest")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode == "nearest":
        return 0
    x = shape(node.inputs[0])
    y = shape(node.outputs[0])
    if len(x) != len(y):
        raise _Unknown
    resized_axes = sum(1 for a, b in zip(x, y) if a != b)
    taps_per_axis = 4 if mode == "cubic" else 2
    return 2 * taps_per_axis**resized_axes * math.prod(y)


_ELEMENTWISE = """
    Add Sub Mul Div Pow Mod PRelu Abs Neg Reciprocal Floor Ceil Round Sign
    Relu LeakyRelu Elu Selu Celu ThresholdedRelu HardSigmoid HardSwish Sigmoid Tanh Softplus
    Softsign Mish Gelu Swish Erf Exp Log Sqrt Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh
    Clip Shrink Where Not And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual IsNaN IsInf
    BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot QuantizeLinear DequantizeLinear
""".split()

_REDUCTIONS = """
    ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin Hardmax CumSum
    GlobalAveragePool GlobalMaxPool GlobalLpPool
""".split()

DATA_MOVEMENT_OPS = frozenset(
    """
    Reshape Transpose Gather GatherElements GatherND Scatter ScatterElements ScatterND Concat
    ConcatFromSequence Slice Squeeze Unsqueeze Shape Size Identity Cast CastLike Expand Pad Flatten
    Split SplitToSequence Tile Constant ConstantOfShape Dropout DepthToSpace SpaceToDepth Range
    NonZero OneHot Trilu ReverseSequence Compress EyeLike CenterCropPad Optional OptionalGetElement
    OptionalHasElement SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
    SequenceLength
    """.split()
)

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})

_RULES: dict[str, Rule] = {
    "Conv": _conv_rule(weight_index=1, bias_index=2),
    "ConvInteger": _conv_rule(weight_index=1, bias_index=None),
    "QLinearConv": _conv_rule(weight_index=3, bias_index=8),
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul_rule(0, 1),
    "MatMulInteger": _matmul_rule(0, 1),
    "QLinearMatMul": _matmul_rule(0, 3),
    "Gemm": _gemm,
    "Einsum": _einsum,
    "RNN": _recurrent_rule(gates=1),
    "GRU": _recurrent_rule(gates=3),
    "LSTM": _recurrent_rule(gates=4),
    "BatchNormalization": _per_output_element(2),
    "LayerNormalization": _per_output_element(5),
    "InstanceNormalization": _per_output_element(5),
    "GroupNormalization": _per_output_element(5),
    "MeanVarianceNormalization": _per_output_element(5),
    "RMSNormalization": _per_output_element(4),
    "LpNormalization": _per_output_element(3),
    "LRN": _lrn,
    "Softmax": _per_output_element(5),
    "LogSoftmax": _per_output_element(5),
    "DynamicQuantizeLinear": _per_output_element(3),
    "Sum": _variadic(extra=0),
    "Max": _variadic(extra=0),
    "Min": _variadic(extra=0),
    "Mean": _variadic(extra=1),
    "MaxPool": _window_pool,
    "AveragePool": _window_pool,
    "LpPool": _window_pool,
    "Resize": _resize,
    "Upsample": _resize,
    "Attention": _attention,
    **{op: _per_output_element(1) for op in _ELEMENTWISE},
    **{op: _per_input_element(1) for op in _REDUCTIONS},
}


# Rules for ops outside ai.onnx, by (domain, op): the fused attention onnxruntime's transformer
# optimizer (and graphopt's fusion) writes.
_DOMAIN_RULES: dict[tuple[str, str], Rule] = {
    ("com.microsoft", "MultiHeadAttention"): _ms_multihead_attention,
    ("com.microsoft", "Attention"): _ms_attention,
    # The fused kernels graphopt's fusion and onnxruntime's optimizer write: the same arithmetic
    # as the standard ops they replace (the fused activation or scale is not counted, as in Gemm).
    ("com.microsoft", "FusedConv"): _conv_rule(weight_index=1, bias_index=2),
    ("com.microsoft", "FusedMatMul"): _fused_matmul,
    ("com.microsoft", "FusedGemm"): _gemm,
    ("com.microsoft", "DynamicQuantizeLSTM"): _dynamic_quantize_lstm,
    ("com.microsoft", "DynamicQuantizeMatMul"): _matmul_rule(0, 1),
    ("com.microsoft", "MatMulIntegerToFloat"): _matmul_rule(0, 1),
    ("com.microsoft", "SkipLayerNormalization"): _per_output_element(6),  # the skip (and bias) add, then LayerNormalization's 5
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): _per_output_element(5),
    ("com.microsoft", "SimplifiedLayerNormalization"): _per_output_element(4),
    **{("com.microsoft", op): _per_output_element(1) for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd")},
}


def _rule(node: gs.Node) -> Rule | None:
    if _is_default_domain(node):
        return _RULES.get(node.op)
    return _DOMAIN_RULES.get((node.domain, node.op))


def _is_default_domain(node: gs.Node) -> bool:
    return not node.domain or node.domain in DEFAULT_DOMAINS


def has_rule(node: gs.Node) -> bool:
    """Whether the node's flops are counted by a rule (data movement and control flow count as rules: 0)."""
    if not _is_default_domain(node):
        return (node.domain, node.op) in _DOMAIN_RULES
    return node.op in _RULES or node.op in DATA_MOVEMENT_OPS or node.op in CONTROL_FLOW_OPS


def op_key(node: gs.Node) -> str:
    """The key of the node's op in graph_cost's breakdowns: the op type, domain-qualified outside ai.onnx."""
    return node.op if _is_default_domain(node) else f"{node.domain}::{node.op}"


# ---------------------------------------------------------------------------------------------
# Public API


def node_cost(node: gs.Node, symbolic_dims: SymbolicDims = None) -> NodeCost:
    """The node's own cost (for If/Loop/Scan: without their subgraphs). Rules in the module docstring."""
    bytes_read, read_known = _sum_bytes(node.inputs, symbolic_dims)
    bytes_written, written_known = _sum_bytes(node.outputs, symbolic_dims)
    flops, flops_known = 0, True
    rule = _rule(node)
    if rule is not None:
        try:
            flops = int(rule(node, _Shapes(symbolic_dims)))
        except _Unknown:
            flops, flops_known = 0, False
    return NodeCost(
        flops=flops,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        known=flops_known and read_known and written_known,
    )


@dataclass
class _Totals:
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    nodes: int = 0
    unknown_nodes: int = 0
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    uncounted_ops: set[str] = field(default_factory=set)

    def add_node(self, key: str, cost: NodeCost) -> None:
        self.flops += cost.flops
        self.bytes_read += cost.bytes_read
        self.bytes_written += cost.bytes_written
        self.nodes += 1
        self.unknown_nodes += 0 if cost.known else 1
        entry = self.by_op.setdefault(key, {"count": 0, "flops": 0, "bytes": 0})
        entry["count"] += 1
        entry["flops"] += cost.flops
        entry["bytes"] += cost.bytes_read + cost.bytes_written

    def merge(self, other: _Totals) -> None:
        self.flops += other.flops
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.nodes += other.nodes
        self.unknown_nodes += other.unknown_nodes
        for key, theirs in other.by_op.items():
            entry = self.by_op.setdefault(key, {"count": 0, "flops": 0, "bytes": 0})
            for k, v in theirs.items():
                entry[k] += v
        self.uncounted_ops |= other.uncounted_ops


def _accumulate(graph: gs.Graph, symbolic_dims: SymbolicDims, totals: _Totals) -> None:
    # Tensors computed from constants alone: a runtime evaluates them once, when it loads the model.
    compile_time: set[int] = set()
    for node in graph.nodes:
        if computed_at_load(node, compile_time, symbolic_dims):
            compile_time.update(id(t) for t in node.outputs)
            totals.add_node(op_key(node), NodeCost(0, 0, 0, True))
            continue
        totals.add_node(op_key(node), node_cost(node, symbolic_dims))
        if not has_rule(node):
            totals.uncounted_ops.add(op_key(node))
        if node.op == "If" and _is_default_domain(node):
            branches = []
            for name in ("then_branch", "else_branch"):
                branch = _Totals()
                if isinstance(node.attrs.get(name), gs.Graph):
                    _accumulate(node.attrs[name], symbolic_dims, branch)
                branches.append(branch)
            # One branch runs: charge the costlier one, a worst case that does not depend on cond.
            chosen = max(branches, key=lambda b: (b.flops, b.bytes_read + b.bytes_written))
            totals.merge(chosen)
            # Rule coverage is about the code present, not the branch charged.
            for branch in branches:
                totals.uncounted_ops |= branch.uncounted_ops
        else:
            for sub in subgraphs_of(node):
                inner = _Totals()
                _accumulate(sub, symbolic_dims, inner)
                totals.merge(inner)


def computed_at_load(node: gs.Node, compile_time: set[int], symbolic_dims: SymbolicDims) -> bool:
    """Whether a runtime computes this node once, at load: ai.onnx, deterministic, from constants
    alone or from tensors in `compile_time` (ids of such nodes' outputs, which the caller adds)."""
    if not _is_default_domain(node) or node.op in NONDETERMINISTIC_OPS or subgraphs_of(node) or not node.outputs:
        return False
    if node.op in ("Shape", "Size") and node.inputs:
        return _resolve_shape(node.inputs[0], symbolic_dims) is not None
    return all(t.is_empty() or isinstance(t, gs.Constant) or id(t) in compile_time for t in node.inputs)


def graph_cost(graph: gs.Graph, symbolic_dims: SymbolicDims = None) -> dict:
    """Totals over every node of `graph`, subgraphs included.

    Returns a dict with
      flops, bytes_read, bytes_written: sums of node_cost over the nodes counted;
      nodes: how many nodes were counted; unknown_nodes: how many of them had known=False;
      known: unknown_nodes == 0;
      by_op: {op_key: {"count", "flops", "bytes"}}, bytes being read + written;
      uncounted_ops: the op keys that have no FLOP rule (counted as 0 flops).

    Subgraphs: an If charges its costlier branch (by flops, then bytes) since exactly one runs; a
    Loop or Scan body is counted once, i.e. one iteration, because the trip count is in general
    only known at run time; any other node carrying graph attributes has each subgraph counted
    once. Each node's own cost (node_cost) is counted too, so an If adds its condition and outputs.
    """
    totals = _Totals()
    _accumulate(graph, symbolic_dims, totals)
    return {
        "flops": totals.flops,
        "bytes_read": totals.bytes_read,
        "bytes_written": totals.bytes_written,
        "nodes": totals.nodes,
        "unknown_nodes": totals.unknown_nodes,
        "known": totals.unknown_nodes == 0,
        "by_op": totals.by_op,
        "uncounted_ops": totals.uncounted_ops,
    }
