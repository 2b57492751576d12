"""The pass library. Importing it registers every pass; a module holds passes and nothing else."""

from graphopt.passes import cleanup, fold, fusion, lowrank, nm_sparsity, quantize, sparsity  # noqa: F401
