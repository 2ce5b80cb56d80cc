"""Flash attention for MLA's train / prefill path, forward and backward, with each query's max logit.

    out[b, n, t]    = sum_s softmax_s(logit[b, n, t, s]) v[b, n, s]       over visible s
    logit[b,n,t,s]  = (q_nope[b,n,t] . k_nope[b,n,s] + q_rope[b,n,t] . k_rope[b,s]) * scale
    visible(t, s)   = s <= t and segment_ids[b, t] == segment_ids[b, s]    (causal self-attention, packed rows)
    rowmax[b, n, t] = max over visible s of logit[b, n, t, s]             (-inf if none)

MLA's rope key is one [S, R] per row shared by all heads, so it is read once per (b, s) block instead of being
broadcast to N heads. rowmax is the online softmax's running max at the end of the key loop: QK-Clip's max logit
per head (max of rowmax over valid queries) comes at no extra pass over memory. It carries no gradient.

    mla_attention(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, segment_ids_BT, scale=...,
                  backend="pallas", platform="tpu") -> (out_BNTU in q's dtype, rowmax_BNT float32)

backend and platform as pallas_kernels.backend says ("xla": the reference; "pallas": platform "tpu" or "gpu").

Kernels (grid over batch x heads x query blocks, or key blocks for dk/dv; the other sequence axis is a loop inside
the program, so nothing is accumulated across grid steps and one kernel body compiles on both Mosaic and Triton):
  forward  online softmax in float32, keys only up to the causal diagonal; saves logsumexp for the backward
  dq       recomputes the probabilities from the logsumexp: ds = p (dO.v - delta) with delta = rowsum(dO * out)
  dk, dv   the same per key block over the query blocks at or after the diagonal, on transposed [keys, queries]
           tiles (per-query statistics as lane-dense rows); dk_rope per head, summed over heads outside the kernel
Padding: T is padded to whole blocks; padded keys lie after every real query (never visible) and their rows are
zeroed before any product with probabilities, padded queries are zeroed in the dk/dv loop, padded outputs dropped.

Launch settings (block sizes, and Triton's warps / stages on GPU) are per launch form and dtype in LAUNCH, beside
the kernel: the entry point's setting arguments left None take them. The backward may use blocks other than the
forward's. With them (no launch arguments) the three kernels compile for TPU v5p and H100 at K2's head dims (nope
128, rope 64, value 128), 64 heads, 1K and 4K tokens, bf16 and float32 (tests/pallas_kernels/test_compile.py);
they have not been run or timed on a device yet. On TPU a program keeps a head's whole key / value rows (forward,
dq) or query rows (dk/dv) in VMEM: 4K tokens take about a third (bf16) to a half (float32) of the 16 MiB scoped
VMEM, so much longer sequences need a key-block grid axis.

Letter legend: B batch, N heads, T queries, S keys (= T), P nope dim, R rope dim, U value dim, q = N·T query rows.
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
# inside VMEM (TPU) or shared memory (GPU, H100: 227 KiB per block); tests/pallas_kernels/test_compile.py compiles
# the kernels with these for TPU v5p and H100.
#   TPU (compiled, v5p; VMEM at 4K tokens / per block): 128x128 blocks, forward ~4.8 MiB bf16 / 8.9 MiB f32 of the
#   16 MiB scoped limit (whole K/V rows of a head stay in VMEM: up to 8K tokens bf16, 4K f32).
#   H100 (compiled; shared memory of 227 KiB per block, ptxas: no register spills unless noted): forward bf16 128x64
#   tiles, 8 warps, 3 stages (168 KiB); backward (dq, dk/dv) 64x64, 8 warps, 2 stages (120 / 136 KiB, dk/dv spills
#   8 bytes); float32 tiles hold twice the bytes: forward 128x32 (192 KiB), backward 32x32 unpipelined (60 KiB,
#   dk/dv spills 20 bytes).
LAUNCH: dict[tuple[str, str], dict] = {
    ("tpu", "bfloat16"): dict(block_q=128, block_k=128),
    ("tpu", "float32"): dict(block_q=128, block_k=128),
    ("gpu", "bfloat16"): dict(block_q=128, block_k=64, num_warps=8, num_stages=3, bwd_block_q=64, bwd_block_k=64,
                              bwd_num_warps=8, bwd_num_stages=2),
    ("gpu", "float32"): dict(block_q=128, block_k=32, num_warps=8, num_stages=3, bwd_block_q=32, bwd_block_k=32,
                             bwd_num_warps=8, bwd_num_stages=1),
}
# any other form / dtype; bwd_* None: the forward's
DEFAULTS = dict(block_q=128, block_k=128, num_warps=4, num_stages=2, bwd_block_q=None, bwd_block_k=None,
                bwd_num_warps=None, bwd_num_stages=None)


# ---- XLA reference -------------------------------------------------------------------------------------------
def visibility(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T, S] bool: s <= t and the same segment."""
    T = segment_ids_BT.shape[1]
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    return causal_TS[None] & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])


