"""Tuning tools for the kernels' launch configurations, run as `python -m benchmarks.tuning.<kernel>` from the
repository root on a GPU machine (docs/benchmarks.md has the commands and what they printed)."""
