"""pallas_kernels.cpu_grouped_ffn: the tiled CPU grouped matmul and FFN against the XLA reference (jax.lax.ragged_dot).

Sizes straddle every tile height (BIG_TILE rows, then a remainder in SMALL_TILE rows, a MID_TILE and at most one
small tile, or one more BIG_TILE), including groups that are empty, groups that end mid-tile before a short group,
remainder mid and big tiles that run over the next groups' rows, and rows past the last group."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu_grouped_ffn import BIG_TILE, MID_TILE, SMALL_TILE, SMALL_TILES_MAX, cpu_grouped_matmul
from pallas_kernels.cpu_grouped_ffn import cpu_grouped_ffn as _cpu_grouped_ffn
from pallas_kernels.expert_weights import ExpertWeights
from pallas_kernels.grouped_matmul import grouped_ffn, reference, reference_ffn

CASES = {
    "odd_sizes": (37, 13, 11, [5, 0, 17, 1, 0, 14]),
    "all_in_one_group": (50, 16, 8, [0, 0, 50, 0]),
    "empty_first_and_last": (70, 9, 24, [0, 33, 37, 0]),
    "tile_multiples": (2 * BIG_TILE + 2 * SMALL_TILE, 8, 8, [BIG_TILE + SMALL_TILE, 0, BIG_TILE + SMALL_TILE]),
    "big_then_ragged": (BIG_TILE + 61, 12, 7, [BIG_TILE + 3, 2, 1, 55]),
    "rows_past_the_groups": (40, 8, 5, [7, 0, 20]),  # 13 trailing rows belong to no group
    # 100 rows end in a big tile, running over the 30-row group after it; 60 in a mid tile over the 5 rows after it
    "big_remainders": (200, 10, 6, [100, 30, 60, 5]),
    # BIG_TILE + 40 rows: a big tile, then a mid tile over the next group; 70: a mid and a small tile; 33: a mid tile
    "mid_remainders": (2 * BIG_TILE + 40, 9, 5, [BIG_TILE + 40, 3, 70, 33]),
}
assert SMALL_TILES_MAX * SMALL_TILE < 33 < 60 < MID_TILE < 70 <= MID_TILE + SMALL_TILE < 100 < BIG_TILE


def _inputs(m, k, n, sizes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiled_matches_reference(case):
    x, w, sizes = _inputs(*CASES[case])
    got = cpu_grouped_matmul(x, w, sizes)
    want = reference(x, w, sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    tail = int(sizes.sum())
    np.testing.assert_array_equal(np.asarray(got[tail:]), 0)


@pytest.mark.parametrize("case", ["odd_sizes", "rows_past_the_groups", "big_then_ragged", "big_remainders",
                                  "mid_remainders"])
def test_gradients_match_reference(case):
    x, w, sizes = _inputs(*CASES[case])
    dy = jnp.asarray(np.random.default_rng(1).standard_normal((x.shape[0], w.shape[2])), jnp.float32)

    def loss(impl):
        f = (lambda a, b: reference(a, b, sizes)) if impl == "ref" else (
            lambda a, b: cpu_grouped_matmul(a, b, sizes))
        return jax.grad(lambda a, b: jnp.sum(f(a, b) * dy), argnums=(0, 1))

    (dx, dw), (dx_ref, dw_ref) = loss("tiled")(x, w), loss("ref")(x, w)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_ref), rtol=1e-5, atol=1e-5)


def test_nan_rows_past_the_groups_never_leak():
    x, w, sizes = _inputs(*CASES["rows_past_the_groups"])
    tail = int(sizes.sum())
    poisoned = x.at[tail:].set(jnp.nan)
    got = cpu_grouped_matmul(poisoned, w, sizes)
    np.testing.assert_allclose(np.asarray(got[:tail]), np.asarray(reference(x, w, sizes)[:tail]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[tail:]), 0)
    dw = jax.grad(lambda b: jnp.sum(cpu_grouped_matmul(poisoned, b, sizes)[:tail]))(w)
    assert np.all(np.isfinite(np.asarray(dw)))
    dy = jnp.ones(got.shape).at[tail:].set(jnp.nan)  # a poisoned cotangent for rows no group owns
    dw = jax.grad(lambda b: jnp.sum(cpu_grouped_matmul(x, b, sizes) * dy))(w)
    assert np.all(np.isfinite(np.asarray(dw)))


def test_bf16_within_1e_2():
    x, w, sizes = _inputs(*CASES["odd_sizes"], dtype=jnp.bfloat16)
    got = cpu_grouped_matmul(x, w, sizes).astype(jnp.float32)
    want = reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-2 * float(jnp.max(jnp.abs(want)))


def cpu_grouped_ffn(x, w_gate, w_up, w_down, sizes, stack=None):
    """The tiled FFN over plain weights (shapes checked by the dispatch, pallas_kernels.grouped_matmul)."""
    return _cpu_grouped_ffn(x, ExpertWeights("plain", w_gate, w_up, w_down), sizes, stack=stack)


def _ffn_inputs(case, dtype=jnp.float32):
    m, k, f, sizes = CASES[case]
    x, w_gate, sizes = _inputs(m, k, f, sizes, dtype, seed=2)
    _, w_up, _ = _inputs(m, k, f, sizes, dtype, seed=3)
    w_down = jnp.swapaxes(_inputs(m, k, f, sizes, dtype, seed=4)[1], 1, 2)
    return x, w_gate, w_up, w_down, sizes


@pytest.mark.parametrize("case", sorted(CASES))
def test_ffn_matches_reference(case):
    x, wg, wu, wd, sizes = _ffn_inputs(case)
    got, want = cpu_grouped_ffn(x, wg, wu, wd, sizes), reference_ffn(x, wg, wu, wd, sizes)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(got[int(sizes.sum()):]), 0)


@pytest.mark.parametrize("case", ["odd_sizes", "rows_past_the_groups", "big_then_ragged", "empty_first_and_last",
                                  "big_remainders", "mid_remainders"])
def test_ffn_gradients_match_reference(case):
    x, wg, wu, wd, sizes = _ffn_inputs(case)
    tail = int(sizes.sum())
    x = x.at[tail:].set(jnp.nan)  # poison: rows past the groups must not reach any gradient
    dy = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)

    def grads(f):
        return jax.grad(lambda *a: jnp.sum(f(*a, sizes) * dy), argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    got = grads(lambda *a: cpu_grouped_ffn(*a))
    want = grads(lambda a, *rest: reference_ffn(jnp.nan_to_num(a), *rest))
    for name, g, r in zip(("dx", "dw_gate", "dw_up", "dw_down"), got, want):
        g, r = np.asarray(g), np.asarray(r)
        if name == "dx":
            g, r = g[:tail], r[:tail]
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.max(np.abs(r)), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ffn_reading_weights_from_layer_stacks_inside_a_scan(dtype):
    """`stack`: a scan over 3 layers whose FFN reads each layer's weights from the float32 stacks (cast per
    group) gives the outputs and gradients of the same scan over the layers' own slices."""
    m, k, f, sizes = CASES["big_remainders"]
    rng = np.random.default_rng(7)
    stacks = [jnp.asarray(rng.standard_normal((3, len(sizes)) + s), jnp.float32) for s in ((k, f), (k, f), (f, k))]
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    sizes = jnp.asarray(sizes, jnp.int32)

    def run(ws, use_stacks):
        fixed = [jax.lax.stop_gradient(w) for w in ws]

        def layer(h, xs):
            *w, index = xs
            stack = (ExpertWeights("plain", *fixed), index) if use_stacks else None
            return jnp.tanh(cpu_grouped_ffn(h, *(a.astype(dtype) for a in w), sizes, stack=stack)), None

        return jnp.sum(jax.lax.scan(layer, x, (*ws, jnp.arange(3)))[0].astype(jnp.float32))

    for use_stacks in (False, True):
        value, grads = jax.jit(jax.value_and_grad(run), static_argnums=1)(stacks, use_stacks)
        if not use_stacks:
            want_value, want_grads = value, grads
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    for g, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6 * np.max(np.abs(want)))


