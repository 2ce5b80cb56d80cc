"""grouped_weight_grad (the grouped matmul's weight gradient, "tgmm"), both launch forms in the Pallas interpreter,
against its XLA reference (ragged_dot_general contracting the ragged rows = ragged_dot's transpose): odd M, I, O,
empty groups, one group, all rows in one group, groups straddling row blocks, rows past the groups NaN (and the
kernel's padding NaN) never leaking; bf16; and deviceless compiles for H100 (Triton) and TPU v5p (Mosaic) at K2's
expert shapes, with no dense [G, M, ...] fallback left in the compiled program.

Letter legend: M rows, I x's features (the forward's in), O dy's features (its out), G groups."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_weight_grad import grouped_weight_grad, reference, visit_schedule
from tests.pallas_kernels.kernel_checks import compile_for, nan_padding, rel_err

CASES = {  # M, I, O, group sizes
    "odd_sizes_with_empty_groups": (300, 200, 150, [5, 0, 140, 1, 0, 100]),  # 54 rows past the groups
    "one_group": (77, 130, 40, [70]),
    "all_rows_in_one_group": (130, 128, 129, [0, 130, 0]),
    "groups_straddling_row_blocks": (256, 136, 40, [63, 2, 127, 64]),
    "all_groups_empty": (50, 20, 30, [0, 0, 0]),
}
FORMS = ["gpu", "tpu"]


def _inputs(case, dtype=jnp.float32, seed=0):
    """x [M, I], dy [M, O] with NaN in every row past sum(group sizes), group sizes [G]."""
    M, I, O, sizes = CASES[case]
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = jnp.asarray(rng.standard_normal((M, I)), dtype).at[n:].set(jnp.nan)
    dy = jnp.asarray(rng.standard_normal((M, O)), dtype).at[n:].set(jnp.nan)
    return x, dy, jnp.asarray(sizes, jnp.int32)


def _kernel(x, dy, sizes, form, **kw):
    with nan_padding():
        return jax.jit(lambda a, b: grouped_weight_grad(a, b, sizes, backend="interpret", platform=form, **kw))(x, dy)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_f32(case, form):
    x, dy, sizes = _inputs(case)
    want = reference(x, dy, sizes)
    got = _kernel(x, dy, sizes, form)
    assert got.shape == want.shape == (len(sizes), x.shape[1], dy.shape[1]) and got.dtype == jnp.float32
    assert np.isfinite(np.asarray(want)).all() and np.isfinite(np.asarray(got)).all()
    assert rel_err(got, want) <= 1e-5
    for g in np.flatnonzero(np.asarray(sizes) == 0):  # empty groups: exact zeros
        np.testing.assert_array_equal(np.asarray(got[g]), 0)


def test_reference_is_ragged_dots_weight_gradient():
    """The reference equals jax.vjp of jax.lax.ragged_dot in its weights (what fp8_grouped_matmul's backward
    takes today), NaN rows past the groups included."""
    x, dy, sizes = _inputs("odd_sizes_with_empty_groups")
    w = jnp.zeros((len(sizes), x.shape[1], dy.shape[1]), jnp.float32)
    _, pullback = jax.vjp(lambda w_: jax.lax.ragged_dot(x, w_, sizes, preferred_element_type=jnp.float32), w)
    assert rel_err(reference(x, dy, sizes), pullback(dy)[0]) <= 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_bf16(form):
    """bf16 in, bf16 out within 1e-2; bf16 in, f32 out (f32 accumulation of exact products) within 1e-5."""
    x, dy, sizes = _inputs("groups_straddling_row_blocks", jnp.bfloat16, seed=1)
    want = reference(x.astype(jnp.float32), dy.astype(jnp.float32), sizes)
    got = _kernel(x, dy, sizes, form)
    assert got.dtype == jnp.bfloat16 and rel_err(got, want) <= 1e-2
    got32 = _kernel(x, dy, sizes, form, out_dtype=jnp.float32)
    assert got32.dtype == jnp.float32 and rel_err(got32, want) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_other_block_sizes(form):
    """Launch options: 16-row blocks (many blocks per group) and 32 x 64 dw tiles (ragged I and O padding)."""
    x, dy, sizes = _inputs("odd_sizes_with_empty_groups")
    got = _kernel(x, dy, sizes, form, block_m=32, block_k=32, block_n=64)
    assert rel_err(got, reference(x, dy, sizes)) <= 1e-5


def test_visit_schedule_visits_each_groups_blocks_in_order():
    """The TPU form's schedule: per group, in group order, the row blocks its rows overlap (one visit for an empty
    group, which only zeroes its output), first / last flags on its first / last visit; padding visits up to the
    static bound repeat the last pair with every flag off."""
    sizes = np.array([0, 5, 0, 140, 1, 0, 100, 0])
    ends = np.cumsum(sizes).astype(np.int32)
    starts = ends - sizes.astype(np.int32)
    num_blocks, bm = 2, 128
    block, group, active, first, last = map(np.asarray, visit_schedule(jnp.asarray(starts), jnp.asarray(ends),
                                                                       num_blocks, bm))
    assert len(block) == num_blocks + len(sizes) - 1
    n = np.flatnonzero(last)[-1] + 1
    assert not (active[n:].any() or first[n:].any() or last[n:].any())
    assert np.all(block[n:] == block[n - 1]) and np.all(group[n:] == group[n - 1])
    assert np.all(np.diff(group[:n]) >= 0)
    for g, size in enumerate(sizes):
        visits = np.flatnonzero(group[:n] == g)
        want = list(range(starts[g] // bm, (ends[g] - 1) // bm + 1)) if size else [min(starts[g] // bm, 1)]
        assert list(block[visits]) == want
        assert list(first[visits]) == [1] + [0] * (len(want) - 1) and list(last[visits]) == [0] * (len(want) - 1) + [1]
        assert np.all(active[visits] == int(size > 0))


def test_bad_inputs_are_named():
    x, dy, sizes = _inputs("one_group")
    with pytest.raises(ValueError, match="expected x"):
        grouped_weight_grad(x, dy[:5], sizes, backend="interpret")
    with pytest.raises(ValueError, match="integer group_sizes"):
        grouped_weight_grad(x, dy, sizes.astype(jnp.float32), backend="interpret")
    with pytest.raises(TypeError, match="block_q"):  # launch settings are named arguments
        grouped_weight_grad(x, dy, sizes, backend="interpret", block_q=64)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        grouped_weight_grad(x, dy, sizes, backend="interpret", block_m=48)


# ---- deviceless compiles ---------------------------------------------------------------------------------------
KERNEL_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _compiled_text(platform, M, I, O, G, dtype, backend):
    fn = lambda x, dy, sizes: grouped_weight_grad(x, dy, sizes, backend=backend, platform=platform)  # noqa: E731
    return compile_for(platform, fn, ((M, I), dtype), ((M, O), dtype), ((G,), jnp.int32)).as_text()


def _dense_fallback(text, G, M) -> bool:
    """A [G, M, ...] array (every row for every group) or an XLA dot / convolution in the compiled program."""
    return bool(re.search(rf"\[{G},{M}[,\]]", text) or re.search(r"\b(dot|convolution)\(", text))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("I, O", [(7168, 2048), (2048, 7168)], ids=["gate_up", "down"])
@pytest.mark.parametrize("platform", ["gpu", "tpu"], ids=["h100", "v5p"])
def test_k2_expert_shapes_compile(platform, I, O, dtype):
    """K2's expert weight gradients (hidden 7168, expert FFN 2048), 8 groups of 1024 rows: the Triton / Mosaic
    kernel compiles with its default launch settings (H100 shared-memory and v5p VMEM limits included) and nothing
    runs densely over G x M."""
    text = _compiled_text(platform, 1024, I, O, 8, dtype, "pallas")
    assert KERNEL_CALL[platform] in text
    assert not _dense_fallback(text, 8, 1024)


@pytest.mark.parametrize("platform", ["gpu", "tpu"], ids=["h100", "v5p"])
def test_xla_reference_is_the_dense_fallback(platform):
    """Why the kernel exists, and that the check above would see it: XLA's ragged_dot transpose compiles for
    H100 and v5p to a select over [G, M, ...] and a dot over all rows for every group."""
    text = _compiled_text(platform, 256, 256, 384, 4, jnp.bfloat16, "xla")
    assert _dense_fallback(text, 4, 256) and KERNEL_CALL[platform] not in text
