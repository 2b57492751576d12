"""float16 / bfloat16 compute: `convert-fp16` and `convert-bf16` move a model's float32 arithmetic
to the half-width dtype where the target computes it faster, with Casts only where an fp16 region
meets an fp32 one.

Why this and not "cast everything":
* It pays only where the hardware has a faster rate for the dtype: `Hardware.peak(dtype)` above
  `peak("fp32")` (cuda: 312 vs 19.5 TFLOP/s on an A100). x86_64's AVX2/AVX-512 chips compute fp16
  and bf16 in fp32 (their peaks say so), where the casts are pure overhead: the pass then changes
  nothing and says why, unless `options["float16_force"]`.
* An op moves only where the runtime has a kernel for that dtype. For a provider the installed
  onnxruntime reports (its kernel defs carry type constraints), that is asked; the x86_64 CPU
  provider has fp16 kernels for data movement, LayerNormalization and a few others, but not for
  MatMul, Conv, Add or Relu, so even forced the pass converts next to nothing there. For a provider
  the CPU wheel cannot report (CUDA), the op schema's type constraints decide for fp16 (the CUDA
  provider registers fp16 for nearly every float op) and a short list from onnxruntime's
  RegisterCudaKernels decides for bf16, which CUDA registers for a handful of ops only.
* Numerically sensitive ops stay fp32: softmax, the normalizations (their mean and variance are
  sums over many values), reductions, Exp/Log/Pow/Sqrt/Reciprocal (fp16's range is 6e-5..65504:
  exp overflows at 11, 1/x at 1.5e-5), Div by anything but a constant of magnitude >= 1, CumSum,
  Range, recurrent cells. Also kept: a node reading a small float constant fp16 cannot hold (an
  epsilon of 1e-12 flushes to 0, a -3.4e38 mask becomes -inf), nodes holding subgraphs (their
  bodies and what they read stay as they are), ops whose output dtype is an attribute (Cast,
  ConstantOfShape, Random*), and nodes named in `options["quantize_exclude"]` (an accuracy search
  keeps them fp32 one at a time).
* Which positions of an op change follows its schema: only type variables that an output carries
  become fp16; a fixed `tensor(float)` input (Resize scales) and a type variable of inputs only
  (Resize roi) keep float32, and integer inputs (Reshape shape, Slice starts) are never touched.
* Casts: a tensor gets at most one Cast per dtype, shared by all its readers; a cheap op
  (elementwise, data movement) between an fp16 region and an fp32 one goes to whichever side needs
  fewer Casts (a local search that only removes Casts), so adjacent fp32 ops share one boundary
  and an island of cheap ops with no MatMul/Conv next to it stays fp32. A Cast never feeds a Cast
  back: Shape, Size and Cast read whichever dtype a tensor has, and a float32 tensor that was cast
  from fp16 in the model is read in fp16 from before that Cast.
* The interface is unchanged: graph inputs and outputs keep their names and float32 dtype (a Cast
  at entry and exit).

Weights become fp16 (bf16) constants, which halves their size on disk too. onnxruntime's CPU
provider, which graphopt verifies on, still runs an fp16 model (its InsertCastTransformer computes
the nodes it has no fp16 kernel for in fp32, between Casts of its own), so it checks accuracy but
not speed; it refuses a bf16 one (no bf16 MatMul, Add, Relu): check that on the target, or with
onnx.reference.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import ir
from graphopt.pass_manager import CostDecision, Pass, PassContext, PassResult, register_pass

# Computed in fp32 whatever the target: their result depends on sums over many values, or on a
# range fp16 lacks (see the module docstring).
SENSITIVE_OPS = frozenset({
    "Softmax", "LogSoftmax",
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization", "GroupNorm", "SkipGroupNorm", "LpNormalization", "MeanVarianceNormalization", "LRN",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd",
    "CumSum", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Softplus", "Range", "LSTM", "GRU", "RNN",
})
# Their output dtype is an attribute (or the op is a source of values): the pass would have to
# rewrite the attribute, and a Cast after them is what converting their readers already gives.
ATTRIBUTE_TYPED_OPS = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
# Where fp16 pays (tensor-core GEMMs and convolutions): always converted when they can be; every
# other convertible op follows whichever side needs fewer Casts.
ANCHOR_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention",
    "FusedMatMul", "FusedGemm", "FusedConv",
})
# Read a tensor of any dtype without their result depending on it (Cast's input 0: fp16 widened to
# fp32 is exact, so casting the fp16 value directly gives the same result).
DTYPE_AGNOSTIC_READERS = frozenset({"Shape", "Size", "Cast"})
# Constants of at most this many elements are parameters (an epsilon, a mask value): one fp16
# flushes to 0 changes the result, so their reader stays fp32. Larger ones are weights, where a
# few subnormals more or less do not matter.
PARAMETER_MAX_ELEMENTS = 64

# onnxruntime's CUDA provider registers BFloat16 for these only (onnxruntime/core/providers/cuda/
# cuda_execution_provider.cc, RegisterCudaKernels: the BFloat16 entries from opset 13), plus the
# data-movement kernels it registers for every fixed-size type. Used when the installed
# onnxruntime cannot report the CUDA provider (the CPU wheel); a CUDA build's probe wins.
CUDA_BF16_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Relu", "Sigmoid", "Tanh", "Softmax", "ReduceSum", "Cast",
    "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Concat", "Gather", "Slice", "Expand",
})

_INT_MAX = 2**31 - 1
_F32 = np.dtype(np.float32)


class _Schema:
    """The parts of an op schema the pass reads, from onnx.defs or onnxruntime's."""

    def __init__(self, schema):
        self.since_version = schema.since_version
        self.inputs = [(_type_str(p), _variadic(p)) for p in schema.inputs]
        self.outputs = [(_type_str(p), _variadic(p)) for p in schema.outputs]
        self.allowed = {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints}

    @staticmethod
    def param(params, index):
        if index < len(params):
            return params[index][0]
        if params and params[-1][1]:
            return params[-1][0]
        return None


