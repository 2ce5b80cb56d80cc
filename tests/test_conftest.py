"""The test command's own setup (tests/conftest.py): without xdist, pytest runs in one process (pyproject's
addopts used to pass xdist's -n, which made `pytest -p no:xdist` fail); the longest test files are collected
first."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pytest_runs_without_xdist():
    plain = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "tests/k2jax/test_quant.py", "-k",
                            "zero_blocks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert "1 passed" in plain.stdout and "workers" not in plain.stdout


def test_the_longest_files_are_collected_first():
    """pytest_collection_modifyitems: the files of conftest._LONGEST_FIRST lead, in its order (xdist's loadfile
    then starts them first), and every file's tests keep their order."""
    from tests import conftest
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    files = list(dict.fromkeys(i.split("::")[0] for i in ids))
    assert files[:len(conftest._LONGEST_FIRST)] == list(conftest._LONGEST_FIRST)
    assert len(files) > len(conftest._LONGEST_FIRST) + 20
    train = [i for i in ids if i.startswith("tests/k2jax/training/test_train.py")]
    assert train[0].endswith("test_the_loss_falls_and_checkpoints_are_kept")  # the file's own first test
