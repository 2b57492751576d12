"""The main job as a library call: load, optimize for a target, check, verify, report."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from graphopt import export, ir, loading
from graphopt.analysis.shapes import resolve_shapes
from graphopt.analysis.stats import ModelStats, model_stats
from graphopt.errors import GraphoptError, one_line
from graphopt.instruments import DumpIR, StatsDelta, VerifyEach
from graphopt.pass_manager import PassContext, PassManager, PassRecord, Sequential, create_pass
from graphopt.pipelines import build_pipeline
from graphopt.specialize import Specialization


@dataclass
class Report:
    source: str
    target: str
    opt_level: int
    before: ModelStats
    after: ModelStats
    bytes_before: int
    bytes_after: int
    passes: list[PassRecord]
    pass_deltas: dict[str, dict[str, int]]
    seconds: float
    fidelity: Any = None  # graphopt.verify.Fidelity when verified
    rollbacks: list[tuple[str, str]] = field(default_factory=list)
    specialization: Specialization = field(default_factory=Specialization)
    # Where the result was written (set by whoever saves it).
    output: str | None = None
    # How verification got its inputs: {"source": "generated" | "given", "dims": {symbol: size}, "tries": n}.
    verification_inputs: dict | None = None
    # The target's cost model on the model before and after (None: the target has none):
    # {"target", "calibration", "threads", "before_s", "after_s", "exact"}.
    predicted: dict | None = None
    # What graphopt did to the model beyond its passes, in words (an opset conversion, ...).
    notes: list[str] = field(default_factory=list)
    # The accuracy search of a quantized run (graphopt.accuracy.SearchResult.to_dict()): the
    # budget, per-layer sensitivity and SQNR, the layers kept float and why.
    quantization: dict | None = None
    pruning: dict | None = None  # what prune-channels did: groups, kept channels, refused groups, FLOPs
    sparsity: dict | None = None  # what nm-sparsity did: the pattern, each layer's decision and error
    # FLOPs, parameters, predicted (and, with --measure-stages, measured) time after each stage:
    # the original, the level's pipeline, each work-removal family, the quantization.
    stages: list[dict] = field(default_factory=list)
    stage_models: dict = field(default_factory=dict)  # stage -> ModelProto, with options["measure_stages"]
    # What a code-generating backend built (targets/backends/tvm.py): its manifest, the build's
    # seconds and the library's measured time against onnxruntime's where it was measured.
    backend: dict | None = None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "output": self.output,
            "backend": self.backend,
            "versions": versions(),
            "target": self.target,
            "opt_level": self.opt_level,
            "specialization": self.specialization.to_dict(),
            "before": self.before.to_dict() | {"bytes": self.bytes_before},
            "after": self.after.to_dict() | {"bytes": self.bytes_after},
            "seconds": round(self.seconds, 4),
            "passes": [
                {
                    "name": r.name,
                    "runs": r.runs,
                    "seconds": round(r.seconds, 4),
                    "changed": r.changed,
                    "stats": r.stats,
                    "delta": self.pass_deltas.get(r.name, {}),
                    "rolled_back": r.rolled_back,
                    "cost_decisions": [
                        {"rule": d.rule, "node": d.node, "kept": d.kept, "before_s": d.before_s, "after_s": d.after_s, "reason": d.reason}
                        for d in final_decisions(r.decisions)
                    ],
                }
                for r in self.passes
            ],
            "rollbacks": [{"pass": p, "reason": why} for p, why in self.rollbacks],
            "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None,
            "verification_inputs": self.verification_inputs,
            "predicted": self.predicted,
            "notes": self.notes,
            "quantization": self.quantization,
            "pruning": self.pruning,
            "sparsity": self.sparsity,
            "stages": self.stages,
        }


# --quantize KIND -> the pass that does it.
QUANTIZE_PASSES = {"int8": "quantize-int8", "int8-dynamic": "quantize-int8-dynamic", "int4": "quantize-int4",
                   "fp16": "convert-fp16", "bf16": "convert-bf16"}


# --quantize KIND -> the dtype its Conv/MatMul layers compute in, for the cost model.
COMPUTE_DTYPES = {"int8": "int8", "int8-dynamic": "int8", "fp16": "fp16", "bf16": "bf16"}


# Quantizations whose per-tensor activation scales smoothing helps (passes/quantize/smooth.py).
SMOOTHED = ("int8", "int8-dynamic")


def final_decisions(decisions):
    """A pass's cost decisions, the last one per (rule, node): a fixed-point group asks again each iteration."""
    last = {}
    for d in decisions:
        last[(d.rule, d.node)] = d
    return list(last.values())


