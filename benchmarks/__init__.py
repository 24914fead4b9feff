"""Benchmarks against other libraries, run as modules from the repository root: `python -m benchmarks.NAME`."""
