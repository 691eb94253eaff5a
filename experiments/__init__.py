"""Runnable experiments and benchmarks: python -m experiments.NAME."""
