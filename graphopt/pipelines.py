"""Named pipelines: the passes each -O level runs, extended by plugins and per target.

A pass's `opt_level` decides the levels: it runs in the default pipeline of -O`opt_level` and
above, and `None` means opt-in (only when named in --passes). The order is fixed here: the
built-in passes in the order below, a pass from a plugin or package just before the trailing
cleanup or right after the pass its `run_after` names.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.errors import GraphoptError
from graphopt.pass_manager import FixedPoint, Sequential, create_pass, filter_pipeline, pass_source, registered_passes

OPT_LEVELS = (0, 1, 2, 3)

# Every built-in pass of the default pipelines, in the order they run; each level runs those whose
# opt_level it reaches, so -O1 (opt_level 1) only removes what is provably dead or does nothing,
# -O2 also evaluates, merges and fuses into standard ONNX ops (portable to any runtime), and -O3
# adds the fused ops of the target's runtime (onnxruntime's com.microsoft kernels, where it has them).
_LEVEL_PASSES: dict[int, list[str]] = {
    2: [
        "constant-to-initializer",
        "fold-shapes",
        "fold-constants",
        "fuse-layernorm",
        "fuse-activations",
        "fuse-activations-contrib",
        "fold-conv-bn",
        "fold-conv-affine",
        "fold-pad-into-conv",
        "flush-subnormal-weights",
        "fuse-conv-add-activation",
        "eliminate-noop",
        "merge-transpose",
        "merge-reshape",
        "merge-slice",
        "merge-concat",
        "fold-scale-into-weights",
        "fuse-gemm",
        "fuse-attention",
        "cse",
        "dce",
    ],
}

# The passes that end the group and sweep up after the others; a plugin pass goes before them so
# that what it leaves dead is removed in the same iteration.
CLEANUP_PASSES = ("cse", "dce")
# What a custom pipeline (--passes) ends with unless told not to: a pass that replaces uses leaves
# its old nodes dead, and removing them is what a user expects.
CUSTOM_CLEANUP = "dce"


def default_order() -> list[str]:
    """Every pass that some default pipeline runs, in pipeline order (levels filter it)."""
    passes = registered_passes()
    order = list(_LEVEL_PASSES[2])
    for name in order:
        if name not in passes or passes[name].opt_level is None:
            raise TypeError(f"built-in pass '{name}' is in the default pipeline order but is not registered with an opt_level")
    extra = [name for name, cls in passes.items() if name not in order and cls.opt_level is not None]
    slot = len(order)
    while slot > 0 and order[slot - 1] in CLEANUP_PASSES:
        slot -= 1
    unplaced = [name for name in extra if passes[name].run_after is not None]
    order[slot:slot] = [name for name in extra if passes[name].run_after is None]
    # Anchors may be passes placed in this loop (a plugin pass after another plugin's pass).
    while unplaced:
        ready = [name for name in unplaced if passes[name].run_after in order]
        if not ready:
            # The root cause: a pass whose anchor is not itself waiting to be placed, if any.
            name = next((n for n in unplaced if passes[n].run_after not in unplaced), unplaced[0])
            anchor = passes[name].run_after
            if anchor not in passes:
                why = "is not a registered pass"
            elif passes[anchor].opt_level is None:
                why = "is opt-in, so no default pipeline runs it"
            else:
                why = "is itself placed after this pass (a run_after cycle)"
            raise GraphoptError(f"pass '{name}' ({pass_source(name)}) has run_after = '{anchor}', which {why}")
        # Reversed: passes after the same anchor then keep their (sorted) order.
        for name in reversed(ready):
            order.insert(order.index(passes[name].run_after) + 1, name)
            unplaced.remove(name)
    return order


def level_passes(level: int, target=None) -> list[str]:
    """The names the default pipeline of -O`level` runs, in order."""
    if level not in OPT_LEVELS:
        raise GraphoptError(f"unknown optimization level -O{level}; use 0 to 3")
    passes = registered_passes()
    names = [name for name in default_order() if passes[name].opt_level <= level]
    if target is not None:
        # Before the trailing cleanup, like a plugin's pass: what they rewrite gets cleaned up too.
        slot = len(names)
        while slot > 0 and names[slot - 1] in CLEANUP_PASSES:
            slot -= 1
        extra = [name for lvl in range(level + 1) for name in target.extra_passes.get(lvl, ())]
        names[slot:slot] = extra
    return names


def build_pipeline(
    level: int = 2,
    target=None,
    *,
    only: list[str] | None = None,
    disabled: list[str] | None = None,
    cleanup: bool = True,
) -> Sequential:
    """The pipeline for a level and target; `only` replaces it with the named passes (in that order),
    followed by dce unless `cleanup` is False or dce already ends it."""
    if only:
        names = list(only)
        if cleanup and names[-1] != CUSTOM_CLEANUP:
            names.append(CUSTOM_CLEANUP)
        pipeline = Sequential([create_pass(name) for name in names], name="custom")
    else:
        names = level_passes(level, target)
        # Each pass exposes work for others (folding creates no-ops, no-op removal exposes
        # transposes to merge, ...), so the group runs to a fixed point.
        group = FixedPoint([create_pass(n) for n in names], max_iterations=10, name=f"O{level}")
        pipeline = Sequential([group] if names else [], name=f"O{level}")
    for name in disabled or ():
        create_pass(name)  # an unknown name is an error, not silently ignored
    return filter_pipeline(pipeline, set(disabled or ()))


@dataclass(frozen=True)
class PassInfo:
    name: str
    description: str
    # The lowest level whose default pipeline runs the pass ("-O2"), or "opt-in".
    level: str
    # "built-in", "plugin FILE_OR_MODULE" or "package DISTRIBUTION".
    source: str


def describe_passes() -> dict[str, PassInfo]:
    """Every registered pass by name, with its level and where it came from."""
    default_order()  # a plugin pass that cannot be placed is reported here too, not only at run time
    return {
        name: PassInfo(
            name,
            cls.description,
            "opt-in" if cls.opt_level is None else f"-O{cls.opt_level}",
            pass_source(name),
        )
        for name, cls in registered_passes().items()
    }
