"""Print the real-model tier as a table: every model through -O3, nodes before/after, worst error.

    python -m tests.real_models.table                    # x86_64
    python -m tests.real_models.table --target all       # x86_64, arm64 and cuda
    python -m tests.real_models.table --models magika,silero_vad --json out.json

Exit code 0 when every available model is valid and within its tolerance, 1 otherwise. Models whose
package is missing are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import harness, zoo


def _fmt_error(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return "0" if x == 0 else f"{x:.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.real_models.table", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86_64", help="x86_64, arm64, cuda or all")
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    targets = list(harness.TARGETS) if args.target == "all" else [args.target]
    names = [n for n in args.models.split(",") if n] or zoo.names()
    unknown = [n for n in names if n not in zoo.ENTRIES]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(zoo.names())}")

    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR  # gs's "[W] colored module is not installed" and the like
    console = Console()
    table = Table(title=f"graphopt -O3, real models ({', '.join(targets)})")
    for column, justify in (
        ("model", "left"), ("exporter", "left"), ("opset", "left"), ("target", "left"), ("nodes before", "right"),
        ("nodes after", "right"), ("removed", "right"), ("worst rel err", "right"), ("worst output", "left"),
        ("tolerance", "left"), ("O3 s", "right"), ("status", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")

    rows, skipped, failures = [], [], 0
    for name in names:
        entry = zoo.ENTRIES[name]
        missing = entry.available()
        if missing:
            skipped.append(missing)
            rows.append({"model": name, "exporter": entry.exporter, "skipped": missing})
            continue
        for target in targets:
            start = time.perf_counter()
            try:
                outcome = harness.evaluate(name, target)
            except Exception as exc:  # noqa: BLE001 - a crash is a result to show, not a reason to stop
                failures += 1
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                table.add_row(name, entry.exporter, "", target, "", "", "", "", "", "", f"{time.perf_counter() - start:.2f}", f"[red]CRASH {escape(message)}")
                rows.append({"model": name, "exporter": entry.exporter, "target": target, "crash": message})
                continue
            worst = outcome.worst()
            status = "ok"
            if outcome.checker_error:
                status = f"[red]checker: {escape(outcome.checker_error[:120])}"
            elif not outcome.ok:
                status = "[red]outside tolerance"
            failures += not outcome.ok
            removed = outcome.nodes_before - outcome.nodes_after
            table.add_row(
                name, outcome.exporter, outcome.opset, target, str(outcome.nodes_before), str(outcome.nodes_after),
                f"{removed} ({100 * removed / max(outcome.nodes_before, 1):.0f}%)", _fmt_error(worst.max_rel_error), escape(worst.name),
                f"{entry.rtol:g}/{entry.atol:g}", f"{outcome.seconds:.2f}", status,
            )
            rows.append({
                "model": name, "exporter": outcome.exporter, "opset": outcome.opset, "target": target,
                "nodes_before": outcome.nodes_before, "nodes_after": outcome.nodes_after,
                "worst_rel_error": worst.max_rel_error if math.isfinite(worst.max_rel_error) else str(worst.max_rel_error),
                "worst_abs_error": worst.max_abs_error if math.isfinite(worst.max_abs_error) else str(worst.max_abs_error),
                "worst_output": worst.name, "rtol": entry.rtol, "atol": entry.atol, "seconds": round(outcome.seconds, 3),
                "ok": outcome.ok, "checker_error": outcome.checker_error,
            })
    console.print(table)
    for reason in skipped:
        console.print(f"skipped: {reason}", markup=False, highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
