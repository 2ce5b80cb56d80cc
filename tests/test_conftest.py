"""The test command's own setup (tests/conftest.py): without xdist, pytest runs in one process (pyproject's
addopts used to pass xdist's -n, which made `pytest -p no:xdist` fail)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pytest_runs_without_xdist():
    plain = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "tests/k2jax/formats/test_quant.py", "-k",
                            "zero_blocks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert "1 passed" in plain.stdout and "workers" not in plain.stdout
