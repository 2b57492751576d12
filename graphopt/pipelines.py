"""Named pipelines: the passes each -O level runs, extended per target."""

from __future__ import annotations

from graphopt.pass_manager import FixedPoint, Sequential, create_pass, filter_pipeline

OPT_LEVELS = (0, 1, 2, 3)

# -O1 only removes what is provably dead or does nothing; -O2 also evaluates and merges;
# -O3 adds target-specific rewrites on top (fusion, layout, ... in later issues).
_LEVEL_PASSES: dict[int, list[str]] = {
    0: [],
    1: ["constant-to-initializer", "eliminate-noop", "dce"],
    2: [
        "constant-to-initializer",
        "fold-shapes",
        "fold-constants",
        "fuse-layernorm",
        "fold-conv-bn",
        "eliminate-noop",
        "merge-transpose",
        "merge-reshape",
        "cse",
        "dce",
    ],
}
_LEVEL_PASSES[3] = list(_LEVEL_PASSES[2])


def build_pipeline(level: int = 2, target=None, *, only: list[str] | None = None, disabled: list[str] | None = None) -> Sequential:
    """The pipeline for a level and target; `only` replaces it with the named passes (in that order)."""
    if only:
        pipeline = Sequential([create_pass(name) for name in only], name="custom")
    else:
        if level not in OPT_LEVELS:
            from graphopt.errors import GraphoptError

            raise GraphoptError(f"unknown optimization level -O{level}; use 0 to 3")
        names = list(_LEVEL_PASSES[level])
        if target is not None:
            for lvl in range(level + 1):
                names += list(target.extra_passes.get(lvl, ()))
        # Each pass exposes work for others (folding creates no-ops, no-op removal exposes
        # transposes to merge, ...), so the group runs to a fixed point.
        group = FixedPoint([create_pass(n) for n in names], max_iterations=10, name=f"O{level}")
        pipeline = Sequential([group] if names else [], name=f"O{level}")
    for name in disabled or ():
        create_pass(name)  # an unknown name is an error, not silently ignored
    return filter_pipeline(pipeline, set(disabled or ()))
