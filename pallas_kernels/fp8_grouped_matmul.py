"""Grouped matmul for routed experts with block-FP8 (or plain bf16 / f32) weights, as a Pallas kernel.

    out[i] = x[i] @ W[g(i)]          rows sorted by group: rows [start_g, start_g + group_sizes[g]) use W[g]
    W[g][k, n] = float(w[g, k, n]) * scales[g, k // 128, n // 128]     (FP8 e4m3 weights, the release's blocks)

Rows past sum(group_sizes) come out as zeros. Empty groups are allowed. Without `scales` the weights are used as
they are (the bf16-weight mode). Activations are bf16 or f32, accumulation is f32, the output has x's dtype.

The kernel: one program per (128-row tile, 128-column tile). A tile's rows may belong to several groups; the
program walks the groups that overlap it (a per-tile [first, last] group table computed outside the kernel; empty
groups skipped), and for each accumulates x_tile @ dequant(w[g] block) over 128-deep blocks of the contraction
dim, the FP8 block cast to the activation dtype in VMEM / registers and its scale applied to the f32 block product
after the dot (TPU v5p has no FP8 MXU; on GPU the same dequantise-then-dot form runs on the bf16 tensor cores).
The group's rows of the tile take that result (a select, so other rows' values, NaN included, never mix in).

Gradients: d/dx runs the same kernel against the transposed weights (the scales read transposed); d/dw (bf16 /
f32 weights only: FP8 weights are frozen) is XLA's ragged_dot transpose.

Known limit: each program reads its weight column block through a whole-array ref. On GPU (Triton) that is a
pointer; on TPU it puts [G, K, 128] of weights in VMEM, which fits tiny expert counts only: K2-sized expert weights
on TPU need a scalar-prefetch schedule that DMAs only the visited group's block (megablox-style). Until then
`backend="auto"` on TPU should stay on ragged_dot for bf16 weights.

Letter legend: M rows, K contraction dim, N output dim, G groups, Kb / Nb scale blocks (128 each).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb

F32 = jnp.float32
BLOCK = 128  # the release's FP8 scale block, and the kernel's tile along every axis
FP8 = jnp.float8_e4m3fn


# ---- XLA reference -------------------------------------------------------------------------------------------
def dequantize(w_GKN: jax.Array, scales_GKbNb: jax.Array | None, dtype=F32) -> jax.Array:
    """W = float(w) * scale per 128x128 block (ragged last blocks: the scale covers what exists)."""
    if scales_GKbNb is None:
        return w_GKN.astype(dtype)
    K, N = w_GKN.shape[1:]
    s = jnp.repeat(jnp.repeat(scales_GKbNb, BLOCK, axis=1)[:, :K], BLOCK, axis=2)[:, :, :N]
    return (w_GKN.astype(F32) * s).astype(dtype)


def reference(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, scales_GKbNb: jax.Array | None = None
              ) -> jax.Array:
    """The XLA reference: dequantise, then jax.lax.ragged_dot (f32 accumulation), rows past the groups zeroed."""
    w = dequantize(w_GKN, scales_GKbNb, x_MK.dtype)
    y = jax.lax.ragged_dot(x_MK, w, group_sizes_G.astype(jnp.int32), preferred_element_type=F32)
    return y.astype(x_MK.dtype)


# ---- kernel --------------------------------------------------------------------------------------------------
def _kernel(first_ref, last_ref, start_ref, end_ref, x_ref, w_ref, s_ref, o_ref, *, transpose_w, n_contract,
            has_scales):
    """o[tile] = sum over the tile's groups g of rows_in(g) ? x_tile @ W[g] block : (previous value)."""
    m, o = pl.program_id(0), pl.program_id(1)
    tm, to = o_ref.shape
    rows = m * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def group_product(g):
        def step(c, acc):
            cs = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
            x_blk = x_ref[:, cs]
            if transpose_w:  # W[g]ᵀ: weights stored [G, O, C] for this product
                w_blk = w_ref[g, :, cs].astype(x_blk.dtype)
                prod = jax.lax.dot_general(x_blk, w_blk, (((1,), (1,)), ((), ())), preferred_element_type=F32)
            else:
                w_blk = w_ref[g, cs, :].astype(x_blk.dtype)
                prod = jax.lax.dot_general(x_blk, w_blk, (((1,), (0,)), ((), ())), preferred_element_type=F32)
            if has_scales:  # the block's scale, expanded along the output columns: [1, to]
                prod = prod * s_ref[g, pl.ds(c, 1), :]
            return acc + prod
        return jax.lax.fori_loop(0, n_contract, step, jnp.zeros((tm, to), F32))

    def per_group(g, out):
        start, end = start_ref[g], end_ref[g]

        def take(out):
            in_group = (rows >= start) & (rows < end)
            return jnp.where(in_group, group_product(g), out)
        return jax.lax.cond(end > start, take, lambda out: out, out)

    out = jax.lax.fori_loop(first_ref[m], last_ref[m] + 1, per_group, jnp.zeros((tm, to), F32))
    o_ref[...] = out.astype(o_ref.dtype)


