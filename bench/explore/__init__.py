"""Exploratory benchmarks: questions asked once (their answers are in docs/benchmarks.md); not part of `make bench`."""
