"""The `graphopt` command line: run, inspect, passes, targets, zoo, compare.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error (a bug: please
report it; --debug shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt.errors import EXIT_BAD_INPUT, EXIT_VERIFICATION_FAILED, GraphoptError, VerificationError

EXIT_INTERNAL_ERROR = 3

console = Console()
err_console = Console(stderr=True)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix or isinstance(n, float) else f"{int(n)}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _seconds(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _change(before: float, after: float) -> str:
    if before == 0:
        return "-"
    return f"{(after - before) / before * 100:+.1f}%"


class _Group(click.Group):
    def main(self, *args, **kwargs):
        debug = bool(os.environ.get("GRAPHOPT_DEBUG")) or "--debug" in sys.argv
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.Abort:
            err_console.print("aborted")
            sys.exit(EXIT_BAD_INPUT)
        except GraphoptError as exc:
            if debug:
                raise
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - a bug, still reported in one line unless --debug
            if debug:
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err_console.print(
                f"internal error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(EXIT_INTERNAL_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="graphopt")
def cli(debug: bool) -> None:
    """graphopt: a compiler-style graph optimizer for ONNX models."""


def _plugin_option(command):
    """--plugin, shared by run and passes (see graphopt/plugins.py)."""
    return click.option(
        "--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
        help="Load passes from a Python file or an importable module (repeatable).",
    )(command)


def _shape_options(command):
    """--input-shape and --dim, shared by run, inspect and compare."""
    command = click.option(
        "--dim", "dims", multiple=True, metavar="SYMBOL=VALUE",
        help="Bind a symbolic dim everywhere it appears, e.g. --dim batch=1 --dim seq=128 (repeatable).",
    )(command)
    return click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
        help="Fix an input's shape, e.g. --input-shape input_ids:1,128 (repeatable).",
    )(command)


def _quiet_option(command):
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(command)


def _load(model: str, feedback, files: set | None = None, input_shapes=(), dims=()):
    """Resolve MODEL and apply --input-shape/--dim to it: (proto, file path or None, specialization)."""
    from graphopt.optimize import resolve_source
    from graphopt.specialize import parse_all, specialize_proto

    shapes, bound = parse_all(input_shapes, dims)  # bad syntax fails before any model work
    with feedback.phase(f"loading {model}"):
        proto, path = resolve_source(model, files, notify=feedback.note)
    return proto, path, specialize_proto(proto, shapes, bound)


def _verification_inputs(reference, proto, inputs_path, feedback):
    """Inputs for verification and the original's outputs on them (None when not yet run).

    Given inputs are checked against the (specialized) model. Generated ones come from
    `verify.find_inputs`, which tries sizes for symbolic dims until the original runs.
    """
    from graphopt import verify as verify_mod

    if inputs_path:
        return verify_mod.reference_inputs(reference, proto, inputs_path)
    with feedback.phase("choosing input sizes the original model runs on"):
        inputs, outputs, record = verify_mod.reference_inputs(reference, proto)
    if record["dims"]:
        tries = f" ({record['tries']} tries)" if record["tries"] > 1 else ""
        feedback.note(f"verifying on generated inputs with {_dims_text(record['dims'])}{tries}")
    return inputs, outputs, record


_target_file_option = click.option(
    "--target-file", "target_files", multiple=True, type=click.Path(dir_okay=False),
    help="A TOML file defining a target family or variants (schema: targets/data/*.toml); repeatable.",
)


def _load_target_files(paths) -> None:
    from graphopt import targets

    for path in paths:
        targets.load_file(path)


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="x86_64", show_default=True, help="Target to optimize for: FAMILY or FAMILY:VARIANT (see `graphopt targets`).")
@_target_file_option
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True, help="Optimization level.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model path [default: <name>.opt.onnx, or .opt.ort].")
@click.option("--format", "artifact_format", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="onnx, or ort: onnxruntime's own offline conversion of the result. Either way a <output>.session.json beside it holds the session options to deploy it with.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tvm"]), default="onnxruntime", show_default=True,
              help="onnxruntime: write the optimized model; tvm: compile it with Apache TVM into a shared library (<output>.json beside it: its manifest), loaded with graphopt.runtime.load.")
@click.option("--db", "tuning_db", type=click.Path(file_okay=False), help="With --backend tvm: the tuning database `graphopt tune` wrote, applied without tuning again.")
@click.option("--passes", help="Comma-separated passes to run instead of the level's pipeline.")
@click.option("--disable", help="Comma-separated passes to leave out.")
@click.option("--cleanup/--no-cleanup", default=True, show_default=True, help="End a --passes list with dce (unless it already ends with it).")
@_plugin_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the result against the original in onnxruntime; exit 1 and write nothing if it moved.")
@click.option("--verify-each", is_flag=True, help="Check after every pass and roll back a pass that breaks equivalence.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="Inputs for verification (.npz keyed by input name).")
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--quantize", type=click.Choice(["int8", "int8-dynamic", "int4", "fp16", "bf16"]),
              help="End with a lossy conversion: int8 (static QDQ, calibrated on --calibration), int8-dynamic (MatMuls with weights, activations quantized per call), int4 (weight-only MatMulNBits), fp16/bf16 (where the target gains from it).")
@click.option("--calibration", "calibration_source", help="Calibration samples for --quantize: an .npz keyed by input name, an .npy, a folder of them, or random:N (not representative).")
@click.option("--calibration-method", type=click.Choice(["minmax", "moving_average", "percentile", "entropy", "mse"]), default="percentile", show_default=True)
@click.option("--quantize-gate/--no-quantize-gate", default=True, show_default=True, help="On this machine's target (x86_64:host), keep static INT8 only if it measures faster than fp32.")
@click.option("--accuracy-budget", default="cos=0.99", show_default=True,
              help="With --quantize: cos=MIN (least cosine of an output to the original's), rel=MAX (largest relative error) or top1=MAX (share of argmax positions that differ). Layers that would break it stay float; verification judges by it instead of --rtol/--atol.")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Run the accuracy search's evaluations on Ray: a cluster address, auto (a running cluster) or local (start one here).")
@click.option("--smooth/--no-smooth", default=True, show_default=True,
              help="With --quantize int8|int8-dynamic and calibration data: move outlier activation channels into the weights (SmoothQuant-style) where that measures a smaller error.")
@click.option("--prune", "prune_spec", metavar="flops=FRACTION|budget",
              help="Remove whole Conv/Gemm channels and attention heads until the FLOPs fall by FRACTION, or (budget) as far as --accuracy-budget allows on held-out calibration batches (lossy): with --calibration, per-layer ratios from a measured sensitivity search and the next layers refit by least squares; before any --quantize.")
@click.option("--lowrank", "lowrank_tolerance", type=float, metavar="TOLERANCE",
              help="Split constant-weight MatMul/Gemm/Conv into products of low rank where the cost model says it pays, each within TOLERANCE relative output error (lossy; activation-weighted with --calibration); a k x k Conv becomes k x k then 1 x 1, or Tucker-2 (1 x 1, k x k, 1 x 1), whichever is predicted faster.")
@click.option("--sparsity", "sparsity_spec", metavar="N:M",
              help="Zero all but the N largest of every M weights along each Conv/Gemm/MatMul reduction (2:4, 4:8; lossy), where the target's sparse tensor cores make it pay (cuda, fp16/int8); marked in the model's metadata.")
@click.option("--sparsity-force", is_flag=True, help="Apply --sparsity also where the cost model expects no speedup (any CPU target).")
@click.option("--measure-stages", is_flag=True,
              help="Time the model after each stage (the level's passes, each of --prune/--lowrank/--sparsity, --quantize) in onnxruntime here, interleaved over 30 rounds, beside the cost model's prediction.")
@click.option("--dump-ir", type=click.Path(file_okay=False), help="Write the model after each changing pass into this folder.")
@click.option("--fold-input-defaults", is_flag=True, help="Treat initializers that are also graph inputs as constants (they are overridable defaults).")
@click.option("--fold-size-limit", type=int, default=None, help="Largest folded constant in bytes (default 1 MiB).")
@_shape_options
@_quiet_option
@click.option("-v", "--verbose", is_flag=True, help="List every op type in the summary, not only the top changes.")
def run(model, target, target_files, opt_level, output, artifact_format, backend, tuning_db, passes, disable, report_path, verify, verify_each, inputs_path, rtol, atol,
        quantize, calibration_source, calibration_method, quantize_gate, accuracy_budget, ray_address, smooth, prune_spec, lowrank_tolerance, sparsity_spec, sparsity_force, measure_stages, dump_ir,
        fold_input_defaults, fold_size_limit, input_shapes, dims, quiet, verbose, cleanup, plugins):
    """Optimize MODEL (a file or zoo:NAME) for a target and write the result."""
    from graphopt import export, targets
    from graphopt import verify as verify_mod
    from graphopt.feedback import Feedback, PassProgress
    from graphopt.optimize import check_opset, optimize_model
    from graphopt.plugins import load_plugins

    _load_target_files(target_files)
    tgt = targets.get(target)  # fail fast on an unknown target, before any model work
    if backend == "tvm":
        from graphopt.targets.backends import tvm as tvm_backend

        tvm_backend.import_tvm()  # and on a missing TVM or a target it cannot compile for
        tgt = tvm_backend.for_tvm(tgt)
        tvm_backend.tvm_target(tgt)
        if artifact_format == "ort":
            raise GraphoptError("--format ort is onnxruntime's; --backend tvm writes a shared library")
        if tuning_db and not Path(tuning_db).is_dir():
            raise GraphoptError(f"tuning database {tuning_db} is not a folder (graphopt tune --db DIR writes one)")
    elif tuning_db:
        raise GraphoptError("--db is the TVM tuning database; add --backend tvm")
    load_plugins(plugins)  # and on a broken plugin
    feedback = Feedback(err_console, quiet=quiet)
    input_files: set[Path] = set()
    proto, path, specialization = _load(model, feedback, input_files, input_shapes, dims)
    check_opset(proto, tgt)  # before verification runs the original
    if backend == "tvm":
        tvm_backend.static_signature(proto)  # refuses dynamic inputs before any work
    name = Path(path).name if path else model[4:] + ".onnx"
    from graphopt.targets.backends import onnxruntime as ort_backend

    if artifact_format == "ort" and tgt.runtime != "onnxruntime":
        raise GraphoptError(f"target {tgt.full_name} names no runtime, so it has no .ort artifact; use --format onnx")
    suffix = "so" if backend == "tvm" else artifact_format
    out = Path(output) if output else Path(Path(name).stem + f".opt.{suffix}")
    written = {"output": out, "output's external data": out.with_name(out.name + ".data")}
    if backend == "tvm":
        written["manifest"] = tvm_backend.manifest_path(out)
    session_json = ort_backend.session_options_path(out) if tgt.runtime == "onnxruntime" else None
    if session_json is not None:
        written["session options"] = session_json
    if report_path:
        written["report"] = Path(report_path)
    for role, candidate in written.items():
        if candidate.resolve() in input_files:
            raise GraphoptError(f"{role} {candidate} is a file of the input model; choose another path so the input stays intact")
        # Files are written beside their path and renamed over it: that would replace a device
        # (-o /dev/full), FIFO or socket instead of writing into it.
        if candidate.exists() and not candidate.is_file() and not candidate.is_dir():
            raise GraphoptError(f"cannot write {role} {candidate}: it is not a regular file (a device, FIFO or socket)")
    if report_path and Path(report_path).resolve() == out.resolve():
        raise GraphoptError(f"report {report_path} and output {out} are the same file")
    if out.is_dir():
        raise GraphoptError(f"cannot write {out}: it is a directory")
    # Checked before any work, the report's folder too: a report that cannot be written after the
    # output was would leave a half-finished run behind.
    for dest in [out] + ([Path(report_path)] if report_path else []):
        if not dest.parent.is_dir():
            why = "is not a folder" if dest.parent.exists() else "does not exist"
            raise GraphoptError(f"cannot write {dest}: folder {dest.parent} {why}")
        if not os.access(dest.parent, os.W_OK):
            raise GraphoptError(f"cannot write {dest}: folder {dest.parent} is not writable")
    # The reference for verification: the file itself when there is one (a specialized model
    # computes the same on inputs of its shapes), else an in-memory copy.
    reference = path if path is not None else _copy(proto)
    calibration_data = budget = None
    reduces = bool(prune_spec) or lowrank_tolerance is not None or bool(sparsity_spec)  # lossy, like --quantize: judged by the budget
    if sparsity_spec:
        from graphopt.passes.nm_sparsity import parse_sparsity

        parse_sparsity(sparsity_spec)
    elif sparsity_force:
        raise GraphoptError("--sparsity-force goes with --sparsity N:M")
    if prune_spec:
        from graphopt.passes.sparsity import parse_prune

        parse_prune(prune_spec)
    if lowrank_tolerance is not None and not 0 < lowrank_tolerance < 1:
        raise GraphoptError(f"--lowrank takes a relative error between 0 and 1, not {lowrank_tolerance}")
    if quantize or reduces:
        from graphopt.accuracy import Budget

        budget = Budget.parse(accuracy_budget)
        if quantize == "int8" or calibration_source:
            calibration_data = _calibration_data(calibration_source, proto, feedback)
    elif calibration_source:
        raise GraphoptError("--calibration is for --quantize, --prune, --lowrank or --sparsity; add --quantize int8 (or --prune flops=F, --lowrank TOL, --sparsity 2:4)")
    elif ray_address:
        raise GraphoptError("--ray runs the accuracy search of --quantize; add --quantize")
    inputs = original_outputs = None
    input_record = None
    if (quantize or reduces) and verify and not inputs_path and calibration_data is not None and calibration_data.representative:
        # A quantized model is judged on data like what it was calibrated on: generated inputs lie
        # outside every calibrated range and would measure clipping, not quantization.
        # The last batch: the one the pruning refit and the quantizer's held-out evaluation leave
        # out, so that a fit that memorised its samples does not pass the check on them.
        inputs = next(iter(calibration_data.tail(1)))
        held = "" if len(calibration_data) > 1 else " (the only one: the check sees data the passes fitted)"
        input_record = {"source": f"the last calibration batch of {calibration_data.source}{held}"}
    elif verify or verify_each:
        # From the proto in memory: reading the file again would load every weight twice.
        inputs, original_outputs, input_record = _verification_inputs(reference, proto, inputs_path, feedback)
    options = {}
    if fold_size_limit is not None:
        options["fold_size_limit"] = fold_size_limit
    if quantize:
        from graphopt.calibration import default_cache_dir

        options.update(calibration_method=calibration_method, calibration_cache=default_cache_dir(), quantize_gate=quantize_gate, smooth=smooth)
    if prune_spec:
        options["prune"] = prune_spec
    if lowrank_tolerance is not None:
        options["lowrank_tolerance"] = lowrank_tolerance
    if sparsity_spec:
        options.update(sparsity=sparsity_spec, sparsity_force=sparsity_force)
    if measure_stages:
        options["measure_stages"] = True
    from graphopt import executor as executors

    with executors.create(ray_address) as executor, feedback.phase(f"optimizing {name} for {target} at -O{opt_level}"):
        result, report = optimize_model(
            proto,
            target=target,
            opt_level=opt_level,
            passes=_names(passes),
            disabled=_names(disable),
            cleanup=cleanup,
            options=options,
            verify_each=verify_each,
            verify_inputs=inputs,
            dump_ir=dump_ir,
            fold_input_defaults=fold_input_defaults,
            source=model,
            reference=reference,
            specialization=specialization,
            instruments=[PassProgress(feedback)],
            calibration_data=calibration_data,
            quantize=quantize,
            accuracy_budget=budget,
            executor=executor,
            progress=feedback.update,
            backend=backend,
        )
    report.verification_inputs = input_record
    if report.stage_models:
        with feedback.phase(f"timing the {len(report.stage_models)} stages in onnxruntime, interleaved"):
            stage_inputs = inputs if inputs is not None else verify_mod.make_inputs(next(iter(report.stage_models.values())))
            timed = verify_mod.interleaved_latency_ms(report.stage_models, stage_inputs)
        for record in report.stages:
            record.update({f"measured_{k}": v for k, v in timed.get(record["stage"], {}).items()})
        report.stage_models = {}  # copies of every weight: not kept past the timing
    verified = {}

    def check_fidelity(staged: Path) -> None:
        # Verification reads the staged file, so onnxruntime needs no serialized copy of the model,
        # and a failure abandons the write: nothing is left at the output path.
        import onnx

        # First what the target's execution provider runs: a model it cannot load is no artifact.
        ort_backend.check_runs_on(onnx.load(str(staged), load_external_data=False), tgt)
        if not verify:
            return
        with feedback.phase("verifying against the original in onnxruntime"):
            expected = original_outputs
            if expected is None:
                remedy = "pass real inputs with --inputs FILE.npz or skip verification with --no-verify"
                expected = verify_mod.original_outputs(reference, inputs, remedy=remedy)
            verified["expected"] = expected
            actual = verify_mod.run(str(staged), inputs)
            report.fidelity = verify_mod.compare(expected, actual, rtol=rtol, atol=atol)
        if budget is not None:
            # Quantization is lossy by design: judged by its budget, not by float tolerance.
            if budget.kind == "cos":
                report.fidelity = verify_mod.judged_by_cosine(report.fidelity, budget.value)
                verify_mod.require_cosine(report.fidelity, budget.value, "; nothing written")
            else:
                budget.require([expected], [actual], "; nothing written")
            return
        verify_mod.require_within_tolerance(report.fidelity, rtol, atol, "; nothing written")

    try:
        with feedback.phase(f"writing {out}"):
            if backend == "tvm":
                _write_tvm(result, out, tgt, check_fidelity, verified, budget, report, rtol, atol, tuning_db, feedback, inputs if verify else None)
            elif artifact_format == "ort":
                _write_ort(result, out, tgt, check_fidelity, inputs if verify else None, report, rtol, atol)
            else:
                export.save(result, out, validate=check_fidelity)
            if session_json is not None:
                ort_backend.write_session_options(session_json, ort_backend.session_options(tgt, artifact_format))
    except VerificationError:
        _finish_report(report, report_path, quiet, verbose)
        raise
    report.output = str(out)
    _finish_report(report, report_path, quiet, verbose)
    if not quiet:
        beside = (f" and its session options {escape(str(session_json))}" if session_json else
                  f" and its manifest {escape(str(tvm_backend.manifest_path(out)))}" if backend == "tvm" else "")
        console.print(f"wrote [bold]{escape(str(out))}[/bold]" + beside)


def _calibration_data(source: str | None, proto, feedback):
    import warnings

    from graphopt import calibration

    if not source:
        raise GraphoptError("--quantize needs --calibration DATA (.npz/.npy/folder of samples; random:N only for a smoke test)")
    if source.startswith("random:"):
        try:
            count = int(source[len("random:"):])
        except ValueError:
            raise GraphoptError(f"--calibration random:N needs a whole number of samples, not {source!r}") from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", calibration.RandomDataWarning)
            data = calibration.random_data(proto, count)
        for w in caught:
            feedback.note(f"warning: {w.message}")
    else:
        data = calibration.from_path(source, proto)
    if len(data) == 0:
        raise GraphoptError(f"{data.source}: no complete batch of calibration samples (the model takes {data.batch_size} per batch)")
    return data


def _write_ort(result, out: Path, tgt, check_fidelity, inputs, report, rtol: float, atol: float) -> None:
    """The .ort artifact: the checked .onnx staged beside `out`, converted by onnxruntime, the
    conversion verified against the .onnx's outputs, and only then renamed onto `out`."""
    import tempfile

    from graphopt import export
    from graphopt import verify as verify_mod
    from graphopt.targets.backends import onnxruntime as ort_backend

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".") as tmp:
        staged_onnx, staged_ort = Path(tmp) / "model.onnx", Path(tmp) / "model.ort"
        export.save(result, staged_onnx, validate=check_fidelity)
        ort_backend.convert_to_ort(staged_onnx, staged_ort, tgt)
        if inputs is not None:
            # onnxruntime's conversion applies its own optimizations: its result must still compute the same.
            converted = verify_mod.compare(verify_mod.run(str(staged_onnx), inputs), verify_mod.run(str(staged_ort), inputs), rtol=rtol, atol=atol)
            verify_mod.require_within_tolerance(converted, rtol, atol, "; the .ort conversion moved the outputs, nothing written")
        os.replace(staged_ort, out)


