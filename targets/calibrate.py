"""Calibrating the cost model on this machine: profile models in onnxruntime, fit the factors per op class.

`graphopt calibrate-cost` and benchmarks/cost_model.py (the validation on models the calibration
did not see) are built on these functions:

* `prepare`: a model as the cost model will see it: graphopt's output for the target (default -O3),
  its symbolic dims bound to the shapes of the generated inputs, every node named uniquely (the
  profiler reports kernels by node name), shapes inferred.
* `profile`: onnxruntime's profiler at ORT_ENABLE_BASIC (the graph as graphopt wrote it: basic
  folds and removes, but fuses nothing graphopt has not already fused, so kernels keep graphopt's
  node names), `runs` runs after warm-up, each node's median kernel time, and the model's median
  wall time measured without the profiler.
* `fit`: per op class, the three factors by least squares on log time (relative error, so a 5 us
  Reshape counts as much as a 5 ms Conv), shrunk towards DEFAULT_FACTORS where a class has few
  nodes; then a correction per op type that sits off its class (at least MIN_OP_SAMPLES nodes, more
  than 15% off).
* `validate`: Spearman rank correlation of predicted vs measured per node and end-to-end error.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from graphopt import loading
from graphopt.targets.cost import (
    DEFAULT_FACTORS,
    CALIBRATION_SCHEMA,
    Calibration,
    ClassFactors,
    CostModel,
    GraphEstimate,
    NodeEstimate,
)

# The models `graphopt calibrate-cost` profiles by default: convolutional, depthwise and BERT-shaped
# graphs. zoo:resnet50 and zoo:bert_base stay out, so that they (and the real models) validate it.
DEFAULT_MODELS = ("zoo:resnet18", "zoo:mobilenetv2", "zoo:bert_tiny", "zoo:digits_cnn", "bert_small")

MIN_OP_SAMPLES = 3
# How far the fit may move a factor from its prior before the data must say so strongly: the
# weight of the prior, in log units, against one node's log-time residual.
PRIOR_WEIGHT = 0.15


@dataclass
class Prepared:
    name: str
    proto: onnx.ModelProto
    feeds: dict[str, np.ndarray]


@dataclass
class Profile:
    node_seconds: dict[str, float]  # median kernel time per node name
    wall_seconds: float             # median run time, without the profiler
    unattributed_seconds: float     # kernels (per run) whose name is no node of the model


def load_calibration_model(name: str) -> onnx.ModelProto:
    """A model of the calibration set: zoo:NAME, a file, or "bert_small" (models/bert.py, not in the zoo)."""
    if name == "bert_small":
        from graphopt.models.bert import bert_small

        return bert_small()
    from graphopt.optimize import resolve_source

    return resolve_source(name)[0]


def prepare(name: str, proto: onnx.ModelProto, target: str = "x86_64", opt_level: int = 3,
            feeds: dict[str, np.ndarray] | None = None) -> Prepared:
    """graphopt's output for `target`, specialized to its inputs' shapes, nodes named uniquely."""
    from graphopt import export, verify
    from graphopt.optimize import optimize_model
    from graphopt.specialize import specialize_proto

    if feeds is None:
        feeds = verify.find_inputs(proto).inputs
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    initializers = {t.name for t in work.graph.initializer}
    specialize_proto(work, {k: list(v.shape) for k, v in feeds.items() if k not in initializers})
    optimized, _ = optimize_model(work, target=target, opt_level=opt_level)
    out = export.to_proto(optimized)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)
    return Prepared(name, out, feeds)


def estimate(prepared: Prepared, model: CostModel) -> GraphEstimate:
    from graphopt.analysis.shapes import infer_shapes, resolve_shapes

    m = loading.from_proto(prepared.proto)
    infer_shapes(m)
    resolve_shapes(m)
    return model.estimate_graph(m.graph)


def _session(proto: onnx.ModelProto, threads: int, profile_dir: str | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "profile")
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def profile(prepared: Prepared, threads: int = 1, runs: int = 20, warmup: int = 3) -> Profile:
    """Per-node median kernel times and the median wall time, in onnxruntime on this machine."""
    names = {n.name for n in prepared.proto.graph.node}
    plain = _session(prepared.proto, threads, None)
    for _ in range(warmup):
        plain.run(None, prepared.feeds)
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        plain.run(None, prepared.feeds)
        walls.append(time.perf_counter() - t0)
    del plain
    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
        sess = _session(prepared.proto, threads, tmp)
        for _ in range(warmup + runs):
            sess.run(None, prepared.feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] * 1e-6)
    node_seconds, unattributed = {}, 0.0
    for name, durations in per_node.items():
        kept = durations[warmup:] if len(durations) > warmup else durations
        owner = _owner(name, names)
        if owner is None:
            unattributed += statistics.median(kept)
        else:
            node_seconds[owner] = node_seconds.get(owner, 0.0) + statistics.median(kept)
    return Profile(node_seconds, statistics.median(walls), unattributed)


def _owner(kernel: str, names: set[str]) -> str | None:
    """The node a kernel runs: its own name, or for a node onnxruntime fused at load (MatMul + Add
    -> Gemm is a basic-level fusion) the node its name extends ("<name>/MatMulAddFusion")."""
    while kernel:
        if kernel in names:
            return kernel
        if "/" not in kernel:
            return None
        kernel = kernel.rsplit("/", 1)[0]
    return None


@dataclass
class Sample:
    model: str
    estimate: NodeEstimate
    measured: float


def samples(prepared: Prepared, est: GraphEstimate, prof: Profile) -> list[Sample]:
    return [Sample(prepared.name, n, prof.node_seconds[n.name]) for n in est.nodes if n.name in prof.node_seconds and n.known]


def fit(all_samples: Sequence[Sample], model: CostModel, description: str = "") -> Calibration:
    """Factors per op class (and per-op corrections) fitted to measured kernel times."""
    from scipy.optimize import least_squares

    defaults = DEFAULT_FACTORS[model.device]
    by_class: dict[str, list[Sample]] = {}
    for s in all_samples:
        by_class.setdefault(s.estimate.op_class, []).append(s)
    bandwidth = model.hardware.memory_bandwidth_gbs * 1e9
    factors: dict[str, ClassFactors] = {}
    for cls, rows in sorted(by_class.items()):
        prior = defaults.get(cls, defaults["other"])
        flops = np.array([r.estimate.flops for r in rows], float)
        moved = np.array([r.estimate.bytes for r in rows], float)
        peak = np.array([model.peak(r.estimate.dtype) for r in rows], float)
        measured = np.log(np.array([max(r.measured, 1e-8) for r in rows], float))
        x0 = np.log([prior.compute_efficiency, prior.memory_efficiency, prior.overhead_us * 1e-6])

        def residuals(x, flops=flops, moved=moved, peak=peak, measured=measured, x0=x0):
            e, m, o = np.exp(x)
            predicted = np.maximum(flops / (peak * e), moved / (bandwidth * m)) + o
            return np.concatenate([np.log(predicted) - measured, PRIOR_WEIGHT * (x - x0)])

        # Efficiencies between 0.01% and 100% of peak (bandwidth: up to 4x DRAM, for data that
        # stays in cache), fixed cost between 10 ns and 10 ms.
        lower = np.log([1e-4, 1e-4, 1e-8])
        upper = np.log([1.0, 4.0, 1e-2])
        x = least_squares(residuals, np.clip(x0, lower + 1e-9, upper - 1e-9), bounds=(lower, upper)).x
        e, m, o = np.exp(x)
        factors[cls] = ClassFactors(round(float(e), 5), round(float(m), 5), round(float(o) * 1e6, 3))
    fitted = Calibration(factors, {}, model.threads, description)
    refit = CostModel(model.target, threads=model.threads, calibration=fitted)
    by_op: dict[str, list[float]] = {}
    for s in all_samples:
        predicted = _repredict(refit, s.estimate)
        by_op.setdefault(s.estimate.op, []).append(math.log(max(s.measured, 1e-8) / predicted))
    op_scale = {}
    for op, logs in sorted(by_op.items()):
        if len(logs) >= MIN_OP_SAMPLES:
            ratio = math.exp(statistics.median(logs))
            if abs(math.log(ratio)) > math.log(1.15):
                op_scale[op] = round(ratio, 4)
    return Calibration(factors, op_scale, model.threads, description)


def _repredict(model: CostModel, e: NodeEstimate) -> float:
    """`e`'s time under `model`'s factors (the estimate's flops, bytes, class and dtype as they were)."""
    f = model.factors(e.op_class)
    compute = e.flops / model.compute_rate(e.dtype, e.op_class) if e.flops else 0.0
    memory = e.bytes / model.bandwidth(e.op_class) if e.bytes else 0.0
    scale = model.calibration.op_scale.get(e.op, 1.0) if model.calibration else 1.0
    return (max(compute, memory) + f.overhead_us * 1e-6) * scale


def write(calibration: Calibration, path: str | os.PathLike, extra: dict | None = None) -> None:
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = calibration.to_dict() | (extra or {})
    assert data["schema"] == CALIBRATION_SCHEMA
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class Validation:
    model: str
    nodes: int
    spearman: float
    predicted_s: float
    measured_wall_s: float
    measured_kernels_s: float

    @property
    def e2e_error(self) -> float:
        """(predicted - measured) / measured, end to end."""
        return (self.predicted_s - self.measured_wall_s) / self.measured_wall_s


def validate(prepared: Prepared, est: GraphEstimate, prof: Profile) -> Validation:
    from scipy.stats import spearmanr

    rows = [(n.seconds, prof.node_seconds[n.name]) for n in est.nodes if n.name in prof.node_seconds]
    rho = float(spearmanr([r[0] for r in rows], [r[1] for r in rows]).statistic) if len(rows) > 2 else float("nan")
    return Validation(prepared.name, len(rows), rho, est.seconds, prof.wall_seconds, sum(prof.node_seconds.values()))


def cpu_model_name() -> str:
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass
class CalibrationRun:
    calibration: Calibration
    fits: list[Validation]  # how well the fitted factors reproduce the calibration models themselves
    samples: int


def calibrate(model_names: Sequence[str], target, *, threads: int = 1, runs: int = 20, opt_level: int = 3,
              on_model=None) -> CalibrationRun:
    """Profile `model_names` (see load_calibration_model) on this machine and fit `target`'s factors.

    `on_model(name, step)` hears of progress ("optimizing", "profiling").
    """
    import datetime

    base = CostModel(target, threads=threads, calibration=False)
    prepared, profiles, all_samples = [], [], []
    for name in model_names:
        if on_model:
            on_model(name, "optimizing")
        p = prepare(name, load_calibration_model(name), target.full_name, opt_level)
        if on_model:
            on_model(name, "profiling")
        prof = profile(p, threads=threads, runs=runs)
        prepared.append(p)
        profiles.append(prof)
        all_samples += samples(p, estimate(p, base), prof)
    description = (f"{cpu_model_name()}, {threads} thread{'s' if threads != 1 else ''}, onnxruntime {ort.__version__}, "
                   f"{datetime.date.today().isoformat()}, {len(all_samples)} kernels of {', '.join(model_names)}")
    calibration = fit(all_samples, base, description)
    fitted = CostModel(target, threads=threads, calibration=calibration)
    fits = [validate(p, estimate(p, fitted), prof) for p, prof in zip(prepared, profiles)]
    return CalibrationRun(calibration, fits, len(all_samples))
