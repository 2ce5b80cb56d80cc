"""Absorbed MLA decode over the latent cache: every head attends over one shared [S, C + R] latent per row.

With kv_b's key half folded into the query (q_lat = q_nope . W_UK), MLA attention for new tokens is

    logit[b, t, n, s] = (q_lat[b, t, n] . c[b, s] + q_rope[b, t, n] . k_rope[b, s]) * scale
    o_lat[b, t, n]    = sum_s softmax_s(logit) c[b, s]            over visible slots s <= positions[b, t]
 where cache[b, s] = [c (C values) | k_rope (R values) | padding] is what `k2jax.inference.generate.LatentCache`
stores per layer (a slot may be padded past C + R: TPU keeps it a multiple of 128 values, unread). The value is the
latent itself; W_UV and o_proj are applied by the caller. All N heads (and all T new tokens) of a row share the keys,
so one program handles the T·N query rows of a row against a block of slots: a [T·N, C + R] x [C + R, block] product,
the shape FlashMLA uses.

    mla_decode(q_lat_BTNC, q_rope_BTNR, cache_BSX, positions_BT, scale=..., backend="pallas", platform="tpu")
        -> o_lat [B, T, N, C] float32

backend and platform as pallas_kernels.backend says ("xla": the reference; "pallas": platform "tpu" or "gpu").

Split-K ("flash decoding"): the S slots are cut into `num_splits` chunks, one program per (row, chunk) writes a
partial softmax (normalised output and logsumexp) and the chunks are merged outside the kernel, so a batch of
one long context still fills the device. Ragged rows: only the blocks holding slots up to a row's last position
are read, so a short row costs little in a batch of long ones; slots past a row's last position are masked and
zeroed (stale or uninitialised cache memory never reaches a result, NaN included).

Two launch forms, picked by platform (backend.launch_form; one block step, `_block_step`, shared):
  "tpu" (Mosaic): the grid is (row, chunk, block of `block_m` query rows, block of `block_s` slots), the last
        axis sequential with the running softmax in VMEM scratch; the cache's BlockSpec copies one [block_s, C + R]
        block per step, and the blocks past the last position of a query-row block map to its last needed block,
        so they are never copied (a scalar-prefetched table of last positions per row and query-row block: a
        chunk of a prompt skips the slots after its tokens causally). VMEM holds a block of slots and one of query
        rows, not the chunk or all T·N rows: a 128K-slot cache and a prefill chunk of thousands of tokens compile.
  "gpu" (Triton; also the default interpreted form): one program per (row, chunk, `block_m` of the T·N query
        rows) loops over its chunk's blocks up to the row's last position (a per-(row, chunk) block count
        computed outside the kernel), loading them through the chunk's ref. Fewer query rows per program keep the
        [block_m, C] float32 accumulator in registers and the [block_m + block_s, C] operands in shared memory;
        the programs of one chunk read the same cache blocks (from L2 after the first).

Launch settings per launch form and cache dtype are in LAUNCH, beside the kernel: the entry point's setting
arguments left None take them. With them (no launch arguments) both forms compile for their platform (TPU v5p,
H100) at K2's sizes (64 heads, C = 512, R = 64, 4K and 128K slots, 1 and 4 new tokens, bf16 and float32;
tests/pallas_kernels/test_compile.py), and run in the Pallas interpreter in the tests; they have not been run or
timed on a device yet.

Split-K is for few query rows (decode): with many (a prefill chunk: T·N >= SPLIT_K_ROWS) the query-row blocks fill
the device and each row's partials would cost a [T·N, C] float32 copy per chunk, so the default is one chunk.

Letter legend: B batch, T new tokens per row, N heads, S cache slots, C kv_lora, R rope dim, X = C + R, q = T·N
query rows (all, or a block_m of them: q'), k split-K chunks, i query-row blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb

F32 = jnp.float32

# Launch settings per (launch form, cache dtype) for the arguments left None (backend.launch_settings); the cache's
# blocks are what fill VMEM / shared memory (H100: 227 KiB per block). tests/pallas_kernels/test_compile.py compiles
# both forms with these for TPU v5p and H100.
#   TPU (compiled, v5p): one 1024-slot (bf16) / 512-slot (f32) cache block per grid step, ~1.2 MB per copy, and
#   256 query rows per block (decode's T·N = 64 rows are one block; a prefill chunk's T·N rows come in blocks).
#   H100 (compiled; ptxas: no register spills unless noted): 16 of the T·N query rows per program (the [rows, 512]
#   float32 accumulator in registers), 64-slot blocks (218 KiB bf16; float32 32-slot blocks, 174 KiB, spills 668
#   bytes).
LAUNCH: dict[tuple[str, str], dict] = {
    ("tpu", "bfloat16"): dict(block_s=1024, block_m=256),
    ("tpu", "float32"): dict(block_s=512, block_m=256),
    ("gpu", "bfloat16"): dict(block_m=16, block_s=64, num_warps=8, num_stages=2),
    ("gpu", "float32"): dict(block_m=16, block_s=32, num_warps=8, num_stages=2),
}
# any other form / dtype; num_splits None: default_splits, block_m None: all T·N query rows
SPLIT_K_ROWS = 2048  # query rows (T·N) from which default_splits is 1
DEFAULTS = dict(block_s=128, num_splits=None, block_m=None, num_warps=4, num_stages=2)


# ---- XLA reference -------------------------------------------------------------------------------------------
def reference(q_lat_BTNC, q_rope_BTNR, cache_BSX, positions_BT, *, scale: float, return_lse: bool = False):
    C = q_lat_BTNC.shape[-1]
    R = q_rope_BTNR.shape[-1]
    c_BSC, k_rope_BSR = cache_BSX[..., :C], cache_BSX[..., C:C + R]
    logits_BTNS = (jnp.einsum("btnc,bsc->btns", q_lat_BTNC, c_BSC, preferred_element_type=F32)
                   + jnp.einsum("btnr,bsr->btns", q_rope_BTNR, k_rope_BSR, preferred_element_type=F32)) * scale
    visible_BTS = jnp.arange(cache_BSX.shape[1])[None, None, :] <= positions_BT[:, :, None]
    logits_BTNS = jnp.where(visible_BTS[:, :, None, :], logits_BTNS, -jnp.inf)
    # the softmax written out, so that a query that sees no slot (a slot split's device before its position) gives
    # output 0 and logsumexp -inf
    m_BTN1 = jnp.max(logits_BTNS, axis=-1, keepdims=True)
    m_BTN1 = jnp.where(m_BTN1 == -jnp.inf, 0.0, m_BTN1)
    p_BTNS = jnp.exp(logits_BTNS - m_BTN1)
    l_BTN1 = jnp.sum(p_BTNS, axis=-1, keepdims=True)
    c_BSC = jnp.where((jnp.arange(cache_BSX.shape[1])[None, :] <= positions_BT.max(1, keepdims=True))[..., None],
                      c_BSC, 0)  # slots past the row's last position may hold anything
    o_BTNC = jnp.einsum("btns,bsc->btnc", (p_BTNS / jnp.where(l_BTN1 == 0, 1.0, l_BTN1)).astype(c_BSC.dtype), c_BSC,
                        preferred_element_type=F32)
    if not return_lse:
        return o_BTNC
    return o_BTNC, jnp.where(l_BTN1 == 0, -jnp.inf, m_BTN1 + jnp.log(jnp.where(l_BTN1 == 0, 1.0, l_BTN1)))[..., 0]


# ---- kernels ---------------------------------------------------------------------------------------------------
def _block_step(ql, qr, pos, c, kr, first_slot, carry, *, scale):
    """One block of slots [first_slot, first_slot + bs) for query rows ql [q', C], qr [q', R] at positions pos
    [q', 1]: the running (acc [q', C], max [q', 1], sum [q', 1]) -> updated. The block's latent rows past the
    rows' last position are zeroed (stale or uninitialised slots may hold NaN)."""
    c = kb.rows_below(c, first_slot, jnp.max(pos, axis=0, keepdims=True) + 1)
    s = (kb.dot_nt(ql, c) + kb.dot_nt(qr, kr)) * scale  # [q', bs]
    slot = first_slot + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return kb.online_softmax_step(jnp.where(slot <= pos, s, -jnp.inf), c, *carry)


