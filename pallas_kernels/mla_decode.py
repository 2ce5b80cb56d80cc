"""Absorbed MLA decode over the latent cache: every head attends over one shared [S, C + R] latent per row.

With kv_b's key half folded into the query (q_lat = q_nope . W_UK), MLA attention for new tokens is

    logit[b, t, n, s] = (q_lat[b, t, n] . c[b, s] + q_rope[b, t, n] . k_rope[b, s]) * scale
    o_lat[b, t, n]    = sum_s softmax_s(logit) c[b, s]            over visible slots s <= positions[b, t]

where cache[b, s] = [c (C values) | k_rope (R values)] is exactly what `k2jax.generate.LatentCache` stores per
layer. The value is the latent itself; W_UV and o_proj are applied by the caller. All N heads (and all T new
tokens) of a row share the keys, so one program handles the T·N query rows of a row against a block of slots:
a [T·N, C + R] x [C + R, block] product, the shape FlashMLA uses.

    mla_decode(q_lat_BTNC, q_rope_BTNR, cache_BSX, positions_BT, scale=..., backend="auto")
        -> o_lat [B, T, N, C] float32

Split-K ("flash decoding"): the S slots are cut into `num_splits` chunks, one program per (row, chunk) writes a
partial softmax (normalised output and logsumexp) and the chunks are merged outside the kernel, so a batch of
one long context still fills the device. Ragged rows: a program runs only over the blocks holding slots up to its
row's last position (a per-(row, chunk) block count computed outside the kernel), so a short row costs little in a
batch of long ones; slots past a row's last position are masked and zeroed (stale or uninitialised cache memory
never reaches a result, NaN included).

Letter legend: B batch, T new tokens per row, N heads, S cache slots, C kv_lora, R rope dim, X = C + R, M = T·N.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb

F32 = jnp.float32


# ---- XLA reference -------------------------------------------------------------------------------------------
def reference(q_lat_BTNC, q_rope_BTNR, cache_BSX, positions_BT, *, scale: float) -> jax.Array:
    C = q_lat_BTNC.shape[-1]
    c_BSC, k_rope_BSR = cache_BSX[..., :C], cache_BSX[..., C:]
    logits_BTNS = (jnp.einsum("btnc,bsc->btns", q_lat_BTNC, c_BSC, preferred_element_type=F32)
                   + jnp.einsum("btnr,bsr->btns", q_rope_BTNR, k_rope_BSR, preferred_element_type=F32)) * scale
    visible_BTS = jnp.arange(cache_BSX.shape[1])[None, None, :] <= positions_BT[:, :, None]
    logits_BTNS = jnp.where(visible_BTS[:, :, None, :], logits_BTNS, -jnp.inf)
    probs_BTNS = jax.nn.softmax(logits_BTNS, axis=-1)
    c_BSC = jnp.where((jnp.arange(cache_BSX.shape[1])[None, :] <= positions_BT.max(1, keepdims=True))[..., None],
                      c_BSC, 0)  # slots past the row's last position may hold anything
    return jnp.einsum("btns,bsc->btnc", probs_BTNS.astype(c_BSC.dtype), c_BSC, preferred_element_type=F32)


# ---- kernel --------------------------------------------------------------------------------------------------
def _decode_kernel(nblk_ref, ql_ref, qr_ref, pos_ref, cache_ref, o_ref, lse_ref, *, scale, bs, C, R, chunk):
    b, split = pl.program_id(0), pl.program_id(1)
    ql, qr, pos = ql_ref[...], qr_ref[...], pos_ref[...]  # [M, C], [M, R], [M, 1]
    last = jnp.max(pos, axis=0, keepdims=True)  # [1, 1]: the row's last visible slot
    base = split * chunk

    def body(j, carry):
        rows = pl.ds(pl.multiple_of(j * bs, bs), bs)
        c = kb.rows_below(cache_ref[rows, pl.ds(0, C)], base + j * bs, last + 1)
        kr = cache_ref[rows, pl.ds(C, R)]
        s = (kb.dot_nt(ql, c) + kb.dot_nt(qr, kr)) * scale  # [M, bs]
        slot = base + j * bs + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        return kb.online_softmax_step(jnp.where(slot <= pos, s, -jnp.inf), c, *carry)

    M = ql.shape[0]
    init = (jnp.zeros((M, C), F32), jnp.full((M, 1), -jnp.inf, F32), jnp.zeros((M, 1), F32))
    acc, m, l = jax.lax.fori_loop(0, nblk_ref[b, split], body, init)
    l_safe = jnp.where(l == 0, 1.0, l)
    o_ref[...] = acc / l_safe
    lse_ref[...] = jnp.where(l == 0, -jnp.inf, m + jnp.log(l_safe))


def default_splits(num_slots: int, block_s: int) -> int:
    """One chunk per ~1024 slots, at most 16."""
    return max(1, min(16, -(-num_slots // max(1024, block_s))))


def mla_decode(q_lat_BTNC: jax.Array, q_rope_BTNR: jax.Array, cache_BSX: jax.Array, positions_BT: jax.Array, *,
               scale: float, backend: str = "auto", platform: str | None = None, block_s: int = 128,
               num_splits: int | None = None) -> jax.Array:
    """-> o_lat [B, T, N, C] float32. See the module docstring."""
    B, T, N, C = q_lat_BTNC.shape
    R = q_rope_BTNR.shape[-1]
    S, X = cache_BSX.shape[1:]
    if q_rope_BTNR.shape[:3] != (B, T, N) or cache_BSX.shape[0] != B or X != C + R:
        raise ValueError(f"mla_decode: q_lat {q_lat_BTNC.shape}, q_rope {q_rope_BTNR.shape} and cache "
                         f"{cache_BSX.shape} do not agree (cache slots hold kv_lora + rope = C + R values)")
    if positions_BT.shape != (B, T):
        raise ValueError(f"mla_decode: positions must be [B, T] = {(B, T)}, got {positions_BT.shape}")
    backend = kb.resolve(backend, (C, R))
    if backend == "xla":
        return reference(q_lat_BTNC, q_rope_BTNR, cache_BSX, positions_BT, scale=scale)

    splits = num_splits or default_splits(S, block_s)
    cache = kb.pad_axis(cache_BSX, 1, splits * block_s)
    chunk = cache.shape[1] // splits
    M = T * N
    pos_BT = positions_BT.astype(jnp.int32)
    pos_BM1 = jnp.repeat(pos_BT, N, axis=1)[..., None]  # row m = t * N + n
    # blocks of each chunk holding slots <= the row's last position
    last_B1 = pos_BT.max(axis=1, keepdims=True)
    starts = jnp.arange(splits, dtype=jnp.int32)[None, :] * chunk
    nblk_BK = jnp.clip((last_B1 + 1 - starts + block_s - 1) // block_s, 0, chunk // block_s).astype(jnp.int32)

    row = lambda d: pl.BlockSpec((None, M, d), lambda b, k: (b, 0, 0))  # noqa: E731
    part = lambda d: pl.BlockSpec((None, None, M, d), lambda b, k: (b, k, 0, 0))  # noqa: E731
    o_BKMC, lse_BKM1 = pl.pallas_call(
        functools.partial(_decode_kernel, scale=float(scale), bs=block_s, C=C, R=R, chunk=chunk),
        grid=(B, splits),
        in_specs=[kb.scalar_table_spec(backend, platform), row(C), row(R), row(1),
                  pl.BlockSpec((None, chunk, X), lambda b, k: (b, k, 0))],
        out_specs=[part(C), part(1)],
        out_shape=[jax.ShapeDtypeStruct((B, splits, M, C), F32), jax.ShapeDtypeStruct((B, splits, M, 1), F32)],
        **kb.launch_options(backend, platform, 2),
    )(nblk_BK, q_lat_BTNC.reshape(B, M, C), q_rope_BTNR.reshape(B, M, R), pos_BM1, cache)
    return merge_splits(o_BKMC, lse_BKM1).reshape(B, T, N, C)


def merge_splits(o_BKMC: jax.Array, lse_BKM1: jax.Array) -> jax.Array:
    """Combines per-chunk normalised outputs by their logsumexps -> [B, M, C]. Chunks that saw nothing
    (lse = -inf) get weight 0."""
    top_B1M1 = jnp.max(lse_BKM1, axis=1, keepdims=True)
    top_B1M1 = jnp.where(top_B1M1 == -jnp.inf, 0.0, top_B1M1)
    w_BKM1 = jnp.exp(lse_BKM1 - top_B1M1)
    total_BM1 = jnp.sum(w_BKM1, axis=1)
    merged_BMC = jnp.sum(w_BKM1 * jnp.where(w_BKM1 > 0, o_BKMC, 0.0), axis=1)
    return merged_BMC / jnp.where(total_BM1 == 0, 1.0, total_BM1)
