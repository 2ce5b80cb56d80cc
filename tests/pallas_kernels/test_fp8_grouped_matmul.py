"""Block-FP8 / plain-weight grouped matmul (interpret mode) against its XLA reference (dequantise + ragged_dot):
ragged K and N (scale blocks cut short), empty groups, all rows in one group, rows past the last group (NaN there
and in the kernel's padding must not leak; those rows come out 0), gradients, bf16. Both launch forms run: "gpu"
(per-tile group walk) and "tpu" (scalar-prefetched visit schedule). The TPU / GPU compiles are in test_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_grouped_matmul import (
    FP8,
    dequantize_activations,
    fp8_grouped_matmul,
    quantize_activations,
    reference,
)
from tests.pallas_kernels.kernel_checks import nan_padding, rel_err

CASES = {  # M, K, N, group sizes
    "ragged_k_and_n_with_empty_groups": (300, 200, 150, [5, 0, 140, 1, 0, 100]),
    "all_in_one_group": (130, 128, 128, [0, 130, 0]),
    "tile_straddling_groups": (256, 136, 40, [127, 2, 127]),
}


def _inputs(case, fp8: bool, dtype=jnp.float32, seed=0):
    M, K, N, sizes = CASES[case]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = rng.standard_normal((len(sizes), K, N))
    sizes = jnp.asarray(sizes, jnp.int32)
    if not fp8:
        return x, jnp.asarray(w, dtype), sizes, None
    scales = jnp.asarray(rng.uniform(0.005, 0.05, (len(sizes), -(-K // 128), -(-N // 128))), jnp.float32)
    return x, jnp.asarray(w * 30, FP8), sizes, scales


def _poison_tail(x, sizes):
    return x.at[int(sizes.sum()):].set(jnp.nan)


@pytest.mark.parametrize("form", ["gpu", "tpu"])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "f32_weights"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, fp8, form):
    x, w, sizes, scales = _inputs(case, fp8)
    x = _poison_tail(x, sizes)
    n = int(sizes.sum())
    want = reference(x, w, sizes, scales)
    with nan_padding():
        got = jax.jit(lambda a: fp8_grouped_matmul(a, w, sizes, scales, backend="interpret", platform=form))(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert rel_err(got[:n], want[:n]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got[n:]), 0)


@pytest.mark.parametrize("form", ["gpu", "tpu"])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "f32_weights"])
def test_gradients(fp8, form):
    """d/dx by the kernel against transposed weights; d/dw (plain weights) by XLA; FP8 weights get none."""
    x, w, sizes, scales = _inputs("ragged_k_and_n_with_empty_groups", fp8)
    n = int(sizes.sum())
    dy = jnp.asarray(np.random.default_rng(3).standard_normal((x.shape[0], w.shape[2])), jnp.float32)

    def grads(backend):
        loss = lambda a, b: jnp.sum(  # noqa: E731
            fp8_grouped_matmul(a, b, sizes, scales, backend=backend, platform=form)[:n] * dy[:n])
        return jax.jit(jax.grad(loss, argnums=(0, 1) if not fp8 else 0))(x, w)

    with nan_padding():
        got = grads("interpret")
    want = grads("xla")
    if fp8:
        assert rel_err(got[:n], want[:n]) <= 1e-5
        np.testing.assert_array_equal(np.asarray(got[n:]), 0)
    else:
        assert rel_err(got[0][:n], want[0][:n]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


def test_bf16_activations_within_1e2():
    x, w, sizes, scales = _inputs("tile_straddling_groups", True, dtype=jnp.bfloat16, seed=1)
    got = fp8_grouped_matmul(x, w, sizes, scales, backend="interpret")
    want = reference(x.astype(jnp.float32), w, sizes, scales)
    assert got.dtype == jnp.bfloat16 and rel_err(got, want) <= 1e-2


@pytest.mark.parametrize("form", ["gpu", "tpu"])
def test_fp8_activations_match_the_quantised_reference(form):
    """FP8 x FP8 products with both scales applied per block equal the XLA reference on the same quantised
    activations; the quantisation itself stays within e4m3's rounding (half an ulp); the gradient passes it
    straight through (dx as without it)."""
    x, w, sizes, scales = _inputs("ragged_k_and_n_with_empty_groups", True, seed=2)
    x = _poison_tail(x, sizes)
    n = int(sizes.sum())
    q, q_scales = quantize_activations(x[:n])
    assert q.dtype == FP8 and q_scales.shape == (n, 2)
    # round to nearest: half a unit in the last place, 2^-4 |x| for normal e4m3, 2^-10 x scale below 2^-6 x scale
    per_col_scale = np.repeat(np.asarray(q_scales), 128, axis=1)[:, :x.shape[1]]
    err = np.abs(np.asarray(dequantize_activations(q, q_scales, jnp.float32)) - np.asarray(x[:n]))
    assert np.all(err <= np.maximum(2.0 ** -4 * np.abs(np.asarray(x[:n])), 2.0 ** -10 * per_col_scale) * (1 + 1e-6))
    want = reference(x, w, sizes, scales, fp8_activations=True)
    with nan_padding():
        got = jax.jit(lambda a: fp8_grouped_matmul(a, w, sizes, scales, fp8_activations=True, backend="interpret",
                                                   platform=form))(x)
    assert rel_err(got[:n], want[:n]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got[n:]), 0)
    dy = jnp.asarray(np.random.default_rng(4).standard_normal(got.shape), jnp.float32)
    dx = [jax.grad(lambda a, f=f: jnp.sum(fp8_grouped_matmul(a, w, sizes, scales, fp8_activations=f,
                                                              backend="interpret", platform=form)[:n] * dy[:n]))(x)
          for f in (True, False)]
    np.testing.assert_array_equal(np.asarray(dx[0]), np.asarray(dx[1]))


def test_bad_inputs_are_named():
    x, w, sizes, scales = _inputs("all_in_one_group", True)
    with pytest.raises(ValueError, match="one per 128x128 block"):
        fp8_grouped_matmul(x, w, sizes, scales[:, :, :0], backend="interpret")
    with pytest.raises(ValueError, match="need their block scales"):
        fp8_grouped_matmul(x, w, sizes, None, backend="interpret")
    with pytest.raises(ValueError, match="group_sizes"):
        fp8_grouped_matmul(x, w, sizes[:2], scales, backend="interpret")
    with pytest.raises(ValueError, match="fp8_activations needs FP8 weights"):
        fp8_grouped_matmul(x, w.astype(jnp.float32), sizes, None, fp8_activations=True, backend="interpret")