# Interleaved rounds timing a TVM library against onnxruntime after a build, within this many
# seconds: untuned TVM code can take seconds per run (ResNet-18: 1.6-3.3 s), and the build step
# must not turn into a benchmark.
TVM_TIMING_ROUNDS, TVM_TIMING_SECONDS = 10, 15.0


def _write_tvm(result, out: Path, tgt, check_fidelity, verified: dict, budget, report, rtol: float, atol: float, tuning_db,
               feedback, inputs) -> None:
    """The TVM library: the checked .onnx staged beside `out`, compiled, the library verified
    against the original (where this machine runs it) and timed against onnxruntime, and only
    then renamed onto `out` with its manifest."""
    import tempfile
    import time

    import onnx

    from graphopt import export, runtime
    from graphopt import verify as verify_mod
    from graphopt.targets.backends import tvm as tvm_backend

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".") as tmp:
        staged_onnx, staged_library = Path(tmp) / "model.onnx", Path(tmp) / out.name
        export.save(result, staged_onnx, validate=check_fidelity)
        proto = onnx.load(str(staged_onnx))
        db = Path(tuning_db) if tuning_db else None
        start = time.perf_counter()
        with feedback.phase(f"compiling with TVM for {tgt.full_name}" + (f" with tuning database {db}" if db else " (untuned)")):
            manifest = tvm_backend.build(proto, tgt, db, staged_library)
        record = {**manifest, "compile_seconds": round(time.perf_counter() - start, 3), "verified": False}
        if inputs is not None and tvm_backend.runs_here(tgt):
            with feedback.phase("verifying the TVM library against the original"):
                library = runtime.load(staged_library)
                actual = library(inputs)
                expected = verified.get("expected") or verify_mod.run(str(staged_onnx), inputs)
                if budget is not None:
                    budget.require([expected], [actual], "; the TVM library moved the outputs, nothing written")
                else:
                    fidelity = verify_mod.compare(expected, actual, rtol=rtol, atol=atol)
                    verify_mod.require_within_tolerance(fidelity, rtol, atol, "; the TVM library moved the outputs, nothing written")
                record["verified"] = True
            with feedback.phase("timing the TVM library against onnxruntime"):
                record["measured"] = tvm_backend.time_against_onnxruntime(library, str(staged_onnx), inputs, TVM_TIMING_ROUNDS, TVM_TIMING_SECONDS)
        os.replace(staged_library, out)
        os.replace(tvm_backend.manifest_path(staged_library), tvm_backend.manifest_path(out))
    report.backend = record


