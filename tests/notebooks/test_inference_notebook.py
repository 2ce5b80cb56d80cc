"""notebooks/inference.ipynb runs top to bottom (it builds and converts a tiny release when K2_RELEASE is unset, and
deletes it at the end) with the FP8 checkpoint's routed experts FP8-resident (K2_WEIGHTS=dequantized: bf16); half
its settings is one clear error."""

import os

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kernel_env(monkeypatch, tmp_path):
    # the kernel is a fresh process: give it the same 8 fake CPU devices as the tests, and its own temp dir
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def _outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_inference_notebook_runs(monkeypatch, tmp_path):
    for var in ("K2_RELEASE", "K2_CHECKPOINT", "K2_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    _kernel_env(monkeypatch, tmp_path)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inference.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "expert" in _outputs(code[1]) and "'expert'" in _outputs(code[1])  # experts sharded over the expert axis
    # the FP8 checkpoint loaded FP8-resident (and chatted and generated below)
    assert ("fp8 checkpoint, weights='fp8': routed experts float8_e4m3fn with float32 block scales, other weights "
            "bfloat16") in _outputs(code[1]), _outputs(code[1])
    assert all(not any(o.get("output_type") == "error" for o in c.get("outputs", [])) for c in nb.cells)
    generated = _outputs(code[-2])
    assert "finish_reason" not in generated and generated.count("Sampling(") == 4
    assert not [p for p in os.listdir(tmp_path) if p.startswith("k2jax-notebook-")]  # 4.5 MB were left per run


def test_a_release_without_a_checkpoint_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("K2_RELEASE", str(tmp_path))
    monkeypatch.delenv("K2_CHECKPOINT", raising=False)
    _kernel_env(monkeypatch, tmp_path)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inference.ipynb"), as_version=4)
    nb.cells = nb.cells[:2]  # the settings cell
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for o in nb.cells[1].outputs if o.get("output_type") == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "SystemExit", nb.cells[1].outputs
    assert errors[0]["evalue"].startswith("set both K2_RELEASE (the release directory, for its tokenizer) and "
                                          "K2_CHECKPOINT")
    assert f"K2_RELEASE={str(tmp_path)!r}, K2_CHECKPOINT=None" in errors[0]["evalue"]


def test_one_device_sharding_cell_says_why_every_axis_is_none(monkeypatch, tmp_path):
    # the settings, load and clean-up cells only (no generation), on a kernel with a single CPU device; and the
    # K2_WEIGHTS override: the FP8 checkpoint dequantised to bf16
    for var in ("K2_RELEASE", "K2_CHECKPOINT", "K2_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    _kernel_env(monkeypatch, tmp_path)
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=1")
    monkeypatch.setenv("K2_WEIGHTS", "dequantized")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inference.ipynb"), as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    nb.cells = [code[0], code[1], code[-1]]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    shown = _outputs(nb.cells[1])
    assert "on mesh {'fsdp': 1, 'expert': 1}" in shown, shown
    assert "routed experts: P(None, None, None, None) (one device: nothing to split" in shown, shown
    assert "fp8 checkpoint, weights='dequantized': routed experts bfloat16, other weights bfloat16" in shown, shown
    assert not [p for p in os.listdir(tmp_path) if p.startswith("k2jax-notebook-")]
