"""Benchmarks at scale: a bulk loader and ``saju-billing bench scale``. Benchmarks are never tests."""
