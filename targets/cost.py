"""The roofline cost model: what a node, a rewrite or a whole model costs on a target, in seconds.

For one node, with F its FLOPs and B its bytes moved (graphopt.analysis.cost: weights and
activations in and out; a fused node's intermediates are not tensors, so they are not moved):

    time = max(F / (peak(dtype) x compute_efficiency), B / (bandwidth x memory_efficiency)) + overhead

peak and bandwidth are the target variant's figures (targets/data/*.toml); the three factors
belong to the node's op class (`op_class`: conv, matmul, normalization, ...) and are calibrated:
`graphopt calibrate-cost` (targets/calibrate.py) profiles models on this machine with
onnxruntime's profiler and fits them, so "compute_efficiency 0.31 for conv" is a measured share of
the peak, and overhead is the measured fixed cost of a kernel of that class (dispatch, thread-pool
hand-off, small-shape inefficiency). Op types with enough samples that still sit off their class
get a measured correction of their own (`op_scale`). A model's time is the sum over its nodes:
onnxruntime's CPU and CUDA providers run one kernel at a time.

Threads (CPU targets): compute scales with the threads a session uses (peak is per core x
threads); bandwidth scales too until it reaches the socket's figure. Factors are fitted at the
calibration's thread count. A GPU runs at its whole peak.

Which factors a target uses: the file `calibrate-cost` wrote for this target (`user_calibration_path`),
else the one shipped for its family (targets/data/cost/<family>.json, calibrated on the machine
named in it), else uncalibrated defaults (DEFAULT_FACTORS: round guesses, flagged as such in every
report). A target without hardware figures (generic) has no cost model: `for_target` returns None.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analysis.cost import SymbolicDims, computed_at_load, node_cost, op_key
from graphopt.errors import GraphoptError
from graphopt.ir import DEFAULT_DOMAINS, subgraphs_of
from graphopt.targets.hardware import DATA_DIR, RUNTIME_LEVELS

SHIPPED_CALIBRATION_DIR = DATA_DIR / "cost"
CALIBRATION_SCHEMA = 1

OP_CLASSES = ("conv", "conv-grouped", "matmul", "attention", "recurrent", "normalization", "softmax",
              "elementwise", "broadcast", "reduction", "pooling", "data", "view", "other")
# Classes whose compute efficiency depends on the GEMM they are: k (the reduction length) and n
# (output channels or columns) shorter than the kernel's register blocking waste its vector lanes.
GEMM_CLASSES = ("conv", "conv-grouped", "matmul")

_CLASS_OF_OP = {
    **dict.fromkeys(("Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "FusedConv", "NhwcFusedConv"), "conv"),
    **dict.fromkeys(("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "FusedGemm", "Einsum",
                     "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"), "matmul"),
    **dict.fromkeys(("Attention", "MultiHeadAttention", "GroupQueryAttention"), "attention"),
    **dict.fromkeys(("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"), "recurrent"),
    **dict.fromkeys(("BatchNormalization", "LayerNormalization", "SkipLayerNormalization", "RMSNormalization",
                     "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "InstanceNormalization",
                     "GroupNormalization", "LpNormalization", "MeanVarianceNormalization", "LRN"), "normalization"),
    **dict.fromkeys(("Softmax", "LogSoftmax"), "softmax"),
    **dict.fromkeys(("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum", "TopK",
                     "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"), "reduction"),
    **dict.fromkeys(("MaxPool", "AveragePool", "LpPool", "Resize", "Upsample"), "pooling"),
    **dict.fromkeys(("Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Scatter",
                     "ScatterElements", "ScatterND", "Expand", "Pad", "Tile", "Cast", "CastLike", "ConstantOfShape",
                     "Range", "NonZero", "OneHot", "Trilu", "Compress", "DepthToSpace", "SpaceToDepth", "Where"), "data"),
    # onnxruntime runs these without copying (the output aliases the input) or reads only metadata.
    **dict.fromkeys(("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout", "Shape", "Size"), "view"),
}
VIEW_CLASS = "view"
_ELEMENT_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
# What NVIDIA's sparse tensor cores (Ampere and later) execute: 2 nonzeros in every 4 weights
# along the reduction; a variant's "sparse_<dtype>" peak is their rate.
SPARSE_TENSOR_CORE_PATTERN = (2, 4)
_INTEGER_OPS = frozenset({"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                          "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM"})


def op_class(node: gs.Node) -> str:
    """The node's class for the cost model's factors; "other" for ops it has no class for."""
    cls = _CLASS_OF_OP.get(node.op)
    if cls is None:
        if node.domain in ("", *DEFAULT_DOMAINS, "com.microsoft") and (node.op in _ELEMENTWISE_LIKE or node.op.startswith(("Bias", "Quick", "Fast"))):
            return "broadcast" if _is_broadcast(node) else "elementwise"
        return "other"
    if cls == "conv" and int(node.attrs.get("group", 1) or 1) > 1:
        return "conv-grouped"
    return cls


def _numel(tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _is_broadcast(node: gs.Node) -> bool:
    """An elementwise node with an input broadcast along an inner axis (a per-channel scale [C, 1, 1]
    on NCHW): onnxruntime's kernels walk those one inner run at a time, much slower than same-shape
    inputs, scalars, or a bias along the last axis ([768] on [1, 128, 768]), which stream."""
    out = node.outputs[0].shape if node.outputs else None
    if out is None:
        return False
    for t in node.inputs:
        shape = None if t.is_empty() else t.shape
        if shape is None or _numel(t) in (None, 1) or tuple(shape) == tuple(out):
            continue
        dims = list(shape)
        while dims and dims[0] == 1:
            dims.pop(0)
        # Broadcast along an inner axis: a size-1 dim after a larger one ([C, 1, 1], [1, H, 1]).
        if any(d == 1 for d in dims):
            return True
    return False


def gemm_dims(node: gs.Node) -> tuple[int, int]:
    """(k, n) of the GEMM a Conv or MatMul-class node is: the reduction length and the output
    channels (per group) or columns; (0, 0) when the weight's shape is not known."""
    op = node.op

    def shape(i: int):
        t = node.inputs[i] if i < len(node.inputs) else None
        s = None if t is None or t.is_empty() else t.shape
        return tuple(s) if s is not None and all(isinstance(d, int) for d in s) else None

    if _CLASS_OF_OP.get(op) == "conv" and op != "ConvTranspose":
        w = shape(3 if op == "QLinearConv" else 1)
        if not w or len(w) < 3:
            return 0, 0
        group = int(node.attrs.get("group", 1) or 1)
        return int(np.prod(w[1:])), w[0] // group
    if op in ("Gemm", "FusedGemm"):
        b = shape(1)
        if not b or len(b) != 2:
            return 0, 0
        return (b[1], b[0]) if node.attrs.get("transB", 0) else (b[0], b[1])
    if _CLASS_OF_OP.get(op) == "matmul" and op != "Einsum":
        b = shape(3 if op == "QLinearMatMul" else 1)
        if not b or len(b) < 2:
            return 0, 0
        return (b[-1], b[-2]) if node.attrs.get("transB", 0) else (b[-2], b[-1])
    return 0, 0