def versions() -> dict[str, str]:
    """The versions a result depends on, for the report: graphopt and the libraries doing the work."""
    import onnx_graphsurgeon
    import onnxruntime

    import graphopt

    return {
        "graphopt": graphopt.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx_graphsurgeon": onnx_graphsurgeon.__version__,
        "python": platform.python_version(),
    }


def resolve_source(spec: str, files: set | None = None, notify=None) -> tuple[onnx.ModelProto, str | None]:
    """A model from `zoo:NAME` or a file path; returns the proto and the file path (None for zoo).

    `files` receives the paths of the files a model on disk consists of (see loading.load_proto);
    `notify(text)` hears of slow first-time work (a zoo model trained before its first use).
    """
    if spec.startswith("zoo:"):
        from graphopt import models

        return models.load(spec[4:], notify=notify), None
    return loading.load_proto(spec, files=files), spec


def check_opset(proto: onnx.ModelProto, target) -> None:
    """Refuse a model whose ai.onnx opset the target's runtime does not run (before anything runs it)."""
    opset = next((v for d, v in ((i.domain, i.version) for i in proto.opset_import) if d in ir.DEFAULT_DOMAINS), None)
    if opset is not None and opset > target.max_opset:
        raise GraphoptError(
            f"model uses opset {opset} but the {target.name} runtime supports opsets up to {target.max_opset}"
        )


def optimize(proto: onnx.ModelProto, **kwargs) -> tuple[onnx.ModelProto, Report]:
    """Optimize a model and return it as a ModelProto (see `optimize_model` for the arguments)."""
    model, report = optimize_model(proto, **kwargs)
    return export.to_proto(model), report


