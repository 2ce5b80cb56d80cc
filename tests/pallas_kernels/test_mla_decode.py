"""Absorbed MLA decode (interpret mode) against its XLA reference: ragged rows in one batch, several new tokens
per row, split-K with chunks that hold no visible slot, stale NaN slots past each row's length and NaN kernel
padding, bf16; both launch forms (the TPU grid over slot blocks, the GPU loop with query rows in blocks). The
TPU / GPU compiles at K2's sizes are in test_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import mla_decode, reference
from tests.pallas_kernels.kernel_checks import nan_padding, rel_err

C, R = 16, 8


def _inputs(B, T, N, S, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, C)).astype(dtype), jax.random.normal(ks[1], (B, T, N, R)).astype(dtype),
            jax.random.normal(ks[2], (B, S, C + R)).astype(dtype))


def _stale(cache, positions):
    """NaN in every slot past each row's last position (what an uninitialised or reused cache may hold)."""
    S = cache.shape[1]
    past = jnp.arange(S)[None, :] > positions.max(axis=1, keepdims=True)
    return jnp.where(past[..., None], jnp.nan, cache)


@pytest.mark.parametrize("form, block_m", [("gpu", 8), ("gpu", 3), ("tpu", None), ("tpu", 3)])
@pytest.mark.parametrize("num_splits, block_s", [(1, 8), (3, 8), (4, 16)])
def test_ragged_rows_match_reference(num_splits, block_s, form, block_m):
    """Both launch forms, with all T·N = 8 query rows in one program (block) and in blocks of 3 (one padded
    block; on TPU each block stops at its own last position)."""
    q_lat, q_rope, cache = _inputs(3, 2, 4, 70)
    positions = jnp.array([[3, 4], [40, 41], [68, 69]], jnp.int32)  # short, middle, full rows
    cache = _stale(cache, positions)
    want = reference(q_lat, q_rope, cache, positions, scale=0.3)
    assert np.isfinite(np.asarray(want)).all()
    with nan_padding():
        got = mla_decode(q_lat, q_rope, cache, positions, scale=0.3, backend="interpret", platform=form,
                         block_s=block_s, num_splits=num_splits, block_m=block_m)
    assert got.shape == (3, 2, 4, C) and got.dtype == jnp.float32
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("form", ["gpu", "tpu"])
def test_a_token_sees_only_slots_up_to_its_position(form):
    """Token 0 of a row must not see token 1's slot even though that slot is written (multi-token extend)."""
    q_lat, q_rope, cache = _inputs(1, 2, 2, 16)
    positions = jnp.array([[9, 10]], jnp.int32)
    kw = dict(scale=0.5, backend="interpret", platform=form, block_s=8, num_splits=2)
    got = mla_decode(q_lat, q_rope, cache, positions, **kw)
    alone = mla_decode(q_lat[:, :1], q_rope[:, :1], cache.at[:, 10:].set(jnp.nan), positions[:, :1], **kw)
    assert rel_err(got[:, :1], alone) <= 1e-6


@pytest.mark.parametrize("form", ["gpu", "tpu"])
def test_bf16_within_1e2(form):
    q_lat, q_rope, cache = _inputs(2, 1, 4, 50, dtype=jnp.bfloat16, seed=1)
    positions = jnp.array([[20], [49]], jnp.int32)
    want = reference(q_lat, q_rope, cache, positions, scale=0.2)
    got = mla_decode(q_lat, q_rope, cache, positions, scale=0.2, backend="interpret", platform=form, block_s=16,
                     num_splits=2)
    assert rel_err(got, want) <= 1e-2


def test_rejects_a_cache_of_the_wrong_width():
    q_lat, q_rope, cache = _inputs(1, 1, 2, 8)
    with pytest.raises(ValueError, match="C \\+ R"):
        mla_decode(q_lat, q_rope, cache[..., :-1], jnp.zeros((1, 1), jnp.int32), scale=1.0, backend="interpret")


