"""Flash attention for MLA's train / prefill path, forward and backward, with each query's max logit.

    out[b, n, t]    = sum_s softmax_s(logit[b, n, t, s]) v[b, n, s]       over visible s
    logit[b,n,t,s]  = (q_nope[b,n,t] . k_nope[b,n,s] + q_rope[b,n,t] . k_rope[b,s]) * scale
    visible(t, s)   = s <= query_index[b, t] and segment_ids[b, t] == key_segment_ids[b, s]
    rowmax[b, n, t] = max over visible s of logit[b, n, t, s]             (-inf if none)

Self-attention (the default): the queries are the keys (S = T, query_index[b, t] = t, key_segment_ids =
segment_ids): causal within segments, packed rows. Context parallelism (sharding.context_parallel) gives a device
T queries out of S = stride x T keys, the whole sequence: query t is key query_index[b, t], with t x stride <=
query_index[b, t] < (t + 1) x stride (the striped order: query t of context shard r is token t x stride + r), so
which key blocks a query block can see is known from its place alone and the causal block skipping below still
holds (stride 1: self-attention).

MLA's rope key is one [S, R] per row shared by all heads, so it is read once per (b, s) block instead of being
broadcast to N heads. rowmax is the online softmax's running max at the end of the key loop: QK-Clip's max logit
per head (max of rowmax over valid queries) comes at no extra pass over memory. It carries no gradient.

    mla_attention(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, segment_ids_BT, scale=...,
                  backend="pallas", platform="tpu") -> (out_BNTU in q's dtype, rowmax_BNT float32)
    mla_attention(..., key_segment_ids_BS=..., query_index_BT=...)      # T queries of S = stride x T keys

backend and platform as pallas_kernels.backend says ("xla": the reference; "pallas": platform "tpu" or "gpu").

Three kernels, each over the causal (outer block, inner block) pairs of a (b, head):
  forward  per query block, its key blocks up to the diagonal: online softmax in float32; saves the logsumexp
  dq       the same pairs again, recomputing the probabilities from the logsumexp: ds = p (dO.v - delta) with
           delta = rowsum(dO * out); a pass of its own, so no partial dq is summed across key blocks in HBM
  dk, dv   per key block, its query blocks from the diagonal on, on transposed [keys, queries] tiles (per-query
           statistics as lane-dense rows); dk_rope per head, summed over heads outside the kernel
One pair's work (_attend_step, _dq_step, _dkv_step) is the same in both launch forms:
  TPU (Mosaic)  the inner blocks are the last grid axis: a step copies one inner block into VMEM (Pallas'
                pipeline overlaps the copy with the step before) and updates float32 accumulators in VMEM
                scratch (the softmax's running max / sum / output, or the gradient sums), written out at the outer
                block's last pair, so VMEM holds a few blocks at any length. The causal triangle is folded into
                the grid (_Pairs): outer blocks o and n-1-o share a grid row, one after the other, so the rows are
                about equally long and no step lies above the diagonal; a step past its row's end (the middle row
                of an odd count; a few more where inner blocks are longer than outer ones) repeats the row's last
                block indices, so nothing is copied, and does nothing. Per-query statistics (logsumexp, max,
                delta) and segment ids travel as [.., 1, T] rows (XLA pads a [T, 1] column to 128 lanes in HBM)
                and become columns in VMEM.
  GPU (Triton)  a program per outer block, its inner blocks a loop over the whole sequence in HBM; per-query
                statistics as [.., T, 1] columns in the forward and dq
Padding: T and S are padded to whole blocks; padded keys lie after every real query (never visible) and their rows
are zeroed before any product with probabilities, padded queries (index -1: they see nothing) are zeroed in the
dk/dv pass, padded outputs dropped.

Launch settings (block sizes, and Triton's warps / stages on GPU) are per launch form and dtype in LAUNCH, beside
the kernel: the entry point's setting arguments left None take them; a block longer than the sequence is cut to
the sequence rounded up to 128. The backward may use blocks other than the forward's. Compiled (no launch
arguments) for TPU v5p and H100 at K2's head dims (nope 128, rope 64, value 128), bf16 and float32, up to 262,144
tokens (tests/pallas_kernels/test_compile.py; figures in docs/kernels.md); not yet run or timed on a device.

Letter legend: B batch, N heads, T queries, S keys (T x stride), P nope dim, R rope dim, U value dim,
q = N·T query rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb

F32 = jnp.float32

# Launch settings per (launch form, compute dtype) for the arguments left None (backend.launch_settings): block sizes
# and, on GPU, Triton's warps and pipeline stages; bwd_* for the dq and dk/dv kernels. The blocks must keep the tiles
# inside VMEM (TPU, v5p: 16 MiB scoped) or shared memory (GPU, H100: 227 KiB per block); tests/pallas_kernels/
# test_compile.py compiles the kernels with these for TPU v5p and H100 at 32K tokens (128K and 256K with -m slow).
# Chosen from compiles alone (docs/kernels.md has the figures, dated):
#   TPU v5p: 512 x 512 blocks in all three passes (MaxText's splash-attention defaults; a 128 x 128 pair is ~10
#   MFLOP, little work for a grid step). Scoped VMEM, forward / dq / dk-dv: bf16 3.9 / 4.6 / 5.0 MiB at 32K tokens,
#   4.4 / 5.3 / 5.8 at 256K; float32 5.3 / 7.6 / 7.6 at 32K, 5.8 / 8.1 / 8.1 at 256K.
#   H100: forward bf16 128x64 tiles, 8 warps, 3 stages (168 KiB of shared memory); backward (dq, dk/dv) 64x64,
#   8 warps, 2 stages (120 / 137 KiB); float32 tiles hold twice the bytes: forward 128x32 (192 KiB), backward 32x32
#   unpipelined (68 / 88 KiB); no register spills (ptxas 12.9 -v on the PTX XLA compiled). The same at any length.
LAUNCH: dict[tuple[str, str], dict] = {
    ("tpu", "bfloat16"): dict(block_q=512, block_k=512),
    ("tpu", "float32"): dict(block_q=512, block_k=512),
    ("gpu", "bfloat16"): dict(block_q=128, block_k=64, num_warps=8, num_stages=3, bwd_block_q=64, bwd_block_k=64,
                              bwd_num_warps=8, bwd_num_stages=2),
    ("gpu", "float32"): dict(block_q=128, block_k=32, num_warps=8, num_stages=3, bwd_block_q=32, bwd_block_k=32,
                             bwd_num_warps=8, bwd_num_stages=1),
}
# any other form / dtype; bwd_* None: the forward's
DEFAULTS = dict(block_q=128, block_k=128, num_warps=4, num_stages=2, bwd_block_q=None, bwd_block_k=None,
                bwd_num_warps=None, bwd_num_stages=None)


# ---- XLA reference -------------------------------------------------------------------------------------------
def visibility(segment_ids_BT: jax.Array, key_segment_ids_BS: jax.Array | None = None,
               query_index_BT: jax.Array | None = None) -> jax.Array:
    """[B, T, S] bool: s <= query_index[t] (default t) and the same segment (key_segment_ids default: the
    queries' own)."""
    seg_k_BS = segment_ids_BT if key_segment_ids_BS is None else key_segment_ids_BS
    S = seg_k_BS.shape[1]
    if query_index_BT is None:
        query_index_BT = jnp.broadcast_to(jnp.arange(segment_ids_BT.shape[1]), segment_ids_BT.shape)
    causal_BTS = jnp.arange(S)[None, None, :] <= query_index_BT[:, :, None]
    return causal_BTS & (segment_ids_BT[:, :, None] == seg_k_BS[:, None, :])


# The reference runs the queries in causal blocks of at least this many rows (at most this many blocks), each
# against the keys up to its own end, so most of the masked upper triangle is never multiplied (T = 256: 2 blocks,
# 3/4 of the work; smaller blocks' matmuls run slower on CPU than the skipped work saves, more blocks only add
# compile time).
CAUSAL_BLOCK = 128
MAX_CAUSAL_BLOCKS = 8


def reference(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, segment_ids_BT, *, scale: float,
              key_segment_ids_BS=None, query_index_BT=None):
    """The XLA form (the CPU path and what the kernels are tested against): materialised logits in float32 as
    head-major batched matmuls (2x faster on CPU than the equivalent einsums), the shared rope key multiplied once
    for all heads, float32 softmax, queries in causal blocks (CAUSAL_BLOCK)."""
    T = q_nope_BNTP.shape[2]
    stride = k_nope_BNSP.shape[2] // T
    n_blocks = max(1, min(MAX_CAUSAL_BLOCKS, T // CAUSAL_BLOCK))
    edges = [T * i // n_blocks for i in range(n_blocks + 1)]
    visible_BTS = visibility(segment_ids_BT, key_segment_ids_BS, query_index_BT)
    outs, rowmaxes = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):  # queries [lo, hi) see keys [0, hi x stride) at most
        end = hi * stride
        out_BNTU, rowmax_BNT = _attend_block(q_nope_BNTP[:, :, lo:hi], q_rope_BNTR[:, :, lo:hi],
                                             k_nope_BNSP[:, :, :end], k_rope_BSR[:, :end], v_BNSU[:, :, :end],
                                             visible_BTS[:, lo:hi, :end], scale)
        outs.append(out_BNTU)
        rowmaxes.append(rowmax_BNT)
    join = (lambda xs: xs[0]) if n_blocks == 1 else (lambda xs: jnp.concatenate(xs, axis=2))  # noqa: E731
    return join(outs).astype(q_nope_BNTP.dtype), jax.lax.stop_gradient(join(rowmaxes))


def _attend_block(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, visible_BTS, scale):
    """Materialised attention of T queries over S keys -> (out [B, N, T, U] float32, rowmax [B, N, T])."""
    B, N, T, _ = q_nope_BNTP.shape
    nope_BNTS = jnp.matmul(q_nope_BNTP, k_nope_BNSP.swapaxes(-1, -2), preferred_element_type=F32)
    q_rope_BqR = q_rope_BNTR.reshape(B, N * T, -1)  # q = N T query rows against the one shared rope key
    rope_BNTS = jnp.matmul(q_rope_BqR, k_rope_BSR.swapaxes(-1, -2), preferred_element_type=F32).reshape(
        nope_BNTS.shape)
    logits_BNTS = jnp.where(visible_BTS[:, None], (nope_BNTS + rope_BNTS) * scale, -jnp.inf)
    rowmax_BNT = jnp.max(logits_BNTS, axis=-1)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(v_BNSU.dtype)
    return jnp.matmul(probs_BNTS, v_BNSU, preferred_element_type=F32), rowmax_BNT


# ---- kernel helpers ------------------------------------------------------------------------------------------
def _iota(shape, dim, start):
    """start + the index along `dim` of a 2-D int32 tile (built 2-D: Mosaic cannot reshape a 1-D mask to a column)."""
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _div(a, b: int):
    """a // b for non-negative ints, Python or traced (truncating division: floor division's sign fix-up has no
    Mosaic lowering on every TPU generation)."""
    return a // b if isinstance(a, int) else jax.lax.div(a, jnp.int32(b))


def _logits(qn, qr, kn, kr, scale):
    return (kb.dot_nt(qn, kn) + kb.dot_nt(qr, kr)) * scale


def _visible(idx_q, seg_q, k_start, bk, seg_k):
    """[bq, bk] from the queries' key indices and segment ids [bq, 1] and the key segment ids [1, bk]."""
    causal = idx_q >= _iota((idx_q.shape[0], bk), 1, k_start)
    return causal & (seg_q == seg_k)


# ---- one (outer block, inner block) pair of each pass: the same in both launch forms ---------------------------
def _attend_step(qn, qr, kn, kr, v, seg_q, idx_q, seg_k, k0, carry, *, scale, n_keys):
    """The forward on one pair: the online softmax's (acc, max, sum) of the query block after the key block's
    visible keys. seg_q, idx_q [bq, 1], seg_k [1, bk]; k0 the key block's first row."""
    s = jnp.where(_visible(idx_q, seg_q, k0, kn.shape[0], seg_k), _logits(qn, qr, kn, kr, scale), -jnp.inf)
    return kb.online_softmax_step(s, kb.rows_below(v, k0, n_keys), *carry)


def _attend_result(acc, m, l):
    """(out, logsumexp, max) of a finished online softmax; a query that saw no key: out 0, logsumexp 0, max -inf."""
    l_safe = jnp.where(l == 0, 1.0, l)
    return acc / l_safe, jnp.where(l == 0, 0.0, m + jnp.log(l_safe)), m


def _dq_step(qn, qr, do, lse, delta, seg_q, idx_q, kn, kr, v, seg_k, k0, *, scale, n_keys):
    """dq on one pair: the key block's terms of (d q_nope [bq, P], d q_rope [bq, R]), float32. lse, delta, seg_q,
    idx_q are [bq, 1] columns, seg_k a [1, bk] row."""
    kn, kr, v = (kb.rows_below(x, k0, n_keys) for x in (kn, kr, v))
    visible = _visible(idx_q, seg_q, k0, kn.shape[0], seg_k)
    p = jnp.where(visible, jnp.exp(_logits(qn, qr, kn, kr, scale) - lse), 0.0)
    ds = (p * (kb.dot_nt(do, v) - delta) * scale).astype(kn.dtype)
    return kb.dot_nn(ds, kn), kb.dot_nn(ds, kr)


def _dkv_step(kn, kr, v, seg_k, qn, qr, do, lse, delta, seg_q, idx_q, k0, q0, *, scale, n_queries):
    """dk / dv on one pair, on a transposed [keys, queries] tile: the query block's terms of (d k_nope [bk, P],
    this head's d k_rope [bk, R], dv [bk, U]), float32. seg_k is a [bk, 1] column; the per-query lse, delta,
    seg_q and idx_q are [1, bq] rows (lane-dense). Queries past the real ones (padding) are zeroed."""
    bk, bq = kn.shape[0], qn.shape[0]
    qn, qr, do = (kb.rows_below(x, q0, n_queries) for x in (qn, qr, do))
    real_q = _iota((1, bq), 1, q0) < n_queries
    lse, delta = (jnp.where(real_q, x, 0.0) for x in (lse, delta))
    visible = (idx_q >= _iota((bk, bq), 0, k0)) & (seg_k == seg_q) & real_q
    p_t = jnp.where(visible, jnp.exp(_logits(kn, kr, qn, qr, scale) - lse), 0.0)
    dv = kb.dot_nn(p_t.astype(do.dtype), do)
    ds_t = (p_t * (kb.dot_nt(v, do) - delta) * scale).astype(qn.dtype)
    return kb.dot_nn(ds_t, qn), kb.dot_nn(ds_t, qr), dv


class _Pairs(NamedTuple):
    """The causal (outer block, inner block) pairs of a pass, seen from its outer blocks: the forward and dq go over
    query blocks (outer) and their key blocks up to the diagonal (inner); dk/dv (by_keys) over key blocks and their
    query blocks from the diagonal on. Query block o holds keys' indices below (o + 1) bq stride (the module
    docstring's stride). Block numbers are Python ints or traced int32 scalars."""
    by_keys: bool
    bq: int
    bk: int
    n_q: int
    n_k: int
    stride: int = 1

    @classmethod
    def of(cls, Tp: int, bq: int, bk: int, *, by_keys: bool, Sp: int | None = None, stride: int = 1) -> _Pairs:
        """Tp / Sp padded queries / keys (Sp default Tp)."""
        return cls(by_keys, bq, bk, Tp // bq, (Tp if Sp is None else Sp) // bk, stride)

    @property
    def n_outer(self) -> int:
        return self.n_k if self.by_keys else self.n_q

    def rows(self, side: str) -> int:
        """Rows of a block on `side` ("outer" | "inner")."""
        return self.bk if self.by_keys == (side == "outer") else self.bq

    def first(self, o):
        """The first inner block outer block o meets."""
        return _div(o * self.bk, self.bq * self.stride) if self.by_keys else 0

    def count(self, o):
        """How many inner blocks outer block o meets."""
        if self.by_keys:
            return self.n_q - self.first(o)
        last = _div((o + 1) * self.bq * self.stride + self.bk - 1, self.bk)
        return min(last, self.n_k) if isinstance(last, int) else jnp.minimum(last, self.n_k)

    # The TPU form's grid (rows, steps): row r runs outer block r's pairs, then outer block n_outer - 1 - r's.
    @property
    def grid_rows(self) -> int:
        return (self.n_outer + 1) // 2

    @property
    def grid_steps(self) -> int:
        last = self.n_outer - 1
        return max(self.count(r) + (self.count(last - r) if last - r != r else 0) for r in range(self.grid_rows))

    def at(self, r, s) -> _Step:
        """What step s of grid row r does (traced ints). A step past the row's end repeats its last pair's block
        indices (Pallas copies nothing) and has no work."""
        a, b = r, self.n_outer - 1 - r
        ca = self.count(a)
        total = ca + jnp.where(b == a, 0, self.count(b))
        t = jnp.minimum(s, total - 1)
        in_a = t < ca
        return _Step(outer=jnp.where(in_a, a, b), inner=jnp.where(in_a, self.first(a) + t, self.first(b) + t - ca),
                     work=s < total, first=(t == 0) | (t == ca), last=(t == ca - 1) | (t == total - 1))


class _Step(NamedTuple):
    outer: jax.Array  # outer and inner block numbers
    inner: jax.Array
    work: jax.Array  # whether the step has a pair to do, whether it is its outer block's first one, its last one
    first: jax.Array
    last: jax.Array


# ---- GPU form: a program per outer block, its inner blocks a loop (Triton) ------------------------------------
def _gpu_forward_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, idxq_ref, segk_ref, o_ref, lse_ref,
                        max_ref, *, pairs, scale, n_queries, n_keys):
    bk = pairs.bk
    qn, qr, seg_q, idx_q = qn_ref[...], qr_ref[...], segq_ref[...], idxq_ref[...]

    def body(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        return _attend_step(qn, qr, kn_ref[ks, :], kr_ref[ks, :], v_ref[ks, :], seg_q, idx_q, segk_ref[:, ks],
                            j * bk, carry, scale=scale, n_keys=n_keys)

    bq = pairs.bq
    init = (jnp.zeros((bq, v_ref.shape[1]), F32), jnp.full((bq, 1), -jnp.inf, F32), jnp.zeros((bq, 1), F32))
    out, lse_ref[...], max_ref[...] = _attend_result(*jax.lax.fori_loop(0, pairs.count(pl.program_id(2)), body,
                                                                        init))
    o_ref[...] = out.astype(o_ref.dtype)


def _gpu_dq_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, idxq_ref, segk_ref, do_ref, lse_ref, delta_ref,
                   dqn_ref, dqr_ref, *, pairs, scale, n_queries, n_keys):
    bk = pairs.bk
    q_side = (qn_ref[...], qr_ref[...], do_ref[...], lse_ref[...], delta_ref[...], segq_ref[...], idxq_ref[...])

    def body(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        dqn, dqr = _dq_step(*q_side, kn_ref[ks, :], kr_ref[ks, :], v_ref[ks, :], segk_ref[:, ks], j * bk,
                            scale=scale, n_keys=n_keys)
        return carry[0] + dqn, carry[1] + dqr

    init = (jnp.zeros(qn_ref.shape, F32), jnp.zeros(qr_ref.shape, F32))
    dqn, dqr = jax.lax.fori_loop(0, pairs.count(pl.program_id(2)), body, init)
    dqn_ref[...] = dqn.astype(dqn_ref.dtype)
    dqr_ref[...] = dqr.astype(dqr_ref.dtype)


def _gpu_dkv_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, idxq_ref, segk_ref, do_ref, lse_ref, delta_ref,
                    dkn_ref, dkr_ref, dv_ref, *, pairs, scale, n_queries, n_keys):
    """The per-query statistics, segment ids and key indices come as lane-dense [1, T] rows (a [T, 1] column of a
    whole sequence would take 128x its bytes), the key segment ids as a column."""
    j, bq, bk = pl.program_id(2), pairs.bq, pairs.bk
    k_side = (kn_ref[...], kr_ref[...], v_ref[...], segk_ref[...])

    def body(i, carry):
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        terms = _dkv_step(*k_side, qn_ref[qs, :], qr_ref[qs, :], do_ref[qs, :], lse_ref[:, qs], delta_ref[:, qs],
                          segq_ref[:, qs], idxq_ref[:, qs], j * bk, i * bq, scale=scale, n_queries=n_queries)
        return tuple(c + t for c, t in zip(carry, terms))

    init = tuple(jnp.zeros(r.shape, F32) for r in (kn_ref, kr_ref, v_ref))
    first = pairs.first(j)
    dkn, dkr_ref[...], dv = jax.lax.fori_loop(first, first + pairs.count(j), body, init)
    dkn_ref[...] = dkn.astype(dkn_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- TPU form: the inner blocks a grid axis, accumulators in VMEM scratch (Mosaic) ----------------------------
def _row(column):
    """[n, 1] -> [1, n]: a transpose of the lane-broadcast tile (Mosaic transposes whole (8, 128) tiles)."""
    return jnp.transpose(jnp.broadcast_to(column, (column.shape[0], 128)))[:1, :]


def _column(row):
    """[1, n] -> [n, 1], as _row."""
    return jnp.transpose(jnp.broadcast_to(row, (128, row.shape[1])))[:, :1]


def _tpu_pass(pairs, scratch, start, step, finish):
    """The body of a TPU-form kernel at grid step (r, s): at an outer block's first pair, `start()` returns the
    scratch refs' first values (accumulators first, then what stays fixed for the outer block); at each pair,
    `step(outer row, inner row, values)` returns the accumulators' next values; at its last pair, `finish(values)`
    writes the outputs."""
    at = pairs.at(pl.program_id(2), pl.program_id(3))

    def values():
        return tuple(ref[...] for ref in scratch)

    def store(new):
        for ref, value in zip(scratch, new):
            ref[...] = value

    pl.when(at.work & at.first)(lambda: store(start()))
    o0, i0 = at.outer * pairs.rows("outer"), at.inner * pairs.rows("inner")
    pl.when(at.work)(lambda: store(step(o0, i0, values())))
    pl.when(at.work & at.last)(lambda: finish(values()))


def _tpu_forward_kernel(qn_ref, qr_ref, segq_ref, idxq_ref, kn_ref, kr_ref, v_ref, segk_ref, o_ref, lse_ref, max_ref,
                        *scratch, pairs, scale, n_queries, n_keys):
    def start():
        bq = qn_ref.shape[0]
        return (jnp.zeros((bq, v_ref.shape[1]), F32), jnp.full((bq, 1), -jnp.inf, F32), jnp.zeros((bq, 1), F32),
                _column(segq_ref[...]), _column(idxq_ref[...]))

    def step(q0, k0, values):
        acc, m, l, seg_q, idx_q = values
        return _attend_step(qn_ref[...], qr_ref[...], kn_ref[...], kr_ref[...], v_ref[...], seg_q, idx_q,
                            segk_ref[...], k0, (acc, m, l), scale=scale, n_keys=n_keys)

    def finish(values):
        out, lse, m = _attend_result(*values[:3])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...], max_ref[...] = _row(lse), _row(m)

    _tpu_pass(pairs, scratch, start, step, finish)


def _tpu_dq_kernel(qn_ref, qr_ref, do_ref, lse_ref, delta_ref, segq_ref, idxq_ref, kn_ref, kr_ref, v_ref, segk_ref,
                   dqn_ref, dqr_ref, *scratch, pairs, scale, n_queries, n_keys):
    def start():
        return (jnp.zeros(dqn_ref.shape, F32), jnp.zeros(dqr_ref.shape, F32),
                *(_column(r[...]) for r in (lse_ref, delta_ref, segq_ref, idxq_ref)))

    def step(q0, k0, values):
        dqn, dqr, *columns = values
        terms = _dq_step(qn_ref[...], qr_ref[...], do_ref[...], *columns, kn_ref[...], kr_ref[...], v_ref[...],
                         segk_ref[...], k0, scale=scale, n_keys=n_keys)
        return dqn + terms[0], dqr + terms[1]

    def finish(values):
        dqn_ref[...] = values[0].astype(dqn_ref.dtype)
        dqr_ref[...] = values[1].astype(dqr_ref.dtype)

    _tpu_pass(pairs, scratch, start, step, finish)


def _tpu_dkv_kernel(kn_ref, kr_ref, v_ref, segk_ref, qn_ref, qr_ref, do_ref, lse_ref, delta_ref, segq_ref, idxq_ref,
                    dkn_ref, dkr_ref, dv_ref, *scratch, pairs, scale, n_queries, n_keys):
    outs = (dkn_ref, dkr_ref, dv_ref)

    def start():
        return *(jnp.zeros(r.shape, F32) for r in outs), _column(segk_ref[...])

    def step(k0, q0, values):
        *sums, seg_k = values
        terms = _dkv_step(kn_ref[...], kr_ref[...], v_ref[...], seg_k, qn_ref[...], qr_ref[...], do_ref[...],
                          lse_ref[...], delta_ref[...], segq_ref[...], idxq_ref[...], k0, q0, scale=scale,
                          n_queries=n_queries)
        return tuple(s + t for s, t in zip(sums, terms))

    def finish(values):
        for ref, value in zip(outs, values):
            ref[...] = value.astype(ref.dtype)

    _tpu_pass(pairs, scratch, start, step, finish)


# ---- launches ------------------------------------------------------------------------------------------------
class _Launch(NamedTuple):
    """One pass's launch: query / key block rows and, on GPU, Triton's warps and pipeline stages."""
    bq: int
    bk: int
    num_warps: int
    num_stages: int


class _Config(NamedTuple):
    scale: float
    n_queries: int  # T before padding
    n_keys: int  # S before padding
    backend: str
    platform: str | None
    fwd: _Launch
    bwd: _Launch

    @property
    def form(self) -> str:
        return kb.launch_form(self.backend, self.platform)

    def pairs(self, launch: _Launch, Tp: int, Sp: int, *, by_keys: bool) -> _Pairs:
        return _Pairs.of(Tp, launch.bq, launch.bk, by_keys=by_keys, Sp=Sp, stride=self.n_keys // self.n_queries)

    def call(self, kernel, pairs: _Pairs, grid, launch: _Launch, **specs):
        """pallas_call of kernel (given pairs, scale, n_queries, n_keys) over grid: the GPU form's (b, n, outer
        block), or the TPU form's (b, n, rows, steps) with its last axis sequential."""
        tpu = self.form == "tpu"
        options = kb.launch_options(self.backend, self.platform, len(grid), sequential=(3,) if tpu else (),
                                    num_warps=launch.num_warps, num_stages=launch.num_stages)
        body = functools.partial(kernel, pairs=pairs, scale=self.scale, n_queries=self.n_queries,
                                 n_keys=self.n_keys)
        return pl.pallas_call(body, grid=grid, **specs, **options)


def _shape(a, dtype=None):
    return jax.ShapeDtypeStruct(a.shape if hasattr(a, "shape") else a, dtype or a.dtype)


def _costs(qn, qr, kn, kr, v, segs, cfg: _Config):
    """Cost estimates of the (forward, dq, dk/dv) launches: FLOPs of the visited pairs, operand bytes once."""
    B, N, Tp, P = qn.shape
    Sp, R, U = kn.shape[2], qr.shape[-1], v.shape[-1]
    vec = B * N * Tp * 4  # a float32 per query
    inputs = kb.nbytes(qn, qr, kn, kr, v, *segs)

    def pairs(launch, by_keys):
        p = cfg.pairs(launch, Tp, Sp, by_keys=by_keys)
        return B * N * sum(p.count(o) for o in range(p.n_outer)) * launch.bq * launch.bk

    fwd_pairs, dq_pairs, dkv_pairs = pairs(cfg.fwd, False), pairs(cfg.bwd, False), pairs(cfg.bwd, True)
    out = B * N * Tp * U * qn.dtype.itemsize  # out or dO
    backward = inputs + out + 2 * vec  # + dO, logsumexp, delta
    return (kb.cost(flops=2 * fwd_pairs * (P + R + U), transcendentals=fwd_pairs,
                    bytes_accessed=inputs + out + 2 * vec),  # scores, p v; out, logsumexp, max
            kb.cost(flops=2 * dq_pairs * (2 * (P + R) + U), transcendentals=dq_pairs,  # scores, dp = do v^T, ds k
                    bytes_accessed=backward + kb.nbytes(qn, qr)),
            kb.cost(flops=2 * dkv_pairs * (2 * (P + R) + 2 * U), transcendentals=dkv_pairs,  # + dv = p^T do
                    bytes_accessed=backward + kb.nbytes(kn, v) + B * N * Sp * R * 4))


# GPU layouts: a program reads its outer block and the whole sequence of the inner side (its loop slices it). The
# forward and dq see per-query vectors, segment ids and key indices as [.., T, 1] columns and the key segment ids as
# a [B, 1, S] row; dk/dv works on [keys, queries] tiles and gets the per-query vectors, segment ids and key indices
# as rows and the key segment ids as a [B, S, 1] column.
def _gpu_specs(length, blk, dims, *, blocked: bool, shared: bool = False):
    """Specs for per-head arrays [B, N, length, d] (d in dims; shared: one [B, length, d]), blocked along the
    sequence or whole rows."""
    rows = blk if blocked else length
    at = (lambda i: i) if blocked else (lambda i: 0)
    if shared:
        return [pl.BlockSpec((None, rows, d), lambda b, n, i: (b, at(i), 0)) for d in dims]
    return [pl.BlockSpec((None, None, rows, d), lambda b, n, i: (b, n, at(i), 0)) for d in dims]


def _gpu_column(blk):
    """An int32 vector [B, length, 1] blocked along the sequence."""
    return pl.BlockSpec((None, blk, 1), lambda b, n, i: (b, i, 0))


def _gpu_row(length):
    """An int32 vector [B, 1, length] whole."""
    return pl.BlockSpec((None, 1, length), lambda b, n, i: (b, 0, 0))


def _gpu_kv_specs(Sp, blk, P, R, U, *, blocked: bool):
    """Specs for k_nope [B,N,S,P], k_rope [B,S,R], v [B,N,S,U]."""
    nope, value = _gpu_specs(Sp, blk, (P, U), blocked=blocked)
    return [nope, *_gpu_specs(Sp, blk, (R,), blocked=blocked, shared=True), value]


def _gpu_forward(qn, qr, kn, kr, v, segq, idxq, segk, cfg, cost):
    B, N, Tp, P = qn.shape
    Sp, R, U = kn.shape[2], qr.shape[-1], v.shape[-1]
    bq, bk = cfg.fwd.bq, cfg.fwd.bk
    vec = (B, N, Tp, 1)
    out, lse, rowmax = cfg.call(
        _gpu_forward_kernel, cfg.pairs(cfg.fwd, Tp, Sp, by_keys=False), (B, N, Tp // bq), cfg.fwd,
        in_specs=[*_gpu_specs(Tp, bq, (P, R), blocked=True), *_gpu_kv_specs(Sp, bk, P, R, U, blocked=False),
                  _gpu_column(bq), _gpu_column(bq), _gpu_row(Sp)],
        out_specs=_gpu_specs(Tp, bq, (U, 1, 1), blocked=True),
        out_shape=[_shape((B, N, Tp, U), qn.dtype), _shape(vec, F32), _shape(vec, F32)], cost_estimate=cost,
    )(qn, qr, kn, kr, v, segq[:, :, None], idxq[:, :, None], segk[:, None, :])
    return out, rowmax[..., 0], lse


def _gpu_backward(qn, qr, kn, kr, v, segq, idxq, segk, do, lse, delta_BNT, cfg, costs):
    B, N, Tp, P = qn.shape
    Sp, R, U = kn.shape[2], qr.shape[-1], v.shape[-1]
    bq, bk = cfg.bwd.bq, cfg.bwd.bk
    qn_s, qr_s, do_s, lse_s, delta_s = _gpu_specs(Tp, bq, (P, R, U, 1, 1), blocked=True)
    dqn, dqr = cfg.call(
        _gpu_dq_kernel, cfg.pairs(cfg.bwd, Tp, Sp, by_keys=False), (B, N, Tp // bq), cfg.bwd,
        in_specs=[qn_s, qr_s, *_gpu_kv_specs(Sp, bk, P, R, U, blocked=False), _gpu_column(bq), _gpu_column(bq),
                  _gpu_row(Sp), do_s, lse_s, delta_s],
        out_specs=_gpu_specs(Tp, bq, (P, R), blocked=True), out_shape=[_shape(qn), _shape(qr)],
        cost_estimate=costs[0],
    )(qn, qr, kn, kr, v, segq[:, :, None], idxq[:, :, None], segk[:, None, :], do, lse, delta_BNT[..., None])

    qn_s, qr_s, do_s = _gpu_specs(Tp, bq, (P, R, U), blocked=False)
    row = pl.BlockSpec((None, None, 1, Tp), lambda b, n, i: (b, n, 0, 0))
    dkn, dkr_BNSR, dv = cfg.call(
        _gpu_dkv_kernel, cfg.pairs(cfg.bwd, Tp, Sp, by_keys=True), (B, N, Sp // bk), cfg.bwd,
        in_specs=[qn_s, qr_s, *_gpu_kv_specs(Sp, bk, P, R, U, blocked=True), _gpu_row(Tp), _gpu_row(Tp),
                  _gpu_column(bk), do_s, row, row],
        out_specs=_gpu_specs(Sp, bk, (P, R, U), blocked=True),  # per-head key blocks: dk_rope summed outside
        out_shape=[_shape(kn), _shape((B, N, Sp, R), F32), _shape(v)], cost_estimate=costs[1],
    )(qn, qr, kn, kr, v, segq[:, None, :], idxq[:, None, :], segk[:, :, None], do, lse.reshape(B, N, 1, Tp),
      delta_BNT[:, :, None, :])
    return dqn, dqr, dkn, dkr_BNSR, dv


# TPU layouts: every operand blocked along its sequence, on the outer or the inner side of a pass; per-query vectors
# (logsumexp, max, delta), segment ids and the queries' key indices as [.., 1, T] rows.
def _tpu_spec(pairs: _Pairs, side: str, *dims):
    """BlockSpec of a TPU-form operand: dims are the block's, None for the batch and head axes (the grid's first
    two indices, in that order), "T" for the sequence axis (the `side` block's rows), other dims whole."""
    def index(b, n, r, s):
        t, grid = getattr(pairs.at(r, s), side), iter((b, n))
        return tuple(next(grid) if d is None else t if d == "T" else 0 for d in dims)
    return pl.BlockSpec(tuple(pairs.rows(side) if d == "T" else d for d in dims), index)


def _tpu_operands(pairs: _Pairs, side: str, P, R, U, *, stats: int = 0):
    """Specs for (nope [B, N, T, P], rope [B, N, T, R] or the shared [B, T, R], value [B, N, T, U]) of `side`, then
    `stats` per-head rows [B, N, 1, T], the segment-id row [B, 1, T] and, on the query side, the key-index row
    [B, 1, T]; the rope key is shared on the key side."""
    spec = functools.partial(_tpu_spec, pairs, side)
    keys = pairs.by_keys == (side == "outer")
    rope = spec(None, "T", R) if keys else spec(None, None, "T", R)
    return [spec(None, None, "T", P), rope, spec(None, None, "T", U), *(spec(None, None, 1, "T"),) * stats,
            *(spec(None, 1, "T"),) * (1 if keys else 2)]


def _tpu_forward(qn, qr, kn, kr, v, segq, idxq, segk, cfg, cost):
    from jax.experimental.pallas import tpu as pltpu
    B, N, Tp, P = qn.shape
    Sp, R, U = kn.shape[2], qr.shape[-1], v.shape[-1]
    pairs = cfg.pairs(cfg.fwd, Tp, Sp, by_keys=False)
    bq, row = pairs.bq, _shape((B, N, 1, Tp), F32)
    q_spec = functools.partial(_tpu_spec, pairs, "outer")
    qn_s, qr_s, _, segq_s, idxq_s = _tpu_operands(pairs, "outer", P, R, U)
    out, lse, rowmax = cfg.call(
        _tpu_forward_kernel, pairs, (B, N, pairs.grid_rows, pairs.grid_steps), cfg.fwd,
        in_specs=[qn_s, qr_s, segq_s, idxq_s, *_tpu_operands(pairs, "inner", P, R, U)],
        out_specs=[q_spec(None, None, "T", U), q_spec(None, None, 1, "T"), q_spec(None, None, 1, "T")],
        out_shape=[_shape((B, N, Tp, U), qn.dtype), row, row], cost_estimate=cost,
        scratch_shapes=[pltpu.VMEM((bq, U), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32),
                        pltpu.VMEM((bq, 1), jnp.int32), pltpu.VMEM((bq, 1), jnp.int32)],
    )(qn, qr, segq[:, None, :], idxq[:, None, :], kn, kr, v, segk[:, None, :])
    return out, rowmax.reshape(B, N, Tp), lse


def _tpu_backward(qn, qr, kn, kr, v, segq, idxq, segk, do, lse, delta_BNT, cfg, costs):
    from jax.experimental.pallas import tpu as pltpu
    B, N, Tp, P = qn.shape
    Sp, R, U = kn.shape[2], qr.shape[-1], v.shape[-1]
    segq_row, idxq_row, segk_row, delta = segq[:, None, :], idxq[:, None, :], segk[:, None, :], delta_BNT[:, :, None, :]
    pairs = cfg.pairs(cfg.bwd, Tp, Sp, by_keys=False)
    q_spec = functools.partial(_tpu_spec, pairs, "outer")
    bq = pairs.bq
    dqn, dqr = cfg.call(
        _tpu_dq_kernel, pairs, (B, N, pairs.grid_rows, pairs.grid_steps), cfg.bwd,
        in_specs=[*_tpu_operands(pairs, "outer", P, R, U, stats=2), *_tpu_operands(pairs, "inner", P, R, U)],
        out_specs=[q_spec(None, None, "T", P), q_spec(None, None, "T", R)], out_shape=[_shape(qn), _shape(qr)],
        cost_estimate=costs[0],
        scratch_shapes=[pltpu.VMEM((bq, P), F32), pltpu.VMEM((bq, R), F32), pltpu.VMEM((bq, 1), F32),
                        pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), jnp.int32), pltpu.VMEM((bq, 1), jnp.int32)],
    )(qn, qr, do, lse, delta, segq_row, idxq_row, kn, kr, v, segk_row)

    pairs = cfg.pairs(cfg.bwd, Tp, Sp, by_keys=True)
    k_spec = functools.partial(_tpu_spec, pairs, "outer")
    bk = pairs.bk
    dkn, dkr_BNSR, dv = cfg.call(
        _tpu_dkv_kernel, pairs, (B, N, pairs.grid_rows, pairs.grid_steps), cfg.bwd,
        in_specs=[*_tpu_operands(pairs, "outer", P, R, U), *_tpu_operands(pairs, "inner", P, R, U, stats=2)],
        out_specs=[k_spec(None, None, "T", d) for d in (P, R, U)],  # per-head dk_rope, summed outside
        out_shape=[_shape(kn), _shape((B, N, Sp, R), F32), _shape(v)], cost_estimate=costs[1],
        scratch_shapes=[pltpu.VMEM((bk, P), F32), pltpu.VMEM((bk, R), F32), pltpu.VMEM((bk, U), F32),
                        pltpu.VMEM((bk, 1), jnp.int32)],
    )(kn, kr, v, segk_row, qn, qr, do, lse, delta, segq_row, idxq_row)
    return dqn, dqr, dkn, dkr_BNSR, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(qn, qr, kn, kr, v, segq, idxq, segk, cfg):
    return _flash_fwd(qn, qr, kn, kr, v, segq, idxq, segk, cfg)[0]


def _flash_fwd(qn, qr, kn, kr, v, segq, idxq, segk, cfg):
    forward = _tpu_forward if cfg.form == "tpu" else _gpu_forward
    cost = _costs(qn, qr, kn, kr, v, (segq, idxq, segk), cfg)[0]
    out, rowmax, lse = forward(qn, qr, kn, kr, v, segq, idxq, segk, cfg, cost)
    return (out, rowmax), (qn, qr, kn, kr, v, segq, idxq, segk, out, lse)


def _flash_bwd(cfg, res, cotangents):
    qn, qr, kn, kr, v, segq, idxq, segk, out, lse = res
    do = cotangents[0].astype(out.dtype)  # rowmax carries no gradient
    delta_BNT = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1)
    backward = _tpu_backward if cfg.form == "tpu" else _gpu_backward
    costs = _costs(qn, qr, kn, kr, v, (segq, idxq, segk), cfg)[1:]
    dqn, dqr, dkn, dkr_BNSR, dv = backward(qn, qr, kn, kr, v, segq, idxq, segk, do, lse, delta_BNT, cfg, costs)
    return dqn, dqr, dkn, jnp.sum(dkr_BNSR, axis=1).astype(kr.dtype), dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- dispatch ------------------------------------------------------------------------------------------------
def mla_attention(q_nope_BNTP: jax.Array, q_rope_BNTR: jax.Array, k_nope_BNSP: jax.Array, k_rope_BSR: jax.Array,
                  v_BNSU: jax.Array, segment_ids_BT: jax.Array, *, scale: float,
                  key_segment_ids_BS: jax.Array | None = None, query_index_BT: jax.Array | None = None,
                  backend: str = "pallas", platform: str | None = None, block_q: int | None = None,
                  block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  bwd_block_q: int | None = None, bwd_block_k: int | None = None, bwd_num_warps: int | None = None,
                  bwd_num_stages: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal, segment-masked MLA attention -> (out [B, N, T, U] in q's dtype, rowmax [B, N, T] float32).
    Differentiable in q, k and v (rowmax is a statistic: no gradient). See the module docstring.

    Self-attention by default (S = T). Keys longer than the queries (S = stride x T, context parallelism) need
    key_segment_ids_BS [B, S] and query_index_BT [B, T], each query's index among the keys, with t x stride <=
    query_index[b, t] < (t + 1) x stride (not checked: it is traced).
    backend: "xla" | "pallas" | "interpret"; platform: the one compiled for ("pallas": "tpu" or "gpu"; "interpret":
    picks the launch settings' form). Launch settings, None: LAUNCH's for the platform and q's dtype, else DEFAULTS:
    block_q / block_k rows per query / key block and, on GPU, Triton's num_warps / num_stages, for the forward
    kernel; the bwd_* ones for the dq and dk/dv kernels (default: the forward's). A block longer than T is cut to T
    rounded up to 128; the blocks set the padded lengths (multiples of all four)."""
    B, N, T, P = q_nope_BNTP.shape
    S, R, U = k_nope_BNSP.shape[2], q_rope_BNTR.shape[-1], v_BNSU.shape[-1]
    if S % T:
        raise ValueError(f"mla_attention: {S} keys are not a whole multiple of the {T} queries")
    if S != T and (key_segment_ids_BS is None or query_index_BT is None):
        raise ValueError(f"mla_attention: {S} keys for {T} queries need key_segment_ids_BS and query_index_BT")
    seg_k_BS = segment_ids_BT if key_segment_ids_BS is None else key_segment_ids_BS
    expect = {"q_rope": (B, N, T, R), "k_nope": (B, N, S, P), "k_rope": (B, S, R), "v": (B, N, S, U),
              "segment_ids": (B, T), "key_segment_ids": (B, S)}
    got = {"q_rope": q_rope_BNTR.shape, "k_nope": k_nope_BNSP.shape, "k_rope": k_rope_BSR.shape,
           "v": v_BNSU.shape, "segment_ids": segment_ids_BT.shape, "key_segment_ids": seg_k_BS.shape}
    if query_index_BT is not None:
        expect["query_index"], got["query_index"] = (B, T), query_index_BT.shape
    bad = [f"{k} {got[k]} (expected {v})" for k, v in expect.items() if tuple(got[k]) != v]
    if bad:
        raise ValueError(f"mla_attention: q_nope {q_nope_BNTP.shape} and " + ", ".join(bad))
    if kb.check("mla_attention", backend, platform) == "xla":
        return reference(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, segment_ids_BT, scale=scale,
                         key_segment_ids_BS=key_segment_ids_BS, query_index_BT=query_index_BT)
    if query_index_BT is None:
        query_index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    s = kb.launch_settings(LAUNCH, DEFAULTS, backend, platform, q_nope_BNTP.dtype, block_q=block_q, block_k=block_k,
                           num_warps=num_warps, num_stages=num_stages, bwd_block_q=bwd_block_q,
                           bwd_block_k=bwd_block_k, bwd_num_warps=bwd_num_warps, bwd_num_stages=bwd_num_stages)
    longest = -(-T // 128) * 128
    fwd = _Launch(min(s["block_q"], longest), min(s["block_k"], longest), s["num_warps"], s["num_stages"])
    bwd = _Launch(*(min(s["bwd_" + k] or s[k], longest) for k in ("block_q", "block_k")),
                  *(s["bwd_" + k] or s[k] for k in ("num_warps", "num_stages")))
    multiple = math.lcm(fwd.bq, fwd.bk, bwd.bq, bwd.bk)  # queries and keys alike: padded S <= stride x padded T
    pad = functools.partial(kb.pad_axis, axis=2, multiple=multiple)
    ints = functools.partial(kb.pad_axis, axis=1, multiple=multiple, value=-1)
    args = (pad(q_nope_BNTP), pad(q_rope_BNTR), pad(k_nope_BNSP), kb.pad_axis(k_rope_BSR, 1, multiple),
            pad(v_BNSU), ints(segment_ids_BT.astype(jnp.int32)), ints(query_index_BT.astype(jnp.int32)),
            ints(seg_k_BS.astype(jnp.int32)))
    out, rowmax = _flash(*args, _Config(float(scale), T, S, backend, platform, fwd, bwd))
    return out[:, :, :T], rowmax[:, :, :T]