def _finish(acc, m, l, o_ref, lse_ref):
    l_safe = jnp.where(l == 0, 1.0, l)
    o_ref[...] = acc / l_safe
    lse_ref[...] = jnp.where(l == 0, -jnp.inf, m + jnp.log(l_safe))


def _loop_kernel(nblk_ref, *refs, scale, bs, C, R, chunk, layered):
    """GPU form: one program per (row, chunk, query-row block) loops over the chunk's blocks up to the row's last
    position, reading them through the chunk's ref (a pointer on GPU; a stack of layers' caches: at the layer)."""
    layer_ref, ql_ref, qr_ref, pos_ref, cache_ref, o_ref, lse_ref = refs if layered else (None, *refs)
    b, split = pl.program_id(0), pl.program_id(1)
    ql, qr, pos = ql_ref[...], qr_ref[...], pos_ref[...]  # [q', C], [q', R], [q', 1]
    at = (layer_ref[0],) if layered else ()

    def body(j, carry):
        rows = pl.ds(pl.multiple_of(j * bs, bs), bs)
        return _block_step(ql, qr, pos, cache_ref[(*at, rows, pl.ds(0, C))], cache_ref[(*at, rows, pl.ds(C, R))],
                           split * chunk + j * bs, carry, scale=scale)

    n_rows = ql.shape[0]
    init = (jnp.zeros((n_rows, C), F32), jnp.full((n_rows, 1), -jnp.inf, F32), jnp.zeros((n_rows, 1), F32))
    _finish(*jax.lax.fori_loop(0, nblk_ref[b, split], body, init), o_ref, lse_ref)


