"""The benchmarks, one module each, run from the repository's root as ``.venv/bin/python -m bench.NAME``.

What they share is in :mod:`bench.harness`; docs/benchmarks.md gives every figure beside its command.
"""