_ELEMENTWISE_LIKE = frozenset("""
    Add Sub Mul Div Pow Mod PRelu Abs Neg Reciprocal Floor Ceil Round Sign Relu LeakyRelu Elu Selu Celu
    ThresholdedRelu HardSigmoid HardSwish Sigmoid Tanh Softplus Softsign Mish Gelu Swish Erf Exp Log Sqrt
    Sin Cos Tan Clip Shrink Not And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual IsNaN IsInf
    QuantizeLinear DequantizeLinear DynamicQuantizeLinear Sum Max Min Mean BitShift
""".split())


def compute_dtype(node: gs.Node) -> str:
    """The dtype whose peak bounds the node: int8 for integer kernels, else its first float input's."""
    if node.op in _INTEGER_OPS:
        return "int8"
    for t in node.inputs:
        if t.is_empty() or t.dtype is None:
            continue
        try:
            kind = np.dtype(t.dtype)
        except TypeError:
            continue
        if kind == np.float16:
            return "fp16"
        if kind.kind == "f":
            return "fp64" if kind == np.float64 else "fp32"
        if str(kind) == "bfloat16":
            return "bf16"
    return "fp32"


@dataclass(frozen=True)
class ClassFactors:
    compute_efficiency: float  # share of the dtype's peak a kernel of this class reaches (a large GEMM, for GEMM_CLASSES)
    memory_efficiency: float   # share of the memory bandwidth, at the calibration's thread count
    overhead_us: float         # fixed cost per kernel
    # GEMM_CLASSES: compute efficiency x k / (k + half_k) x n / (n + half_n), so short reductions
    # and few output channels run below the large-GEMM rate (0: no such dependence).
    half_k: float = 0.0
    half_n: float = 0.0

    def efficiency(self, k: int, n: int) -> float:
        e = self.compute_efficiency
        if self.half_k and k:
            e *= k / (k + self.half_k)
        if self.half_n and n:
            e *= n / (n + self.half_n)
        return e


