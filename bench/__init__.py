"""Benchmarks: each `bench/bench_*.py` exposes `run() -> list[dict]`; `python -m bench` runs them all."""