def _type_str(p) -> str:
    return p.type_str if hasattr(p, "type_str") else p.typeStr


def _variadic(p) -> bool:
    return str(p.option).endswith("Variadic")


@functools.cache
def _schema(op: str, domain: str, opset: int) -> _Schema | None:
    from graphopt.targets import capabilities as caps

    if domain == "":
        schema = caps.standard_schema(op, opset)
        return None if schema is None else _Schema(schema)
    versions = [s for s in caps.runtime_schemas().get((domain, op), ()) if s.since_version <= opset and not s.deprecated]
    return _Schema(versions[-1]) if versions else None


class _Dtype:
    """The low-precision dtype a pass converts to."""

    def __init__(self, name: str):
        self.name = name  # Hardware peak key: "fp16", "bf16"
        self.np = np.dtype(np.float16) if name == "fp16" else np.dtype(ml_dtypes.bfloat16)
        self.onnx = onnx.TensorProto.FLOAT16 if name == "fp16" else onnx.TensorProto.BFLOAT16
        self.type_str = "tensor(float16)" if name == "fp16" else "tensor(bfloat16)"
        info = ml_dtypes.finfo(self.np)
        self.max, self.tiny = float(info.max), float(info.tiny)
        self.min_opset = 1 if name == "fp16" else 13  # Cast to bfloat16 is opset 13


def _dtype_of(t: gs.Tensor):
    if t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def _runtime_has_kernel(target, op: str, domain: str, schema: _Schema, type_vars, low: _Dtype) -> bool:
    if target is None or target.runtime != "onnxruntime" or not target.execution_providers:
        return True  # a runtime graphopt cannot ask: the schema decided
    provider = target.execution_providers[0]
    from graphopt.targets import capabilities as caps

    table = caps.typed_kernel_table()
    if table is not None and provider in table:
        since = schema.since_version
        for (start, end), constraints in table[provider].get(domain, {}).get(op, ()):
            if not (start == since or start < since <= end != _INT_MAX):
                continue
            # A kernel may name its type variables differently from the schema: then any of its
            # constraints taking the dtype will do.
            if all(low.type_str in constraints[v] if v in constraints else any(low.type_str in c for c in constraints.values())
                   for v in type_vars):
                return True
        return False
    if low.name == "fp16":
        return domain == "" or op in target.kernels(domain)
    return provider == "CUDAExecutionProvider" and domain == "" and op in CUDA_BF16_OPS


