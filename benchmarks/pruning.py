"""Channel pruning against fp32 in one run: FLOPs, parameters, onnxruntime latency (variants
interleaved in a shuffled order each round, medians as ratios, bench.py's `_latency`) and, for the
trained digits_cnn, held-out accuracy; each budget alone and combined with graphopt's INT8.

    python benchmarks/pruning.py --models digits_cnn,resnet18,mobilenetv2 --budgets 0.3,0.5 --rounds 30

digits_cnn is calibrated on its training split and scored on the held-out test split; the other zoo
models have random weights, so they get random calibration data and no accuracy column (their
pruning is searched on output error all the same).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from graphopt import calibration, export, models, verify  # noqa: E402
from graphopt.optimize import optimize_model  # noqa: E402


def _data(name: str, fp32: onnx.ModelProto):
    """(calibration data, held-out (x, y) or None)."""
    if name == "digits_cnn":
        from graphopt.models.digits import _split

        x_train, x_test, _, y_test = _split()
        return calibration.from_arrays({"input": x_train[:512]}, fp32, batch_size=64), (x_test, y_test)
    return calibration.random_data(fp32, 8), None


def _weight_flops(proto: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, weight FLOPs per sample as prune-channels counts them)."""
    from graphopt import loading
    from graphopt.analysis import shapes
    from graphopt.passes.sparsity import _flops

    model = loading.from_proto(proto)
    shapes.infer_shapes(model)
    return sum(int(np.prod(i.dims)) for i in proto.graph.initializer), sum(_flops(n) for n in model.graph.nodes)


def bench_model(name: str, budgets: list[float], rounds: int, work: Path) -> list[dict]:
    from benchmarks.bench import _latency

    base, _ = optimize_model(models.load(name), opt_level=2)
    fp32 = export.to_proto(base)
    data, held_out = _data(name, fp32)
    paths = {"original": work / f"{name}.fp32.onnx"}
    export.save(base, paths["original"])
    for budget in budgets:
        for int8 in (False, True):
            copy = onnx.ModelProto()
            copy.CopyFrom(fp32)
            label = f"pruned {budget:.0%}" + (" + int8" if int8 else "")
            model, _ = optimize_model(copy, opt_level=2, calibration_data=data, quantize="int8" if int8 else None,
                                      options={"prune": f"flops={budget}", "quantize_gate": False})
            paths[label] = work / f"{name}.{label.replace(' ', '_').replace('%', '')}.onnx"
            export.save(model, paths[label])
    feeds = verify.make_inputs(fp32) if held_out is None else {"input": held_out[0][:1]}
    settings = argparse.Namespace(threads=os.cpu_count() or 1, warmup=2, runs=rounds, max_runs=rounds, min_time_s=0.0)
    lat, _ = _latency({k: str(v) for k, v in paths.items()}, feeds, settings, shuffle=random.Random(0))
    base_params, base_flops = _weight_flops(fp32)
    rows = []
    for label, path in paths.items():
        proto = onnx.load(str(path))
        params, flops = _weight_flops(proto)
        row = {"model": name, "variant": "fp32" if label == "original" else label, "params": params / base_params, "flops": flops / base_flops,
               "latency": lat[label]["ms"] / lat["original"]["ms"], "min_ratio": lat[label]["min_ms"] / lat["original"]["min_ms"]}
        if held_out is not None:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            row["accuracy"] = float((session.run(None, {"input": held_out[0]})[0].argmax(axis=1) == held_out[1]).mean())
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits_cnn,resnet18,mobilenetv2")
    parser.add_argument("--budgets", default="0.3,0.5")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    print(f"{'model':12s} {'variant':20s} {'params':>7s} {'FLOPs':>7s} {'latency':>8s} {'min':>6s} {'accuracy':>9s}")
    with tempfile.TemporaryDirectory(prefix="graphopt-prune-bench-") as tmp:
        for name in args.models.split(","):
            for r in bench_model(name.strip(), budgets, args.rounds, Path(tmp)):
                acc = f"{r['accuracy']:.2%}" if "accuracy" in r else ""
                flops = f"{r['flops']:6.2f}x" if r["flops"] else "    n/a"  # INT8 weights are DequantizeLinear outputs, not counted
                print(f"{r['model']:12s} {r['variant']:20s} {r['params']:6.2f}x {flops} {r['latency']:7.2f}x {r['min_ratio']:5.2f}x {acc:>9s}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
