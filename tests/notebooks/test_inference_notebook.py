"""notebooks/inference.ipynb runs top to bottom (it builds and converts a tiny release when K2_RELEASE is unset)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_inference_notebook_runs(monkeypatch):
    for var in ("K2_RELEASE", "K2_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    # the kernel is a fresh process: give it the same 8 fake CPU devices as the tests
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inference.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in nb.cells if cell.cell_type == "code"]
    assert "expert" in outputs[1] and "'expert'" in outputs[1]  # experts sharded over the expert axis
    assert all(not any(o.get("output_type") == "error" for o in c.get("outputs", [])) for c in nb.cells)
    assert "finish_reason" not in outputs[-1] and outputs[-1].count("Sampling(") == 4