def _finish_report(report, report_path, quiet: bool = False, verbose: bool = False) -> None:
    if not quiet:
        _print_report(report, verbose)
    if report_path:
        _write_json(Path(report_path), report.to_dict())


def _copy(proto):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _names(csv: str | None) -> list[str] | None:
    if not csv:
        return None
    return [n.strip() for n in csv.split(",") if n.strip()]


def _write_json(path: Path, data: dict) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        # mkstemp makes the file private (0600); a report is an ordinary file, so honour the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise GraphoptError(f"cannot write report {path}: {exc.strerror or exc}") from None


# The summary's op table shows this many op types unless --verbose asks for all.
TOP_OP_CHANGES = 10


def _print_report(report, verbose: bool = False) -> None:
    from graphopt.specialize import describe

    b, a = report.before, report.after
    table = Table(title=f"{escape(report.source)} -> {report.target} (-O{report.opt_level})", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_row("nodes", str(b.nodes), str(a.nodes), _change(b.nodes, a.nodes))
    table.add_row("parameters", _human(b.parameters), _human(a.parameters), _change(b.parameters, a.parameters))
    both_exact = a.flops_exact and b.flops_exact
    table.add_row("FLOPs", _flops(b.flops, b.flops_exact), _flops(a.flops, a.flops_exact), _change(b.flops, a.flops) if both_exact else "-")
    table.add_row("model size", _bytes(report.bytes_before), _bytes(report.bytes_after), _change(report.bytes_before, report.bytes_after))
    p = report.predicted
    if p is not None:
        bound = "" if p["exact"] else " (lower bound)"
        table.add_row(f"predicted time on {p['target']}", _seconds(p["before_s"]) + bound, _seconds(p["after_s"]) + bound,
                      _change(p["before_s"], p["after_s"]))
    console.print(table)
    if p is not None:
        console.print(f"predicted by the cost model, {p['calibration']}, {p['threads']} thread{'s' if p['threads'] != 1 else ''} "
                      f"(onnxruntime runs the graph as written; `graphopt inspect --target` shows where the time goes)", highlight=False)
    _print_lower_bound_note(a)
    for line in describe(report.specialization):
        console.print(f"specialized input {escape(line)}", highlight=False)
    _print_op_changes(b.ops, a.ops, verbose)

    passes = Table(title="passes", title_justify="left")
    for col in ("pass", "runs", "time", "nodes", "what it did"):
        passes.add_column(col, justify="left" if col in ("pass", "what it did") else "right")
    for record in report.passes:
        delta = report.pass_deltas.get(record.name, {})
        did = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in record.stats.items() if v) or "-"
        if record.rolled_back:
            did = f"[yellow]rolled back: {escape(record.rolled_back)}[/yellow]"
        passes.add_row(record.name, str(record.runs), f"{record.seconds * 1000:.1f} ms", f"{delta.get('nodes', 0):+d}", did)
    console.print(passes)
    _print_cost_decisions(report)
    _print_quantization(report.quantization, verbose)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"optimizer time: {report.seconds:.2f} s")
    for name, reason in report.rollbacks:
        err_console.print(f"[yellow]warning:[/yellow] pass '{name}' was rolled back: {escape(reason)}", highlight=False)
    _print_pruning(report.pruning)
    _print_sparsity(report.sparsity)
    _print_stages(report.stages)
    if report.fidelity is not None:
        _print_fidelity(report.fidelity, report.verification_inputs)
    _print_backend(report.backend)


