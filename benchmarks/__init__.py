"""Benchmarks: each prints a table of ratios measured in one run (logs and commands: docs/scoring.md, docs/embedding.md, docs/scaling.md, docs/faults.md)."""
