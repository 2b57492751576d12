"""The pass library. Importing it registers every pass; a module holds passes and nothing else."""

from graphopt.passes import cleanup, fold, fusion, lowrank, quantize, sparsity  # noqa: F401