def _print_pruning(p: dict | None) -> None:
    if not p:
        return
    pruned = [g for g in p.get("groups", []) if g["kept"] < g["channels"]]
    if "flops_after" in p:
        before, after = p["flops_before"], p["flops_after"]
        heads = sum(g["channels"] - g["kept"] for g in pruned if g.get("head_size", 1) > 1)
        channels = sum(g["channels"] - g["kept"] for g in pruned if g.get("head_size", 1) == 1)
        console.print(f"pruned {channels} channels" + (f" and {heads} attention heads" if heads else "") + f" in {len(pruned)} of {len(p['groups'])} channel groups: "
                      f"weight FLOPs per sample {before:,} -> {after:,} ({after / before - 1:+.1%}); "
                      f"{p['refitted']} readers refit on the calibration data" + (f", {p['evaluations']} sensitivity evaluations" if p.get("evaluations") else ""),
                      highlight=False)
    elif "budget" in p:
        worst = p["budget_probes"][-1] if p.get("budget_probes") else {}
        console.print(f"pruning within the budget {p['budget']}: even the smallest cut it tried missed it "
                      f"(min cosine {worst.get('min_cosine')}); nothing pruned", highlight=False)
    else:
        console.print("pruning found no channel group it could remove channels from", highlight=False)
    if p.get("budget_met"):
        m = p["budget_measures"]
        console.print(f"the most FLOPs within the budget {p['budget']} after {len(p['budget_probes'])} probes on held-out calibration batches: "
                      f"min cosine {m['min_cosine']}, top-1 changed {m['top1_disagreement']:.1%}", highlight=False)
    refused = p.get("refused", [])
    if refused:
        first = refused[0]
        console.print(f"{len(refused)} channel groups left whole (e.g. {escape(first['producers'][0])}: {escape(first['reason'])} at {escape(first['node'])})",
                      highlight=False)


def _print_stages(stages: list[dict]) -> None:
    """FLOPs, parameters, predicted and measured time after each stage, as ratios to the original."""
    if not stages:
        return
    first = stages[0]
    table = Table(title="stages (ratios to the original)", title_justify="left")
    for col in ("stage", "FLOPs", "parameters", "predicted", "measured (median, min)"):
        table.add_column(col, justify="left" if col == "stage" else "right")

    def ratio(key: str, row: dict) -> str:
        return "-" if not row.get(key) or not first.get(key) else f"{row[key] / first[key]:.2f}x"

    for row in stages:
        measured = "-" if "measured_median_ms" not in row else f"{row['measured_median_ms']:.2f} ms ({ratio('measured_median_ms', row)}, {ratio('measured_min_ms', row)})"
        table.add_row(escape(row["stage"]), ratio("flops", row), ratio("parameters", row), ratio("predicted_s", row), measured)
    console.print(table)


def _print_sparsity(s: dict | None) -> None:
    if not s:
        return
    if not s.get("applied"):
        console.print(f"{s['pattern']} sparsity not applied: {escape(s.get('reason', ''))}"
                      + ("" if s["forced"] else " (--sparsity-force applies it anyway)"), highlight=False)
        return
    layers = s["layers"]
    errors = [entry["activation_error"] if entry["activation_error"] is not None else entry["weight_error"] for entry in layers]
    timed = [entry for entry in layers if entry["predicted_before_s"] and entry["predicted_after_s"]]
    before, after = sum(e["predicted_before_s"] for e in timed), sum(e["predicted_after_s"] for e in timed)
    speed = (f"predicted {before / after:.2f}x on those layers ({escape(s['target'])})" if s["expected_speedup"]
             else f"applied as --sparsity-force asks, though {escape(s['reason'])}")
    weighted = "activation-weighted" if layers[0]["activation_error"] is not None else "weight"
    console.print(f"{s['pattern']} sparsity in {s['applied']} of {s['considered']} layers ({s['zeros'] / s['weights']:.0%} of their weights zero); "
                  f"{speed}; {weighted} error per layer {min(errors):.1%}-{max(errors):.1%}", highlight=False)


def _print_backend(b: dict | None) -> None:
    if b is None:
        return
    tuned = f"tuning database {b['tuning_database']}" if b["tuning_database"] else "untuned (graphopt tune MODEL --db DIR tunes it)"
    integer = f"; {b['integer_layers']} conv/matmul layers in 8-bit integer arithmetic" if b.get("integer_layers") else ""
    console.print(f"TVM {b['tvm_version']}: compiled for {json.dumps(b['tvm_target'])} in {b['compile_seconds']:.1f} s, {tuned}{integer}",
                  highlight=False)
    m = b.get("measured")
    if m is not None:
        how = f"{m['ratio']:.2f}x onnxruntime's time ({'slower' if m['ratio'] > 1 else 'faster'})"
        console.print(f"TVM library on this machine: {m['tvm_ms']:.3f} ms against onnxruntime's {m['onnxruntime_ms']:.3f} ms "
                      f"(median of {m['rounds']} interleaved rounds): {how}", highlight=False)
    elif not b["verified"]:
        console.print("the TVM library was not run here (another architecture, or a GPU library): load it with graphopt.runtime.load there",
                      highlight=False)


def _print_cost_decisions(report) -> None:
    """The rewrites the target's cost model was asked about, per pass and rule: kept or declined, why."""
    from graphopt.optimize import final_decisions

    groups: dict[tuple[str, str, bool], list] = {}
    for record in report.passes:
        for d in final_decisions(record.decisions):
            groups.setdefault((record.name, d.rule, d.kept), []).append(d)
    if not groups:
        return
    table = Table(title=f"cost model decisions on {report.target}", title_justify="left")
    for col in ("pass", "rule", "", "sites", "before", "after", "reason (first site)"):
        table.add_column(col, justify="right" if col in ("sites", "before", "after") else "left")
    for (name, rule, kept), ds in groups.items():
        before, after = sum(d.before_s for d in ds), sum(d.after_s for d in ds)
        table.add_row(name, rule, "[green]kept[/green]" if kept else "[yellow]declined[/yellow]", str(len(ds)),
                      f"{before * 1e3:.3f} ms", f"{after * 1e3:.3f} ms", escape(ds[0].reason))
    console.print(table)


def _sqnr(value) -> str:
    return "-" if value is None else (f"{value:.1f} dB" if isinstance(value, (int, float)) else str(value))


def _print_quantization(q: dict | None, verbose: bool) -> None:
    """The accuracy search: whether the budget held with everything quantized, which layers stayed
    float and why; with --verbose every layer's sensitivity and SQNR."""
    if q is None:
        return
    layers = q["layers"]
    kept = [layer for layer in layers if layer["kept_float"]]
    full = q["all_quantized"]
    console.print(f"accuracy budget {q['budget']} on {escape(q['evaluated_on'])}: all {len(layers)} layers quantized give "
                  f"min cosine {full['min_cosine']}, SQNR {_sqnr(full['sqnr_db'])}; "
                  + ("budget met" if not kept and q["met"] else f"{len(kept)} kept float, then min cosine {q['final']['min_cosine']}")
                  + f" ({q['evaluations']} evaluation{'s' if q['evaluations'] != 1 else ''}, {q['seconds']:.1f} s, {q['executor']})", highlight=False)
    shown = layers if verbose else kept
    if not shown:
        return
    table = Table(title="layers kept float" if not verbose else "layers (quantized alone: output cosine and SQNR; tensor SQNR in the result)",
                  title_justify="left")
    for col in ("node", "op", "alone: cosine", "alone: SQNR", "tensor SQNR", "float", "why"):
        table.add_column(col, justify="right" if col.startswith(("alone", "tensor")) else "left")
    for layer in shown:
        alone = layer["alone"] or {}
        table.add_row(escape(layer["node"]), layer["op"], str(alone.get("min_cosine", "-")), _sqnr(alone.get("sqnr_db")),
                      _sqnr(layer["tensor_sqnr_db"]), "yes" if layer["kept_float"] else "", escape(layer["why"]))
    console.print(table)
    for note in q["notes"]:
        console.print(f"note: {escape(note)}", highlight=False)


def _print_lower_bound_note(stats) -> None:
    """Why FLOPs are a lower bound, and what fixes it when symbolic input dims are the cause."""
    if stats.flops_exact:
        return
    hint = ""
    if stats.symbolic_inputs:
        named = ", ".join(d for d in stats.symbolic_inputs if d != "?")
        hint = f"; the inputs have symbolic dims{f' ({named})' if named else ''}: --dim SYMBOL=VALUE or --input-shape NAME:D0,D1,... fix them"
    console.print(f"FLOPs are a lower bound: {stats.unknown_nodes} nodes have shapes that are not known statically{hint}", highlight=False)


def _flops(count: int, exact: bool) -> str:
    # Unknown shapes (symbolic dims, shapes computed at run time) leave some nodes uncounted.
    return _human(count) + ("" if exact else " (lower bound)")


