"""Accuracy budgets for lossy passes, per-layer sensitivity, and the search that meets a budget by
keeping the fewest, most sensitive layers in float.

A budget (`--accuracy-budget`) is one of
* `cos=0.993`: the least cosine similarity of any output to the original's, on any sample;
* `rel=0.05`: the largest relative error ||y - y0|| / ||y0|| of any output on any sample;
* `top1=0.01`: the largest share of argmax positions (the first output's last axis) that differ;
* for the API, `Budget.custom(metric, minimum)`: `metric(reference, outputs)` over the evaluation
  samples' output dicts, met when it is at least `minimum` (a task accuracy, for instance).

The search (`search`), for a quantization pass whose `layer_ops` it may keep float one node at a
time (through `options["quantize_exclude"]`):
1. quantize everything and measure; if the budget holds, done;
2. sensitivity: quantize one layer at a time, measure each (the model's output error, and its SQNR);
3. keep the k most sensitive layers float for k = 1, 2, 4, 8, ... and bisect between the last k
   that misses and the first that meets.
The evaluations of steps 2 and 3 are independent and go through graphopt.executor, serially or
on Ray. Steps run in the same order either way, so both decide the same layers.

Layers are ranked alone rather than by leaving each out of a full quantization: alone, a layer's
error is its own, not masked by the others' (and the ranking is what onnxruntime's and NNCF's
debugging tools report too). Measured on held-out calibration batches when there are at least
`MIN_BATCHES_TO_HOLD_OUT`, otherwise on the calibration batches themselves (the report says which).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from graphopt.errors import GraphoptError

BUDGET_KINDS = {
    "cos": "least cosine similarity of an output to the original's",
    "rel": "largest relative error of an output",
    "top1": "largest share of top-1 (argmax) positions that differ",
}
HELD_OUT_BATCHES = 8
MIN_BATCHES_TO_HOLD_OUT = 16
RANDOM_EVALUATION_SAMPLES = 8


@dataclass(frozen=True)
class Measures:
    """How far a candidate's outputs moved from the original's, over the evaluation samples."""

    min_cosine: float
    max_relative_error: float
    top1_disagreement: float
    sqnr_db: float  # all float outputs pooled: 10 log10(sum y0^2 / sum (y - y0)^2)
    metric: float | None = None  # a custom budget's value

    def to_dict(self) -> dict:
        return {k: (None if v is None else _finite(v)) for k, v in asdict(self).items()}


def _finite(v: float) -> float | str:
    return round(v, 6) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


@dataclass(frozen=True)
class Budget:
    kind: str  # a key of BUDGET_KINDS, or "metric"
    value: float
    metric: Callable[[list[dict], list[dict]], float] | None = None
    metric_name: str = "metric"

    @classmethod
    def parse(cls, text: str) -> Budget:
        key, _, raw = text.partition("=")
        key = key.strip().lower()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        ranges = {"cos": (0.0, 1.0), "rel": (0.0, math.inf), "top1": (0.0, 1.0)}
        if key not in ranges or not (ranges[key][0] < value <= ranges[key][1] or (key == "top1" and value == 0)):
            forms = ", ".join(f"{k}=VALUE ({what})" for k, what in BUDGET_KINDS.items())
            raise GraphoptError(f"--accuracy-budget must be one of {forms}, not {text!r}")
        return cls(key, value)

    @classmethod
    def custom(cls, metric: Callable[[list[dict], list[dict]], float], minimum: float, name: str | None = None) -> Budget:
        """A budget on the caller's own metric: `metric(reference_outputs, outputs)` (lists of
        {output name: array}, one per evaluation batch) must be at least `minimum`."""
        return cls("metric", float(minimum), metric, name or getattr(metric, "__name__", "metric"))

    def __str__(self) -> str:
        return f"{self.metric_name}>={self.value:.10g}" if self.kind == "metric" else f"{self.kind}={self.value:.10g}"

    def meets(self, m: Measures) -> bool:
        if self.kind == "cos":
            return m.min_cosine >= self.value
        if self.kind == "rel":
            return m.max_relative_error <= self.value
        if self.kind == "top1":
            return m.top1_disagreement <= self.value
        return m.metric is not None and m.metric >= self.value

    def error(self, m: Measures) -> float:
        """How far from the original, larger is worse: what ranks the layers by sensitivity."""
        if self.kind == "rel":
            return m.max_relative_error
        if self.kind == "top1":
            # Argmax flips are coarse: many layers flip none, and the cosine still orders them.
            return m.top1_disagreement + (1.0 - m.min_cosine) * 1e-3
        if self.kind == "metric" and m.metric is not None:
            return -m.metric
        return 1.0 - m.min_cosine

    def measure(self, reference: list[dict], outputs: list[dict]) -> Measures:
        return measures(reference, outputs, self.metric)

    def value_of(self, m: Measures) -> float | None:
        return {"cos": m.min_cosine, "rel": m.max_relative_error, "top1": m.top1_disagreement}.get(self.kind, m.metric)

    def require(self, reference: list[dict], outputs: list[dict], consequence: str = "") -> Measures:
        """The measures, or a VerificationError saying by how much the outputs miss the budget."""
        from graphopt.errors import VerificationError

        m = self.measure(reference, outputs)
        if not self.meets(m):
            value = self.value_of(m)
            shown = "none" if value is None else f"{value:.5g}"
            raise VerificationError(f"lossy model moved too far: {BUDGET_KINDS.get(self.kind, self.metric_name)} is {shown}, "
                                    f"outside the budget {self}{consequence}")
        return m


def measures(reference: list[dict], outputs: list[dict], metric: Callable | None = None) -> Measures:
    """Measures of `outputs` against `reference` (lists of {output name: array}, one per batch)."""
    min_cos, max_rel = 1.0, 0.0
    signal = noise = 0.0
    flips = positions = 0
    for ref, out in zip(reference, outputs):
        first = True
        for name, y0 in ref.items():
            y0 = np.asarray(y0)
            y = np.asarray(out[name])
            if y0.dtype.kind != "f":
                differ = float(np.any(y0 != y))
                min_cos, max_rel = min(min_cos, 1.0 - differ), max(max_rel, differ)
                continue
            a, b = y0.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            if not np.all(np.isfinite(b)):
                min_cos, max_rel = -1.0, math.inf
                continue
            na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
            diff = float(np.linalg.norm(a - b))
            cos = 1.0 if na == nb == 0 else (float(a @ b) / (na * nb) if na and nb else 0.0)
            min_cos = min(min_cos, cos)
            max_rel = max(max_rel, diff / na if na else (0.0 if diff == 0 else math.inf))
            signal += na * na
            noise += diff * diff
            if first and y0.ndim >= 1 and y0.shape[-1] > 1:
                flips += int(np.sum(np.argmax(y0, axis=-1) != np.argmax(y, axis=-1)))
                positions += int(np.prod(y0.shape[:-1]))
            first = False
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal else -math.inf)
    value = None if metric is None else float(metric(reference, outputs))
    return Measures(min_cos, max_rel, flips / positions if positions else 0.0, sqnr, value)


# ---------------------------------------------------------------------------------------------
# Evaluating one candidate: the fp32 model quantized with some layers kept float


@dataclass
class Job:
    """What every evaluation of a search shares (sent once to Ray's object store)."""

    model: bytes  # the fp32 model, serialized
    quantize_pass: str
    target: str
    options: dict
    feeds: list[dict]
    reference: list[dict]
    budget: Budget
    calibration_data: Any = None
    # Types graphopt's analysis knew in the optimized graph that its export leaves out (dims only
    # onnx's inference could name: unk__N) and a reloaded model's inference cannot find again
    # behind com.microsoft ops; rules that check a dtype or rank need them. {name: (dtype, shape)}
    shapes: dict[str, tuple] = field(default_factory=dict)


def known_shapes(model) -> dict[str, tuple]:
    """{tensor name: (dtype, shape)} of every variable of the IR model's main graph with a known type."""
    import onnx_graphsurgeon as gs

    return {t.name: (t.dtype, None if t.shape is None else list(t.shape)) for t in model.graph.tensors().values()
            if isinstance(t, gs.Variable) and t.dtype is not None}


def quantized(job: Job, keep_float: tuple[str, ...] | frozenset[str] = ()) -> onnx.ModelProto:
    """The job's model through its quantization pass (and dce), the `keep_float` nodes left float."""
    from graphopt import export, loading, targets
    from graphopt.pass_manager import PassContext, PassManager, Sequential, create_pass

    model = loading.from_proto(onnx.load_from_string(job.model))
    for name, t in model.graph.tensors().items():
        if name in job.shapes and not hasattr(t, "values"):
            dtype, shape = job.shapes[name]
            t.dtype = t.dtype if t.dtype is not None else dtype
            t.shape = t.shape if t.shape is not None or shape is None else list(shape)
    # Nodes a pass before the search keeps float (smoothing's outlier MatMuls) stay float too.
    options = dict(job.options, quantize_exclude=frozenset(job.options.get("quantize_exclude", ())) | frozenset(keep_float), quantize_gate=False)
    ctx = PassContext(model=model, target=targets.get(job.target), options=options, calibration_data=job.calibration_data)
    PassManager(Sequential([create_pass(job.quantize_pass), create_pass("dce")])).run(ctx)
    return export.to_proto(model)


def run_all(model: onnx.ModelProto, feeds: list[dict]) -> list[dict]:
    from graphopt import verify

    session = verify._session(model, 1, _ort_level())
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, f))) for f in feeds]