def optimize_model(
    proto: onnx.ModelProto,
    *,
    target: str = "x86_64",
    opt_level: int = 2,
    passes: list[str] | None = None,
    disabled: list[str] | None = None,
    cleanup: bool = True,
    options: dict[str, Any] | None = None,
    verify_each: bool = False,
    verify_inputs: dict | None = None,
    dump_ir: str | None = None,
    fold_input_defaults: bool = False,
    source: str = "<model>",
    reference: onnx.ModelProto | str | None = None,
    specialization: Specialization | None = None,
    instruments: list | None = None,
    calibration_data: Any = None,
    quantize: str | None = None,
    accuracy_budget: Any = None,
    executor: Any = None,
    progress: Any = None,
    sensitivity: bool = False,
    backend: str = "onnxruntime",
) -> tuple[ir.Model, Report]:
    """Optimize a model into graphopt's IR, ready for `export.save` (which streams it to disk).

    `proto` is consumed (its tensors move into the result); pass `reference` (a copy or the file
    path) to verify against the original. `cleanup` ends a custom `passes` list with dce (see
    pipelines.build_pipeline). `specialization` is what `specialize.specialize_proto`
    did to `proto` beforehand, for the report. `instruments` join the pass manager's (progress,
    for example). `quantize` ("int8") ends the pipeline with that quantization, calibrated on
    `calibration_data` (graphopt.calibration.CalibrationData). `backend` "tvm" optimizes for TVM's
    compilation of the result: standard ops only (targets/backends/tvm.py, for_tvm).
    """
    from graphopt import targets

    tgt = targets.get(target)
    if backend == "tvm":
        from graphopt.targets.backends.tvm import for_tvm

        tgt = for_tvm(tgt)
    elif backend != "onnxruntime":
        raise GraphoptError(f"unknown backend '{backend}'; known: onnxruntime, tvm")
    notes = []
    if quantize == "int8":
        proto, converted = _opset_for_per_channel(proto)
        if converted:
            notes.append(converted)
    pipeline = build_pipeline(opt_level, tgt, only=passes, disabled=disabled, cleanup=cleanup)
    quantization = None
    if quantize is not None:
        if quantize not in QUANTIZE_PASSES:
            raise GraphoptError(f"unknown quantization '{quantize}'; known: {', '.join(QUANTIZE_PASSES)}")
        # After the level's pipeline: quantization calibrates on the graph it will change, folded and fused.
        quantization = Sequential([create_pass(QUANTIZE_PASSES[quantize]), create_pass("dce")], name=quantize)
        if quantize == "int8" and calibration_data is None:
            raise GraphoptError("--quantize int8 needs calibration data (--calibration DATA); int8-dynamic needs none")
        if isinstance(accuracy_budget, str):
            from graphopt.accuracy import Budget

            accuracy_budget = Budget.parse(accuracy_budget)
    bytes_before = export.approx_nbytes(proto)
    check_opset(proto, tgt)
    if verify_each and reference is None:
        raise GraphoptError("--verify-each needs the original model to compare against")
    model = loading.from_proto(proto, fold_input_defaults=fold_input_defaults)
    ctx = PassContext(model=model, target=tgt, opt_level=opt_level, options=dict(options or {}), calibration_data=calibration_data)
    if accuracy_budget is not None and str(ctx.options.get("prune", "")).strip() == "budget":
        ctx.options.setdefault("accuracy_budget", accuracy_budget)  # what --prune budget prunes to
    if quantize in COMPUTE_DTYPES:
        # N:M sparsity pays in the dtype the layers will compute in, which quantization sets later.
        ctx.options.setdefault("sparsity_dtype", COMPUTE_DTYPES[quantize])
    ctx.analysis("shapes")
    ir.check_shapes(model)
    before = model_stats(model, ctx.options.get("symbolic_dims"))
    if not before.flops_exact:
        # Counted again on the shapes folding reveals, as `inspect` counts them (that folds a
        # weight-free copy, so only when inference alone left shapes unknown).
        resolve_shapes(model)
        before = model_stats(model, ctx.options.get("symbolic_dims"))
    predicted_before = _predict(ctx)
    deltas = StatsDelta()
    ctx.instruments.append(deltas)
    ctx.instruments.extend(instruments or ())
    verifier = None
    if verify_each:
        from graphopt import verify

        inputs = verify_inputs if verify_inputs is not None else verify.make_inputs(reference)
        verifier = VerifyEach(reference, inputs)
        ctx.instruments.append(verifier)
    if dump_ir:
        try:
            ctx.instruments.append(DumpIR(dump_ir))
        except OSError as exc:
            raise GraphoptError(f"cannot create the IR dump folder {dump_ir}: {exc.strerror or exc}") from None
    start = time.perf_counter()
    families = _reductions(ctx.options, set(_pipeline_names(pipeline)))
    # Stages only where something lossy follows the pipeline: otherwise before and after say it all.
    measure = bool(ctx.options.get("measure_stages"))
    stages = _Stages(ctx, measure, active=measure or bool(families) or quantization is not None)
    stages.add("original", before)
    records = PassManager(pipeline).run(ctx)
    stages.add(f"-O{opt_level}" if passes is None else "passes")
    # Lossy work removal before quantization: INT8 then calibrates on the smaller graph. One
    # family at a time, each a stage of its own in the report.
    for family in families:
        records += PassManager(family).run(ctx)
        stages.add(family.name)
    searched = None
    if quantization is not None and quantize in SMOOTHED and calibration_data is not None and ctx.options.get("smooth", True):
        # Exact, so before the search: every candidate it measures starts from the smoothed model.
        records += PassManager(create_pass("smooth-activations")).run(ctx)
    if quantization is not None:
        if accuracy_budget is not None and getattr(quantization.items[0], "layer_ops", None):
            searched = _search(ctx, QUANTIZE_PASSES[quantize], accuracy_budget, executor, progress, sensitivity)
        records += PassManager(quantization).run(ctx)
        stages.add(quantize)
    seconds = time.perf_counter() - start
    after = stages.latest
    if after is None:
        ctx.analyses.invalidate()
        ctx.analysis("shapes")
        after = model_stats(model, ctx.options.get("symbolic_dims"))
    predicted_after = _predict(ctx)
    report = Report(
        source=source,
        target=tgt.name,
        opt_level=opt_level,
        before=before,
        after=after,
        bytes_before=bytes_before,
        bytes_after=export.approx_nbytes(model),
        passes=records,
        pass_deltas=deltas.deltas,
        seconds=seconds,
        rollbacks=verifier.rollbacks if verifier else [],
        specialization=specialization or Specialization(),
    )
    report.notes = notes
    report.quantization = searched.to_dict() if searched is not None else None
    report.pruning = ctx.options.get("_pruning")
    report.sparsity = ctx.options.get("_sparsity")
    report.stages = stages.records
    report.stage_models = stages.models
    if predicted_before is not None and predicted_after is not None:
        cost = ctx.cost
        report.predicted = {
            "target": cost.target.full_name,
            "calibration": cost.calibrated,
            "threads": cost.threads,
            "before_s": predicted_before.seconds,
            "after_s": predicted_after.seconds,
            # False: some shapes were unknown, and those nodes count only their fixed cost.
            "exact": predicted_before.known and predicted_after.known,
        }
    return model, report


def _reductions(options: dict, ran: set[str]) -> list[Sequential]:
    """The lossy passes that remove work, as the options ask for them, each followed by dce:
    channel pruning (options["prune"]), then low-rank splits (options["lowrank_tolerance"]), then
    N:M sparsity (options["sparsity"]: of the layers the other two left); none that the pipeline
    (a --passes list) ran already."""
    names = ((["prune-channels"] if options.get("prune") else []) + (["lowrank-split"] if options.get("lowrank_tolerance") is not None else [])
             + (["nm-sparsity"] if options.get("sparsity") else []))
    return [Sequential([create_pass(n), create_pass("dce")], name=n) for n in names if n not in ran]


