"""Benchmarks: scripts that print measured numbers and ratios against a baseline run in
the same process. Never timed unit tests."""
