"""Benchmarks of audiomae: one harness (:mod:`benchmarks.harness`), one module per op family, one
entry point (``python -m benchmarks.run``). See ``benchmarks/README.md``."""