def _factors(compute: float, memory: float, overhead: float, half_k: float = 0.0, half_n: float = 0.0) -> ClassFactors:
    return ClassFactors(compute, memory, overhead, half_k, half_n)


# Uncalibrated starting points (and the priors calibration shrinks towards): round figures, not
# measurements. A CPU kernel costs a few microseconds to dispatch; a GPU kernel launch about 5.
DEFAULT_FACTORS: dict[str, dict[str, ClassFactors]] = {
    "cpu": {
        "conv": _factors(0.5, 0.5, 5, 16, 8), "conv-grouped": _factors(0.1, 0.4, 5, 9, 0), "matmul": _factors(0.6, 0.5, 3, 16, 8),
        "attention": _factors(0.3, 0.4, 10), "recurrent": _factors(0.2, 0.3, 10),
        "normalization": _factors(0.2, 0.4, 3), "softmax": _factors(0.1, 0.4, 3),
        "elementwise": _factors(0.2, 0.5, 2), "broadcast": _factors(0.1, 0.25, 2), "reduction": _factors(0.2, 0.5, 2), "pooling": _factors(0.2, 0.5, 3),
        "data": _factors(1.0, 0.4, 2), "view": _factors(1.0, 1.0, 1), "other": _factors(0.2, 0.3, 5),
    },
    "gpu": {
        "conv": _factors(0.5, 0.6, 5, 32, 32), "conv-grouped": _factors(0.1, 0.5, 5, 9, 0), "matmul": _factors(0.7, 0.6, 5, 32, 32),
        "attention": _factors(0.4, 0.6, 8), "recurrent": _factors(0.1, 0.3, 20),
        "normalization": _factors(0.2, 0.7, 5), "softmax": _factors(0.1, 0.7, 5),
        "elementwise": _factors(0.2, 0.8, 5), "broadcast": _factors(0.2, 0.6, 5), "reduction": _factors(0.2, 0.7, 5), "pooling": _factors(0.2, 0.7, 5),
        "data": _factors(1.0, 0.7, 5), "view": _factors(1.0, 1.0, 1), "other": _factors(0.1, 0.5, 10),
    },
}


@dataclass(frozen=True)
class Calibration:
    """Fitted factors: what `calibrate-cost` writes (JSON) and a CostModel reads."""

    factors: Mapping[str, ClassFactors]
    op_scale: Mapping[str, float] = field(default_factory=dict)
    threads: int = 1
    # Where it came from: the machine and onnxruntime it was measured on, the file it was read from.
    description: str = ""
    path: str | None = None

    def to_dict(self) -> dict:
        return {
            "schema": CALIBRATION_SCHEMA,
            "description": self.description,
            "threads": self.threads,
            "classes": {c: {"compute_efficiency": f.compute_efficiency, "memory_efficiency": f.memory_efficiency,
                            "overhead_us": f.overhead_us, "half_k": f.half_k, "half_n": f.half_n} for c, f in self.factors.items()},
            "op_scale": dict(self.op_scale),
        }


