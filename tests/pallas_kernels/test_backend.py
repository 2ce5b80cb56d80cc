"""The one backend rule: concrete names only (no "auto"), "pallas" only for a TPU or GPU named by the caller (never
read from the mesh or the host), the launch form of an interpreted run, launch settings from a kernel's table, the
launch options per backend, and row padding. (Where the platform comes from: tests/k2jax/model/test_target.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as kb
from tests.compile_targets import tpu_mesh


def test_names_are_checked_and_auto_is_refused():
    assert kb.check("k", "xla", None) == "xla" and kb.check("k", "interpret", "cpu") == "interpret"
    assert kb.check("k", "pallas", "tpu") == "pallas" and kb.check("k", "pallas", "gpu") == "pallas"
    for backend in ("auto", "triton"):
        with pytest.raises(ValueError, match=r"^k: backend must be one of \('xla', 'pallas', 'interpret'\)"):
            kb.check("k", backend, "tpu")
    for platform in ("auto", "cuda", "metal"):
        with pytest.raises(ValueError, match="k: platform must be one of"):
            kb.check("k", "xla", platform)


def test_pallas_needs_a_named_tpu_or_gpu_and_never_reads_the_mesh():
    for platform in (None, "cpu"):
        with pytest.raises(ValueError, match="k: backend='pallas' needs platform='tpu' or 'gpu'") as e:
            kb.check("k", "pallas", platform)
        assert "\n" not in str(e.value)
    with jax.set_mesh(tpu_mesh({"x": 1})), pytest.raises(ValueError, match="needs platform"):
        kb.check("k", "pallas", None)


def test_launch_form():
    assert kb.launch_form("pallas", "tpu") == "tpu" and kb.launch_form("pallas", "gpu") == "gpu"
    assert kb.launch_form("interpret", "tpu") == "tpu"
    assert [kb.launch_form("interpret", p) for p in (None, "cpu", "gpu")] == ["gpu"] * 3
    for backend, platform in (("pallas", "cpu"), ("pallas", None), ("xla", "tpu")):
        with pytest.raises(ValueError, match="a Pallas launch needs"):
            kb.launch_form(backend, platform)


def test_launch_settings_given_then_table_then_defaults():
    table = {("gpu", "bfloat16"): {"block": 64, "warps": 8}, ("tpu", "float32"): {"block": 256}}
    defaults = {"block": 128, "warps": 4, "stages": 2}
    assert kb.launch_settings(table, defaults, "pallas", "gpu", jnp.bfloat16) == {"block": 64, "warps": 8, "stages": 2}
    assert kb.launch_settings(table, defaults, "pallas", "gpu", jnp.bfloat16, block=None, warps=2) == {
        "block": 64, "warps": 2, "stages": 2}
    assert kb.launch_settings(table, defaults, "interpret", "tpu", "float32")["block"] == 256
    assert kb.launch_settings(table, defaults, "interpret", None, jnp.float32) == defaults  # gpu form, no row
    with pytest.raises(ValueError, match="unknown"):
        kb.launch_settings(table, defaults, "pallas", "gpu", jnp.bfloat16, blocks=3)


def test_launch_options_per_backend():
    assert kb.launch_options("interpret", None, 3) == {"interpret": True}
    assert type(kb.launch_options("pallas", "tpu", 2)["compiler_params"]).__module__.startswith("jax")
    assert kb.launch_options("pallas", "gpu", 2)["compiler_params"].num_warps == 4
    with pytest.raises(ValueError, match="platform 'tpu' or 'gpu'"):
        kb.launch_options("pallas", "cpu", 2)


def test_padding_and_rows_below():
    x = jnp.arange(10.0).reshape(5, 2)
    old = kb.set_pad_value(float("nan"))
    try:
        padded = kb.pad_axis(x, 0, 4)
    finally:
        kb.set_pad_value(old)
    assert padded.shape == (8, 2) and np.isnan(np.asarray(padded[5:])).all()
    assert kb.pad_axis(jnp.ones((2, 3), jnp.int32), 1, 4).dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(kb.rows_below(x, 3, 5)), np.asarray(x.at[2:].set(0)))
