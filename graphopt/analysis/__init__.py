"""Analyses passes ask for through the PassContext; cached until a pass invalidates them."""