def _ort_level():
    import onnxruntime as ort

    # What `verify.run` checks a result with, so the search and the final verification agree.
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def evaluate(job: Job, keep_float: tuple[str, ...]) -> Measures:
    """The budget's measures of the job's model quantized with `keep_float` left float (top-level,
    so that Ray can ship it)."""
    import gc

    try:
        return job.budget.measure(job.reference, run_all(quantized(job, keep_float), job.feeds))
    finally:
        # A candidate's graph is a web of cycles holding its weights: freed now, not whenever the
        # collector's object counts say (a BERT-base search grew past 11 GB without this).
        gc.collect()


# ---------------------------------------------------------------------------------------------
# The search


@dataclass
class Layer:
    node: str
    op: str
    alone: Measures | None = None  # only this layer quantized
    tensor_sqnr_db: float | None = None  # its output in the final model against fp32's
    kept_float: bool = False
    why: str = ""

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "op": self.op,
            "alone": None if self.alone is None else self.alone.to_dict(),
            "tensor_sqnr_db": None if self.tensor_sqnr_db is None else _finite(self.tensor_sqnr_db),
            "kept_float": self.kept_float,
            "why": self.why,
        }


@dataclass
class SearchResult:
    budget: Budget
    layers: list[Layer]
    full: Measures  # everything quantized
    final: Measures
    evaluations: int
    seconds: float
    executor: str
    evaluated_on: str
    met: bool
    notes: list[str] = field(default_factory=list)
    # What the pass measured once for the candidates (options for the final run to use as well).
    measured: dict = field(default_factory=dict)

    @property
    def kept_float(self) -> list[str]:
        return [layer.node for layer in self.layers if layer.kept_float]

    def to_dict(self) -> dict:
        return {
            "budget": str(self.budget),
            "met": self.met,
            "evaluated_on": self.evaluated_on,
            "executor": self.executor,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "all_quantized": self.full.to_dict(),
            "final": self.final.to_dict(),
            "kept_float": self.kept_float,
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": self.notes,
        }