def read_calibration(path: str | os.PathLike) -> Calibration:
    """A calibration file, checked: a one-line GraphoptError naming the file and the bad field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphoptError(f"cost calibration {path}: cannot read it: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != CALIBRATION_SCHEMA:
        raise GraphoptError(f"cost calibration {path}: schema must be {CALIBRATION_SCHEMA}")
    factors = {}
    for cls, entry in (data.get("classes") or {}).items():
        if cls not in OP_CLASSES:
            raise GraphoptError(f"cost calibration {path}: classes.{cls}: unknown op class (known: {', '.join(OP_CLASSES)})")
        try:
            values = [float(entry[k]) for k in ("compute_efficiency", "memory_efficiency", "overhead_us")]
        except (KeyError, TypeError, ValueError):
            raise GraphoptError(f"cost calibration {path}: classes.{cls}: needs numeric compute_efficiency, memory_efficiency, overhead_us") from None
        try:
            halves = [float(entry.get(k, 0.0)) for k in ("half_k", "half_n")]
        except (TypeError, ValueError):
            raise GraphoptError(f"cost calibration {path}: classes.{cls}: half_k and half_n must be numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in values) or not all(math.isfinite(v) and v >= 0 for v in halves):
            raise GraphoptError(f"cost calibration {path}: classes.{cls}: factors must be positive numbers")
        factors[cls] = ClassFactors(*values, *halves)
    op_scale = {str(k): float(v) for k, v in (data.get("op_scale") or {}).items()}
    return Calibration(factors, op_scale, int(data.get("threads", 1)), str(data.get("description", "")), str(path))


def user_calibration_path(target_name: str) -> Path:
    """Where `calibrate-cost` writes a target's calibration: $GRAPHOPT_CACHE_DIR or ~/.cache/graphopt."""
    root = os.environ.get("GRAPHOPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt"
    return Path(root) / "cost" / f"{target_name.replace(':', '-')}.json"


def find_calibration(target) -> Calibration | None:
    """The calibration a target uses: this machine's for the exact target, else its family's shipped one."""
    for path in (user_calibration_path(target.full_name), SHIPPED_CALIBRATION_DIR / f"{target.full_name.replace(':', '-')}.json",
                 SHIPPED_CALIBRATION_DIR / f"{target.name}.json"):
        if path.is_file():
            return _read_cached(str(path), path.stat().st_mtime_ns)
    return None


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int) -> Calibration:
    return read_calibration(path)


