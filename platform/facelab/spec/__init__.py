"""Sweep and job specifications: loading, ``--set`` overrides and whole-sweep validation."""