class _Plan:
    """Which nodes compute in the low dtype, which of their inputs/outputs change, and why the rest do not."""

    def __init__(self, graph: gs.Graph, ctx: PassContext, low: _Dtype):
        self.graph, self.low = graph, low
        self.main = {id(n) for n in graph.nodes}
        self.conv_in: dict[int, tuple[int, ...]] = {}
        self.conv_out: dict[int, tuple[int, ...]] = {}
        self.anchor: set[int] = set()
        self.kept: dict[str, int] = {}
        # Tensors something outside the main graph's nodes reads as float32: graph outputs and
        # values subgraph bodies take from this scope.
        self.pinned = {id(t) for t in graph.outputs}
        for node in graph.nodes:
            if ir.subgraphs_of(node):
                self.pinned.update(id(t) for t in ir.outer_uses(node))
        excluded = set(ctx.options.get("quantize_exclude", ()) or ())
        for node in graph.nodes:
            why = self._why_kept(node, ctx, excluded)
            if why:
                self.kept[why] = self.kept.get(why, 0) + 1

    def _why_kept(self, node: gs.Node, ctx: PassContext, excluded) -> str | None:
        from graphopt.targets import capabilities as caps

        domain = caps.normalize_domain(node.domain)
        floats = [t for t in list(node.inputs) + list(node.outputs) if not t.is_empty() and _dtype_of(t) == _F32]
        if not floats:
            return None  # nothing float32 to convert (Shape, integer arithmetic)
        if node.name and node.name in excluded:
            return "fp32_excluded"
        if ir.subgraphs_of(node):
            return "fp32_subgraph"
        if node.op in SENSITIVE_OPS:
            return "fp32_sensitive"
        if node.op in ATTRIBUTE_TYPED_OPS:
            return None
        opset = ctx.opset if domain == "" else ctx.model.opset_imports.get(domain, 1)
        schema = _schema(node.op, domain, opset)
        if schema is None:
            return "fp32_no_schema"
        bound: dict[str, list[tuple[str, int]]] = {}
        for kind, tensors, params in (("in", node.inputs, schema.inputs), ("out", node.outputs, schema.outputs)):
            for i, t in enumerate(tensors):
                if t.is_empty():
                    continue
                var = _Schema.param(params, i)
                if var is None:
                    return "fp32_no_schema"
                if var not in schema.allowed:
                    continue  # a fixed type: Resize scales, NMS boxes
                dtype = _dtype_of(t)
                if dtype is None:
                    return "fp32_unknown_dtype"
                if dtype == _F32:
                    bound.setdefault(var, []).append((kind, i))
                elif dtype.kind == "f" or dtype == self.low.np:
                    return "fp32_mixed_dtypes"  # a variable already bound to another float type
        # Only what an output carries computes in the low dtype; a type variable of inputs alone
        # (Resize roi) is a parameter and keeps float32.
        type_vars = {v for v, uses in bound.items() if any(kind == "out" for kind, _ in uses)}
        if not type_vars:
            return None
        if any(self.low.type_str not in schema.allowed[v] for v in type_vars):
            return "fp32_schema"
        if not _runtime_has_kernel(ctx.target, node.op, domain, schema, type_vars, self.low):
            return "fp32_no_kernel"
        conv_in = tuple(i for v in type_vars for kind, i in bound[v] if kind == "in")
        conv_out = tuple(i for v in type_vars for kind, i in bound[v] if kind == "out")
        if node.op == "Div" and 1 in conv_in:
            divisor = ir.constant_value(node.inputs[1])
            if divisor is None or divisor.size == 0 or float(np.min(np.abs(divisor))) < 1.0:
                return "fp32_sensitive"  # x / y for small y overflows fp16
        for i in conv_in:
            value = ir.constant_value(node.inputs[i])
            if value is not None and not self._fits(value):
                return "fp32_constant_range"
        self.conv_in[id(node)] = tuple(sorted(conv_in))
        self.conv_out[id(node)] = tuple(sorted(conv_out))
        if node.op in ANCHOR_OPS:
            self.anchor.add(id(node))
        return None

    def _fits(self, value: np.ndarray) -> bool:
        if value.size == 0:
            return True
        magnitude = np.abs(value.astype(np.float64))
        if not np.all(np.isfinite(magnitude)) or float(magnitude.max()) > self.low.max:
            return False
        if value.size <= PARAMETER_MAX_ELEMENTS:
            nonzero = magnitude[magnitude > 0]
            if nonzero.size and float(nonzero.min()) < self.low.tiny:
                return False
        return True