def test_stack_must_hold_the_weights_shapes():
    x, wg, wu, wd, sizes = _ffn_inputs("odd_sizes")
    with pytest.raises(ValueError, match="is not a stack of"):
        cpu_grouped_ffn(x, wg, wu, wd, sizes, stack=(ExpertWeights("plain", wg[None], wu[None], wg[None]), 0))


def test_quantised_weights_need_their_scales():
    """float8_e4m3fn weights come with one scale per 128x128 block, INT4 ones with one per group (the values:
    test_grouped_matmul.py); without them they would be read as the weights themselves."""
    x, wg, wu, wd, sizes = _ffn_inputs("odd_sizes")
    e4m3 = [w.astype(jnp.float8_e4m3fn) for w in (wg, wu, wd)]
    tiled = functools.partial(grouped_ffn, impl="tiled")
    with pytest.raises(ValueError, match="need their block scales"):
        tiled(x, ExpertWeights("fp8", *e4m3), sizes)
    with pytest.raises(ValueError, match="one per 128x128 block"):
        tiled(x, ExpertWeights("fp8", *e4m3, *(jnp.ones((len(sizes), 2, 2)),) * 3), sizes)
    with pytest.raises(ValueError, match="not float8_e4m3fn"):
        tiled(x, ExpertWeights("fp8", wg, wu, wd, *(jnp.ones((len(sizes), 1, 1)),) * 3), sizes)
    with pytest.raises(ValueError, match="int4 gate weights must be"):
        tiled(x, ExpertWeights("int4", wg, wu, wd, wg, wu, wd, group_size=32), sizes)
