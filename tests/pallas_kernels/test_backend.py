"""The one backend rule: the target platform (named, the mesh's, else the default device's: never the host's
guess), names checked, "auto" by platform and by whether the kernel's dims suit its tiles, the launch options per
backend, and row padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as kb
from tests.compile_targets import gpu_mesh, tpu_mesh


def test_auto_is_xla_on_cpu_and_names_are_checked():
    assert kb.resolve("auto", (128, 64)) == "xla"
    assert kb.resolve("interpret") == "interpret" and kb.resolve("pallas") == "pallas"
    with pytest.raises(ValueError, match="backend must be one of"):
        kb.resolve("triton")


def test_the_target_platform_is_named_or_the_meshs():
    assert kb.target_platform() == "cpu"  # no mesh: the default device
    assert kb.target_platform("tpu") == "tpu" and kb.target_platform("cuda") == "gpu"
    assert kb.target_platform("auto") == "cpu"
    with pytest.raises(ValueError, match="platform must be one of"):
        kb.target_platform("metal")
    for mesh, want in ((tpu_mesh({"x": 4}), "tpu"), (gpu_mesh({"x": 2}), "gpu"),
                       (jax.make_mesh((8,), ("x",)), "cpu")):
        with jax.set_mesh(mesh):
            assert kb.target_platform() == want
            seen = []  # while tracing (the abstract mesh)
            jax.jit(lambda: seen.append(kb.target_platform()) or jnp.zeros(())).trace()
            assert seen == [want]
        assert kb.target_platform() == "cpu"


def test_auto_on_an_accelerator_needs_tile_friendly_dims():
    for platform in ("gpu", "tpu"):
        assert kb.resolve("auto", (128, 64, 128), platform) == "pallas"  # K2's head dims
        assert kb.resolve("auto", (16, 8, 16), platform) == "xla"  # a tiny test config's rope dim: below a tile
        assert kb.resolve("auto", (192,), platform) == "xla"  # not a power of two
    with jax.set_mesh(tpu_mesh({"x": 1})):
        assert kb.resolve("auto", (128, 64, 128)) == "pallas"


def test_launch_options_per_backend():
    assert kb.launch_options("interpret", None, 3) == {"interpret": True}
    assert type(kb.launch_options("pallas", "tpu", 2)["compiler_params"]).__module__.startswith("jax")
    assert kb.launch_options("pallas", "gpu", 2)["compiler_params"].num_warps == 4
    with pytest.raises(ValueError, match="TPU or GPU"):
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