def _print_op_changes(before: dict[str, int], after: dict[str, int], verbose: bool) -> None:
    """Nodes per op type before and after, biggest changes first (onnx-simplifier's table)."""
    ops = sorted(set(before) | set(after), key=lambda op: (-abs(after.get(op, 0) - before.get(op, 0)), op))
    changed = [op for op in ops if after.get(op, 0) != before.get(op, 0)]
    shown = ops if verbose else changed[:TOP_OP_CHANGES]
    if not shown:
        return
    table = Table(title="op types" if verbose else "op types that changed most", title_justify="left")
    for col in ("op", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op in shown:
        n0, n1 = before.get(op, 0), after.get(op, 0)
        table.add_row(escape(op), str(n0), str(n1), f"{n1 - n0:+d}" if n1 != n0 else "")
    console.print(table)
    hidden = 0 if verbose else len(changed) - len(shown)
    if hidden > 0:
        console.print(f"... and {hidden} more op types changed (--verbose lists all)", highlight=False)


def _dims_text(dims: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dims.items())


def _print_fidelity(fidelity, inputs: dict | None = None) -> None:
    title = "fidelity vs the original (onnxruntime"
    if inputs and inputs.get("dims"):
        title += f", generated inputs with {_dims_text(inputs['dims'])}"
    elif inputs and inputs.get("source") not in (None, "generated"):
        title += f", inputs from {inputs['source']}"
    table = Table(title=escape(title + ")"), title_justify="left")
    for col in ("output", "max abs err", "max rel err", "cosine", "top-1", "ok"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for o in fidelity.outputs:
        top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement * 100:.1f}%"
        ok = "[green]yes[/green]" if o.within_tolerance else f"[red]no[/red] {escape(o.note or '')}"
        table.add_row(escape(o.name), f"{o.max_abs_error:.3g}", f"{o.max_rel_error:.3g}", f"{o.cosine_similarity:.6f}", top1, ok)
    console.print(table)


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="x86_64", show_default=True, help="Target to tune for: FAMILY or FAMILY:VARIANT (x86_64, arm64, cuda).")
@_target_file_option
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True, help="Tune the graph `run -O LEVEL --backend tvm` compiles.")
@click.option("--trials", type=click.IntRange(min=0), default=256, show_default=True, help="Measured candidates in all, over the tasks the database lacks.")
@click.option("--db", "tuning_db", required=True, type=click.Path(file_okay=False), help="The tuning database folder: created, or extended (tasks it holds are not tuned again).")
@_plugin_option
@_shape_options
@_quiet_option
def tune(model, target, target_files, opt_level, trials, tuning_db, plugins, input_shapes, dims, quiet):
    """Tune MODEL's TVM kernels with MetaSchedule into a database that `run --backend tvm --db DIR` applies."""
    import logging
    import tempfile
    import time

    from graphopt import export, runtime, targets
    from graphopt import verify as verify_mod
    from graphopt.feedback import Feedback
    from graphopt.optimize import check_opset, optimize_model
    from graphopt.plugins import load_plugins
    from graphopt.targets.backends import tvm as tvm_backend
    from graphopt.targets.backends import tvm_tuning

    _load_target_files(target_files)
    tvm_backend.import_tvm()
    tgt = tvm_backend.for_tvm(targets.get(target))
    tvm_backend.tvm_target(tgt)
    if not tvm_backend.runs_here(tgt):
        raise GraphoptError(f"graphopt tune measures candidates on this machine, which cannot run {tgt.full_name} code; tune on such a machine")
    db = Path(tuning_db)
    if db.exists() and not db.is_dir():
        raise GraphoptError(f"tuning database {db} is not a folder")
    load_plugins(plugins)
    feedback = Feedback(err_console, quiet=quiet)
    proto, _, _ = _load(model, feedback, None, input_shapes, dims)
    check_opset(proto, tgt)
    tvm_backend.static_signature(proto)
    with feedback.phase(f"optimizing for {target} at -O{opt_level} (the graph run --backend tvm compiles)"):
        result, _ = optimize_model(proto, target=target, opt_level=opt_level, backend="tvm")
        optimized = export.to_proto(result)
    start = time.perf_counter()
    # MetaSchedule logs every round's task table at INFO: the progress line says enough.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with feedback.phase(f"tuning with up to {trials} trials into {db}"):
        record = tvm_tuning.tune(optimized, tgt, db, trials, progress=lambda done: feedback.update(f"{done} of {trials} trials measured"))
    record["seconds"] = round(time.perf_counter() - start, 1)
    with tempfile.TemporaryDirectory(prefix=".graphopt-tune-") as tmp:
        library, staged_onnx = Path(tmp) / "model.so", Path(tmp) / "model.onnx"
        with feedback.phase("compiling with the database"):
            tvm_backend.build(optimized, tgt, db, library)
        import onnx

        onnx.save(optimized, str(staged_onnx))
        feeds = verify_mod.make_inputs(optimized)
        with feedback.phase("timing the tuned library against onnxruntime"):
            record["measured"] = tvm_backend.time_against_onnxruntime(runtime.load(library), str(staged_onnx), feeds, 10, 30.0)
    if not quiet:
        m = record["measured"]
        console.print(f"{record['tasks']} tasks: {record['tuned_tasks']} tuned with {record['trials']} trials "
                      f"({record.get('failed_trials', 0)} failed) in {record['seconds']:.0f} s, {record['reused_tasks']} already in {escape(str(db))}"
                      + (f"; {record['written_space_tasks']} convolutions in graphopt's written space" if record.get("written_space_tasks") else ""),
                      highlight=False)
        console.print(f"tuned TVM on this machine: {m['tvm_ms']:.3f} ms against onnxruntime's {m['onnxruntime_ms']:.3f} ms: "
                      f"{m['ratio']:.2f}x onnxruntime's time ({'slower' if m['ratio'] > 1 else 'faster'})", highlight=False)