def layers(fp32: onnx.ModelProto, quantized_model: onnx.ModelProto, layer_ops: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, op) of the nodes of `fp32` with an op of `layer_ops` that the quantization changed:
    rewritten (gone from the result) or reading a DequantizeLinear they did not read before."""
    after = {n.name: n for n in quantized_model.graph.node if n.name}
    dequantized = {out for n in quantized_model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    found = []
    for node in fp32.graph.node:
        if node.op_type not in layer_ops or not node.name:
            continue
        now = after.get(node.name)
        if now is None or any(i in dequantized for i in now.input):
            found.append((node.name, node.op_type))
    return found


def name_nodes_uniquely(nodes) -> None:
    """Give each node (onnx NodeProtos or graphsurgeon Nodes) a name of its own: layers are kept
    float by name, and profiles are read by name."""
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.name or getattr(node, 'op_type', None) or node.op}__{i}"
        seen.add(node.name)


def evaluation_split(data, model: onnx.ModelProto):
    """(data to calibrate on, evaluation feeds, what they are in words)."""
    from graphopt import calibration

    if data is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", calibration.RandomDataWarning)
            sample = calibration.random_data(model, RANDOM_EVALUATION_SAMPLES)
        return None, list(sample), f"{RANDOM_EVALUATION_SAMPLES} random samples (no calibration data: not representative)"
    if len(data) >= MIN_BATCHES_TO_HOLD_OUT:
        calibrate_on = data.head(len(data) - HELD_OUT_BATCHES)
        held = list(data.tail(HELD_OUT_BATCHES))
        return calibrate_on, held, f"{HELD_OUT_BATCHES} held-out calibration batches"
    return data, list(data), f"the {len(data)} calibration batches (too few to hold some out)"


def search(
    fp32: onnx.ModelProto,
    quantize_pass: str,
    *,
    target: str,
    options: dict,
    calibration_data,
    budget: Budget,
    executor=None,
    force_sensitivity: bool = False,
    shapes: dict[str, tuple] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Which of `quantize_pass`'s layers to keep float so that the quantized `fp32` meets `budget`."""
    from graphopt import pass_manager
    from graphopt.executor import Executor

    start = time.perf_counter()
    executor = executor or Executor()
    say = progress or (lambda text: None)
    pass_type = pass_manager.registered_passes()[quantize_pass]
    calibrate_on, feeds, evaluated_on = evaluation_split(calibration_data, fp32)
    options = dict(options)
    measured = {}
    if calibrate_on is not None and hasattr(pass_type, "measurements"):
        # Once for every candidate, instead of once per candidate.
        say("measuring activations on the calibration data")
        measured = pass_type().measurements(fp32, calibrate_on, options, target)
        options.update(measured)
    job = Job(fp32.SerializeToString(), quantize_pass, target, options, feeds, run_all(fp32, feeds), budget, calibrate_on, shapes or {})
    everything = quantized(job)
    full = budget.measure(job.reference, run_all(everything, feeds))
    found = [Layer(name, op) for name, op in layers(fp32, everything, pass_type.layer_ops)]
    evaluations = 1
    result = SearchResult(budget, found, full, full, evaluations, 0.0, executor.name, evaluated_on, budget.meets(full),
                          measured=measured)
    names = [layer.node for layer in found]
    if found and (not result.met or force_sensitivity):
        say(f"sensitivity of {len(found)} layers, one at a time")
        alone = executor.map(evaluate, job, [tuple(n for n in names if n != name) for name in names])
        evaluations += len(found)
        for layer, m in zip(found, alone):
            layer.alone = m
    if found and not result.met:
        order = sorted(range(len(found)), key=lambda i: (-budget.error(found[i].alone), i))
        ranked = [names[i] for i in order]
        ladder = sorted({min(2**j, len(ranked)) for j in range(int(math.log2(len(ranked))) + 2)})
        say(f"keeping the {', '.join(map(str, ladder))} most sensitive layers float")
        tried = dict(zip(ladder, executor.map(evaluate, job, [tuple(ranked[:k]) for k in ladder])))
        evaluations += len(ladder)
        meets = [k for k in ladder if budget.meets(tried[k])]
        if meets:
            high = meets[0]
            low = max([k for k in ladder if k < high], default=0)
            while high - low > 1:
                mid = (low + high) // 2
                tried[mid] = executor.map(evaluate, job, [tuple(ranked[:mid])])[0]
                evaluations += 1
                if budget.meets(tried[mid]):
                    high = mid
                else:
                    low = mid
            keep = high
            result.final, result.met = tried[high], True
        else:
            keep = len(ranked)
            result.final = tried[len(ranked)]
            result.notes.append(f"even with all {len(ranked)} layers float the model misses {budget}")
        if keep == len(ranked):
            result.notes.append(f"no quantized layer fits the budget {budget}: the model stays float")
        for rank, name in enumerate(ranked[:keep], 1):
            layer = found[names.index(name)]
            layer.kept_float = True
            layer.why = f"the {_ordinal(rank)}most sensitive of {len(ranked)} ({_describe(layer.alone, budget)} quantized alone)"
    result.evaluations = evaluations
    final_model = quantized(job, tuple(result.kept_float))
    _tensor_sqnr(fp32, final_model, feeds, found)
    result.seconds = time.perf_counter() - start
    return result


