"""Calibrating the cost model on this machine: profile models in onnxruntime, fit the factors per op class.

`graphopt calibrate-cost` and benchmarks/cost_model.py (the validation on models the calibration
did not see) are built on these functions:

* `prepare`: a model as the cost model will see it: graphopt's output for the target (default -O3),
  its symbolic dims bound to the shapes of the generated inputs, every node named uniquely (the
  profiler reports kernels by node name), shapes inferred.
* `profile` / `profile_many`: onnxruntime's profiler at ORT_ENABLE_BASIC (the graph as graphopt
  wrote it: basic folds, removes and fuses a MatMul with its bias Add, nothing graphopt would
  not, so kernels keep graphopt's node names), `runs` rounds after warm-up, the models interleaved
  in a random order each round; each node's median kernel time, and the model's median wall time
  measured without the profiler.
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
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort

from graphopt import loading
from graphopt.targets.cost import (
    CALIBRATION_SCHEMA,
    DEFAULT_FACTORS,
    GEMM_CLASSES,
    Calibration,
    ClassFactors,
    CostModel,
    GraphEstimate,
    NodeEstimate,
)

# The models `graphopt calibrate-cost` profiles by default: convolutional, depthwise and BERT-shaped
# graphs, and a graph of single kernels at shapes the networks lack (models/kernels.py).
# zoo:resnet50 and zoo:bert_base stay out, so that they (and the real models) validate it.
DEFAULT_MODELS = ("zoo:resnet18", "zoo:mobilenetv2", "zoo:bert_tiny", "zoo:digits_cnn", "bert_small", "kernels")

# The onnxruntime level profiles are taken at (see `profile`), for CostModel(runtime_level=...).
PROFILED_LEVEL = "basic"

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
    """A model of the calibration set: zoo:NAME, a file, "bert_small" (models/bert.py) or "kernels"
    (models/kernels.py), the last two not in the zoo."""
    if name == "bert_small":
        from graphopt.models.bert import bert_small

        return bert_small()
    if name == "kernels":
        from graphopt.models.kernels import calibration_kernels

        return calibration_kernels()
    from graphopt.optimize import resolve_source

    return resolve_source(name)[0]


def prepare(name: str, proto: onnx.ModelProto, target: str = "x86_64", opt_level: int = 3,
            feeds: dict[str, np.ndarray] | None = None, specialize: bool = True) -> Prepared:
    """graphopt's output for `target`, specialized to its inputs' shapes (unless not `specialize`:
    then nodes whose shapes stay symbolic count only their fixed cost), nodes named uniquely."""
    from graphopt import export, verify
    from graphopt.accuracy import name_nodes_uniquely
    from graphopt.optimize import optimize_model
    from graphopt.specialize import specialize_proto

    if feeds is None:
        feeds = verify.find_inputs(proto).inputs
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    initializers = {t.name for t in work.graph.initializer}
    if specialize:
        specialize_proto(work, {k: list(v.shape) for k, v in feeds.items() if k not in initializers})
    optimized, _ = optimize_model(work, target=target, opt_level=opt_level)
    out = export.to_proto(optimized)
    name_nodes_uniquely(out.graph.node)
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
    return profile_many([prepared], threads, runs, warmup)[0]


def profile_many(models: Sequence[Prepared], threads: int = 1, runs: int = 20, warmup: int = 3, seed: int = 0) -> list[Profile]:
    """`profile` for several models at once, interleaved: each of `runs` rounds runs every model
    once under the profiler and once timed, in a fresh random order, so a slow spell of this
    (noisy, shared) machine lands on every model a little instead of on one model entirely."""
    import random

    order = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
        sessions = []
        for i, p in enumerate(models):
            folder = os.path.join(tmp, str(i))
            os.mkdir(folder)
            plain, profiled = _session(p.proto, threads, None), _session(p.proto, threads, folder)
            for _ in range(warmup):
                plain.run(None, p.feeds)
                profiled.run(None, p.feeds)
            sessions.append((p, plain, profiled))
        walls: list[list[float]] = [[] for _ in models]
        for _ in range(runs):
            for i in order.sample(range(len(models)), len(models)):
                p, plain, profiled = sessions[i]
                profiled.run(None, p.feeds)
                t0 = time.perf_counter()
                plain.run(None, p.feeds)
                walls[i].append(time.perf_counter() - t0)
        results = []
        for (p, _, profiled), wall in zip(sessions, walls):
            with open(profiled.end_profiling()) as f:
                events = json.load(f)
            results.append(_node_times(p, events, warmup, statistics.median(wall)))
    return results


def _node_times(prepared: Prepared, events: list, warmup: int, wall: float) -> Profile:
    names = {n.name for n in prepared.proto.graph.node}
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
    return Profile(node_seconds, wall, unattributed)


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
    # Streaming ops measure the bandwidth this machine gives one kernel at these threads; classes
    # whose samples are all compute-bound (a calibration's convolutions) say nothing about theirs,
    # so that measurement, not a default, is their prior. Hence elementwise is fitted first.
    streaming = None
    for cls, rows in sorted(by_class.items(), key=lambda kv: kv[0] != "elementwise"):
        prior = defaults.get(cls, defaults["other"])
        if streaming is not None:
            prior = replace(prior, memory_efficiency=streaming)
        flops = np.array([r.estimate.flops for r in rows], float)
        moved = np.array([r.estimate.bytes for r in rows], float)
        peak = np.array([model.peak(r.estimate.dtype) for r in rows], float)
        k = np.array([r.estimate.gemm_k for r in rows], float)
        n = np.array([r.estimate.gemm_n for r in rows], float)
        measured = np.log(np.array([max(r.measured, 1e-8) for r in rows], float))
        shaped = cls in GEMM_CLASSES and bool(k.any())
        start = [prior.compute_efficiency, prior.memory_efficiency, prior.overhead_us * 1e-6]
        # Efficiencies between 0.01% and 100% of peak (bandwidth: up to 4x DRAM, for data that
        # stays in cache), fixed cost between 10 ns and 10 ms, half-saturation k and n between 0.1 and 10^5.
        lower, upper = [1e-4, 1e-4, 1e-8], [1.0, 4.0, 1e-2]
        if shaped:
            start += [prior.half_k or 16.0, prior.half_n or 8.0]
            lower += [0.1, 0.1]
            upper += [1e5, 1e5]
        x0, lower, upper = np.log(start), np.log(lower), np.log(upper)

        def residuals(x, flops=flops, moved=moved, peak=peak, k=k, n=n, measured=measured, x0=x0, shaped=shaped):
            e, m, o = np.exp(x[:3])
            if shaped:
                half_k, half_n = np.exp(x[3:])
                # A node whose GEMM is unknown (k = 0) runs at the large-GEMM rate, as in ClassFactors.efficiency.
                e = e * np.where(k > 0, k / (k + half_k), 1.0) * np.where(n > 0, n / (n + half_n), 1.0)
            predicted = np.maximum(flops / (peak * e), moved / (bandwidth * m)) + o
            return np.concatenate([np.log(predicted) - measured, PRIOR_WEIGHT * (x - x0)])

        x = np.exp(least_squares(residuals, np.clip(x0, lower + 1e-9, upper - 1e-9), bounds=(lower, upper)).x)
        halves = (round(float(x[3]), 2), round(float(x[4]), 2)) if shaped else (0.0, 0.0)
        factors[cls] = ClassFactors(round(float(x[0]), 5), round(float(x[1]), 5), round(float(x[2]) * 1e6, 3), *halves)
        if cls == "elementwise":
            streaming = factors[cls].memory_efficiency
    factors = dict(sorted(factors.items()))
    fitted = Calibration(factors, {}, model.threads, description)
    refit = CostModel(model.target, threads=model.threads, calibration=fitted, runtime_level=model.runtime_level)
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
    return model.times(e.op, e.op_class, e.dtype, e.flops, e.bytes, e.gemm_k, e.gemm_n)[3]


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

    base = CostModel(target, threads=threads, calibration=False, runtime_level=PROFILED_LEVEL)
    prepared, all_samples = [], []
    for name in model_names:
        if on_model:
            on_model(name, "optimizing")
        prepared.append(prepare(name, load_calibration_model(name), target.full_name, opt_level))
    if on_model:
        on_model(", ".join(model_names), f"profiling {runs} interleaved rounds of")
    profiles = profile_many(prepared, threads=threads, runs=runs)
    for p, prof in zip(prepared, profiles):
        all_samples += samples(p, estimate(p, base), prof)
    description = (f"{cpu_model_name()}, {threads} thread{'s' if threads != 1 else ''}, onnxruntime {ort.__version__}, "
                   f"{datetime.date.today().isoformat()}, {len(all_samples)} kernels of {', '.join(model_names)}")
    calibration = fit(all_samples, base, description)
    fitted = CostModel(target, threads=threads, calibration=calibration, runtime_level=PROFILED_LEVEL)
    fits = [validate(p, estimate(p, fitted), prof) for p, prof in zip(prepared, profiles)]
    return CalibrationRun(calibration, fits, len(all_samples))