@pytest.mark.parametrize("form", ["gpu", "tpu"])
@pytest.mark.parametrize("S", [64, 70])
def test_a_stack_of_layers_caches_is_read_at_the_layer(form, S):
    """layer=: the kernel reads layer 1 of a [3, B, S, X] stack of caches in place (the layer index scalar-prefetched
    on TPU) and gives what that layer's slab gives; a slot count the chunks do not divide (70) pads the layer's slab
    only."""
    q_lat, q_rope, _ = _inputs(2, 1, 4, S)
    caches = jnp.stack([_inputs(2, 1, 4, S, seed=s)[2] for s in (1, 2, 3)])
    positions = jnp.array([[20], [S - 1]], jnp.int32)
    kw = dict(scale=0.3, backend="interpret", platform=form, block_s=16, num_splits=2)
    want = mla_decode(q_lat, q_rope, caches[1], positions, **kw)
    got = mla_decode(q_lat, q_rope, caches, positions, layer=jnp.int32(1), **kw)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("form", ["gpu", "tpu"])
def test_a_prompt_chunk_attends_causally_over_the_cache(form):
    """A prefill chunk in the absorbed form: T = 12 new tokens per row at consecutive positions after rows' filled
    slots (ragged: 30 and 5 slots), NaN in every slot past each row's last token, query rows in blocks of 8 (on TPU
    each block skips the slot blocks past its own last token), read from a stack of layers."""
    B, T, N, S = 2, 12, 4, 64
    q_lat, q_rope, _ = _inputs(B, T, N, S, seed=4)
    positions = jnp.array([30, 5], jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    caches = jnp.stack([_stale(_inputs(B, T, N, S, seed=s)[2], positions) for s in (5, 6)])
    want = reference(q_lat, q_rope, caches[1], positions, scale=0.3)
    assert np.isfinite(np.asarray(want)).all()
    with nan_padding():
        got = mla_decode(q_lat, q_rope, caches, positions, layer=jnp.int32(1), scale=0.3, backend="interpret",
                         platform=form, block_s=8, num_splits=1, block_m=8)
    assert rel_err(got, want) <= 1e-5


def test_many_query_rows_take_one_split():
    """Split-K is for decode's few query rows: a prefill chunk's T·N rows fill the device themselves."""
    from pallas_kernels.mla_decode import SPLIT_K_ROWS, default_splits
    assert default_splits(131072, 1024, 64) == 16 and default_splits(4096, 1024, 4 * 64) == 4
    assert default_splits(131072, 1024, SPLIT_K_ROWS) == 1


@pytest.mark.parametrize("form", ["gpu", "tpu", "xla"])
@pytest.mark.parametrize("S", [64, 40])
def test_parts_of_the_slots_merge_to_the_whole(form, S):
    """A cache split along its slots into 4 parts (as devices hold it when rows are fewer than devices): each part
    attends with positions shifted by its first slot (return_lse), merge_partials combines them by logsumexp, and
    the result is the whole cache's. Rows end in different parts (the last parts see no slot of the short row:
    logsumexp -inf, weight 0; the first parts lie wholly before a long row's position, which must not reach the
    kernel's padding: 10-slot parts in 8-slot blocks), several new tokens per row, NaN in the slots past each
    row's end."""
    from pallas_kernels.mla_decode import merge_partials
    parts = 4
    q_lat, q_rope, cache = _inputs(3, 2, 4, S, seed=4)
    positions = jnp.array([[5, 6], [S // 2 - 2, S // 2 - 1], [S - 2, S - 1]], jnp.int32)
    cache = _stale(cache, positions)
    want = reference(q_lat, q_rope, cache, positions, scale=0.3)
    kw = dict(scale=0.3, backend="interpret", platform=form, block_s=8) if form != "xla" else dict(scale=0.3,
                                                                                                     backend="xla")
    cache_PBSX = cache.reshape(3, parts, S // parts, C + R).transpose(1, 0, 2, 3)

    def part(cache_BSX, first):
        o, lse = mla_decode(q_lat, q_rope, cache_BSX, positions - first, return_lse=True, **kw)
        return merge_partials(o, lse, axis_name="slots"), lse

    got, lse_PBTN = jax.vmap(part, axis_name="slots")(cache_PBSX, jnp.arange(parts) * (S // parts))
    assert np.isinf(np.asarray(lse_PBTN[1:, 0])).all() and np.isfinite(np.asarray(lse_PBTN[:, 2])).all()
    for p in range(parts):  # every part ends with the whole result
        assert rel_err(got[p], want) <= 1e-5
    # the logsumexp of the whole cache is the merged one's: log sum exp over the parts
    _, whole_lse = mla_decode(q_lat, q_rope, cache, positions, return_lse=True, **kw)
    assert rel_err(jax.nn.logsumexp(lse_PBTN, axis=0), whole_lse) <= 1e-6
