"""Random embedding stores for scoring tests (shared with the benchmarks: `benchmarks/synthetic.py`)."""

from benchmarks.synthetic import random_labels, random_store, write_store

__all__ = ["random_labels", "random_store", "write_store"]