def _tables(group_sizes_G, num_tiles):
    """Per group [start, end) rows; per row tile the first and last group overlapping it."""
    ends = jnp.cumsum(group_sizes_G.astype(jnp.int32))
    starts = ends - group_sizes_G.astype(jnp.int32)
    first_row = jnp.arange(num_tiles, dtype=jnp.int32) * BLOCK
    G = group_sizes_G.shape[0]
    first = jnp.minimum(jnp.searchsorted(ends, first_row, side="right"), G - 1).astype(jnp.int32)
    last = jnp.minimum(jnp.searchsorted(ends, first_row + BLOCK - 1, side="right"), G - 1).astype(jnp.int32)
    return first, last, starts, ends


def _scalar_spec(backend, platform):
    if backend == "pallas" and kb.platform_of(platform) == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def _launch(x_MC, w, scales_rows, group_sizes_G, *, transpose_w, backend, platform):
    """out [M, O] = grouped x @ W (W[g] = w[g] or w[g]ᵀ), C and O already multiples of BLOCK. scales_rows is
    [G, C / BLOCK, O] (each block scale repeated along its output columns) or None."""
    G = w.shape[0]
    C, O = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    x = kb.pad_axis(x_MC, 0, BLOCK)
    Mp = x.shape[0]
    tables = _tables(group_sizes_G, Mp // BLOCK)
    has_scales = scales_rows is not None
    if not has_scales:
        scales_rows = jnp.zeros((G, 1, BLOCK), F32)  # unused; keeps one kernel signature
    w_spec = (pl.BlockSpec((G, BLOCK, C), lambda m, o: (0, o, 0)) if transpose_w
              else pl.BlockSpec((G, C, BLOCK), lambda m, o: (0, 0, o)))
    s_spec = (pl.BlockSpec((G, C // BLOCK, BLOCK), lambda m, o: (0, 0, o)) if has_scales
              else pl.BlockSpec((G, 1, BLOCK), lambda m, o: (0, 0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, transpose_w=transpose_w, n_contract=C // BLOCK, has_scales=has_scales),
        grid=(Mp // BLOCK, O // BLOCK),
        in_specs=[_scalar_spec(backend, platform)] * 4 + [pl.BlockSpec((BLOCK, C), lambda m, o: (m, 0)), w_spec,
                                                          s_spec],
        out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda m, o: (m, o)),
        out_shape=jax.ShapeDtypeStruct((Mp, O), x_MC.dtype),
        **kb.launch_options(backend, platform, 2),
    )(*tables, x, w, scales_rows)
    return out[:x_MC.shape[0]]


def _scale_rows(scales_GKbNb, n_out, along_n: bool):
    """Block scales repeated along the output columns: [G, Kb, N] (along_n) or, for the transposed product,
    [G, Nb, K]."""
    s = scales_GKbNb if along_n else scales_GKbNb.swapaxes(1, 2)
    return jnp.repeat(s.astype(F32), BLOCK, axis=2)[:, :, :n_out]


def _pad_to_blocks(a, axes):
    for ax in axes:
        a = kb.pad_axis(a, ax, BLOCK, value=0)
    return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(x_MK, w_GKN, scales, group_sizes_G, opts):
    return _forward(x_MK, w_GKN, scales, group_sizes_G, opts)


def _forward(x_MK, w_GKN, scales, group_sizes_G, opts):
    backend, platform = opts
    K, N = w_GKN.shape[1:]
    x = _pad_to_blocks(x_MK, [1])
    w = _pad_to_blocks(w_GKN, [1, 2])
    s = None if scales is None else kb.pad_axis(_scale_rows(scales, N, along_n=True), 2, BLOCK, value=0)
    out = _launch(x, w, s, group_sizes_G, transpose_w=False, backend=backend, platform=platform)
    return out[:, :N]


def _gmm_fwd(x_MK, w_GKN, scales, group_sizes_G, opts):
    return _forward(x_MK, w_GKN, scales, group_sizes_G, opts), (x_MK, w_GKN, scales, group_sizes_G)


def _gmm_bwd(opts, res, dy_MN):
    backend, platform = opts
    x_MK, w_GKN, scales, group_sizes_G = res
    K, N = w_GKN.shape[1:]
    dy = _pad_to_blocks(dy_MN.astype(x_MK.dtype), [1])
    w = _pad_to_blocks(w_GKN, [1, 2])
    s = None if scales is None else kb.pad_axis(_scale_rows(scales, K, along_n=False), 2, BLOCK, value=0)
    dx = _launch(dy, w, s, group_sizes_G, transpose_w=True, backend=backend, platform=platform)[:, :K]
    if scales is None:
        _, pullback = jax.vjp(lambda w_: reference(x_MK, w_, group_sizes_G), w_GKN)
        dw = pullback(dy_MN.astype(x_MK.dtype))[0]
        ds = None
    else:  # FP8 weights are frozen: no gradient flows to them or their scales
        dw, ds = jnp.zeros_like(w_GKN, dtype=F32).astype(w_GKN.dtype), jnp.zeros_like(scales)
    return dx, dw, ds, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ---- dispatch ------------------------------------------------------------------------------------------------
def fp8_grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array,
                       scales_GKbNb: jax.Array | None = None, *, backend: str = "auto", platform: str | None = None
                       ) -> jax.Array:
    """[M, K] rows sorted by group, [G, K, N] weights (float8_e4m3fn with [G, ceil(K/128), ceil(N/128)] scales,
    or bf16 / f32 without), [G] group sizes -> [M, N] in x's dtype."""
    if x_MK.ndim != 2 or w_GKN.ndim != 3 or group_sizes_G.shape != w_GKN.shape[:1] or x_MK.shape[1] != w_GKN.shape[1]:
        raise ValueError(f"fp8_grouped_matmul: expected x [M, K], w [G, K, N], group_sizes [G]; got x {x_MK.shape}, "
                         f"w {w_GKN.shape}, group_sizes {group_sizes_G.shape}")
    G, K, N = w_GKN.shape
    if scales_GKbNb is not None:
        want = (G, -(-K // BLOCK), -(-N // BLOCK))
        if scales_GKbNb.shape != want:
            raise ValueError(f"fp8_grouped_matmul: scales for w {w_GKN.shape} must be {want} (one per 128x128 "
                             f"block), got {scales_GKbNb.shape}")
        if w_GKN.dtype != FP8:
            raise ValueError(f"fp8_grouped_matmul: scales given but w is {w_GKN.dtype}, not float8_e4m3fn")
    elif w_GKN.dtype == FP8:
        raise ValueError("fp8_grouped_matmul: float8_e4m3fn weights need their block scales")
    backend = kb.resolve(backend)
    if backend == "xla":
        return reference(x_MK, w_GKN, group_sizes_G, scales_GKbNb)
    return _gmm(x_MK, w_GKN, scales_GKbNb, group_sizes_G.astype(jnp.int32), (backend, platform))