@cli.command("quantize-report")
@click.argument("model")
@click.option("--quantize", type=click.Choice(["int8", "int8-dynamic", "int4"]), default="int8", show_default=True)
@click.option("--calibration", "calibration_source", help="Calibration samples: .npz/.npy, a folder of them, or random:N (not representative).")
@click.option("--calibration-method", type=click.Choice(["minmax", "moving_average", "percentile", "entropy", "mse"]), default="percentile", show_default=True)
@click.option("--target", "-t", default="x86_64", show_default=True)
@_target_file_option
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True, help="The level whose fp32 result is quantized.")
@click.option("--accuracy-budget", default="cos=0.99", show_default=True, help="As for run: which layers would stay float.")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Run the evaluations on Ray (an address, auto or local).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Where to write the per-layer plot [default: <name>.quant.png].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the per-layer figures as JSON.")
@_shape_options
@_quiet_option
def quantize_report(model, quantize, calibration_source, calibration_method, target, target_files, opt_level, accuracy_budget, ray_address,
                    plot_path, json_path, input_shapes, dims, quiet):
    """Per-layer quantization sensitivity of MODEL: each layer quantized alone (output cosine and
    SQNR), each layer's SQNR in the quantized result, and which layers the budget keeps float."""
    from graphopt import accuracy, executor as executors, targets
    from graphopt.feedback import Feedback
    from graphopt.optimize import check_opset, optimize_model

    _load_target_files(target_files)
    tgt = targets.get(target)
    budget = accuracy.Budget.parse(accuracy_budget)
    feedback = Feedback(err_console, quiet=quiet)
    proto, path, _ = _load(model, feedback, None, input_shapes, dims)
    check_opset(proto, tgt)
    name = Path(path).name if path else model[4:] + ".onnx"
    plot_path = Path(plot_path) if plot_path else Path(Path(name).stem + ".quant.png")
    for dest in [plot_path] + ([Path(json_path)] if json_path else []):
        if not dest.parent.is_dir():
            raise GraphoptError(f"cannot write {dest}: folder {dest.parent} does not exist")
    data = _calibration_data(calibration_source, proto, feedback) if quantize == "int8" or calibration_source else None
    options = {"calibration_method": calibration_method, "quantize_gate": False}
    if data is not None:
        from graphopt.calibration import default_cache_dir

        options["calibration_cache"] = default_cache_dir()
    with executors.create(ray_address) as executor, feedback.phase(f"measuring each layer of {name} ({quantize})"):
        _, report = optimize_model(proto, target=target, opt_level=opt_level, options=options, source=model, calibration_data=data,
                                   quantize=quantize, accuracy_budget=budget, executor=executor, progress=feedback.update, sensitivity=True)
    q = report.quantization
    if q is None:
        raise GraphoptError(f"--quantize {quantize} has no layers to measure on {target}")
    accuracy.plot(q, plot_path, f"{model} {quantize} on {tgt.full_name}")
    if json_path:
        _write_json(Path(json_path), q)
    if not quiet:
        _print_quantization(q, verbose=True)
        console.print(f"wrote the per-layer plot [bold]{escape(str(plot_path))}[/bold]" + (f" and {escape(json_path)}" if json_path else ""))


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--target", "-t", help="Also predict the time on this target (FAMILY[:VARIANT]): per op class, bottlenecks, roofline.")
@_target_file_option
@click.option("--threads", type=int, help="Threads the prediction assumes on a CPU target [default: the variant's cores].")
@click.option("--top", type=int, default=10, show_default=True, help="How many of the slowest nodes to list.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="With --target: write the roofline plot (PNG, SVG, PDF by extension).")
@_shape_options
def inspect(model, as_json, target, target_files, threads, top, plot_path, input_shapes, dims):
    """Show MODEL's inputs, outputs, op histogram, parameters, FLOPs and bytes per op type
    (with --target: the predicted time per op class and node, and the roofline)."""
    from graphopt import export, loading
    from graphopt.analysis.cost import graph_cost
    from graphopt.analysis.shapes import infer_shapes, resolve_shapes
    from graphopt.analysis.stats import model_stats
    from graphopt.feedback import Feedback
    from graphopt.specialize import describe

    _load_target_files(target_files)
    cost_model = None
    if plot_path and not target:
        raise GraphoptError("--plot needs --target: the roofline is the target's")
    if target:
        from graphopt import targets
        from graphopt.targets.cost import for_target

        tgt = targets.get(target)
        cost_model = for_target(tgt, threads=threads)
        if cost_model is None:
            raise GraphoptError(f"target {tgt.full_name} has no hardware figures to predict time with; pick a family with variants (`graphopt targets`)")
    if plot_path and not Path(plot_path).parent.is_dir():
        raise GraphoptError(f"cannot write {plot_path}: folder {Path(plot_path).parent} does not exist")
    proto, _, specialization = _load(model, Feedback(err_console, quiet=as_json), None, input_shapes, dims)
    size = export.approx_nbytes(proto)
    m = loading.from_proto(proto)
    infer_shapes(m)
    resolve_shapes(m)
    stats = model_stats(m)
    cost = graph_cost(m.graph)
    data = {
        "model": model,
        "ir_version": m.ir_version,
        "opsets": m.opset_imports,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "bytes": size,
        "specialization": specialization.to_dict(),
        "inputs": [_io(t) for t in m.graph.inputs],
        "outputs": [_io(t) for t in m.graph.outputs],
        "stats": stats.to_dict(),
        # Nodes whose shapes are not known count 0 FLOPs: then "flops_exact" is false and the
        # totals are a lower bound (--dim/--input-shape make symbolic shapes known).
        "unknown_nodes": cost["unknown_nodes"],
        "subnormal_weights": _subnormal_weights(m),
        "ops": {op: {"count": v["count"], "flops": v["flops"], "bytes": v["bytes"]} for op, v in sorted(cost["by_op"].items(), key=lambda kv: -kv[1]["count"])},
    }
    estimate = None
    if cost_model is not None:
        estimate = cost_model.estimate_graph(m.graph)
        data["predicted"] = _prediction_dict(estimate, cost_model)
        if plot_path:
            from graphopt.targets import roofline

            roofline.plot(estimate, cost_model, plot_path, f"{model} on {cost_model.target.full_name}")
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    console.print(f"[bold]{escape(model)}[/bold]  IR {m.ir_version}, opsets {m.opset_imports}, {data['producer'] or 'unknown producer'}, {_bytes(size)}")
    for line in describe(specialization):
        console.print(f"specialized input {escape(line)}", highlight=False)
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "type", "shape"):
        io.add_column(col)
    for kind, items in (("input", data["inputs"]), ("output", data["outputs"])):
        for item in items:
            io.add_row(kind, escape(item["name"]), item["dtype"], escape(item["shape"]))
    console.print(io)
    ops = Table(title=f"{stats.nodes} nodes, {_human(stats.parameters)} parameters, {_flops(stats.flops, stats.flops_exact)} FLOPs", title_justify="left")
    for col in ("op", "count", "FLOPs", "bytes"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    for op, v in data["ops"].items():
        ops.add_row(escape(op), str(v["count"]), _human(v["flops"]), _bytes(v["bytes"]))
    console.print(ops)
    _print_lower_bound_note(stats)
    subnormal = data["subnormal_weights"]
    if subnormal["values"]:
        console.print(f"[yellow]{subnormal['values']:,} subnormal weights[/yellow] in {subnormal['tensors']} tensors: CPUs multiply by those "
                      "~100x slower, and no cost model sees it; `graphopt run` (-O2) flushes them to zero (flush-subnormal-weights)", highlight=False)
    if estimate is not None:
        _print_prediction(estimate, cost_model, top)
        if plot_path:
            console.print(f"wrote the roofline plot [bold]{escape(str(plot_path))}[/bold]")


def _subnormal_weights(model) -> dict:
    """How many float32/float64 weights are subnormal (see passes/fold.py, flush-subnormal-weights)."""
    import numpy as np

    from graphopt import ir

    values = tensors = 0
    for t in ir.used_constants(model):
        if np.dtype(t.dtype) not in (np.float32, np.float64):
            continue
        v = ir.constant_value(t)
        count = int(np.count_nonzero(ir.subnormal_mask(v)))
        values += count
        tensors += count > 0
    return {"values": values, "tensors": tensors}


def _prediction_dict(estimate, cost_model) -> dict:
    total = estimate.seconds
    return {
        "target": cost_model.target.full_name,
        "calibration": cost_model.calibrated,
        "threads": cost_model.threads,
        "seconds": total,
        "roofline_seconds": estimate.roofline_seconds,
        "exact": estimate.known,
        "by_class": estimate.by_class(),
        "nodes": [n.to_dict() for n in estimate.nodes],
    }


def _print_prediction(estimate, cost_model, top: int) -> None:
    total = estimate.seconds or 1e-12
    roof = estimate.roofline_seconds
    bound_time: dict[str, float] = {}
    for n in estimate.nodes:
        bound_time[n.bound] = bound_time.get(n.bound, 0.0) + n.seconds
    console.print(
        f"predicted on [bold]{cost_model.target.full_name}[/bold]: {_seconds(total)}"
        f"{'' if estimate.known else ' (lower bound: some shapes are not known)'}, {total / roof if roof else float('inf'):.1f}x its roofline "
        f"({_seconds(roof)}); time {', '.join(f'{k}-bound {v / total:.0%}' for k, v in sorted(bound_time.items(), key=lambda kv: -kv[1]))}",
        highlight=False,
    )
    console.print(f"{cost_model.calibrated}, {cost_model.threads} thread{'s' if cost_model.threads != 1 else ''}", highlight=False)
    classes = Table(title="predicted time per op class", title_justify="left")
    for col in ("op class", "nodes", "FLOPs", "bytes", "FLOP/byte", "bound", "time", "share"):
        classes.add_column(col, justify="left" if col in ("op class", "bound") else "right")
    for cls, v in estimate.by_class().items():
        members = [n for n in estimate.nodes if n.op_class == cls]
        bounds: dict[str, float] = {}
        for n in members:
            bounds[n.bound] = bounds.get(n.bound, 0.0) + n.seconds
        intensity = v["flops"] / v["bytes"] if v["bytes"] else 0.0
        classes.add_row(cls, str(v["nodes"]), _human(v["flops"]), _bytes(v["bytes"]), f"{intensity:.1f}",
                        max(bounds, key=bounds.get), _seconds(v["seconds"]), f"{v['seconds'] / total:.1%}")
    console.print(classes)
    slowest = sorted(estimate.nodes, key=lambda n: -n.seconds)[:max(0, top)]
    if not slowest:
        return
    nodes = Table(title=f"the {len(slowest)} slowest nodes (predicted)", title_justify="left")
    for col in ("node", "op", "bound", "FLOP/byte", "time", "share", "roofline"):
        nodes.add_column(col, justify="left" if col in ("node", "op", "bound") else "right")
    for n in slowest:
        nodes.add_row(escape(n.name or "?"), escape(n.op), n.bound, f"{n.intensity:.1f}", _seconds(n.seconds), f"{n.seconds / total:.1%}",
                      f"{n.seconds / n.roofline_s:.1f}x" if n.roofline_s else "-")
    console.print(nodes)


def _io(tensor) -> dict:
    import numpy as np

    dtype = str(np.dtype(tensor.dtype)) if tensor.dtype is not None else "?"
    shape = "?" if tensor.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in tensor.shape) + "]"
    return {"name": tensor.name, "dtype": dtype, "shape": shape}


@cli.command("passes")
@_plugin_option
def list_passes(plugins):
    """List every registered pass: its level (the lowest -O that runs it, or opt-in), where it
    comes from (built-in, a --plugin, an installed package) and its description."""
    from graphopt.pipelines import describe_passes
    from graphopt.plugins import load_plugins

    load_plugins(plugins)
    table = Table(title="passes", title_justify="left")
    for col in ("name", "level", "source", "description"):
        table.add_column(col)
    for info in describe_passes().values():
        table.add_row(info.name, info.level, escape(info.source), escape(info.description))
    console.print(table)


@cli.group("targets", invoke_without_command=True)
@_target_file_option
@click.pass_context
def list_targets(ctx, target_files):
    """List the target families graphopt optimizes for, with their variants (`targets show NAME[:VARIANT]`)."""
    _load_target_files(target_files)
    if ctx.invoked_subcommand is not None:
        return
    from graphopt import targets

    table = Table(title="targets", title_justify="left")
    for col in ("name", "runtime", "max opset", "variants", "description"):
        table.add_column(col)
    for name, family in targets.families().items():
        t = targets.get(name)
        variants = ", ".join(f"{v}*" if v == family.default_variant else v for v in family.variants) or "-"
        table.add_row(t.name, t.runtime, str(t.max_opset), escape(variants), escape(t.description))
    console.print(table)
    console.print("* the default variant: --target FAMILY uses it; --target FAMILY:VARIANT picks another", highlight=False)


def _number(value: float) -> str:
    return f"{value:,.1f}".rstrip("0").rstrip(".")


