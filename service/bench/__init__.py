"""Benchmarks at scale: a bulk loader and ``saju-billing bench scale``. Never tests."""
