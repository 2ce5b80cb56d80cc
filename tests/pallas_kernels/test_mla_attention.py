"""MLA flash attention (interpret mode) in both launch forms against its XLA reference: outputs, the per-query max
logit, gradients of q_nope, q_rope, k_nope, the shared k_rope and v; packed segments (segment 0 = padding); lengths
that are not a multiple of either block; NaN in the kernel's own padding; query blocks longer and shorter than key
blocks, separate forward / backward blocks; the TPU form's folded causal schedule (every pair below the diagonal
once, nothing above it). The TPU / GPU compiles are in test_compile.py."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mla_attention as attention_module
from pallas_kernels.mla_attention import mla_attention
from tests.pallas_kernels.kernel_checks import nan_padding, rel_err

SCALE = 0.3


def _inputs(B, N, T, P=16, R=8, V=12, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = ((B, N, T, P), (B, N, T, R), (B, N, T, P), (B, T, R), (B, N, T, V))
    return tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes))


def _loss_and_grads(backend, args, segment_ids, **launch):
    def loss(*a):
        out, rowmax = mla_attention(*a, segment_ids, scale=SCALE, backend=backend, **launch)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), (out, rowmax)
    (_, (out, rowmax)), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args)
    return out, rowmax, grads


# T = 37: not a multiple of either block; row 0: three packed segments crossing block edges; row 1: one segment,
# then padding (segment 0: attends only to itself, as in the reference).
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 7, [5] * 30 + [0] * 7], np.int32)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_matches_reference_f32_with_nan_padding(platform):
    """Query blocks twice the key blocks (16 x 8); no backward blocks given: the backward takes the forward's. TPU
    form: 3 query blocks, so the folded grid has a middle row that runs one block and then idles."""
    args = _inputs(2, 2, 37)
    want_out, want_max, want_grads = _loss_and_grads("xla", args, SEGMENTS)
    with nan_padding():
        out, rowmax, grads = _loss_and_grads("interpret", args, SEGMENTS, platform=platform, block_q=16, block_k=8)
    assert rel_err(out, want_out) <= 1e-5
    # the max itself is exact; the logits under it differ from XLA's by dot-product rounding (~1 ulp of max|logit|)
    assert rel_err(rowmax, want_max) <= 1e-6
    for name, g, want in zip(("q_nope", "q_rope", "k_nope", "k_rope", "v"), grads, want_grads):
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, want) <= 1e-5, name


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_bf16_within_1e2(platform):
    """The other block order (query blocks half the key blocks; TPU form: an even number of query blocks), and
    backward blocks other than the forward's."""
    args = _inputs(1, 2, 40, dtype=jnp.bfloat16, seed=1)
    seg = np.array([[3] * 13 + [4] * 27], np.int32)
    want_out, want_max, want_grads = _loss_and_grads("xla", args, seg)
    with nan_padding():
        out, rowmax, grads = _loss_and_grads("interpret", args, seg, platform=platform, block_q=8, block_k=16,
                                              bwd_block_q=16, bwd_block_k=8)
    assert out.dtype == jnp.bfloat16 and rel_err(out, want_out) <= 1e-2
    assert rel_err(rowmax, want_max) <= 1e-2
    for g, want in zip(grads, want_grads):
        assert g.dtype == jnp.bfloat16 and rel_err(g, want) <= 1e-2


