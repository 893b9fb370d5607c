"""Benchmarks: each runs standalone (`python benchmarks/NAME.py --quick --json`) against a baseline."""