# The reference runs the queries in causal blocks of at least this many rows (at most this many blocks), each
# against the keys up to its own end, so most of the masked upper triangle is never multiplied (T = 256: 2 blocks,
# 3/4 of the work; smaller blocks' matmuls run slower on CPU than the skipped work saves, more blocks only add
# compile time).
CAUSAL_BLOCK = 128
MAX_CAUSAL_BLOCKS = 8


def reference(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, segment_ids_BT, *, scale: float):
    """The XLA form (the CPU path and what the kernels are tested against): materialised logits in float32 as
    head-major batched matmuls (2x faster on CPU than the equivalent einsums), the shared rope key multiplied once
    for all heads, float32 softmax, queries in causal blocks (CAUSAL_BLOCK)."""
    T = q_nope_BNTP.shape[2]
    n_blocks = max(1, min(MAX_CAUSAL_BLOCKS, T // CAUSAL_BLOCK))
    edges = [T * i // n_blocks for i in range(n_blocks + 1)]
    visible_BTS = visibility(segment_ids_BT)
    outs, rowmaxes = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):  # queries [lo, hi) see keys [0, hi) at most
        out_BNTU, rowmax_BNT = _attend_block(q_nope_BNTP[:, :, lo:hi], q_rope_BNTR[:, :, lo:hi],
                                             k_nope_BNSP[:, :, :hi], k_rope_BSR[:, :hi], v_BNSU[:, :, :hi],
                                             visible_BTS[:, lo:hi, :hi], scale)
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


def _div(a, b):
    """a // b for non-negative traced ints (truncating division: floor division's sign fix-up has no Mosaic
    lowering on every TPU generation)."""
    return jax.lax.div(a, jnp.int32(b))


def _logits(qn, qr, kn, kr, scale):
    return (kb.dot_nt(qn, kn) + kb.dot_nt(qr, kr)) * scale


def _visible(q_start, bq, k_start, bk, seg_q, seg_k):
    """[bq, bk] from query segment ids [bq, 1] and key segment ids [1, bk]."""
    causal = _iota((bq, bk), 0, q_start) >= _iota((bq, bk), 1, k_start)
    return causal & (seg_q == seg_k)


# ---- forward kernel ------------------------------------------------------------------------------------------
def _forward_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref, max_ref, *,
                    scale, bq, bk, n_real):
    i = pl.program_id(2)
    qn, qr, seg_q = qn_ref[...], qr_ref[...], segq_ref[...]

    def body(j, carry):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s = _logits(qn, qr, kn_ref[ks, :], kr_ref[ks, :], scale)
        s = jnp.where(_visible(i * bq, bq, j * bk, bk, seg_q, segk_ref[:, ks]), s, -jnp.inf)
        return kb.online_softmax_step(s, kb.rows_below(v_ref[ks, :], j * bk, n_real), *carry)

    n_blocks = jnp.minimum(_div((i + 1) * bq + bk - 1, bk), kn_ref.shape[0] // bk)  # up to the causal diagonal
    init = (jnp.zeros((bq, v_ref.shape[1]), F32), jnp.full((bq, 1), -jnp.inf, F32), jnp.zeros((bq, 1), F32))
    acc, m, l = jax.lax.fori_loop(0, n_blocks, body, init)
    l_safe = jnp.where(l == 0, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0, 0.0, m + jnp.log(l_safe))
    max_ref[...] = m


# ---- backward kernels ----------------------------------------------------------------------------------------
def _dq_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, delta_ref,
               dqn_ref, dqr_ref, *, scale, bq, bk, n_real):
    i = pl.program_id(2)
    qn, qr, seg_q, do = qn_ref[...], qr_ref[...], segq_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, carry):
        dqn, dqr = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        kn, kr, v = (kb.rows_below(r[ks, :], j * bk, n_real) for r in (kn_ref, kr_ref, v_ref))
        visible = _visible(i * bq, bq, j * bk, bk, seg_q, segk_ref[:, ks])
        p = jnp.where(visible, jnp.exp(_logits(qn, qr, kn, kr, scale) - lse), 0.0)
        ds = (p * (kb.dot_nt(do, v) - delta) * scale).astype(kn.dtype)
        return dqn + kb.dot_nn(ds, kn), dqr + kb.dot_nn(ds, kr)

    n_blocks = jnp.minimum(_div((i + 1) * bq + bk - 1, bk), kn_ref.shape[0] // bk)
    dqn, dqr = jax.lax.fori_loop(0, n_blocks, body, (jnp.zeros(qn.shape, F32), jnp.zeros(qr.shape, F32)))
    dqn_ref[...] = dqn.astype(dqn_ref.dtype)
    dqr_ref[...] = dqr.astype(dqr_ref.dtype)


def _dkv_kernel(qn_ref, qr_ref, kn_ref, kr_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, delta_ref,
                dkn_ref, dkr_ref, dv_ref, *, scale, bq, bk, n_real):
    """Transposed tiles [keys, queries]: the per-query statistics and segment ids come as lane-dense rows [1, T]
    (a [T, 1] column of a whole sequence would take 128x its bytes of VMEM), the key segment ids as a column."""
    j = pl.program_id(2)
    kn, kr, v, seg_k = kn_ref[...], kr_ref[...], v_ref[...], segk_ref[...]

    def body(i, carry):
        dkn, dkr, dv = carry
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        qn, qr, do = (kb.rows_below(r[qs, :], i * bq, n_real) for r in (qn_ref, qr_ref, do_ref))
        real_q = _iota((1, bq), 1, i * bq) < n_real
        lse, delta = (jnp.where(real_q, r[:, qs], 0.0) for r in (lse_ref, delta_ref))  # [1, bq]
        causal = _iota((bk, bq), 1, i * bq) >= _iota((bk, bq), 0, j * bk)
        visible = causal & (seg_k == segq_ref[:, qs]) & real_q
        p_t = jnp.where(visible, jnp.exp(_logits(kn, kr, qn, qr, scale) - lse), 0.0)  # [bk, bq]
        dv = dv + kb.dot_nn(p_t.astype(do.dtype), do)
        ds_t = (p_t * (kb.dot_nt(v, do) - delta) * scale).astype(qn.dtype)
        return dkn + kb.dot_nn(ds_t, qn), dkr + kb.dot_nn(ds_t, qr), dv

    first = _div(j * bk, bq)  # query blocks before the diagonal see none of these keys
    init = (jnp.zeros(kn.shape, F32), jnp.zeros(kr.shape, F32), jnp.zeros(v.shape, F32))
    dkn, dkr, dv = jax.lax.fori_loop(first, qn_ref.shape[0] // bq, body, init)
    dkn_ref[...] = dkn.astype(dkn_ref.dtype)
    dkr_ref[...] = dkr
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- launches ------------------------------------------------------------------------------------------------
# Layouts the kernels see: for a block of queries (forward, dq), its per-query vectors (logsumexp, rowmax, delta)
# as [B, N, T, 1] columns and segment ids as [B, T, 1] (query side) and [B, 1, T] (key side), so a row statistic
# broadcasts against a [queries, keys] tile without a relayout. The dk/dv kernel works on [keys, queries] tiles
# and reads all queries of a head: its per-query vectors come as [B, N, 1, T] rows, the segment ids swapped.
# Every block's last two dims are whole or (8, 128)-aligned (Mosaic's rule).
def _q_specs(Tp, blk, dims, *, blocked: bool):
    """Specs for per-head query-side arrays [B, N, T, d] (d in dims), blocked along T or whole rows."""
    rows = blk if blocked else Tp
    at = (lambda b, n, i: (b, n, i, 0)) if blocked else (lambda b, n, i: (b, n, 0, 0))
    return [pl.BlockSpec((None, None, rows, d), at) for d in dims]


def _k_specs(Tp, blk, P, R, U, *, blocked: bool):
    """Specs for k_nope [B,N,S,P], k_rope [B,S,R], v [B,N,S,U]."""
    rows = blk if blocked else Tp
    at = (lambda i: i) if blocked else (lambda i: 0)
    return [pl.BlockSpec((None, None, rows, P), lambda b, n, i: (b, n, at(i), 0)),
            pl.BlockSpec((None, rows, R), lambda b, n, i: (b, at(i), 0)),
            pl.BlockSpec((None, None, rows, U), lambda b, n, i: (b, n, at(i), 0))]


def _seg_specs(Tp, blk):
    """Specs for segment ids [B, T, 1] blocked along T and [B, 1, T] whole: the forward and dq kernels read the
    query side blocked and the key side whole, the dk/dv kernel the other way round."""
    return [pl.BlockSpec((None, blk, 1), lambda b, n, i: (b, i, 0)),
            pl.BlockSpec((None, 1, Tp), lambda b, n, i: (b, 0, 0))]


def _shape(a, dtype=None):
    return jax.ShapeDtypeStruct(a.shape if hasattr(a, "shape") else a, dtype or a.dtype)


class _Launch(NamedTuple):
    """One pass's launch: query / key block rows and, on GPU, Triton's warps and pipeline stages."""
    bq: int
    bk: int
    num_warps: int
    num_stages: int

    def options(self, backend, platform):
        return kb.launch_options(backend, platform, 3, num_warps=self.num_warps, num_stages=self.num_stages)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(qn, qr, kn, kr, v, seg, cfg):
    return _flash_forward(qn, qr, kn, kr, v, seg, cfg)[:2]


def _visited_pairs(B, N, Tp, bq, bk, *, by_keys: bool) -> int:
    """(query, key) pairs in the blocks a kernel visits: each query block up to the causal diagonal (forward,
    dq), or each key block from its diagonal on (dk/dv)."""
    if by_keys:
        blocks = sum(Tp // bq - (j * bk) // bq for j in range(Tp // bk))
    else:
        blocks = sum(min(-(-(i + 1) * bq // bk), Tp // bk) for i in range(Tp // bq))
    return B * N * blocks * bq * bk


def _flash_forward(qn, qr, kn, kr, v, seg, cfg):
    scale, n_real, backend, platform, launch, _ = cfg
    bq, bk = launch.bq, launch.bk
    B, N, Tp, P = qn.shape
    R, U = qr.shape[-1], v.shape[-1]
    vec = (B, N, Tp, 1)
    pairs = _visited_pairs(B, N, Tp, bq, bk, by_keys=False)
    out_shape = [_shape((B, N, Tp, U), qn.dtype), _shape(vec, F32), _shape(vec, F32)]
    work = kb.cost(flops=2 * pairs * (P + R + U), transcendentals=pairs,
                   bytes_accessed=kb.nbytes(qn, qr, kn, kr, v, seg, *out_shape))
    out, lse, rowmax = pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, bq=bq, bk=bk, n_real=n_real), grid=(B, N, Tp // bq),
        in_specs=[*_q_specs(Tp, bq, (P, R), blocked=True), *_k_specs(Tp, bk, P, R, U, blocked=False),
                  *_seg_specs(Tp, bq)],
        out_specs=_q_specs(Tp, bq, (U, 1, 1), blocked=True),
        out_shape=out_shape, cost_estimate=work,
        **launch.options(backend, platform))(qn, qr, kn, kr, v, seg[:, :, None], seg[:, None, :])
    return out, rowmax[..., 0], lse


def _flash_fwd(qn, qr, kn, kr, v, seg, cfg):
    out, rowmax, lse = _flash_forward(qn, qr, kn, kr, v, seg, cfg)
    return (out, rowmax), (qn, qr, kn, kr, v, seg, out, lse)


def _flash_bwd(cfg, res, cotangents):
    scale, n_real, backend, platform, _, launch = cfg
    bq, bk = launch.bq, launch.bk
    qn, qr, kn, kr, v, seg, out, lse = res
    do = cotangents[0].astype(out.dtype)  # rowmax carries no gradient
    delta = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1, keepdims=True)
    B, N, Tp, P = qn.shape
    R, U = qr.shape[-1], v.shape[-1]
    opts = launch.options(backend, platform)
    kw = dict(scale=scale, bq=bq, bk=bk, n_real=n_real)
    seg_col, seg_row = seg[:, :, None], seg[:, None, :]
    operands = kb.nbytes(qn, qr, kn, kr, v, seg, do, lse, delta)
    pairs_q = _visited_pairs(B, N, Tp, bq, bk, by_keys=False)  # scores again, dp = do v^T, dq = ds k
    dq_work = kb.cost(flops=2 * pairs_q * (2 * (P + R) + U), transcendentals=pairs_q,
                      bytes_accessed=operands + kb.nbytes(qn, qr))
    pairs_k = _visited_pairs(B, N, Tp, bq, bk, by_keys=True)  # scores, dp, dv = p^T do, dk = ds^T q
    dkv_work = kb.cost(flops=2 * pairs_k * (2 * (P + R) + 2 * U), transcendentals=pairs_k,
                       bytes_accessed=operands + kb.nbytes(kn, v) + B * N * Tp * R * 4)

    qn_s, qr_s, do_s, lse_s, delta_s = _q_specs(Tp, bq, (P, R, U, 1, 1), blocked=True)
    dqn, dqr = pl.pallas_call(
        functools.partial(_dq_kernel, **kw), grid=(B, N, Tp // bq),
        in_specs=[qn_s, qr_s, *_k_specs(Tp, bk, P, R, U, blocked=False), *_seg_specs(Tp, bq), do_s, lse_s, delta_s],
        out_specs=_q_specs(Tp, bq, (P, R), blocked=True), out_shape=[_shape(qn), _shape(qr)],
        cost_estimate=dq_work, **opts,
    )(qn, qr, kn, kr, v, seg_col, seg_row, do, lse, delta)

    qn_s, qr_s, do_s = _q_specs(Tp, bq, (P, R, U), blocked=False)
    row = pl.BlockSpec((None, None, 1, Tp), lambda b, n, i: (b, n, 0, 0))
    segk_s, segq_s = _seg_specs(Tp, bk)
    dkn, dkr_BNSR, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw), grid=(B, N, Tp // bk),
        in_specs=[qn_s, qr_s, *_k_specs(Tp, bk, P, R, U, blocked=True), segq_s, segk_s, do_s, row, row],
        out_specs=_q_specs(Tp, bk, (P, R, U), blocked=True),  # per-head key blocks: dk_rope summed below
        out_shape=[_shape(kn), _shape((B, N, Tp, R), F32), _shape(v)], cost_estimate=dkv_work, **opts,
    )(qn, qr, kn, kr, v, seg_row, seg_col, do, lse.reshape(B, N, 1, Tp), delta.reshape(B, N, 1, Tp))
    return dqn, dqr, dkn, jnp.sum(dkr_BNSR, axis=1).astype(kr.dtype), dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- dispatch ------------------------------------------------------------------------------------------------
def mla_attention(q_nope_BNTP: jax.Array, q_rope_BNTR: jax.Array, k_nope_BNSP: jax.Array, k_rope_BSR: jax.Array,
                  v_BNSU: jax.Array, segment_ids_BT: jax.Array, *, scale: float, backend: str = "pallas",
                  platform: str | None = None, block_q: int | None = None, block_k: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, bwd_block_q: int | None = None,
                  bwd_block_k: int | None = None, bwd_num_warps: int | None = None,
                  bwd_num_stages: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal, segment-masked MLA attention -> (out [B, N, T, U] in q's dtype, rowmax [B, N, T] float32).
    Differentiable in q, k and v (rowmax is a statistic: no gradient). See the module docstring.

    backend: "xla" | "pallas" | "interpret"; platform: the one compiled for ("pallas": "tpu" or "gpu"; "interpret":
    picks the launch settings' form). Launch settings, None: LAUNCH's for the platform and q's dtype, else DEFAULTS:
    block_q / block_k rows per query / key block and, on GPU, Triton's num_warps / num_stages, for the forward
    kernel; the bwd_* ones for the dq and dk/dv kernels (default: the forward's). The blocks set the padded length
    (a multiple of all four)."""
    B, N, T, P = q_nope_BNTP.shape
    R, U = q_rope_BNTR.shape[-1], v_BNSU.shape[-1]
    expect = {"q_rope": (B, N, T, R), "k_nope": (B, N, T, P), "k_rope": (B, T, R), "v": (B, N, T, U),
              "segment_ids": (B, T)}
    got = {"q_rope": q_rope_BNTR.shape, "k_nope": k_nope_BNSP.shape, "k_rope": k_rope_BSR.shape,
           "v": v_BNSU.shape, "segment_ids": segment_ids_BT.shape}
    bad = [f"{k} {got[k]} (expected {v})" for k, v in expect.items() if tuple(got[k]) != v]
    if bad:
        raise ValueError(f"mla_attention: q_nope {q_nope_BNTP.shape} and " + ", ".join(bad))
    if kb.check("mla_attention", backend, platform) == "xla":
        return reference(q_nope_BNTP, q_rope_BNTR, k_nope_BNSP, k_rope_BSR, v_BNSU, segment_ids_BT, scale=scale)
    s = kb.launch_settings(LAUNCH, DEFAULTS, backend, platform, q_nope_BNTP.dtype, block_q=block_q, block_k=block_k,
                           num_warps=num_warps, num_stages=num_stages, bwd_block_q=bwd_block_q,
                           bwd_block_k=bwd_block_k, bwd_num_warps=bwd_num_warps, bwd_num_stages=bwd_num_stages)
    fwd = _Launch(s["block_q"], s["block_k"], s["num_warps"], s["num_stages"])
    bwd = _Launch(*(s["bwd_" + k] or s[k] for k in ("block_q", "block_k", "num_warps", "num_stages")))
    multiple = math.lcm(fwd.bq, fwd.bk, bwd.bq, bwd.bk)
    pad = functools.partial(kb.pad_axis, axis=2, multiple=multiple)
    args = (pad(q_nope_BNTP), pad(q_rope_BNTR), pad(k_nope_BNSP), kb.pad_axis(k_rope_BSR, 1, multiple),
            pad(v_BNSU), kb.pad_axis(segment_ids_BT.astype(jnp.int32), 1, multiple, value=-1))
    out, rowmax = _flash(*args, (float(scale), T, backend, platform, fwd, bwd))
    return out[:, :, :T], rowmax[:, :, :T]