@list_targets.command("show")
@click.argument("name")
@_target_file_option
def show_target(name, target_files):
    """Show one target: runtime, providers, max opset and every hardware figure with its sources."""
    from graphopt import targets

    _load_target_files(target_files)
    t = targets.get(name)
    rows = [
        ("target", t.full_name),
        ("description", t.description),
        ("runtime", t.runtime),
        ("execution providers", ", ".join(t.execution_providers) or "-"),
        ("max opset", str(t.max_opset)),
        ("triple", t.triple or "-"),
    ]
    hw = t.hardware
    if hw is not None:
        rows += [
            ("hardware", hw.description),
            ("cores", f"{hw.cores}" + (" (SMs)" if t.name == "cuda" else "")),
            ("vector width", f"{hw.vector_bits} bits"),
            ("memory bandwidth", f"{_number(hw.memory_bandwidth_gbs)} GB/s"),
        ]
        for dtype, peak in hw.peak_gflops.items():
            unit = "GOP/s" if "int" in dtype else "GFLOP/s"
            rows.append((f"peak {dtype}", f"{_number(peak)} {unit}"))
        for c in hw.caches:
            rows.append((f"cache {c.level}", f"{_number(c.kib)} KiB {c.scope}"))
        rows += [
            ("int8 signedness", hw.int8_signedness),
            ("int8 weight bits", str(hw.int8_weight_bits)),
            ("layout", hw.layout),
            ("llvm mcpu", hw.mcpu),
            ("llvm mattr", hw.mattr or "-"),
        ]
        for i, src in enumerate(hw.sources, 1):
            rows.append((f"source {i}", f"{src.title}: {src.url}"))
    else:
        rows.append(("hardware", "none (a family without variants)"))
    table = Table(title=f"target {t.full_name}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for field_name, value in rows:
        table.add_row(field_name, escape(value))
    console.print(table)


def _floats(text: str | None, what: str, count: int | None = None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GraphoptError(f"{what} must be comma-separated numbers, not {text!r}") from None
    if count is not None and len(values) != count:
        raise GraphoptError(f"{what} needs {count} values, not {len(values)} ({text!r})")
    return values


def _hw(text: str | None, what: str):
    values = _floats(text, what)
    if values is None:
        return None
    if len(values) not in (1, 2) or any(v <= 0 or v != int(v) for v in values):
        raise GraphoptError(f"{what} must be SIZE or H,W in whole pixels, not {text!r}")
    return int(values[0]) if len(values) == 1 else (int(values[0]), int(values[1]))


CALIBRATION_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")


@cli.command()
@click.argument("model")
@click.option("--data", "data_path", type=click.Path(exists=True), help="Samples: an .npz keyed by input name (stacked along axis 0), an .npy, or a folder of them.")
@click.option("--images", "image_folder", type=click.Path(exists=True, file_okay=False), help="A folder of images, preprocessed as --size/--crop/--scale/--mean/--std/--layout/--channels say.")
@click.option("--random", "random_samples", type=int, help="N seeded random samples: a last resort, not representative of real data.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per batch where the model's batch dim is symbolic.")
@click.option("--size", help="Images: resize the shorter side to SIZE, or to exactly H,W.")
@click.option("--crop", help="Images: center crop H,W (or SIZE for a square).")
@click.option("--scale", type=float, default=1 / 255, show_default=True, help="Images: pixel values are multiplied by this first.")
@click.option("--mean", help="Images: per-channel mean (3 values), subtracted after --scale.")
@click.option("--std", help="Images: per-channel std (3 values), divided by after --mean.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True)
@click.option("--channels", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True)
@click.option("--input", "image_input", help="Images: the input they feed [default: the model's single input].")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default="entropy", show_default=True, help="How a tensor's range is chosen from its statistics.")
@click.option("--percentile", type=float, default=99.999, show_default=True, help="For --method percentile.")
@click.option("--bins", type=int, default=2048, show_default=True, help="Histogram bins per tensor.")
@click.option("--cache/--no-cache", default=True, show_default=True, help="Keep the statistics in graphopt's cache: another --method on the same model and data does not run the model again.")
@click.option("--top", type=int, default=20, show_default=True, help="How many tensors to list (widest ranges first); --json lists all.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_quiet_option
def calibrate(model, data_path, image_folder, random_samples, batch_size, size, crop, scale, mean, std, layout, channels,
              image_input, method, percentile, bins, cache, top, as_json, quiet):
    """Collect MODEL's activation statistics on calibration data in onnxruntime (one streaming
    pass, cached) and show each tensor's range by --method: what quantization will use."""
    import warnings

    from graphopt import calibration
    from graphopt.optimize import resolve_source

    sources = [s for s in (data_path, image_folder, random_samples) if s is not None]
    if len(sources) != 1:
        raise GraphoptError("give exactly one of --data FILE|FOLDER, --images FOLDER, --random N")
    if batch_size < 1 or bins < 16 or (random_samples is not None and random_samples < 1):
        raise GraphoptError("--batch-size and --random must be at least 1, --bins at least 16")
    proto, _ = resolve_source(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", calibration.RandomDataWarning)
        if data_path is not None:
            data = calibration.from_path(data_path, proto, batch_size=batch_size)
        elif image_folder is not None:
            crop_hw = _hw(crop, "--crop")
            preprocess = calibration.Preprocess(
                size=_hw(size, "--size"), crop=(crop_hw, crop_hw) if isinstance(crop_hw, int) else crop_hw, scale=scale,
                mean=_floats(mean, "--mean", 3) or (0.0, 0.0, 0.0), std=_floats(std, "--std", 3) or (1.0, 1.0, 1.0),
                layout=layout, channels=channels, input=image_input)
            data = calibration.from_images(image_folder, proto, preprocess, batch_size=batch_size)
        else:
            data = calibration.random_data(proto, random_samples, batch_size=batch_size)
    if len(data) == 0:
        raise GraphoptError(f"{data.source}: no complete batch of calibration samples (the model takes {data.batch_size} per batch)")
    for w in caught:
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", highlight=False)
    if data.dropped:
        err_console.print(f"[yellow]warning:[/yellow] {data.dropped} samples left over that fill no batch of {data.batch_size} were not used", highlight=False)
    cache_dir = calibration.default_cache_dir() if cache else None
    key = calibration.cache_key(proto, data, None, bins) if cache else None
    cached = bool(cache_dir and (cache_dir / f"{key}.npz").is_file())
    with contextlib.ExitStack() as stack:
        progress = None if quiet or as_json else stack.enter_context(calibration.progress_bar(f"calibrating on {data.source}", err_console))
        stats = calibration.collect(proto, data, bins=bins, progress=progress, cache_dir=cache_dir)
    params = {"percentile": percentile} if method == "percentile" else {}
    rows = []
    for name in stats.tensors:
        r = stats.range(name, method, **params)
        full = stats.range(name, "minmax")
        rows.append({"tensor": name, "min": None if full is None else full[0], "max": None if full is None else full[1],
                     "range": None if r is None else list(r), "ignored": int(stats.ignored[stats.row(name)])})
    summary = {"model": model, "data": data.source, "samples": stats.samples, "batches": stats.batches,
               "representative": data.representative, "method": method, "from_cache": cached, "tensors": rows}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if quiet:
        return
    rows.sort(key=lambda r: -((r["range"][1] - r["range"][0]) if r["range"] else -1))
    table = Table(title=f"{escape(model)}: {len(rows)} tensors on {stats.samples} samples of {escape(data.source)}"
                  f"{' (statistics from the cache)' if cached else ''}", title_justify="left")
    for col in ("tensor", "min", "max", f"{method} range", "clipped", "ignored"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for r in rows[:max(0, top)]:
        lo, hi = r["range"] if r["range"] else (None, None)
        # How much of the largest magnitude seen the range gives up (clipping outliers for resolution).
        seen = max(abs(r["min"]), abs(r["max"])) if r["range"] else 0
        clipped = f"{max(0.0, 1 - max(abs(lo), abs(hi)) / seen):.0%}" if r["range"] and seen > 0 else "-"
        table.add_row(escape(r["tensor"]), _g(r["min"]), _g(r["max"]), f"[{_g(lo)}, {_g(hi)}]" if r["range"] else "none", clipped,
                      str(r["ignored"]) if r["ignored"] else "")
    console.print(table)
    if len(rows) > top:
        console.print(f"... and {len(rows) - top} more tensors (--top N, or --json for all)", highlight=False)


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"


@cli.command("calibrate-cost")
@click.argument("models", nargs=-1)
@click.option("--target", "-t", default="x86_64", show_default=True, help="The target this machine is: its host variant.")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads while profiling (1 is the least noisy).")
@click.option("--runs", type=int, default=20, show_default=True, help="Profiled runs per model (each node's median counts).")
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=3, show_default=True, help="Calibrate on graphopt's output at this level (what the cost model will be asked about).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the calibration [default: graphopt's cache, where the target picks it up].")
@_quiet_option
def calibrate_cost(models, target, threads, runs, opt_level, output, quiet):
    """Fit the cost model's efficiency factors to this machine: profile MODELS (default: the
    calibration set; zoo:NAME or files) in onnxruntime and write the factors the target then uses."""
    from graphopt import targets
    from graphopt.feedback import Feedback
    from graphopt.targets import calibrate, cost

    tgt = targets.get(target)
    if tgt.hardware is None or not tgt.variant or "host" not in targets.families()[tgt.name].variants:
        raise GraphoptError(f"calibrate-cost measures this machine: the target must be a family with a host variant (x86_64 on an x86_64 machine), not {tgt.full_name}")
    if tgt.variant != "host":
        raise GraphoptError(f"calibrate-cost measures this machine, which is {tgt.name}:host, not {tgt.full_name}")
    if threads < 1 or runs < 1:
        raise GraphoptError("--threads and --runs must be at least 1")
    out = Path(output) if output else cost.user_calibration_path(tgt.full_name)
    if out.is_dir():
        raise GraphoptError(f"cannot write {out}: it is a directory")
    feedback = Feedback(err_console, quiet=quiet)
    names = list(models) or list(calibrate.DEFAULT_MODELS)
    with feedback.phase(f"calibrating {tgt.full_name} on {len(names)} models"):
        result = calibrate.calibrate(names, tgt, threads=threads, runs=runs, opt_level=opt_level,
                                     on_model=lambda name, step: feedback.update(f"{step} {name}"))
    try:
        calibrate.write(result.calibration, out, {"target": tgt.full_name, "fit": [
            {"model": v.model, "nodes": v.nodes, "spearman": round(v.spearman, 4), "e2e_error": round(v.e2e_error, 4)}
            for v in result.fits]})
    except OSError as exc:
        raise GraphoptError(f"cannot write {out}: {exc.strerror or exc}") from None
    if quiet:
        return
    table = Table(title=f"cost factors for {tgt.full_name} ({result.samples} kernels)", title_justify="left")
    for col in ("op class", "compute efficiency", "GEMM half k, n", "memory efficiency", "overhead"):
        table.add_column(col, justify="left" if col == "op class" else "right")
    for cls, f in result.calibration.factors.items():
        halves = f"{f.half_k:.0f}, {f.half_n:.0f}" if f.half_k or f.half_n else "-"
        table.add_row(cls, f"{f.compute_efficiency:.3f}", halves, f"{f.memory_efficiency:.3f}", f"{f.overhead_us:.1f} us")
    console.print(table)
    if result.calibration.op_scale:
        console.print("per-op corrections: " + ", ".join(f"{op} x{v:.2f}" for op, v in result.calibration.op_scale.items()), highlight=False)
    fits = Table(title="fit on the calibration models (validate on others: benchmarks/cost_model.py)", title_justify="left")
    for col in ("model", "kernels", "Spearman", "predicted", "measured", "error"):
        fits.add_column(col, justify="left" if col == "model" else "right")
    for v in result.fits:
        fits.add_row(escape(v.model), str(v.nodes), f"{v.spearman:.3f}", f"{v.predicted_s * 1e3:.2f} ms", f"{v.measured_wall_s * 1e3:.2f} ms", f"{v.e2e_error * 100:+.0f}%")
    console.print(fits)
    console.print(f"wrote [bold]{escape(str(out))}[/bold]")


@cli.group("zoo", invoke_without_command=True)
@click.pass_context
def zoo(ctx):
    """List the built-in models usable as zoo:NAME (`zoo export NAME -o FILE` saves one)."""
    if ctx.invoked_subcommand is not None:
        return
    from graphopt import models

    table = Table(title="zoo", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name in models.available():
        table.add_row(f"zoo:{name}", escape(models.describe(name)))
    console.print(table)


@zoo.command("export")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write it [default: NAME.onnx].")
@_quiet_option
def zoo_export(name, output, quiet):
    """Save the zoo model NAME (with or without the zoo: prefix) as an ONNX file."""
    from graphopt import export, loading
    from graphopt.feedback import Feedback

    name = name.removeprefix("zoo:")
    out = Path(output) if output else Path(f"{name}.onnx")
    if out.is_dir():
        raise GraphoptError(f"cannot write {out}: it is a directory")
    if not out.parent.is_dir():
        raise GraphoptError(f"cannot write {out}: folder {out.parent} does not exist")
    feedback = Feedback(err_console, quiet=quiet)
    proto, _, _ = _load(f"zoo:{name}", feedback)
    with feedback.phase(f"writing {out}"):
        export.save(loading.from_proto(proto), out)
    if not quiet:
        console.print(f"wrote [bold]{escape(str(out))}[/bold]")


@cli.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="Inputs (.npz keyed by input name).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of tables.")
@_shape_options
@_quiet_option
def compare(model_a, model_b, inputs_path, threads, runs, rtol, atol, as_json, input_shapes, dims, quiet):
    """Compare B against A: output fidelity and onnxruntime latency of both."""
    from graphopt import verify
    from graphopt.feedback import Feedback

    feedback = Feedback(err_console, quiet=quiet or as_json)
    a, path_a, spec_a = _load(model_a, feedback, None, input_shapes, dims)
    # --input-shape/--dim specialize A, which the inputs are made for; B is run as it is, on the
    # same inputs (a B optimized with those dims already has them static, and a dynamic B takes them).
    b, path_b, _ = _load(model_b, feedback, None)
    _check_same_interface(a, b, model_a, model_b)
    a_ref = path_a or a
    b_ref = path_b or b
    with feedback.phase("choosing input sizes model A runs on"):
        inputs, expected, record = verify.reference_inputs(a_ref, a, inputs_path)
    with feedback.phase("running both models in onnxruntime"):
        if expected is None:
            expected = verify.run(a_ref, inputs, threads=threads)
        fidelity = verify.compare(expected, verify.run(b_ref, inputs, threads=threads), rtol=rtol, atol=atol)
        lat_a = verify.latency_ms(a_ref, inputs, threads=threads, runs=runs)
        lat_b = verify.latency_ms(b_ref, inputs, threads=threads, runs=runs)
    speedup = lat_a / lat_b if lat_b else None
    data = {
        "a": {"model": model_a, "nodes": len(a.graph.node), "latency_ms": lat_a},
        "b": {"model": model_b, "nodes": len(b.graph.node), "latency_ms": lat_b},
        "speedup": speedup,
        "threads": threads,
        "runs": runs,
        "specialization": spec_a.to_dict(),
        "inputs": record,
        "fidelity": fidelity.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        _print_fidelity(fidelity, record)
        table = Table(title=f"onnxruntime latency (median of {runs}, {threads} threads)", title_justify="left")
        for col in ("model", "nodes", "latency", "B vs A"):
            table.add_column(col, justify="left" if col == "model" else "right")
        table.add_row(escape(model_a), str(len(a.graph.node)), f"{lat_a:.2f} ms", "")
        table.add_row(escape(model_b), str(len(b.graph.node)), f"{lat_b:.2f} ms", _speed_words(speedup))
        console.print(table)
    if not fidelity.ok:
        sys.exit(EXIT_VERIFICATION_FAILED)


def _speed_words(speedup: float | None) -> str:
    """B's speed against A in words: "1.25x faster", "1.25x slower" (never "0.80x faster")."""
    if not speedup:
        return "-"
    if round(speedup, 2) == 1.0:
        return "same speed"
    return f"{speedup:.2f}x faster" if speedup > 1 else f"{1 / speedup:.2f}x slower"


def _check_same_interface(a, b, name_a: str, name_b: str) -> None:
    """Two models can be compared only when they take the same inputs and give the same outputs."""
    import onnx

    def interface(proto):
        defaults = {t.name for t in proto.graph.initializer}
        def kind(vi):
            t = vi.type
            if t.WhichOneof("value") == "tensor_type":
                rank = len(t.tensor_type.shape.dim) if t.tensor_type.HasField("shape") else None
                return onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower(), rank
            return t.WhichOneof("value"), None
        inputs = {vi.name: kind(vi) for vi in proto.graph.input if vi.name not in defaults}
        outputs = {vi.name: kind(vi) for vi in proto.graph.output}
        return inputs, outputs

    for what, mine, theirs in zip(("input", "output"), interface(a), interface(b)):
        only_a = [n for n in mine if n not in theirs]
        only_b = [n for n in theirs if n not in mine]
        if only_a or only_b:
            parts = ([f"{what}s only in A: {', '.join(only_a)}"] if only_a else []) + ([f"{what}s only in B: {', '.join(only_b)}"] if only_b else [])
            raise GraphoptError(f"{name_a} and {name_b} have different interfaces ({'; '.join(parts)})")
        for n, (dtype, rank) in mine.items():
            other_dtype, other_rank = theirs[n]
            if dtype != other_dtype or (rank is not None and other_rank is not None and rank != other_rank):
                raise GraphoptError(
                    f"{name_a} and {name_b} have different interfaces: {what} '{n}' is {dtype} rank {rank} in A, "
                    f"{other_dtype} rank {other_rank} in B"
                )


class _ClosedPipeSafe:
    """stdout that survives its reader going away (`graphopt run ... | head -1`).

    The work goes on and the exit code stays the work's: a reader that stopped reading is no
    failure of the run. What would have been printed is dropped.
    """

    def __init__(self, stream):
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.reader_gone = True
        # The interpreter flushes stdout once more at exit; on the closed pipe that would print
        # "Exception ignored ... BrokenPipeError". Point the descriptor at /dev/null instead.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    sys.stdout = _ClosedPipeSafe(sys.stdout)
    cli.main(prog_name="graphopt")


if __name__ == "__main__":
    main()
