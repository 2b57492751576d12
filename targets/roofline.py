"""The roofline plot of `graphopt inspect --target T --plot FILE`: each op class against the target's roofline.

x is arithmetic intensity (FLOPs per byte moved), y the FLOP rate the cost model predicts the class
reaches (its FLOPs over its predicted time); the roof is min(peak, bandwidth x intensity) for
each dtype the model computes in, at the threads the model was estimated for. A point's area is
its share of the predicted time, so the biggest points are where the time goes, and their
distance below the roof is what the target leaves unused there. Classes that do no arithmetic
(data movement, views) have no place on a FLOP axis: the legend lists their share of the time.
"""

from __future__ import annotations

import os

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.targets.cost import CostModel, GraphEstimate


def plot(estimate: GraphEstimate, model: CostModel, path: str | os.PathLike, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed, or wanted in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise GraphoptError("--plot needs matplotlib (pip install matplotlib)") from None

    total = estimate.seconds or 1.0
    classes: dict[str, dict] = {}
    for n in estimate.nodes:
        c = classes.setdefault(n.op_class, {"flops": 0, "bytes": 0, "seconds": 0.0, "dtypes": set()})
        c["flops"] += n.flops
        c["bytes"] += n.bytes
        c["seconds"] += n.seconds
        if n.flops:
            c["dtypes"].add(n.dtype)
    plotted = {k: v for k, v in classes.items() if v["flops"] and v["bytes"] and v["seconds"]}
    unplotted = {k: v for k, v in classes.items() if k not in plotted and v["seconds"]}

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    intensities = [v["flops"] / v["bytes"] for v in plotted.values()] or [1.0]
    lo, hi = min(intensities + [0.1]) / 4, max(intensities + [1000.0]) * 4
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    bandwidth = model.hardware.memory_bandwidth_gbs * 1e9
    dtypes = sorted({d for v in plotted.values() for d in v["dtypes"]} or {"fp32"})
    for i, dtype in enumerate(dtypes):
        peak = model.peak(dtype)
        ax.plot(x, np.minimum(peak, bandwidth * x) / 1e9, color=f"C{i}", lw=2,
                label=f"roofline {dtype}: {peak / 1e9:,.0f} GFLOP/s, {bandwidth / 1e9:,.0f} GB/s")
        ridge = peak / bandwidth
        ax.axvline(ridge, color=f"C{i}", ls=":", lw=1)
        ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak / 1e9), textcoords="offset points", xytext=(4, -14), fontsize=8, color=f"C{i}")
    for name, v in sorted(plotted.items(), key=lambda kv: -kv[1]["seconds"]):
        intensity = v["flops"] / v["bytes"]
        rate = v["flops"] / v["seconds"] / 1e9
        share = v["seconds"] / total
        ax.scatter([intensity], [rate], s=40 + 2000 * share, alpha=0.6, edgecolors="black")
        ax.annotate(f"{name} {share:.0%}", (intensity, rate), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("predicted GFLOP/s")
    ax.set_xlim(lo, hi)
    ax.grid(True, which="both", alpha=0.25)
    roof = estimate.roofline_seconds
    ax.set_title(f"{title}\npredicted {total * 1e3:.2f} ms, {total / roof:.1f}x its roofline ({roof * 1e3:.2f} ms); "
                 f"point area = share of time", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if unplotted:
        note = ", ".join(f"{k} {v['seconds'] / total:.0%}" for k, v in sorted(unplotted.items(), key=lambda kv: -kv[1]["seconds"]))
        handles.append(plt.Line2D([], [], ls="none"))
        labels.append(f"no FLOPs, not plotted: {note}")
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    calibrated = model.calibrated if len(model.calibrated) < 110 else model.calibrated[:107] + "..."
    fig.text(0.01, 0.01, f"{model.target.full_name}, {model.threads} threads, {calibrated}", fontsize=7, alpha=0.7)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise GraphoptError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
