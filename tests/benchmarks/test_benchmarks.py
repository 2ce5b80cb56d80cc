"""The benchmark scripts run end to end, as a user runs them (`python benchmarks/X.py`), at their smallest sizes.

Only that they run and print their comparison: the figures themselves are not asserted (machines are noisy).
optimizer.py and parallel.py take a minute or more even at their smallest and are left to their users.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *flags):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *flags], cwd="/",
                            capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script,flags,expect", [
    # run from another directory, with transformers importing: benchmarks/kernels.py once shadowed the `kernels`
    # package transformers probes for, and the script died on a duplicate flag
    pytest.param("forward_vs_torch.py", ["--batch=1", "--seq_len=16", "--iters=1"],
                 ["k2jax / transformers =", "roofline"], marks=pytest.mark.slow),  # ~70 s: the 20-minute suite
    ("decode.py", ["--batch=1", "--context=32", "--iters=1", "--new_tokens=4"],
     ["ratio latent / full", "ratio FP8 experts / fp32", "ratio device loop / host loop"]),
    ("kernels.py", ["--smoke", "--iters=1"], ["dequantise+ragged_dot / pallas"]),
    ("convert.py", ["--experts=1", "--dtype=fp8"], ["/ raw read from disk:", "peak RSS"]),
])
def test_benchmark_runs_and_prints_its_comparison(script, flags, expect):
    out = _run(script, *flags)
    for text in expect:
        assert text in out, out
