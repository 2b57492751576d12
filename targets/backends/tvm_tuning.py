"""graphopt tune: MetaSchedule tuning for the TVM backend, with the workarounds TVM 0.27 from PyPI
needs here (../shared/notes/tvm-0.27.md), into a database that `run --backend tvm --db DIR` applies.

* The runner's workers ask `tvm.runtime.device("llvm")`, which 0.27 does not know ("Unknown
  device"): every measurement failed silently and the database stayed empty. `_cpu_device_alias`,
  run in each runner worker, maps the target kind names to their devices.
* The default builder imports tvm.s_tir.tensor_intrin in every worker (20-25 s per batch);
  `_build` skips it (the tensor intrinsics serve GPU and VNNI tensorization rules, registered
  where the schedule rules need them) and builds a batch in about 2 s.
* Tasks the database already holds are not tuned again: a second model with the same workloads
  (ResNet-18's and ResNet-50's 3x3 convolutions) reuses them.
* Convolutions are searched in graphopt's written space (tvm_schedules: a direct-convolution
  structure with only its tile sizes sampled, in float32 or, with VNNI, in integers); the rest in
  MetaSchedule's generic one. The database holds both kinds of trace alike, and applying it
  replays them without tuning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.targets.backends import tvm_schedules


def _runner_worker_setup() -> None:
    """Run in each runner worker before it measures: the device alias below, and the thread pool
    on every physical core, as the compiled model runs (graphopt.runtime.use_physical_cores):
    TVM's default of half the logical CPUs measured every candidate on one core of two here."""
    from graphopt import runtime

    runtime.use_physical_cores()
    _cpu_device_alias()


def _cpu_device_alias() -> None:
    import tvm

    original = tvm.runtime.device

    def device(kind, index=0):
        return original({"llvm": "cpu", "c": "cpu"}.get(kind, kind) if isinstance(kind, str) else kind, index)

    tvm.runtime.device = device


def _build(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


# A task with under this share of the model's FLOPs (weighted by how often it runs) is small.
SMALL_TASK_SHARE = 0.02
SMALL_TASK_TRIALS = 8
MAX_BATCH = 64
WRITTEN_SPACE_POPULATION = 96


def _split_by_work(tasks) -> tuple[list, list]:
    """(small, large) tasks by their share of the FLOPs, each list in the given order."""
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = [estimate_tir_flops(t.dispatched[0]) * t.weight for t in tasks]
    total = sum(flops) or 1.0
    small = [t for t, f in zip(tasks, flops) if f < SMALL_TASK_SHARE * total]
    return small, [t for t, f in zip(tasks, flops) if f >= SMALL_TASK_SHARE * total]


def tune(proto, target, db: str | Path, trials: int, progress=None) -> dict:
    """Tunes the model's tasks missing from the database at `db` with about `trials` measured
    candidates in all (at least 8 per task); {"tasks", "tuned_tasks", "reused_tasks", "trials"}."""
    from graphopt.targets.backends import tvm as tvm_backend

    tvm = tvm_backend.import_tvm()
    import tvm.s_tir.meta_schedule as ms

    tvm_tgt = tvm.target.Target(tvm_backend.tvm_target(target))
    mod = tvm_backend.tuning_module(proto, tvm_tgt)
    db = Path(db)
    db.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(db))
    tasks = ms.relax_integration.extract_tasks(mod, tvm_tgt)
    missing = [t for t in tasks if not database.has_workload(t.dispatched[0])]
    record = {"tasks": len(tasks), "tuned_tasks": len(missing), "reused_tasks": len(tasks) - len(missing), "trials": 0,
              "written_space_tasks": 0}
    if not missing or trials <= 0:
        return record
    cores = os.cpu_count() or 1
    counter = _trial_counter(progress)
    small, large = _split_by_work(missing)
    # The small tasks (reshapes, pooling, the classifier) first, a few candidates each: every task
    # needs a schedule, and a trial there buys next to nothing. The rest goes to the large ones,
    # in batches of up to 64 (the evolutionary search costs about as much per batch as 64
    # measurements here, so small batches spend the budget searching).
    # tune_tasks stops when its budget is spent, tasks not yet reached left unscheduled: each
    # group gets at least one batch per task, so the total may exceed a very small --trials.
    small_trials = SMALL_TASK_TRIALS * len(small)
    large_trials = max(trials - small_trials, SMALL_TASK_TRIALS * len(large))
    for group, budget in ((small, small_trials), (large, large_trials)):
        if not group:
            continue
        contexts, written = _tune_contexts(group, db, cores)
        record["written_space_tasks"] += written
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=[t.weight for t in group],
            work_dir=str(db),
            max_trials_global=budget,
            num_trials_per_iter=min(MAX_BATCH, max(SMALL_TASK_TRIALS, budget // len(group))),
            builder=ms.builder.LocalBuilder(f_build=_build, max_workers=cores),
            runner=ms.runner.LocalRunner(initializer=_runner_worker_setup),
            database=database,
            measure_callbacks=[*ms.MeasureCallback.create("default"), counter],
        )
    record["trials"], record["failed_trials"] = counter.done, counter.failed
    if counter.done and counter.failed == counter.done:
        raise GraphoptError(f"every one of the {counter.done} tuning measurements failed; the database at {db} holds no tuned schedule")
    return record


def _tune_contexts(tasks, db: Path, cores: int) -> tuple[list, int]:
    """(a TuneContext per task, how many use a written space): graphopt's written space where it
    has one for the kernel (tvm_schedules), MetaSchedule's generic space otherwise."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    contexts, written = [], 0
    for task, rand_state in zip(tasks, fork_seed(0, n=len(tasks))):
        logger = _task_logger(db, task.task_name)
        space = tvm_schedules.space_for(task.dispatched[0], task.target)
        written += space is not None
        # A written space holds a few hundred points: a small population finds its best as well,
        # and the search no longer costs more than the measurements of each batch.
        search = ms.search_strategy.EvolutionarySearch(population_size=WRITTEN_SPACE_POPULATION, init_min_unmeasured=16,
                                                       genetic_num_iters=2) if space is not None else "evolutionary"
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=space or "post-order-apply", search_strategy=search,
                                       task_name=task.task_name, logger=logger, rand_state=rand_state, num_threads=cores).clone())
    return contexts, written


def _task_logger(db: Path, task_name: str) -> logging.Logger:
    """A logger writing the task's search log to DIR/logs/TASK.log, printing nothing. Not TVM's
    get_loggers_from_work_dir: its logging config takes every handler of its global logger by name,
    and a second call in one process fails on an unnamed one (pytest's, a user's)."""
    log_dir = Path(db) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{task_name[:100]}.log"
    logger = logging.getLogger(f"graphopt.tune.{path}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


def _trial_counter(progress):
    """A measure callback counting measured candidates, calling progress(count) after each batch."""
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class TrialCounter(PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.failed = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.done += len(runner_results)
            self.failed += sum(1 for r in runner_results if r.error_msg)
            if progress is not None:
                progress(self.done)

    return TrialCounter()