@dataclass(frozen=True)
class NodeEstimate:
    name: str
    op: str          # op_key: "Conv", "com.microsoft::SkipLayerNormalization"
    op_class: str
    dtype: str
    flops: int
    bytes: int
    compute_s: float
    memory_s: float
    overhead_s: float
    seconds: float
    # The same work at 100% of the peak and of the bandwidth, with nothing fixed: the roofline.
    roofline_s: float
    known: bool      # every shape the estimate needs was known
    gemm_k: int = 0  # for GEMM_CLASSES: the GEMM's reduction length and output columns (gemm_dims)
    gemm_n: int = 0
    fused_into: str = ""  # the node whose kernel the runtime fuses this one into (then it costs nothing)

    @property
    def bound(self) -> str:
        """What limits the node: "compute", "memory" or "overhead" (the fixed cost outweighs both);
        "fused" when the runtime runs it inside another node's kernel."""
        if self.fused_into:
            return "fused"
        if self.overhead_s >= max(self.compute_s, self.memory_s):
            return "overhead"
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved (0 when nothing is moved)."""
        return self.flops / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "op_class": self.op_class, "dtype": self.dtype, "flops": self.flops,
                "bytes": self.bytes, "seconds": self.seconds, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "overhead_s": self.overhead_s, "roofline_s": self.roofline_s, "bound": self.bound, "intensity": round(self.intensity, 3), "known": self.known,
                "fused_into": self.fused_into or None}


@dataclass(frozen=True)
class Verdict:
    """Whether a rewrite pays on the target: the predicted time of what it removes and of what it adds."""

    pays: bool
    before_s: float
    after_s: float
    reason: str


@dataclass
class GraphEstimate:
    nodes: list[NodeEstimate]
    target: str
    calibrated: str  # where the factors came from, in words

    @property
    def seconds(self) -> float:
        return sum(n.seconds for n in self.nodes)

    @property
    def roofline_seconds(self) -> float:
        """The model at its roofline: every node at 100% of the peak and the bandwidth, no overhead."""
        return sum(n.roofline_s for n in self.nodes)

    @property
    def known(self) -> bool:
        return all(n.known for n in self.nodes)

    def by_class(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for n in self.nodes:
            e = out.setdefault(n.op_class, {"nodes": 0, "flops": 0, "bytes": 0, "seconds": 0.0})
            e["nodes"] += 1
            e["flops"] += n.flops
            e["bytes"] += n.bytes
            e["seconds"] += n.seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))


class CostModel:
    """Predicted seconds per node on a target (a Target with hardware figures), per the module docstring."""

    def __init__(self, target, *, threads: int | None = None, calibration: Calibration | None | bool = True,
                 runtime_level: str = "all"):
        if target.hardware is None:
            raise GraphoptError(f"target {target.full_name} has no hardware figures, so no cost model")
        self.target = target
        self.hardware = target.hardware
        self.device = "gpu" if any(p.startswith(("CUDA", "Tensorrt", "ROCM")) for p in target.execution_providers) else "cpu"
        if calibration is True:
            calibration = find_calibration(target)
        self.calibration: Calibration | None = calibration or None
        cores = self.hardware.cores
        self.threads = cores if self.device == "gpu" else max(1, min(int(threads or cores), cores))
        self._calibration_threads = self.calibration.threads if self.calibration else cores
        # The onnxruntime graph optimization level the runtime runs at: its fusions up to this level
        # are priced as the kernels they become (runtime_fusions in the target file). "all" is what
        # the session options graphopt writes use; calibration profiles at "basic".
        self.runtime_level = runtime_level
        self._fusions = tuple(f for f in target.runtime_fusions
                              if RUNTIME_LEVELS.index(f.level) <= RUNTIME_LEVELS.index(runtime_level))

    @property
    def calibrated(self) -> str:
        """Where the factors come from, for reports."""
        if self.calibration is None:
            return "uncalibrated (default factors)"
        where = self.calibration.description or self.calibration.path or "a calibration file"
        return f"calibrated ({where})"

    def factors(self, cls: str) -> ClassFactors:
        if self.calibration is not None and cls in self.calibration.factors:
            return self.calibration.factors[cls]
        return DEFAULT_FACTORS[self.device].get(cls, DEFAULT_FACTORS[self.device]["other"])

    def peak(self, dtype: str) -> float:
        """FLOP/s of `dtype` at this model's threads (the variant's peak, per core x threads on a CPU)."""
        peak = self.hardware.peak(dtype) * 1e9
        return peak * self.threads / self.hardware.cores if self.device == "cpu" else peak

    def compute_rate(self, dtype: str, cls: str, k: int = 0, n: int = 0) -> float:
        """FLOP/s a kernel of `cls` reaches on `dtype` (a GEMM class: for a GEMM of that k and n)."""
        return self.peak(dtype) * self.factors(cls).efficiency(k, n)

    def bandwidth(self, cls: str) -> float:
        """Bytes/s a kernel of `cls` moves at this model's threads (the socket's figure at most)."""
        full = self.hardware.memory_bandwidth_gbs * 1e9
        share = self.factors(cls).memory_efficiency
        if self.device == "cpu":
            share *= self.threads / self._calibration_threads
        return full * min(1.0, share)

    def estimate(self, node: gs.Node, symbolic_dims: SymbolicDims = None, *, dtype: str | None = None) -> NodeEstimate:
        """`dtype` prices the node as if it computed in that dtype (a later --quantize's, say): its
        bytes moved scale by the ratio of the element sizes too."""
        cls = op_class(node)
        native = compute_dtype(node)
        dtype = dtype or native
        cost = node_cost(node, symbolic_dims)
        moved = 0 if cls == VIEW_CLASS else cost.bytes_read + cost.bytes_written
        if dtype != native and dtype in _ELEMENT_BYTES and native in _ELEMENT_BYTES:
            moved = moved * _ELEMENT_BYTES[dtype] // _ELEMENT_BYTES[native]
        k, n = gemm_dims(node) if cls in GEMM_CLASSES else (0, 0)
        compute_s, memory_s, overhead_s, seconds = self.times(op_key(node), cls, dtype, cost.flops, moved, k, n)
        roofline_s = max(cost.flops / self.peak(dtype), moved / (self.hardware.memory_bandwidth_gbs * 1e9))
        return NodeEstimate(node.name, op_key(node), cls, dtype, cost.flops, moved, compute_s, memory_s, overhead_s,
                            seconds, roofline_s, cost.known, k, n)

    def times(self, op: str, cls: str, dtype: str, flops: int, moved: int, k: int = 0, n: int = 0) -> tuple[float, float, float, float]:
        """(compute, memory, fixed, total) seconds of a kernel with these figures under this model's factors."""
        compute_s = flops / self.compute_rate(dtype, cls, k, n) if flops else 0.0
        memory_s = moved / self.bandwidth(cls) if moved else 0.0
        overhead_s = self.factors(cls).overhead_us * 1e-6
        scale = self.calibration.op_scale.get(op, 1.0) if self.calibration else 1.0
        return compute_s, memory_s, overhead_s, (max(compute_s, memory_s) + overhead_s) * scale

    def seconds(self, nodes: Iterable[gs.Node], symbolic_dims: SymbolicDims = None) -> tuple[float, bool]:
        """The predicted time of these nodes and whether every estimate was known."""
        total, known = 0.0, True
        for node in nodes:
            e = self.estimate(node, symbolic_dims)
            total += e.seconds
            known &= e.known
        return total, known

    def compare(self, before: Sequence[gs.Node], after: Sequence[gs.Node], symbolic_dims: SymbolicDims = None) -> Verdict:
        """Whether replacing `before` by `after` pays: strictly less predicted time. Unknown shapes: it pays
        (no evidence against the rewrite), and the reason says so."""
        old, old_known = self.seconds(before, symbolic_dims)
        new, new_known = self.seconds(after, symbolic_dims)
        where = f"{self.target.full_name}, {self.calibrated}"
        fusion = self.runtime_fusion(before)
        if fusion is not None:
            # The runtime makes the same one kernel of these nodes by itself: nothing to gain.
            return Verdict(False, new, new, f"{self.target.full_name}'s runtime fuses {'+'.join(fusion.ops)} itself: {fusion.by}")
        if not (old_known and new_known):
            return Verdict(True, old, new, f"shapes not known, kept ({where})")
        if new < old:
            return Verdict(True, old, new, f"predicted {_us(old)} -> {_us(new)} ({where})")
        return Verdict(False, old, new, f"predicted {_us(old)} -> {_us(new)}: no faster ({where})")

    def sparse_compare(self, node: gs.Node, pattern: tuple[int, int], symbolic_dims: SymbolicDims = None, *,
                       dtype: str | None = None) -> Verdict:
        """Whether `node` with N:M sparse weights (`pattern`, N kept in every M along the reduction)
        runs faster than dense: only where the variant has a "sparse_<dtype>" peak (sparse tensor
        cores) and the pattern is the one they execute; the compute term runs at that peak, the
        memory term is left as dense (conservative: the compressed weights and their index
        metadata move a little over N/M of the bytes, activations as many as before)."""
        dense = self.estimate(node, symbolic_dims, dtype=dtype)
        sparse_dtype = f"sparse_{dense.dtype}"
        shown = f"{pattern[0]}:{pattern[1]}"
        if sparse_dtype not in self.hardware.peak_gflops:
            why = ("no sparse tensor cores" if not any(k.startswith("sparse_") for k in self.hardware.peak_gflops)
                   else f"sparse tensor cores, but not for {dense.dtype} (quantize to "
                        f"{' or '.join(k[len('sparse_'):] for k in self.hardware.peak_gflops if k.startswith('sparse_'))})")
            return Verdict(False, dense.seconds, dense.seconds, f"{self.target.full_name} has {why}: no speedup expected from {shown} weights")
        if tuple(pattern) != SPARSE_TENSOR_CORE_PATTERN:
            return Verdict(False, dense.seconds, dense.seconds,
                           f"sparse tensor cores execute 2:4, not {shown}: no speedup expected on {self.target.full_name}")
        if not dense.known:
            return Verdict(False, dense.seconds, dense.seconds, "shapes not known, so no speedup can be predicted (bind symbolic dims with --dim NAME=SIZE)")
        compute_s, memory_s, overhead_s, seconds = self.times(dense.op, dense.op_class, sparse_dtype, dense.flops, dense.bytes, dense.gemm_k, dense.gemm_n)
        where = f"{self.target.full_name}, {sparse_dtype} at {self.hardware.peak(sparse_dtype) / 1000:g} TFLOP/s"
        if seconds < dense.seconds:
            return Verdict(True, dense.seconds, seconds, f"predicted {_us(dense.seconds)} -> {_us(seconds)} ({where})")
        bound = "memory-bound" if dense.memory_s >= dense.compute_s else "bound by its fixed cost"
        return Verdict(False, dense.seconds, seconds, f"{bound}: predicted {_us(dense.seconds)} either way ({where})")

    def runtime_fusion(self, nodes: Sequence[gs.Node]):
        """The target's runtime fusion (targets/data/*.toml, runtime_fusions) these nodes are, if any."""
        ops = sorted(n.op for n in nodes)
        return next((f for f in self._fusions if sorted(f.ops) == ops), None)

    def estimate_graph(self, graph: gs.Graph, symbolic_dims: SymbolicDims = None) -> GraphEstimate:
        """Every node's estimate (subgraphs included: an If's costlier branch, one Loop/Scan iteration);
        nodes computed from constants alone cost nothing (a runtime computes them once, at load)."""
        nodes: list[NodeEstimate] = []
        self._collect(graph, symbolic_dims, nodes)
        return GraphEstimate(nodes, self.target.full_name, self.calibrated)

    def _absorbed(self, graph: gs.Graph) -> dict[int, str]:
        """Nodes the runtime fuses into an earlier one (id -> the head's name): the later ops of a
        runtime fusion, each the single reader of the previous one's only output."""
        absorbed: dict[int, str] = {}
        outputs = {id(t) for t in graph.outputs}
        for fusion in self._fusions:
            for head in graph.nodes:
                if head.op != fusion.ops[0] or id(head) in absorbed:
                    continue
                chain, cur = [], head
                for op in fusion.ops[1:]:
                    if len(cur.outputs) != 1 or id(cur.outputs[0]) in outputs or len(cur.outputs[0].outputs) != 1:
                        break
                    nxt = cur.outputs[0].outputs[0]
                    if nxt.op != op or id(nxt) in absorbed:
                        break
                    chain.append(nxt)
                    cur = nxt
                else:
                    absorbed.update((id(n), head.name) for n in chain)
        return absorbed

    def _collect(self, graph: gs.Graph, symbolic_dims: SymbolicDims, out: list[NodeEstimate]) -> None:
        at_load: set[int] = set()
        absorbed = self._absorbed(graph) if self._fusions else {}
        for node in graph.nodes:
            if computed_at_load(node, at_load, symbolic_dims):
                at_load.update(id(t) for t in node.outputs)
                continue
            if id(node) in absorbed:
                # Its work runs inside the head's kernel, its input arrives in cache: no time of its own.
                e = self.estimate(node, symbolic_dims)
                out.append(replace(e, compute_s=0.0, memory_s=0.0, overhead_s=0.0, seconds=0.0, roofline_s=0.0,
                                   fused_into=absorbed[id(node)]))
                continue
            out.append(self.estimate(node, symbolic_dims))
            subs = subgraphs_of(node)
            if node.op == "If" and subs:
                branches = []
                for sub in subs:
                    inner: list[NodeEstimate] = []
                    self._collect(sub, symbolic_dims, inner)
                    branches.append(inner)
                out.extend(max(branches, key=lambda b: sum(n.seconds for n in b)))
            else:
                for sub in subs:
                    self._collect(sub, symbolic_dims, out)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def for_target(target, threads: int | None = None) -> CostModel | None:
    """The cost model of a target, or None for a target without hardware figures (generic)."""
    if target is None or target.hardware is None:
        return None
    return CostModel(target, threads=threads)
