"""Fuse scaled-dot-product self-attention, as torch's exporters write it, into onnxruntime's
com.microsoft ``Attention`` (the form onnxruntime's transformer optimizer writes for BERT).

One layer, from the hidden state x [B,S,D], as TorchScript and dynamo export transformers' BERT
(eager and SDPA attention), after -O2 has folded the Reshape targets it can:

    q  = Add(MatMul(x, Wq), bq)      k, v likewise (the bias first or second)
    qh = Transpose(Reshape(q, [B,S,N,H]), [0,2,1,3])                      [B,N,S,H]
    kT = Transpose(Reshape(k, [B,S,N,H]), [0,2,3,1])                      [B,N,H,S]
         or Transpose(Transpose(Reshape(k, ..), [0,2,1,3]), [0,1,3,2])
    vh = Transpose(Reshape(v, [B,S,N,H]), [0,2,1,3])
    s  = MatMul(qh, kT) / c   or * c   or MatMul(qh * cq, kT * ck) (SDPA)   or unscaled
    p  = Softmax(s [+ mask], axis=-1)
    y  = Reshape(Transpose(MatMul(p, vh), [0,2,1,3]), [B,S,D])

    y  -> Attention(x, [Wq|Wk|Wv], [bq|bk|bv], mask_index, num_heads=N[, scale=..])

The additive mask must be proven to be the padding mask transformers builds from a [B,S]
attention_mask graph input (1 keep, 0 padded), broadcast over heads and queries:

    (1 - Cast(Unsqueeze(attention_mask, [1,2]))) * big_negative                 (eager)
    Where(Cast(1 - Cast(Expand(Unsqueeze(..))), bool), big_negative, 1 - ..)   (SDPA)

where big_negative <= -1e4 (transformers writes finfo(float32).min). mask_index is then
Cast(attention_mask, int32), and ``mask_filter_value`` is the model's own big_negative. A mask
the pass cannot prove leaves the layer unfused; a layer without a mask Add fuses without one.

Conditions: x is float32 of rank 3; the weights [D_in, D] and biases [D] are constants; the three
head splits are Reshapes to [B,S,N,H] with N*H = D, and the merge is a Reshape to [B,S,D] (a
constant target must prove B and S; a run-time one, dynamo's shared Concat(B,-1,N,H), is trusted
for B and S as onnxruntime's fusion trusts it, its N and H read from the inferred shape); dynamo's
SDPA key, Reshape(Transpose(Reshape(kh, [-1,S,H]), [0,2,1]), [B,N,H,S]), is traced element by
element to kh's own Shape; the scale factors are constant
scalars (the product becomes the ``scale`` attribute when it is not 1/sqrt(H)); Softmax is over
the last axis. The first rule runs only where the target may emit com.microsoft Attention; elsewhere,
where the model's opset (23 on) has the standard Attention, the second writes that, taking the
additive mask as it is (no proof needed); otherwise attention stays decomposed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import register_pass
from graphopt.patterns import Match, RewritePass, Rule

_MS = "com.microsoft"
# The least negative additive mask value that still zeroes a masked position's softmax weight
# in float32 whatever the scores (onnxruntime's own default mask_filter_value).
_BIG_NEGATIVE = -1.0e4


def _heads(op, t, shape, reshape: str, perm):
    return op.Transpose(op.Reshape(t, shape, _name=reshape), perm=perm, _name=f"{reshape}_transpose")


def self_attention(op, x, wq, bq, wk, bk, wv, bv, shape_q, shape_k, shape_v, shape_o,
                   scale_q, scale_k, scale_div, scale_mul, mask, kh, k_flat, k_unflat, nan_fill):
    q = op.Add(op.MatMul(x, wq, _name="q_matmul"), bq, _name="q_add")
    k = op.Add(op.MatMul(x, wk, _name="k_matmul"), bk, _name="k_add")
    v = op.Add(op.MatMul(x, wv, _name="v_matmul"), bv, _name="v_add")
    qh = _heads(op, q, shape_q, "q_reshape", [0, 2, 1, 3])
    kt = op.either(
        _heads(op, k, shape_k, "k_reshape", [0, 2, 3, 1]),
        op.Transpose(_heads(op, k, shape_k, "k_reshape", [0, 2, 1, 3]), perm=[0, 1, 3, 2], _name="k_swap"),
        # dynamo + SDPA: kh [B,N,S,H] -> [B*N,S,H] -> [B*N,H,S] -> [B,N,H,S]; kh is also read by the
        # Shape nodes that compute those targets, so it is a value here (traced in the check).
        op.Reshape(op.Transpose(op.Reshape(kh, k_flat, _name="k_flat"), perm=[0, 2, 1], _name="k_flat_transpose"), k_unflat,
                   _name="k_unflat"),
    )
    vh = _heads(op, v, shape_v, "v_reshape", [0, 2, 1, 3])
    scores = op.MatMul(op.optional(op.Mul(qh, scale_q, _name="q_scale")), op.optional(op.Mul(kt, scale_k, _name="k_scale")),
                       _name="qk")
    scores = op.either(op.Div(scores, scale_div, _name="scale"), op.Mul(scores, scale_mul, _name="scale"), scores)
    masked = op.optional(op.Add(scores, mask, _name="mask_add"))
    probs = op.Softmax(masked, _name="softmax")
    # Newer transformers' SDPA exports zero the rows a -inf mask would turn into NaN: with a finite
    # mask constant (checked) no NaN arises from masking, and the guard passes the probabilities on.
    probs = op.either(probs, op.Where(op.IsNaN(probs), nan_fill, probs, _name="nan_guard"))
    context = op.Transpose(op.MatMul(probs, vh, _name="pv"), perm=[0, 2, 1, 3], _name="merge_transpose")
    return op.Reshape(context, shape_o, _name="merge_reshape")


# ---------------------------------------------------------------------------------------------
# The checks


def _dims(tensor: gs.Tensor) -> tuple | None:
    return None if tensor is None or tensor.shape is None else tuple(tensor.shape)


def _reshape_to(node: gs.Node, x_dims: tuple, tail: tuple[int, ...]) -> bool:
    """`node` is a Reshape of a [B,S,...] tensor (x's B and S) to [B,S,*tail].

    A constant target must prove it: [0 or B, -1 or 0 or S, *tail] (0 only without allowzero; one
    -1 in the tail instead of S's is fine). A
    target computed at run time (dynamo's one Concat(B, -1, N, H) for every layer) is taken to be
    B and S as the exporter wrote them, when inference gives the output [.., .., *tail]; as in
    onnxruntime's own fusion, those two dims are not traced back to x (a different B or S there
    would make the original's later Reshape or residual Add fail, not compute something else).
    """
    target = ir.constant_value(node.inputs[1])
    if target is None:
        out = _dims(node.outputs[0])
        return out is not None and len(out) == 2 + len(tail) and tuple(out[2:]) == tail
    if target.ndim != 1 or len(target) != 2 + len(tail):
        return False
    target = [int(t) for t in target]
    # One -1 may stand for a head or feature count (dynamo writes [B, S, -1, H]): B and S proven,
    # it can only be what the tail needs.
    if any(t != want and t != -1 for t, want in zip(target[2:], tail)) or target.count(-1) > 1:
        return False
    allowzero = int(node.attrs.get("allowzero", 0))
    b_ok = (target[0] == 0 and not allowzero) or (isinstance(x_dims[0], (int, np.integer)) and target[0] == x_dims[0])
    s_ok = target[1] == -1 or (target[1] == 0 and not allowzero) or (isinstance(x_dims[1], (int, np.integer)) and target[1] == x_dims[1])
    return b_ok and s_ok


def _scalar(tensor: gs.Tensor | None) -> float | None:
    value = ir.constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _scale(m: Match) -> float | None:
    """The product of the constant factors the scores are scaled by (1.0 when none)."""
    scale = 1.0
    for name in ("scale_q", "scale_k", "scale_mul"):
        if m.values.get(name) is not None:
            s = _scalar(m.values[name])
            if s is None:
                return None
            scale *= s
    if m.values.get("scale_div") is not None:
        s = _scalar(m.values["scale_div"])
        if not s:
            return None
        scale /= s
    return scale if math.isfinite(scale) and scale > 0 else None


def _mask_source(mask: gs.Tensor) -> tuple[gs.Tensor, float] | None:
    """(attention_mask, big_negative) when `mask` is (1 - m) * big_negative (or the SDPA
    Where(bool(1 - m), big_negative, 1 - m)) of m = the [B,S] graph input `attention_mask`
    broadcast as [B,1,1,S] (and possibly Expand-ed over heads and queries), else None."""
    node = ir.producer(mask)
    if node is None or node.domain not in ir.DEFAULT_DOMAINS:
        return None
    if node.op == "Mul" and len(node.inputs) == 2:
        for inv, neg in (node.inputs, node.inputs[::-1]):
            big = _scalar(neg)
            if big is not None and big <= _BIG_NEGATIVE:
                found = _inverted(inv)
                if found is not None:
                    return found, big
        return None
    if node.op == "Where" and len(node.inputs) == 3 and _scalar(node.inputs[1]) == 0.0:
        # Where(keep, 0, big_negative), keep a boolean view of attention_mask (transformers 4.5x dynamo)
        big = _scalar(node.inputs[2])
        if big is None or big > _BIG_NEGATIVE:
            return None
        found = _kept_positions(node.inputs[0])
        return None if found is None else (found, big)
    if node.op == "Where" and len(node.inputs) == 3:
        cond, neg, inv = node.inputs
        big = _scalar(neg)
        if big is None or big > _BIG_NEGATIVE:
            return None
        # cond must be bool(inv): Casts (to bool, or bool to bool) of inv itself.
        c = cond
        while True:
            producer = ir.producer(c)
            if producer is None or producer.op != "Cast" or producer.domain not in ir.DEFAULT_DOMAINS:
                return None
            if producer.attrs.get("to") != onnx.TensorProto.BOOL:
                return None
            c = producer.inputs[0]
            if c is inv:
                break
        found = _inverted(inv)
        return None if found is None else (found, big)
    return None


def _kept_positions(cond: gs.Tensor) -> gs.Tensor | None:
    """The [B,S] attention_mask graph input when `cond` is Bool(attention_mask)[:, None, None, :]
    as a dynamo export with bound dims writes it: GatherND(Cast(mask, bool), indices) with constant
    indices [B,1,1,S,2] holding (b, s), possibly And-ed with an all-true constant (the bidirectional
    mask's other half, folded)."""
    node = ir.producer(cond)
    if node is not None and node.op == "And" and node.domain in ir.DEFAULT_DOMAINS and len(node.inputs) == 2:
        for const, other in (node.inputs, node.inputs[::-1]):
            value = ir.constant_value(const)
            if value is not None and value.dtype == np.bool_ and value.all() and value.ndim <= 4:
                node = ir.producer(other)
                break
        else:
            return None
    if node is None or node.op != "GatherND" or node.domain not in ir.DEFAULT_DOMAINS or int(node.attrs.get("batch_dims", 0)):
        return None
    indices = ir.constant_value(node.inputs[1])
    cast = ir.producer(node.inputs[0])
    if indices is None or cast is None or cast.op != "Cast" or cast.attrs.get("to") != onnx.TensorProto.BOOL:
        return None
    source = cast.inputs[0]
    shape = ir.static_shape(source)
    if shape is None or len(shape) != 2 or not _is_input(source):
        return None
    batch, sequence = shape
    expected = np.stack(np.meshgrid(np.arange(batch), np.arange(sequence), indexing="ij"), axis=-1).reshape(batch, 1, 1, sequence, 2)
    return source if indices.shape == expected.shape and np.array_equal(indices, expected) else None


def _is_input(tensor: gs.Tensor) -> bool:
    """A value no node computes (a graph input): what attention_mask is to the model."""
    return ir.producer(tensor) is None and not isinstance(tensor, gs.Constant)


_INT_OR_BOOL = {onnx.TensorProto.BOOL, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                onnx.TensorProto.UINT64}


def _inverted(inv: gs.Tensor) -> gs.Tensor | None:
    """The attention_mask graph input when `inv` is Sub(1.0, float(m)) of it broadcast as [B,1,1,S]."""
    node = ir.producer(inv)
    if node is None or node.op != "Sub" or node.domain not in ir.DEFAULT_DOMAINS or len(node.inputs) != 2:
        return None
    if _scalar(node.inputs[0]) != 1.0:
        return None
    return _broadcast_input(node.inputs[1])


def _broadcast_input(t: gs.Tensor) -> gs.Tensor | None:
    """The rank-2 graph input that `t` is, through Casts to float (from an integer or bool input),
    Unsqueezes that insert exactly axes 1 and 2, and Expands; else None."""
    unsqueezed: list[int] = []
    float_cast = False
    while True:
        node = ir.producer(t)
        if node is None:
            break
        if node.domain not in ir.DEFAULT_DOMAINS:
            return None
        if node.op == "Cast":
            to = node.attrs.get("to")
            if to == onnx.TensorProto.FLOAT:
                if float_cast:
                    return None
                float_cast = True
            elif to not in _INT_OR_BOOL or float_cast:
                # Once a float, a cast back to an integer type could lose what it held.
                return None
        elif node.op == "Unsqueeze":
            axes = node.attrs.get("axes") if len(node.inputs) < 2 else ir.constant_value(node.inputs[1])
            if axes is None:
                return None
            unsqueezed.append([int(a) for a in np.asarray(axes).reshape(-1)])
        elif node.op == "Expand":
            # Expand broadcasts the same values; the scores' shape is checked by the caller.
            pass
        else:
            return None
        t = node.inputs[0]
    if t.shape is None or len(t.shape) != 2 or not float_cast:
        return None
    # Replay the Unsqueezes, innermost first, on the input's two axes.
    labels = ["b", "s"]
    for axes in reversed(unsqueezed):
        rank = len(labels) + len(axes)
        for a in sorted(a % rank if -rank <= a < rank else 99 for a in axes):
            if a > len(labels):
                return None
            labels.insert(a, "1")
    return t if labels == ["b", "1", "1", "s"] else None


def _head_split(m: Match) -> tuple[int, int] | None:
    """(num_heads, head_size) from the Q reshape's target or inferred shape."""
    node = m.node("q_reshape")
    out = _dims(node.outputs[0])
    if out is not None and len(out) == 4 and all(isinstance(d, (int, np.integer)) and d > 0 for d in out[2:]):
        return int(out[2]), int(out[3])
    target = ir.constant_value(node.inputs[1])
    if target is not None and target.ndim == 1 and len(target) == 4 and all(int(d) > 0 for d in target[2:]):
        return int(target[2]), int(target[3])
    return None


def _k_parts(m: Match, x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Node] | None:
    """(Wk, bk, the K head-split Reshape): bound by the match, or traced from kh in the dynamo SDPA form."""
    if m.values.get("kh") is None:
        return m.wk, m.bk, m.node("k_reshape")
    kh = m.kh
    transpose = ir.producer(kh)
    if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", ())) != [0, 2, 1, 3]:
        return None
    # Whatever else reads kh only measures it (the Shape nodes of the flatten targets).
    if any(reader is not m.node("k_flat") and reader.op != "Shape" for reader in kh.outputs) or kh in m.graph.outputs:
        return None
    chain = [transpose]
    reshape = ir.producer(transpose.inputs[0])
    if reshape is None or reshape.op != "Reshape":
        return None
    add = ir.producer(reshape.inputs[0])
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    for matmul_input, bias in (add.inputs, add.inputs[::-1]):
        matmul = ir.producer(matmul_input)
        if matmul is not None and matmul.op == "MatMul" and len(matmul.inputs) == 2 and matmul.inputs[0] is x:
            chain += [reshape, add, matmul]
            if any(n.domain not in ir.DEFAULT_DOMAINS or len(n.outputs) != 1 or len(n.outputs[0].outputs) != 1
                   or n.outputs[0] in m.graph.outputs for n in chain[1:]):
                return None
            return matmul.inputs[1], bias, reshape
    return None


def _elements(t: gs.Tensor, depth: int = 0) -> list | None:
    """The elements of a small int64 shape vector: ints, or (tensor, axis) for a dimension of a
    tensor read by Shape; None when they cannot be traced."""
    value = ir.constant_value(t)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)] if value.ndim <= 1 and value.dtype.kind == "i" else None
    node = ir.producer(t)
    if node is None or depth > 8 or node.domain not in ir.DEFAULT_DOMAINS:
        return None
    if node.op == "Shape":
        rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
        if rank is None:
            return None
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        return [(node.inputs[0], i) for i in range(rank)][start:None if end is None else int(end)]
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [_elements(i, depth + 1) for i in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op == "Slice" and len(node.inputs) in (3, 4, 5):
        data = _elements(node.inputs[0], depth + 1)
        bounds = [ir.constant_value(i) for i in node.inputs[1:]]
        if data is None or any(b is None or b.size != 1 for b in bounds):
            return None
        bounds = [int(b.reshape(-1)[0]) for b in bounds]
        if len(bounds) > 2 and bounds[2] not in (0, -1) or len(bounds) > 3 and bounds[3] != 1:
            return None
        return data[bounds[0]:bounds[1]]
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _elements(node.inputs[0], depth + 1)
    return None


def _is_dim(element, tensor: gs.Tensor, axis: int) -> bool:
    if isinstance(element, tuple):
        return element[0] is tensor and element[1] == axis
    dims = _dims(tensor)
    return dims is not None and isinstance(dims[axis], (int, np.integer)) and int(dims[axis]) == element > 0


def _flattened_k_ok(m: Match, head_size: int) -> bool:
    """k_flat is [*, S, H] of kh = [B,N,S,H], and k_unflat is [B or -1, N, H, S]."""
    kh = m.kh
    if _dims(kh) is None or len(_dims(kh)) != 4:
        return False
    flat, unflat = _elements(m.k_flat), _elements(m.k_unflat)
    if flat is None or unflat is None or len(flat) != 3 or len(unflat) != 4:
        return False
    if int(m.node("k_unflat").attrs.get("allowzero", 0)) and 0 in unflat or int(m.node("k_flat").attrs.get("allowzero", 0)) and 0 in flat:
        return False
    if not (_is_dim(flat[1], kh, 2) and (flat[2] == head_size or _is_dim(flat[2], kh, 3))):
        return False
    return (unflat[0] == -1 or _is_dim(unflat[0], kh, 0)) and _is_dim(unflat[1], kh, 1) \
        and (unflat[2] == head_size or _is_dim(unflat[2], kh, 3)) and _is_dim(unflat[3], kh, 2)


def applies(m: Match) -> bool:
    x_dims = m.shape("x")
    if m.dtype("x") != np.dtype(np.float32) or x_dims is None or len(x_dims) != 3:
        return False
    k_parts = _k_parts(m, m.x)
    if k_parts is None:
        return False
    ws = [m.value("wq"), ir.constant_value(k_parts[0]), m.value("wv")]
    bs = [m.value("bq"), ir.constant_value(k_parts[1]), m.value("bv")]
    if any(w is None or w.dtype != np.float32 or w.ndim != 2 for w in ws) or any(b is None or b.dtype != np.float32 for b in bs):
        return False
    d_in, hidden = ws[0].shape
    if any(w.shape != (d_in, hidden) for w in ws) or any(b.shape not in ((hidden,), (1, hidden), (1, 1, hidden)) for b in bs):
        return False
    if isinstance(x_dims[2], (int, np.integer)) and x_dims[2] != d_in:
        return False
    split = _head_split(m)
    if split is None or split[0] * split[1] != hidden:
        return False
    if not all(_reshape_to(node, x_dims, split) for node in (m.node("q_reshape"), k_parts[2], m.node("v_reshape"))):
        return False
    if m.values.get("kh") is not None and not _flattened_k_ok(m, split[1]):
        return False
    if not _reshape_to(m.node("merge_reshape"), x_dims, (hidden,)):
        return False
    softmax = m.node("softmax")
    axis = softmax.attrs.get("axis")
    if not (axis in (-1, 3) or (axis is None and m.graph.opset is not None and m.graph.opset >= 13)):
        return False
    if _scale(m) is None:
        return False
    if m.nan_fill is not None and (m.scalar("nan_fill") != 0.0 or m.mask is None or _mask_source(m.mask) is None):
        return False
    return m.mask is None or _mask_keeps_scores_shape(m)


def applies_with_mask_index(m: Match) -> bool:
    """com.microsoft Attention takes the padding mask as mask_index: the mask must be proven one."""
    return applies(m) and (m.mask is None or _mask_source(m.mask) is not None)


def _mask_keeps_scores_shape(m: Match) -> bool:
    """The mask is rank 4 and broadcasts over the heads (where inference knows its shape)."""
    mask = _dims(m.mask)
    if mask is None:
        return True
    return len(mask) == 4 and (mask[1] == 1 or not isinstance(mask[1], (int, np.integer)))


def attention(op, m: Match):
    num_heads, head_size = _head_split(m)
    wk, bk, _ = _k_parts(m, m.x)
    ws = [m.value("wq"), ir.constant_value(wk), m.value("wv")]
    bs = [b.reshape(-1) for b in (m.value("bq"), ir.constant_value(bk), m.value("bv"))]
    weight = op.constant(np.ascontiguousarray(np.concatenate(ws, axis=1)), f"{m.root.name}_qkv_weight")
    bias = op.constant(np.concatenate(bs), f"{m.root.name}_qkv_bias")
    attrs = {"num_heads": num_heads}
    scale = _scale(m)
    if abs(scale * math.sqrt(head_size) - 1.0) > 1e-6:
        attrs["scale"] = float(scale)
    mask_index = None
    if m.mask is not None:
        source, big = _mask_source(m.mask)
        mask_index = op.Cast(source, to=onnx.TensorProto.INT32)
        attrs["mask_filter_value"] = float(max(big, float(np.finfo(np.float32).min)))
    return op.Attention(m.x, weight, bias, mask_index, _domain=_MS, **attrs)


def applies_as_standard(m: Match) -> bool:
    """Opset 23's Attention broadcasts attn_mask to [B,N,S,S], but onnxruntime's kernel (1.32) does
    not broadcast its query axis: the mask must already be [.., .., S, S] (SDPA exports expand it)."""
    if not applies(m):
        return False
    mask = _dims(m.mask) if m.mask is not None else None
    return m.mask is None or (mask is not None and len(mask) == 4 and mask[2] == m.shape("x")[1] and mask[2] is not None)


def standard_attention(op, m: Match):
    """Opset 23's Attention on the projected q, k, v [B,S,D] (3-D: heads as attributes); the
    additive mask goes in as attn_mask unchanged (it broadcasts to [B,N,S,S] as the Add did)."""
    num_heads, head_size = _head_split(m)
    wk, bk, _ = _k_parts(m, m.x)
    projected = [op.Add(op.MatMul(m.x, w), b) for w, b in ((m.wq, m.bq), (wk, bk), (m.wv, m.bv))]
    attrs = {"q_num_heads": num_heads, "kv_num_heads": num_heads}
    scale = _scale(m)
    if abs(scale * math.sqrt(head_size) - 1.0) > 1e-6:
        attrs["scale"] = float(scale)
    return op.Attention(*projected, m.mask, **attrs)


@register_pass
class FuseAttention(RewritePass):
    name = "fuse-attention"
    description = "Replace decomposed multi-head self-attention (BERT-style) by onnxruntime's com.microsoft Attention"
    opt_level = 3
    needs_shapes = True
    rules = (
        Rule(self_attention, attention, applies_with_mask_index, name="attention", emits=[("Attention", _MS)]),
        # Where the target runs no contrib op (generic) but the model's opset has Attention (23).
        Rule(self_attention, standard_attention, applies_as_standard, name="standard_attention", emits=["Attention"]),
    )
