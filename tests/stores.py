"""Random embedding stores for scoring tests (shared with the benchmarks: `benchmarks/synthetic.py`), and the
scoring backends installed here."""

import importlib.util

from benchmarks.synthetic import random_labels, random_store, write_store

# Found, not imported: a plain `import faiss` would load FAISS's OpenBLAS on its fall-back kernels for the whole
# session, where the scoring's `import_faiss` chooses current ones (the two differ in the last bits).
BACKENDS = ["torch", "faiss"] if importlib.util.find_spec("faiss") else ["torch"]

__all__ = ["BACKENDS", "random_labels", "random_store", "write_store"]
