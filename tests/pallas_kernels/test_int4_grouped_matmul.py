"""INT4 (compressed-tensors pack-quantized, W4A16) grouped matmul: the unpacking against the library's own packing,
then the kernel (interpret mode, both launch forms: "gpu" per-tile group walk, "tpu" scalar-prefetched visit
schedule) against its XLA reference (dequantise + ragged_dot): odd I and O (I not a multiple of 32, or of 8), empty
groups, one group, rows past the last group (NaN there and in the kernel's padding must not leak; those rows come
out 0), bf16 activations, d/dx. The TPU / GPU compiles are in test_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int4_grouped_matmul import (
    LAUNCH,
    dequantize,
    int4_grouped_matmul,
    launch_settings,
    reference,
    unpack,
)
from tests.pallas_kernels.kernel_checks import nan_padding, rel_err

CASES = {  # M, I, O, group sizes, group_size
    "odd_sizes_with_empty_groups": (300, 200, 150, [5, 0, 140, 1, 0, 100], 32),
    "all_in_one_group": (130, 136, 128, [0, 130, 0], 32),
    "tile_straddling_groups_i_not_multiple_of_8": (256, 37, 40, [127, 2, 127], 8),
}


def _weights(G, I, O, group_size, rng, scales_dtype=jnp.bfloat16):
    """Random int32 words (every word is eight valid nibbles; those past I are garbage the kernel must not use)
    and scales."""
    packed = rng.integers(-2 ** 31, 2 ** 31, (G, -(-I // 8), O), dtype=np.int64).astype(np.int32)
    scales = rng.uniform(0.005, 0.05, (G, -(-I // group_size), O))
    return jnp.asarray(packed), jnp.asarray(scales, scales_dtype)


def _inputs(case, dtype=jnp.float32, seed=0, scales_dtype=jnp.bfloat16):
    M, I, O, sizes, group_size = CASES[case]
    rng = np.random.default_rng(seed)
    packed, scales = _weights(len(sizes), I, O, group_size, rng, scales_dtype)
    x = jnp.asarray(rng.standard_normal((M, I)), dtype)
    sizes = jnp.asarray(sizes, jnp.int32)
    return x.at[int(sizes.sum()):].set(jnp.nan), packed, sizes, scales, group_size


@pytest.mark.parametrize("I", [37, 40, 200])
def test_unpack_and_dequantize_match_compressed_tensors_packing(I):
    """Values in [-8, 7] packed by compressed-tensors ([O, I] -> int32 [O, ceil(I/8)]) come back from unpack in the
    release's orientation and in k2jax's ([P, O], [G, P, O]); dequantize applies one scale per 32 inputs."""
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    rng = np.random.default_rng(I)
    G, O = 3, 24
    values = rng.integers(-8, 8, (G, O, I)).astype(np.int8)
    packed_GOP = helpers.pack_to_int32(torch.from_numpy(values), 4, packed_dim=1).numpy()
    assert packed_GOP.shape == (G, O, -(-I // 8)) and packed_GOP.dtype == np.int32
    packed_GPO = jnp.asarray(packed_GOP.transpose(0, 2, 1))
    np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(packed_GOP[0]), axis=-1, size=I)), values[0])
    np.testing.assert_array_equal(np.asarray(unpack(packed_GPO[0], axis=0, size=I)), values[0].T)
    got = unpack(packed_GPO, axis=1, size=I)
    assert got.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(got), values.transpose(0, 2, 1))
    scales = rng.uniform(0.01, 0.1, (G, -(-I // 32), O)).astype(np.float32)
    want = values.transpose(0, 2, 1).astype(np.float32) * np.repeat(scales, 32, axis=1)[:, :I]
    np.testing.assert_array_equal(np.asarray(dequantize(packed_GPO, jnp.asarray(scales), axis=1, size=I)), want)


@pytest.mark.parametrize("form", ["gpu", "tpu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, form):
    x, packed, sizes, scales, group_size = _inputs(case)
    n = int(sizes.sum())
    want = reference(x, packed, scales, sizes, group_size=group_size)
    with nan_padding():
        got = jax.jit(lambda a: int4_grouped_matmul(a, packed, sizes, scales, group_size=group_size,
                                                    backend="interpret", platform=form))(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert rel_err(got[:n], want[:n]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got[n:]), 0)


@pytest.mark.parametrize("form", ["gpu", "tpu"])
def test_gradient_wrt_x_and_none_for_the_weights(form):
    """d/dx by the kernel on the transposed product = jax.grad of the reference; the frozen weights' scales get
    zeros (from the XLA backend too)."""
    x, packed, sizes, scales, _ = _inputs("odd_sizes_with_empty_groups", seed=1)
    n = int(sizes.sum())
    dy = jnp.asarray(np.random.default_rng(3).standard_normal((x.shape[0], packed.shape[2])), jnp.float32)

    def grads(backend):
        loss = lambda a, s: jnp.sum(  # noqa: E731
            int4_grouped_matmul(a, packed, sizes, s, backend=backend, platform=form)[:n] * dy[:n])
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scales)

    with nan_padding():
        got, ds = grads("interpret")
    want, ds_xla = grads("xla")
    assert rel_err(got[:n], want[:n]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got[n:]), 0)
    np.testing.assert_array_equal(np.asarray(ds), 0)
    np.testing.assert_array_equal(np.asarray(ds_xla), 0)


def test_bf16_activations_within_1e2():
    x, packed, sizes, scales, _ = _inputs("odd_sizes_with_empty_groups", dtype=jnp.bfloat16, seed=2)
    n = int(sizes.sum())
    got = int4_grouped_matmul(x, packed, sizes, scales, backend="interpret")
    want = reference(x[:n].astype(jnp.float32), packed, scales, sizes)
    assert got.dtype == jnp.bfloat16 and rel_err(got[:n], want) <= 1e-2


def test_tpu_form_over_several_contraction_blocks_and_its_scale_tile():
    """block_k 256 (8 f32 scale rows: one Mosaic tile) over I = 600: three contraction blocks per tile, and three
    output tiles of d/dx. bf16 scales need 16 rows: a default block_k is raised to them, a given one refused."""
    rng = np.random.default_rng(4)
    M, I, O, sizes = 200, 600, 130, jnp.asarray([70, 0, 100], jnp.int32)
    packed, scales = _weights(3, I, O, 32, rng, jnp.float32)
    x = jnp.asarray(rng.standard_normal((M, I)), jnp.float32)
    n = int(sizes.sum())
    gmm = lambda a, **kw: int4_grouped_matmul(a, packed, sizes, scales, platform="tpu", block_k=256, **kw)  # noqa: E731
    with nan_padding():
        got = jax.jit(lambda a: gmm(a, backend="interpret"))(x)
        dx = jax.jit(jax.grad(lambda a: jnp.sum(gmm(a, backend="interpret")[:n] ** 2)))(x)
    assert rel_err(got[:n], reference(x, packed, scales, sizes)[:n]) <= 1e-5
    want_dx = jax.grad(lambda a: jnp.sum(gmm(a, backend="xla")[:n] ** 2))(x)
    assert rel_err(dx[:n], want_dx[:n]) <= 1e-5
    assert launch_settings("interpret", "tpu", jnp.float32, jnp.bfloat16, 64)["block_k"] == 1024
    with pytest.raises(ValueError, match="multiple of 16 for bfloat16 scales"):
        int4_grouped_matmul(x, packed, sizes, scales.astype(jnp.bfloat16), backend="interpret", platform="tpu",
                            block_k=256)


def test_launch_defaults_come_from_the_table():
    for (platform, dtype), settings in LAUNCH.items():
        got = launch_settings("pallas", platform, dtype, jnp.bfloat16, 32)
        assert {k: got[k] for k in settings} == settings
    assert launch_settings("pallas", "gpu", jnp.bfloat16, jnp.bfloat16, 32, num_warps=4)["num_warps"] == 4
    with pytest.raises(ValueError, match="power of two"):
        launch_settings("interpret", "gpu", jnp.float32, jnp.float32, 32, block_k=384)
    with pytest.raises(ValueError, match="positive multiple of 128"):
        launch_settings("interpret", "tpu", jnp.float32, jnp.float32, 32, block_k=200)


def test_bad_inputs_are_named():
    x, packed, sizes, scales, _ = _inputs("all_in_one_group")
    call = lambda *a, **kw: int4_grouped_matmul(*a, backend="interpret", **kw)  # noqa: E731
    with pytest.raises(ValueError, match="needs packed"):
        call(x, packed[:, :-1], sizes, scales)
    with pytest.raises(ValueError, match="needs packed"):
        call(x, packed, sizes[:2], scales)
    with pytest.raises(ValueError, match="must be int32"):
        call(x, packed.astype(jnp.uint32), sizes, scales)
    with pytest.raises(ValueError, match="floating point"):
        call(x, packed, sizes, scales.astype(jnp.int32))
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 8"):
        call(x, packed, sizes, scales, group_size=12)
    with pytest.raises(ValueError, match="group_size must divide 128"):
        call(x, packed, sizes, scales[:, :3], group_size=48)
    with pytest.raises(ValueError, match="expected x"):
        call(x[None], packed, sizes, scales)