@pytest.mark.parametrize("by_keys", [False, True], ids=["by_queries", "by_keys"])
@pytest.mark.parametrize("Tp, bq, bk", [(64, 8, 8), (56, 8, 8), (48, 16, 8), (48, 8, 16), (96, 32, 8), (16, 16, 16)])
def test_tpu_schedule_visits_each_causal_pair_once_and_nothing_above_the_diagonal(Tp, bq, bk, by_keys):
    """The TPU form's grid (rows x steps, outer blocks o and n-1-o in one row): the pairs it works on are exactly the
    (query block, key block) pairs that hold a visible (query >= key) position, each once, an outer block's in one
    run from its first to its last flag; every step's block indices (what Pallas copies) are such a pair, and a step
    without work repeats the step before it (nothing copied)."""
    pairs = attention_module._Pairs.of(Tp, bq, bk, by_keys=by_keys)
    r, s = np.meshgrid(np.arange(pairs.grid_rows), np.arange(pairs.grid_steps), indexing="ij")
    at = pairs.at(jnp.asarray(r, jnp.int32), jnp.asarray(s, jnp.int32))
    outer, inner, work, first, last = (np.asarray(x) for x in at)
    q_blk, k_blk = (inner, outer) if by_keys else (outer, inner)

    causal = {(i, j) for i, j in itertools.product(range(Tp // bq), range(Tp // bk)) if (i + 1) * bq - 1 >= j * bk}
    assert all((i, j) in causal for i, j in zip(q_blk.ravel(), k_blk.ravel()))
    done = [(int(i), int(j)) for i, j in zip(q_blk[work], k_blk[work])]
    assert sorted(done) == sorted(causal)
    assert (work[:, 0]).all() and not (np.diff(work.astype(int), axis=1) > 0).any()  # work, then idle
    idle = ~work[:, 1:]
    assert (outer[:, 1:][idle] == outer[:, :-1][idle]).all() and (inner[:, 1:][idle] == inner[:, :-1][idle]).all()
    for row in range(pairs.grid_rows):
        runs = np.split(np.arange(work[row].sum()), np.flatnonzero(first[row][work[row]])[1:])
        for run in runs:  # one outer block each, first .. last
            assert len(set(outer[row][run])) == 1 and last[row][run[-1]] and not last[row][run[:-1]].any()
    assert len({int(o) for o in outer[work]}) == pairs.n_outer


def test_single_block_and_query_max_logit_is_the_visible_max():
    """T smaller than one block; the reported max is the max over each query's visible keys only."""
    args = _inputs(1, 2, 5)
    seg = np.array([[1, 1, 2, 2, 2]], np.int32)
    _, rowmax = mla_attention(*args, seg, scale=SCALE, backend="interpret", platform="tpu", block_q=8, block_k=8)
    qn, qr, kn, kr, _ = (np.asarray(a, np.float64) for a in args)
    logits = (np.einsum("bntp,bnsp->bnts", qn, kn) + np.einsum("bntr,bsr->bnts", qr, kr)) * SCALE
    for t in range(5):
        visible = [s for s in range(t + 1) if seg[0, s] == seg[0, t]]
        np.testing.assert_allclose(rowmax[0, :, t], logits[0, :, t, visible].max(axis=0), rtol=1e-6)


def test_default_launch_cuts_blocks_to_the_sequence():
    """No launch arguments: the TPU form's 512-row blocks are cut to T rounded up to 128 (one block here)."""
    args = _inputs(1, 2, 37)
    want_out, want_max = mla_attention(*args, SEGMENTS[:1], scale=SCALE, backend="xla")
    out, rowmax = jax.jit(lambda *a: mla_attention(*a, SEGMENTS[:1], scale=SCALE, backend="interpret",
                                                   platform="tpu"))(*args)
    assert rel_err(out, want_out) <= 1e-5 and rel_err(rowmax, want_max) <= 1e-6


def test_rejects_mismatched_shapes():
    qn, qr, kn, kr, v = _inputs(1, 2, 8)
    with pytest.raises(ValueError, match="k_rope"):
        mla_attention(qn, qr, kn, kr[:, :4], v, np.ones((1, 8), np.int32), scale=1.0, backend="interpret")
    with pytest.raises(ValueError, match="backend must be one of"):
        mla_attention(qn, qr, kn, kr, v, np.ones((1, 8), np.int32), scale=1.0, backend="cuda")


# Context parallelism's shape of the problem: a device's T queries are every stride-th token of the S = stride x T
# keys, starting at its shard r (the striped order, sharding.context_parallel).
def _striped(args, segment_ids, stride, r):
    """The queries of shard r out of a self-attention problem over S tokens: (q_nope, q_rope, segment ids, key
    index) of tokens r, r + stride, ..."""
    qn, qr = args[0][:, :, r::stride], args[1][:, :, r::stride]
    index = np.broadcast_to(np.arange(r, segment_ids.shape[1], stride, dtype=np.int32), segment_ids[:, r::stride].shape)
    return qn, qr, segment_ids[:, r::stride], np.ascontiguousarray(index)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("stride,r", [(2, 1), (4, 0), (4, 3)])
def test_striped_queries_equal_their_rows_of_self_attention(platform, stride, r):
    """T queries against S = stride x T keys (query t is key t x stride + r): outputs and max logits are the
    self-attention's rows of those tokens, and the gradients (NaN padding, lengths no block divides) equal the XLA
    reference's on the same problem."""
    S = 76 if stride == 4 else 74
    args = _inputs(2, 2, S, seed=stride + r)
    seg = np.array([[1] * 23 + [2] * 30 + [3] * (S - 53), [4] * (S - 9) + [0] * 9], np.int32)
    full_out, full_max = mla_attention(*args, seg, scale=SCALE, backend="xla")
    qn, qr, seg_q, index = _striped(args, seg, stride, r)

    def run(backend, **launch):
        def loss(qn, qr, kn, kr, v):
            out, rowmax = mla_attention(qn, qr, kn, kr, v, seg_q, key_segment_ids_BS=seg, query_index_BT=index,
                                        scale=SCALE, backend=backend, **launch)
            return jnp.sum(jnp.sin(out)), (out, rowmax)
        return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(qn, qr, *args[2:])

    (_, (want_out, want_max)), want_grads = run("xla")
    assert rel_err(want_out, full_out[:, :, r::stride]) <= 1e-6
    np.testing.assert_array_equal(np.asarray(want_max), np.asarray(full_max[:, :, r::stride]))
    with nan_padding():
        (_, (out, rowmax)), grads = run("interpret", platform=platform, block_q=8, block_k=16, bwd_block_q=16,
                                        bwd_block_k=8)
    assert rel_err(out, want_out) <= 1e-5 and rel_err(rowmax, want_max) <= 1e-6
    for name, g, want in zip(("q_nope", "q_rope", "k_nope", "k_rope", "v"), grads, want_grads):
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, want) <= 1e-5, name


@pytest.mark.parametrize("by_keys", [False, True], ids=["by_queries", "by_keys"])
@pytest.mark.parametrize("Tp, bq, bk, stride", [(32, 8, 8, 2), (48, 16, 8, 4), (32, 8, 16, 4), (24, 8, 8, 3)])
def test_tpu_schedule_with_strided_queries_covers_every_visible_pair(Tp, bq, bk, stride, by_keys):
    """Queries at key indices t x stride + r (any r < stride): the grid works on each (query block, key block) pair
    that holds a visible position for some shard r exactly once, and on no other."""
    pairs = attention_module._Pairs.of(Tp, bq, bk, by_keys=by_keys, Sp=Tp * stride, stride=stride)
    r, s = np.meshgrid(np.arange(pairs.grid_rows), np.arange(pairs.grid_steps), indexing="ij")
    outer, inner, work, _, _ = (np.asarray(x) for x in pairs.at(jnp.asarray(r, jnp.int32), jnp.asarray(s, jnp.int32)))
    q_blk, k_blk = (inner, outer) if by_keys else (outer, inner)
    needed = {(i, j) for i, j in itertools.product(range(Tp // bq), range(Tp * stride // bk))
              if ((i + 1) * bq - 1) * stride + stride - 1 >= j * bk}
    done = [(int(i), int(j)) for i, j in zip(q_blk[work], k_blk[work])]
    assert sorted(done) == sorted(needed)


def test_rejects_keys_without_their_segments_or_a_query_index():
    qn, qr, kn, kr, v = _inputs(1, 2, 16)
    with pytest.raises(ValueError, match="need key_segment_ids_BS and query_index_BT"):
        mla_attention(qn[:, :, :8], qr[:, :, :8], kn, kr, v, np.ones((1, 8), np.int32), scale=1.0, backend="xla")
    with pytest.raises(ValueError, match="not a whole multiple"):
        mla_attention(qn[:, :, :6], qr[:, :, :6], kn, kr, v, np.ones((1, 6), np.int32), scale=1.0, backend="xla")
