"""Imported first by every benchmark script (`import _repo_root`, found next to the script): the repo root replaces
the script's own directory at the head of sys.path, so `benchmarks`, `k2jax` and `tests` import from any working
directory, and benchmarks/kernels.py cannot shadow the `kernels` package that transformers probes for."""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