class _Stages:
    """FLOPs, parameters and the cost model's predicted time after each stage of the optimization
    (the level's pipeline, each work-removal family, the quantization), for the report; with
    `keep_models`, a copy of the model after each too, for `graphopt run --measure-stages` to time
    in onnxruntime (copies of every weight, so only when asked)."""

    def __init__(self, ctx: PassContext, keep_models: bool, active: bool):
        self.ctx, self.keep_models, self.active = ctx, keep_models, active
        self.records: list[dict] = []
        self.models: dict[str, onnx.ModelProto] = {}
        # The stats of the model as the last stage left it (shapes inferred afresh): the report's
        # `after` when nothing changed the model since, without a second inference.
        self.latest: ModelStats | None = None

    def add(self, name: str, stats: ModelStats | None = None) -> None:
        if not self.active:
            return
        ctx = self.ctx
        if stats is None:
            ctx.analyses.invalidate()
            ctx.analysis("shapes")
            stats = model_stats(ctx.model, ctx.options.get("symbolic_dims"))
            self.latest = stats
        dims = ctx.options.get("symbolic_dims")
        if not stats.flops_exact and not dims:
            # Per sample: the input dims without a size (a batch, a sequence) at 1, so that the
            # stages compare FLOPs and predictions by the same measure.
            dims = {d: 1 for d in stats.symbolic_inputs if d != "?"}
            stats = model_stats(ctx.model, dims)
        cost = ctx.cost
        predicted = None if cost is None else cost.estimate_graph(ctx.model.graph, dims)
        self.records.append({"stage": name, "flops": stats.flops, "flops_exact": stats.flops_exact, "parameters": stats.parameters,
                             "parameter_bytes": stats.parameter_bytes, "predicted_s": None if predicted is None else predicted.seconds,
                             "per_sample": bool(dims) and not ctx.options.get("symbolic_dims")})
        if self.keep_models:
            self.models[name] = export.to_proto(ctx.model)


def _pipeline_names(item) -> list[str]:
    return item.pass_names() if hasattr(item, "pass_names") else [item.name]


# Per-channel QuantizeLinear/DequantizeLinear (the axis attribute) exist from this opset on.
PER_CHANNEL_QDQ_OPSET = 13


def _opset_for_per_channel(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The model at opset 13 or later for per-channel Q/DQ: onnx's version converter lifts an older
    one (per-tensor weight scales instead collapse real models, see passes/quantize/static.py)."""
    opset = next((i.version for i in proto.opset_import if i.domain in ir.DEFAULT_DOMAINS), None)
    if opset is None or opset >= PER_CHANNEL_QDQ_OPSET:
        return proto, None
    import onnx.version_converter

    try:
        converted = onnx.version_converter.convert_version(proto, PER_CHANNEL_QDQ_OPSET)
    except Exception as exc:  # the converter raises several types, all "cannot convert"
        raise GraphoptError(f"--quantize int8 needs opset >= {PER_CHANNEL_QDQ_OPSET} for per-channel Q/DQ, and onnx cannot convert "
                            f"this opset-{opset} model: {one_line(exc)}") from None
    return converted, f"converted the model from opset {opset} to {PER_CHANNEL_QDQ_OPSET} for per-channel Q/DQ"


def _search(ctx: PassContext, quantize_pass: str, budget, executor, progress, sensitivity: bool):
    """The accuracy search on the optimized fp32 model; the context then quantizes exactly what it chose."""
    from graphopt import accuracy

    accuracy.name_nodes_uniquely(ctx.model.graph.nodes)
    fp32 = export.to_proto(ctx.model)
    options = {k: v for k, v in ctx.options.items() if not k.startswith("_")}
    result = accuracy.search(fp32, quantize_pass, target=ctx.target.full_name, options=options,
                             calibration_data=ctx.calibration_data, budget=budget, executor=executor, progress=progress,
                             force_sensitivity=sensitivity, shapes=accuracy.known_shapes(ctx.model))
    ctx.options["quantize_exclude"] = frozenset(ctx.options.get("quantize_exclude", ())) | frozenset(result.kept_float)
    ctx.options.update(result.measured)
    return result


def _predict(ctx: PassContext):
    """The model's estimate on the context's target, or None where the target has no cost model."""
    cost = ctx.cost
    return None if cost is None else cost.estimate_graph(ctx.model.graph, ctx.options.get("symbolic_dims"))
