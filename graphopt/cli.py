"""The `graphopt` command line: run, inspect, passes, targets, zoo, compare.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error (a bug: please
report it; --debug shows the traceback).
"""

from __future__ import annotations

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


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="x86_64", show_default=True, help="Target to optimize for (see `graphopt targets`).")
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True, help="Optimization level.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model path [default: <name>.opt.onnx].")
@click.option("--passes", help="Comma-separated passes to run instead of the level's pipeline.")
@click.option("--disable", help="Comma-separated passes to leave out.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the result against the original in onnxruntime; exit 1 and write nothing if it moved.")
@click.option("--verify-each", is_flag=True, help="Check after every pass and roll back a pass that breaks equivalence.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="Inputs for verification (.npz keyed by input name).")
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--dump-ir", type=click.Path(file_okay=False), help="Write the model after each changing pass into this folder.")
@click.option("--fold-input-defaults", is_flag=True, help="Treat initializers that are also graph inputs as constants (they are overridable defaults).")
@click.option("--fold-size-limit", type=int, default=None, help="Largest folded constant in bytes (default 1 MiB).")
def run(model, target, opt_level, output, passes, disable, report_path, verify, verify_each, inputs_path, rtol, atol, dump_ir, fold_input_defaults, fold_size_limit):
    """Optimize MODEL (a file or zoo:NAME) for a target and write the result."""
    from graphopt import ir, targets
    from graphopt import verify as verify_mod
    from graphopt.optimize import optimize_model, resolve_source

    targets.get(target)  # fail fast on an unknown target, before any model work
    input_files: set[Path] = set()
    proto, path = resolve_source(model, input_files)
    name = Path(path).name if path else model[4:] + ".onnx"
    out = Path(output) if output else Path(Path(name).stem + ".opt.onnx")
    written = {"output": out, "output's external data": out.with_name(out.name + ".data")}
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
    # The reference for verification: the file itself when there is one, else an in-memory copy.
    reference = path if path is not None else _copy(proto)
    inputs = None
    if verify or verify_each:
        # From the proto in memory: reading the file again would load every weight twice.
        inputs = verify_mod.load_inputs(inputs_path, proto) if inputs_path else verify_mod.make_inputs(proto)
    options = {}
    if fold_size_limit is not None:
        options["fold_size_limit"] = fold_size_limit
    with console.status(f"optimizing {name} for {target} at -O{opt_level}", spinner="dots"):
        result, report = optimize_model(
            proto,
            target=target,
            opt_level=opt_level,
            passes=_names(passes),
            disabled=_names(disable),
            options=options,
            verify_each=verify_each,
            verify_inputs=inputs,
            dump_ir=dump_ir,
            fold_input_defaults=fold_input_defaults,
            source=model,
            reference=reference,
        )
    def check_fidelity(staged: Path) -> None:
        # Verification reads the staged file, so onnxruntime needs no serialized copy of the model,
        # and a failure abandons the write: nothing is left at the output path.
        if not verify:
            return
        with console.status("verifying against the original in onnxruntime", spinner="dots"):
            report.fidelity = verify_mod.compare(
                _run_original(reference, inputs, given=bool(inputs_path)), verify_mod.run(str(staged), inputs), rtol=rtol, atol=atol
            )
        if not report.fidelity.ok:
            worst = report.fidelity.worst()
            raise VerificationError(
                f"optimized model differs from the original: output '{worst.name}' max abs error "
                f"{worst.max_abs_error:.3g} (rtol {rtol}, atol {atol}); nothing written"
            )

    try:
        ir.save(result, out, validate=check_fidelity)
    except VerificationError:
        _finish_report(report, report_path)
        raise
    _finish_report(report, report_path)
    console.print(f"wrote [bold]{escape(str(out))}[/bold]")


def _run_original(reference, inputs, *, given: bool):
    """The original's outputs; when the original itself fails, say so (it is not our result failing)."""
    from graphopt import verify as verify_mod

    try:
        return verify_mod.run(reference, inputs)
    except GraphoptError as exc:
        origin = "the given" if given else "generated"
        raise GraphoptError(
            f"the original model fails in onnxruntime on {origin} inputs ({exc}); "
            "pass real inputs with --inputs FILE.npz or skip verification with --no-verify"
        ) from None


def _finish_report(report, report_path) -> None:
    _print_report(report)
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


def _print_report(report) -> None:
    b, a = report.before, report.after
    table = Table(title=f"{escape(report.source)} -> {report.target} (-O{report.opt_level})", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_row("nodes", str(b.nodes), str(a.nodes), _change(b.nodes, a.nodes))
    table.add_row("parameters", _human(b.parameters), _human(a.parameters), _change(b.parameters, a.parameters))
    # Unknown shapes (symbolic dims, shapes computed at run time) leave some nodes uncounted.
    def flops(stats) -> str:
        return _human(stats.flops) + ("" if stats.flops_exact else " (lower bound)")

    both_exact = a.flops_exact and b.flops_exact
    table.add_row("FLOPs", flops(b), flops(a), _change(b.flops, a.flops) if both_exact else "-")
    table.add_row("model size", _bytes(report.bytes_before), _bytes(report.bytes_after), _change(report.bytes_before, report.bytes_after))
    console.print(table)

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
    console.print(f"optimizer time: {report.seconds:.2f} s")
    for name, reason in report.rollbacks:
        err_console.print(f"[yellow]warning:[/yellow] pass '{name}' was rolled back: {escape(reason)}", highlight=False)
    if report.fidelity is not None:
        _print_fidelity(report.fidelity)


def _print_fidelity(fidelity) -> None:
    table = Table(title="fidelity vs the original (onnxruntime)", title_justify="left")
    for col in ("output", "max abs err", "max rel err", "cosine", "top-1", "ok"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for o in fidelity.outputs:
        top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement * 100:.1f}%"
        ok = "[green]yes[/green]" if o.within_tolerance else f"[red]no[/red] {escape(o.note or '')}"
        table.add_row(escape(o.name), f"{o.max_abs_error:.3g}", f"{o.max_rel_error:.3g}", f"{o.cosine_similarity:.6f}", top1, ok)
    console.print(table)


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(model, as_json):
    """Show MODEL's inputs, outputs, op histogram, parameters, FLOPs and bytes per op type."""
    from graphopt import ir
    from graphopt.analysis.cost import graph_cost
    from graphopt.analysis.stats import model_stats
    from graphopt.analysis.shapes import infer_shapes
    from graphopt.optimize import resolve_source

    proto, _ = resolve_source(model)
    size = ir.approx_nbytes(proto)
    m = ir.from_proto(proto)
    infer_shapes(m)
    stats = model_stats(m)
    cost = graph_cost(m.graph)
    data = {
        "model": model,
        "ir_version": m.ir_version,
        "opsets": m.opset_imports,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "bytes": size,
        "inputs": [_io(t) for t in m.graph.inputs],
        "outputs": [_io(t) for t in m.graph.outputs],
        "stats": stats.to_dict(),
        "ops": {op: {"count": v["count"], "flops": v["flops"], "bytes": v["bytes"]} for op, v in sorted(cost["by_op"].items(), key=lambda kv: -kv[1]["count"])},
    }
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    console.print(f"[bold]{escape(model)}[/bold]  IR {m.ir_version}, opsets {m.opset_imports}, {data['producer'] or 'unknown producer'}, {_bytes(size)}")
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "type", "shape"):
        io.add_column(col)
    for kind, items in (("input", data["inputs"]), ("output", data["outputs"])):
        for item in items:
            io.add_row(kind, escape(item["name"]), item["dtype"], escape(item["shape"]))
    console.print(io)
    ops = Table(title=f"{stats.nodes} nodes, {_human(stats.parameters)} parameters, {_human(stats.flops)} FLOPs", title_justify="left")
    for col in ("op", "count", "FLOPs", "bytes"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    for op, v in data["ops"].items():
        ops.add_row(escape(op), str(v["count"]), _human(v["flops"]), _bytes(v["bytes"]))
    console.print(ops)


def _io(tensor) -> dict:
    import numpy as np

    dtype = str(np.dtype(tensor.dtype)) if tensor.dtype is not None else "?"
    shape = "?" if tensor.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in tensor.shape) + "]"
    return {"name": tensor.name, "dtype": dtype, "shape": shape}


@cli.command("passes")
def list_passes():
    """List every registered pass with its description."""
    from graphopt.pass_manager import registered_passes
    from graphopt.pipelines import OPT_LEVELS, build_pipeline

    levels = {lvl: set(build_pipeline(lvl).pass_names()) for lvl in OPT_LEVELS}
    table = Table(title="passes", title_justify="left")
    for col in ("name", "from", "description"):
        table.add_column(col)
    for name, cls in registered_passes().items():
        first = next((f"-O{lvl}" for lvl in OPT_LEVELS if name in levels[lvl]), "opt-in")
        table.add_row(name, first, escape(cls.description))
    console.print(table)


@cli.command("targets")
def list_targets():
    """List the targets graphopt optimizes for."""
    from graphopt import targets

    table = Table(title="targets", title_justify="left")
    for col in ("name", "runtime", "max opset", "description"):
        table.add_column(col)
    for t in targets.available().values():
        table.add_row(t.name, t.runtime, str(t.max_opset), t.description)
    console.print(table)


@cli.command("zoo")
def list_zoo():
    """List the built-in models usable as zoo:NAME."""
    from graphopt import models

    table = Table(title="zoo", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name in models.available():
        table.add_row(f"zoo:{name}", escape(models.describe(name)))
    console.print(table)


@cli.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="Inputs (.npz keyed by input name).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True)
def compare(model_a, model_b, inputs_path, threads, runs, rtol, atol):
    """Compare B against A: output fidelity and onnxruntime latency of both."""
    from graphopt import verify
    from graphopt.optimize import resolve_source

    a, path_a = resolve_source(model_a)
    b, path_b = resolve_source(model_b)
    a_ref = path_a or a
    b_ref = path_b or b
    inputs = verify.load_inputs(inputs_path, a_ref) if inputs_path else verify.make_inputs(a_ref)
    with console.status("running both models in onnxruntime", spinner="dots"):
        fidelity = verify.compare(verify.run(a_ref, inputs, threads=threads), verify.run(b_ref, inputs, threads=threads), rtol=rtol, atol=atol)
        lat_a = verify.latency_ms(a_ref, inputs, threads=threads, runs=runs)
        lat_b = verify.latency_ms(b_ref, inputs, threads=threads, runs=runs)
    _print_fidelity(fidelity)
    table = Table(title=f"onnxruntime latency (median of {runs}, {threads} threads)", title_justify="left")
    for col in ("model", "nodes", "latency", "vs A"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(escape(model_a), str(len(a.graph.node)), f"{lat_a:.2f} ms", "1.00x")
    table.add_row(escape(model_b), str(len(b.graph.node)), f"{lat_b:.2f} ms", f"{lat_a / lat_b:.2f}x faster" if lat_b else "-")
    console.print(table)
    if not fidelity.ok:
        sys.exit(EXIT_VERIFICATION_FAILED)


def main() -> None:
    cli.main(prog_name="graphopt")


if __name__ == "__main__":
    main()