def _ordinal(n: int) -> str:
    return "" if n == 1 else f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')} "


def _describe(m: Measures, budget: Budget) -> str:
    parts = [f"cosine {m.min_cosine:.5f}"]
    if budget.kind == "rel":
        parts.insert(0, f"relative error {m.max_relative_error:.4f}")
    elif budget.kind == "top1":
        parts.insert(0, f"top-1 disagreement {m.top1_disagreement:.4f}")
    elif budget.kind == "metric" and m.metric is not None:
        parts.insert(0, f"{budget.metric_name} {m.metric:.4f}")
    return ", ".join(parts)


def _tensor_sqnr(fp32: onnx.ModelProto, final: onnx.ModelProto, feeds: list[dict], found: list[Layer]) -> None:
    """Each layer's output in the final model against fp32's, where the tensor kept its name."""
    from graphopt import calibration

    produced = {n.name: n.output[0] for n in fp32.graph.node if n.output}
    final_tensors = {out for n in final.graph.node for out in n.output}
    wanted = {layer.node: produced[layer.node] for layer in found if produced.get(layer.node) in final_tensors}
    if not wanted:
        return
    tensors = sorted(set(wanted.values()))
    a = run_all(calibration.with_outputs(fp32, tensors), feeds)
    b = run_all(calibration.with_outputs(final, tensors), feeds)
    for layer in found:
        t = wanted.get(layer.node)
        if t is None:
            continue
        signal = sum(float(np.sum(np.square(x[t], dtype=np.float64))) for x in a)
        noise = sum(float(np.sum(np.square(x[t].astype(np.float64) - y[t]))) for x, y in zip(a, b))
        layer.tensor_sqnr_db = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal else -math.inf)


