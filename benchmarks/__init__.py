"""Benchmarks: `make bench` runs them into benchmarks/results/ and docs/BENCHMARKS.md."""