def _grid_kernel(last_ref, *refs, scale, bs, C, R, chunk, layered):
    """TPU form: one grid step per (query-row block, block of slots) (the slots the innermost, sequential grid axis),
    the running softmax in VMEM scratch. Blocks past the query-row block's last position (last_ref, flat [row,
    query-row block]) are skipped, and their index map repeats the last needed block, so they are not even copied
    in. (A stack of layers' caches is read at the scalar-prefetched layer.)"""
    ql_ref, qr_ref, pos_ref, cache_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs[layered:]
    b, split, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    first_slot = split * chunk + j * bs

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when(first_slot <= last_ref[b * pl.num_programs(2) + i])
    def _():
        carry = (acc_ref[...], m_ref[...], l_ref[...])
        acc, m, l = _block_step(ql_ref[...], qr_ref[...], pos_ref[...], cache_ref[:, pl.ds(0, C)],
                                cache_ref[:, pl.ds(C, R)], first_slot, carry, scale=scale)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        _finish(acc_ref[...], m_ref[...], l_ref[...], o_ref, lse_ref)


def default_splits(num_slots: int, block_s: int, query_rows: int = 1) -> int:
    """One chunk per ~1024 slots, at most 16; one when the T·N query rows are many (SPLIT_K_ROWS)."""
    if query_rows >= SPLIT_K_ROWS:
        return 1
    return max(1, min(16, -(-num_slots // max(1024, block_s))))


def mla_decode(q_lat_BTNC: jax.Array, q_rope_BTNR: jax.Array, cache_BSX: jax.Array, positions_BT: jax.Array, *,
               scale: float, layer: jax.Array | int | None = None, backend: str = "pallas",
               platform: str | None = None, block_s: int | None = None, num_splits: int | None = None,
               block_m: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
               return_lse: bool = False):
    """-> o_lat [B, T, N, C] float32 (return_lse: and the logsumexp of each query's visible logits [B, T, N], -inf
    where it sees no slot, with output 0: what merge_partials needs to combine the parts of a cache split over
    devices). See the module docstring. layer: cache_BSX is the stack of every layer's cache [L, B, S, X], read in
    place at this layer index (no copy of the layer's slab).

    backend: "xla" | "pallas" | "interpret"; platform: the one compiled for ("pallas": "tpu" or "gpu"; "interpret":
    "tpu" runs the tpu form, anything else the gpu form). Launch settings, None: LAUNCH's for the form and the
    cache's dtype, else DEFAULTS: block_s slots per block (on TPU one grid step and one DMA each), num_splits chunks
    per row (default: default_splits), block_m query rows (of the T·N) per program (gpu form) or per block of
    the grid (tpu form) (default all: each cache block is read once; fewer keep the [block_m, C] float32
    accumulator in registers / VMEM, and on TPU let each block stop at its own last position), and in the gpu form
    Triton's num_warps / num_stages."""
    B, T, N, C = q_lat_BTNC.shape
    R = q_rope_BTNR.shape[-1]
    layered = layer is not None
    S, X = cache_BSX.shape[-2:]
    if (q_rope_BTNR.shape[:3] != (B, T, N) or cache_BSX.ndim != 3 + layered or cache_BSX.shape[-3] != B
            or X < C + R):
        raise ValueError(f"mla_decode: q_lat {q_lat_BTNC.shape}, q_rope {q_rope_BTNR.shape} and cache "
                         f"{cache_BSX.shape} do not agree (cache {'[L, B, S, X]' if layered else '[B, S, X]'}: "
                         f"slots hold kv_lora + rope = C + R values, then any padding)")
    if positions_BT.shape != (B, T):
        raise ValueError(f"mla_decode: positions must be [B, T] = {(B, T)}, got {positions_BT.shape}")
    if kb.check("mla_decode", backend, platform) == "xla":
        if layered:
            cache_BSX = jax.lax.dynamic_index_in_dim(cache_BSX, layer, 0, False)
        return reference(q_lat_BTNC, q_rope_BTNR, cache_BSX, positions_BT, scale=scale, return_lse=return_lse)
    launch = kb.launch_settings(LAUNCH, DEFAULTS, backend, platform, cache_BSX.dtype, block_s=block_s,
                                num_splits=num_splits, block_m=block_m, num_warps=num_warps, num_stages=num_stages)
    block_s = launch["block_s"]
    if S < block_s and S % 128 == 0:  # a short cache (a device's part of a slot split) is one block, unpadded
        block_s = S
    splits = launch["num_splits"] or default_splits(S, block_s, T * N)
    if layered and S % (splits * block_s):  # padding a stack would copy every layer: pad the layer's slab only
        cache_BSX, layered = jax.lax.dynamic_index_in_dim(cache_BSX, layer, 0, False), False
    cache = kb.pad_axis(cache_BSX, cache_BSX.ndim - 2, splits * block_s)
    layer_args = (jnp.asarray(layer, jnp.int32).reshape(1),) if layered else ()
    chunk = cache.shape[-2] // splits
    q = T * N
    pos_BT = jnp.minimum(positions_BT.astype(jnp.int32), S - 1)  # past the cache: every slot (never the padding)
    last_B1 = pos_BT.max(axis=1, keepdims=True)  # each row's last visible slot
    q_lat, q_rope = q_lat_BTNC.reshape(B, q, C), q_rope_BTNR.reshape(B, q, R)  # query row t * N + n
    pos_Bq1 = jnp.repeat(pos_BT, N, axis=1)[..., None]
    kw = dict(scale=float(scale), bs=block_s, C=C, R=R, chunk=chunk, layered=layered)
    bm = min(launch["block_m"] or q, q)
    qp = -(-q // bm) * bm  # padded query rows: position -1 sees no slot, and their outputs are dropped
    q_lat, q_rope = (kb.pad_axis(a, 1, bm, value=0) for a in (q_lat, q_rope))
    pos_Bq1 = kb.pad_axis(pos_Bq1, 1, bm, value=-1)
    row = lambda d: pl.BlockSpec((None, bm, d), lambda b, k, i, *_: (b, i, 0))  # noqa: E731
    part = lambda d: pl.BlockSpec((None, None, bm, d), lambda b, k, i, *_: (b, k, i, 0))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((B, splits, qp, C), F32), jax.ShapeDtypeStruct((B, splits, qp, 1), F32)]
    # every slot of the cache once per row (an upper bound: blocks past a row's last position are skipped):
    # scores over the latent and the rope key, values over the latent
    work = kb.cost(flops=2 * B * q * S * (2 * C + R), transcendentals=B * q * S,
                   bytes_accessed=kb.nbytes(cache_BSX) // (cache_BSX.shape[0] if layered else 1)
                   + kb.nbytes(q_lat_BTNC, q_rope_BTNR, *out_shape))

    if kb.launch_form(backend, platform) == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        per_chunk = chunk // block_s
        nq = qp // bm
        last_Bi = pos_Bq1.reshape(B, nq, bm).max(axis=2)  # each query-row block's last visible slot

        def cache_at(b, k, i, j, last, *layer):  # blocks past the query rows' last needed one repeat it: no copy
            block = jnp.minimum(k * per_chunk + j, jax.lax.div(jnp.maximum(last[b * nq + i], 0), block_s))
            return (*(lr[0] for lr in layer), b, block, 0)

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1 + layered, grid=(B, splits, nq, per_chunk),
            in_specs=[row(C), row(R), row(1), pl.BlockSpec((None,) * (1 + layered) + (block_s, X), cache_at)],
            out_specs=[part(C), part(1)],
            scratch_shapes=[pltpu.VMEM((bm, C), F32), pltpu.VMEM((bm, 1), F32), pltpu.VMEM((bm, 1), F32)])
        o_BkqC, lse_Bkq1 = pl.pallas_call(
            functools.partial(_grid_kernel, **kw), grid_spec=grid_spec, out_shape=out_shape, cost_estimate=work,
            **kb.launch_options(backend, platform, 4, sequential=(3,)),
        )(last_Bi.reshape(-1), *layer_args, q_lat, q_rope, pos_Bq1, cache)
        return _result(*merge_splits(o_BkqC[:, :, :q], lse_Bkq1[:, :, :q]), (B, T, N, C), return_lse)

    # blocks of each chunk holding slots <= the row's last position
    starts = jnp.arange(splits, dtype=jnp.int32)[None, :] * chunk
    nblk_Bk = jnp.clip((last_B1 + 1 - starts + block_s - 1) // block_s, 0, chunk // block_s).astype(jnp.int32)
    stack = cache.shape[:1] if layered else ()  # a stack of layers: the whole layer axis, read at the layer
    o_BkqC, lse_Bkq1 = pl.pallas_call(
        functools.partial(_loop_kernel, **kw), grid=(B, splits, qp // bm),
        in_specs=[kb.scalar_table_spec(backend, platform)] * (1 + layered) + [
            row(C), row(R), row(1), pl.BlockSpec((*stack, None, chunk, X), lambda b, k, i: (*(0,) * layered, b, k, 0))],
        out_specs=[part(C), part(1)], out_shape=out_shape, cost_estimate=work,
        **kb.launch_options(backend, platform, 3, num_warps=launch["num_warps"], num_stages=launch["num_stages"]),
    )(nblk_Bk, *layer_args, q_lat, q_rope, pos_Bq1, cache)
    return _result(*merge_splits(o_BkqC[:, :, :q], lse_Bkq1[:, :, :q]), (B, T, N, C), return_lse)


def _result(o_BqC, lse_Bq1, shape, return_lse):
    o_BTNC = o_BqC.reshape(shape)
    return (o_BTNC, lse_Bq1.reshape(shape[:3])) if return_lse else o_BTNC


def merge_splits(o_BkqC: jax.Array, lse_Bkq1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Combines per-chunk normalised outputs by their logsumexps -> (o [B, q, C], lse [B, q, 1]). Chunks that saw
    nothing (lse = -inf) get weight 0."""
    w_Bkq1, top_B1q1 = _weights(lse_Bkq1, jnp.max(lse_Bkq1, axis=1, keepdims=True))
    return _normalised(jnp.sum(w_Bkq1 * jnp.where(w_Bkq1 > 0, o_BkqC, 0.0), axis=1), jnp.sum(w_Bkq1, axis=1),
                       top_B1q1[:, 0])


def merge_partials(o_BTNC: jax.Array, lse_BTN: jax.Array, *, axis_name) -> jax.Array:
    """Inside shard_map: combines each device's normalised output over its part of the slots with the other
    devices' along mesh axis (or axes) `axis_name`, by their logsumexps (mla_decode's return_lse) -> o [B, T, N, C]
    as one device holding every slot computes it. Parts that saw nothing (lse = -inf) get weight 0."""
    w_BTN, top_BTN = _weights(lse_BTN, jax.lax.pmax(lse_BTN, axis_name))
    merged = jax.lax.psum(w_BTN[..., None] * jnp.where(w_BTN[..., None] > 0, o_BTNC, 0.0), axis_name)
    return _normalised(merged, jax.lax.psum(w_BTN, axis_name)[..., None], top_BTN[..., None])[0]


def _weights(lse, top):
    """exp(lse - top) (0 where lse is -inf) and the top used (0 where every part saw nothing)."""
    top = jnp.where(top == -jnp.inf, 0.0, top)
    return jnp.exp(lse - top), top


def _normalised(merged, total, top):
    """merged / total (0 where nothing was seen), and the logsumexp of all the parts."""
    safe = jnp.where(total == 0, 1.0, total)
    return merged / safe, jnp.where(total == 0, -jnp.inf, top + jnp.log(safe))