def plot(search_result: dict, path, title: str) -> None:
    """Per-layer error as a PNG (SVG, PDF by extension): each layer's output SQNR when it alone is
    quantized, and its own output's SQNR in the final model; layers kept float are marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed, or wanted in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise GraphoptError("the plot needs matplotlib (pip install matplotlib)") from None

    rows = search_result["layers"]

    def db(value):
        return value if isinstance(value, (int, float)) else (120.0 if value == "inf" else math.nan)

    alone = [db((r["alone"] or {}).get("sqnr_db")) for r in rows]
    tensor = [db(r["tensor_sqnr_db"]) for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(rows) + 3), 5.5), dpi=120)
    ax.bar(x - 0.2, alone, 0.4, label="model output SQNR, this layer alone quantized", color="C0")
    ax.bar(x + 0.2, tensor, 0.4, label="this layer's output SQNR in the result", color="C1")
    for i, r in enumerate(rows):
        if r["kept_float"]:
            ax.axvspan(i - 0.5, i + 0.5, color="C3", alpha=0.15, lw=0)
    if any(r["kept_float"] for r in rows):
        ax.axvspan(math.nan, math.nan, color="C3", alpha=0.15, label="kept float to meet the budget")
        # The end of a name is what tells layers apart (exporters prefix the module path).
    ax.set_xticks(x, [f"{r['node'][-32:]} ({r['op']})" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title(f"{title}: budget {search_result['budget']}, {len(rows)} layers", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as exc:
        raise GraphoptError(f"cannot write the plot {path}: {exc}") from None
    finally:
        plt.close(fig)