class _Search:
    """Moves cheap (non-anchor) nodes to fp32 wherever that saves Casts."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.low: set[int] = set(plan.conv_in)
        self.nodes = {id(n): n for n in plan.graph.nodes}
        self.uses: dict[int, list[tuple[gs.Node, int]]] = {}
        for node in plan.graph.nodes:
            for i, t in enumerate(node.inputs):
                self.uses.setdefault(id(t), []).append((node, i))

    def casts(self, t: gs.Tensor) -> int:
        """The Casts tensor `t` needs under the current assignment (0 or 1)."""
        if _is_constant(t):
            return 0  # converted ahead of time
        native_low = self.native_low(t)
        need_low, need_f32 = False, id(t) in self.plan.pinned
        for node, i in self.uses.get(id(t), ()):
            if id(node) in self.low and i in self.plan.conv_in[id(node)]:
                need_low = True
            elif not (node.op in DTYPE_AGNOSTIC_READERS and i == 0):
                need_f32 = True
        if native_low:
            return int(need_f32)
        if need_low and _cast_from_low(t, self.plan.low) is not None:
            return 0
        return int(need_low)

    def touched(self, nodes) -> list[gs.Tensor]:
        seen: dict[int, gs.Tensor] = {}
        for node in nodes:
            for i in self.plan.conv_in[id(node)]:
                seen[id(node.inputs[i])] = node.inputs[i]
            for j in self.plan.conv_out[id(node)]:
                seen[id(node.outputs[j])] = node.outputs[j]
        return list(seen.values())

    def native_low(self, t: gs.Tensor) -> bool:
        producer = ir.producer(t)
        return (producer is not None and id(producer) in self.low
                and any(producer.outputs[j] is t for j in self.plan.conv_out[id(producer)]))

    def reads_fp32_only(self, node: gs.Node) -> bool:
        """Whether every computed value the node would convert arrives in float32."""
        return all(not self.native_low(node.inputs[i]) for i in self.plan.conv_in[id(node)] if not _is_constant(node.inputs[i]))

    def flip_saves(self, nodes, on_tie: bool = False) -> bool:
        tensors = self.touched(nodes)
        before = sum(self.casts(t) for t in tensors)
        for node in nodes:
            self.low.discard(id(node))
        after = sum(self.casts(t) for t in tensors)
        if after < before or (on_tie and after == before):
            return True
        self.low.update(id(n) for n in nodes)
        return False

    def regions(self) -> list[list[gs.Node]]:
        """Connected groups of cheap low-dtype nodes (joined by the tensors they convert)."""
        cheap = [n for n in self.plan.graph.nodes if id(n) in self.low and id(n) not in self.plan.anchor]
        parent = {id(n): id(n) for n in cheap}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for node in cheap:
            for j in self.plan.conv_out[id(node)]:
                for reader, i in self.uses.get(id(node.outputs[j]), ()):
                    if id(reader) in parent and i in self.plan.conv_in[id(reader)]:
                        parent[find(id(reader))] = find(id(node))
        groups: dict[int, list[gs.Node]] = {}
        for node in cheap:
            groups.setdefault(find(id(node)), []).append(node)
        return list(groups.values())

    def run(self) -> int:
        moved = 0
        changed = True
        while changed:
            changed = False
            for node in self.plan.graph.nodes:
                # On a tie, a cheap op fed only by fp32 stays fp32: the Cast then sits after the
                # last op of an fp32 region, where onnxruntime's own fusions of that region
                # (LayerNormFusion of a decomposed LayerNorm, up to its scale and bias) expect
                # one dtype throughout.
                if (id(node) in self.low and id(node) not in self.plan.anchor
                        and self.flip_saves([node], on_tie=self.reads_fp32_only(node))):
                    moved += 1
                    changed = True
            for group in self.regions():
                if len(group) > 1 and self.flip_saves(group):
                    moved += len(group)
                    changed = True
        return moved


def _is_constant(t: gs.Tensor) -> bool:
    # Without loading the value: this is asked for every weight at every step of the search.
    if isinstance(t, gs.Constant):
        return True
    producer = ir.producer(t)
    return (producer is not None and producer.op == "Constant" and producer.domain in ir.DEFAULT_DOMAINS
            and len(producer.attrs) == 1 and isinstance(producer.attrs.get("value"), gs.Constant))


def _cast_from_low(t: gs.Tensor, low: _Dtype) -> gs.Tensor | None:
    """The low-dtype tensor `t` was cast from in the model, if it was (read that instead of casting back)."""
    producer = ir.producer(t)
    if producer is not None and producer.op == "Cast" and producer.domain in ir.DEFAULT_DOMAINS and producer.inputs:
        source = producer.inputs[0]
        if _dtype_of(source) == low.np:
            return source
    return None


class _ConvertFloat(Pass):
    dtype = "fp16"
    subgraphs = False  # bodies of If/Loop/Scan stay fp32 with everything they read (see _Plan.pinned)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        low = _Dtype(self.dtype)
        skip = self._skip_reason(ctx, low)
        if skip is not None:
            key, reason, before, after = skip
            return PassResult(False, {key: 1}, [CostDecision(self.name, "<model>", False, before, after, reason)])
        ctx.analysis("shapes")
        plan = _Plan(graph, ctx, low)
        search = _Search(plan)
        moved = search.run()
        if not search.low:
            return PassResult(False, {**plan.kept, "fp32_fewer_casts": moved})
        casts, constants = _rewrite(graph, ctx, plan, search.low, low)
        ir.toposort(graph)
        stats = {f"{low.name}_nodes": len(search.low), "casts": casts, f"{low.name}_constants": constants, **plan.kept}
        if moved:
            stats["fp32_fewer_casts"] = moved
        return PassResult(True, stats)

    def _skip_reason(self, ctx: PassContext, low: _Dtype):
        hardware = getattr(ctx.target, "hardware", None)
        name = getattr(ctx.target, "full_name", "no target")
        if ctx.opset < low.min_opset:
            return ("skipped_opset", f"{low.name} needs opset >= {low.min_opset} (Cast to it), the model is opset {ctx.opset}", 0.0, 0.0)
        if ctx.options.get("float16_force"):
            return None
        if hardware is None:
            return ("skipped_no_hardware", f"{name} has no hardware figures to tell whether {low.name} is faster: "
                    "kept fp32 (float16_force converts anyway)", 0.0, 0.0)
        fp32, half = hardware.peak("fp32"), hardware.peak(low.name)
        if half <= fp32:
            # Seconds per GFLOP at peak, so the decision table compares like with like.
            return ("skipped_not_faster", f"{name} computes {low.name} at {half:g} GFLOP/s, no faster than fp32 ({fp32:g}): "
                    "kept fp32 (float16_force converts anyway)", 1.0 / fp32, 1.0 / half)
        return None


def _rewrite(graph: gs.Graph, ctx: PassContext, plan: _Plan, low_nodes: set[int], low: _Dtype) -> tuple[int, int]:
    """Retype the chosen nodes and put one Cast at each boundary; returns (Casts added, constants converted)."""
    nodes = [n for n in graph.nodes if id(n) in low_nodes]
    low_of: dict[int, gs.Tensor] = {}
    produced: list[tuple[gs.Tensor, gs.Tensor]] = []
    casts = constants = 0
    for node in nodes:
        for j in plan.conv_out[id(node)]:
            t = node.outputs[j]
            t_low = gs.Variable(ctx.fresh_name(f"{t.name}_{low.name}"), dtype=low.np, shape=t.shape)
            list.__setitem__(node.outputs, j, t_low)
            list.clear(t.inputs)
            list.append(t_low.inputs, node)
            low_of[id(t)] = t_low
            produced.append((t, t_low))
    for node in nodes:
        for i in plan.conv_in[id(node)]:
            t = node.inputs[i]
            if id(t) not in low_of:
                value = ir.constant_value(t)
                if value is not None:
                    low_of[id(t)] = ir.make_constant(ctx.fresh_name(f"{t.name}_{low.name}"), value.astype(low.np))
                    constants += 1
                elif (source := _cast_from_low(t, low)) is not None:
                    low_of[id(t)] = source
                else:
                    low_of[id(t)] = _cast(graph, t, low.np, low.onnx, f"{t.name}_{low.name}", ctx)
                    casts += 1
            ir.set_input(node, i, low_of[id(t)])
    main = plan.main
    for t, t_low in produced:
        for reader in {id(n): n for n in t.outputs}.values():
            if id(reader) in main and reader.op in DTYPE_AGNOSTIC_READERS and reader.inputs and reader.inputs[0] is t:
                ir.set_input(reader, 0, t_low)
        if t.outputs or id(t) in plan.pinned:
            # t keeps its name and float32: graph outputs and subgraph bodies read it by name.
            graph.nodes.append(gs.Node("Cast", name=ctx.fresh_name(f"{t.name}_Cast_fp32"), inputs=[t_low], outputs=[t],
                                       attrs={"to": onnx.TensorProto.FLOAT}))
            casts += 1
    return casts, constants


def _cast(graph: gs.Graph, t: gs.Tensor, np_dtype, onnx_dtype: int, base: str, ctx: PassContext) -> gs.Variable:
    out = gs.Variable(ctx.fresh_name(base), dtype=np_dtype, shape=t.shape)
    graph.nodes.append(gs.Node("Cast", name=ctx.fresh_name(f"{base}_Cast"), inputs=[t], outputs=[out], attrs={"to": onnx_dtype}))
    return out


@register_pass
class ConvertFloat16(_ConvertFloat):
    name = "convert-fp16"
    description = "float16 compute where the target is faster in it (Softmax, normalizations, reductions stay fp32; Casts at region boundaries only)"
    dtype = "fp16"


@register_pass
class ConvertBFloat16(_ConvertFloat):
    name = "convert-bf16"
    description = "bfloat16 compute where the target is faster in it and has the kernels (sensitive ops stay fp32; Casts at region boundaries only)"
    dtype = "bf16"
