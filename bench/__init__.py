"""Benchmarks and the synthetic registry generator (``python -m bench``)."""
