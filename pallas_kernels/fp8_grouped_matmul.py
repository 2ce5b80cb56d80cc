"""Grouped matmul for routed experts with block-FP8 (or plain bf16 / f32) weights, as a Pallas kernel.

    out[i] = x[i] @ W[g(i)]          rows sorted by group: rows [start_g, start_g + group_sizes[g]) use W[g]
    W[g][i, o] = float(w[g, i, o]) * scales[g, i // 128, o // 128]     (FP8 e4m3 weights, the release's blocks)

Rows past sum(group_sizes) come out as zeros. Empty groups are allowed. Without `scales` the weights are used as
they are (the bf16-weight mode). Activations are bf16 or f32, accumulation is f32, the output has x's dtype.

`fp8_activations=True` (FP8 weights only) is the FP8 tensor-core mode for GPUs that have them (H100 and later):
the activations are quantised to e4m3 per row and 128-column block (scale = amax / 448, as DeepSeek-V3 / K2 run
inference), the kernel multiplies e4m3 by e4m3 with f32 accumulation and applies both scales to each block
product. Every backend (the XLA reference included) quantises the same way, so they agree to f32 rounding; the
gradient passes the quantisation straight through.

Every form multiplies 128-row tiles by 128x128 weight blocks: the FP8 block is cast to the activation dtype in
VMEM / registers and its scale applied to the f32 block product after the dot (TPU v5p has no FP8 MXU; on GPU the
same dequantise-then-dot form runs on the bf16 tensor cores). A tile's rows may belong to several groups: each
group's product is taken by its own rows only (a select, so other rows' values, NaN included, never mix in).
Two launch forms, picked by platform:
  "gpu" (Triton; also the default interpreted form): one program per (row tile, column tile) walks the groups
        overlapping its tile (a per-tile [first, last] table; empty groups skipped) and loops over the contraction
        blocks inside, reading weights through a whole-array ref (a pointer on GPU).
  "tpu" (Mosaic): a visit schedule computed outside the kernel lists the (row tile, group) pairs in order, at most
        tiles + G - 1 of them, and is scalar-prefetched into SMEM; the grid is (column tile, visit, contraction
        block), and the BlockSpec index maps read the schedule, so only the visited group's [128, 128] weight
        block is DMA'd into VMEM (megablox-style). The contraction accumulates in a VMEM scratch; consecutive
        visits of a tile keep its output block resident, the first zeroes it.

Gradients: d/dx runs the same kernel against the transposed weights (the scales read transposed); d/dw (bf16 /
f32 weights only: FP8 weights are frozen) is `pallas_kernels.grouped_weight_grad` (XLA's ragged_dot transpose
compiles to a dense every-row-by-every-group product on TPU and GPU).

Both forms run in the Pallas interpreter in the tests (platform="tpu" | "gpu" with backend="interpret") and
compile for their platform (TPU v5p, H100) at K2's expert shapes (7168 -> 2048 and 2048 -> 7168; FP8 weights with
bf16 or FP8 activations, bf16 / f32 weights with their gradient), the gpu form with Triton's num_warps / num_stages
from k2jax.model.target.KERNEL_LAUNCH (tests/pallas_kernels/test_compile.py); neither has been run or timed on a device
yet.

Letter legend: M rows, I / O a matmul's in (contraction) / out features, G groups, Ib / Ob I and O in 128-blocks (the
scale blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb
from pallas_kernels.grouped_weight_grad import grouped_weight_grad

F32 = jnp.float32
BLOCK = 128  # the release's FP8 scale block, and the kernel's tile along every axis
FP8 = jnp.float8_e4m3fn


# ---- XLA reference -------------------------------------------------------------------------------------------
def dequantize(w_GIO: jax.Array, scales_GIbOb: jax.Array | None, dtype=F32) -> jax.Array:
    """W = float32(w) * scale per 128x128 block of the last two axes, cast to dtype (any leading axes; ragged last
    blocks: the scale covers what exists). The one block dequantisation: k2jax.formats.quant (host, after its
    checks) and k2jax.checkpoint.orbax_checkpoint (on the devices at load) call it too."""
    if scales_GIbOb is None:
        return w_GIO.astype(dtype)
    I, O = w_GIO.shape[-2:]
    s = jnp.repeat(jnp.repeat(scales_GIbOb, BLOCK, axis=-2)[..., :I, :], BLOCK, axis=-1)[..., :O]
    return (w_GIO.astype(F32) * s).astype(dtype)


def quantize_activations(x_MI: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row and 128-column block: scale = amax / 448 (1 for an all-zero block), values / scale rounded to
    e4m3 -> (x e4m3 [M, I], scales float32 [M, ceil(I/128)])."""
    M, I = x_MI.shape
    xb = kb.pad_axis(x_MI.astype(F32), 1, BLOCK, value=0).reshape(M, -1, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    scales = jnp.where(amax > 0, amax / float(jnp.finfo(FP8).max), 1.0)
    q = (xb / scales[..., None]).astype(FP8).reshape(M, -1)[:, :I]
    return q, scales


def dequantize_activations(q_MI: jax.Array, scales_MIb: jax.Array, dtype) -> jax.Array:
    I = q_MI.shape[1]
    return (q_MI.astype(F32) * jnp.repeat(scales_MIb, BLOCK, axis=1)[:, :I]).astype(dtype)


def reference(x_MI: jax.Array, w_GIO: jax.Array, group_sizes_G: jax.Array, scales_GIbOb: jax.Array | None = None,
              fp8_activations: bool = False) -> jax.Array:
    """The XLA reference: (quantise the activations,) dequantise, then jax.lax.ragged_dot (f32 accumulation)."""
    if fp8_activations:
        return reference(dequantize_activations(*quantize_activations(x_MI), F32), w_GIO, group_sizes_G,
                         scales_GIbOb).astype(x_MI.dtype)
    w = dequantize(w_GIO, scales_GIbOb, x_MI.dtype)
    y = jax.lax.ragged_dot(x_MI, w, group_sizes_G.astype(jnp.int32), preferred_element_type=F32)
    return y.astype(x_MI.dtype)


# ---- kernel --------------------------------------------------------------------------------------------------
def _kernel(first_ref, last_ref, start_ref, end_ref, x_ref, w_ref, s_ref, xs_ref, o_ref, *, transpose_w, n_contract,
            has_scales, has_x_scales):
    """o[tile] = sum over the tile's groups g of rows_in(g) ? x_tile @ W[g] block : (previous value)."""
    m = pl.program_id(0)
    tm, to = o_ref.shape
    rows = m * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def group_product(g):
        def step(c, acc):
            cs = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
            x_blk = x_ref[:, cs]
            if transpose_w:  # W[g]ᵀ: weights stored [G, O, I] for this product
                prod = kb.dot_nt(x_blk, w_ref[g, :, cs].astype(x_blk.dtype))
            else:
                prod = kb.dot_nn(x_blk, w_ref[g, cs, :].astype(x_blk.dtype))
            if has_scales:  # the block's scale, expanded along the output columns: [1, to]
                prod = prod * s_ref[g, pl.ds(c, 1), :]
            if has_x_scales:  # the activation rows' scales for this block: [tm, 1]
                prod = prod * xs_ref[c]
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


def _visit_schedule(first, last, num_groups):
    """The (row tile, group) pairs the TPU form visits, in order, from each tile's first and last group (see
    _tables), padded to the static bound tiles + G - 1: tile [V], group [V], active [V] (0 on padding visits, which
    repeat the last pair so nothing is re-fetched), first [V] (1 on a tile's first visit)."""
    num_tiles = first.shape[0]
    counts = last - first + 1  # every tile gets >= 1 visit, so rows past the groups are written (zeros)
    ends = jnp.cumsum(counts)
    V = num_tiles + num_groups - 1
    v = jnp.arange(V, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(ends, v, side="right"), num_tiles - 1).astype(jnp.int32)
    active = v < ends[-1]
    group = jnp.where(active, first[tile] + v - (ends - counts)[tile], last[-1]).astype(jnp.int32)
    first_visit = active & (v == (ends - counts)[tile])
    return tile, group, active.astype(jnp.int32), first_visit.astype(jnp.int32)


def _tpu_kernel(tile_ref, group_ref, active_ref, first_ref, start_ref, end_ref, x_ref, w_ref, s_ref, xs_ref, o_ref,
                acc_ref, *, transpose_w, has_scales, has_x_scales):
    v, c = pl.program_id(1), pl.program_id(2)
    tm, to = o_ref.shape

    @pl.when(c == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active_ref[v] == 1)
    def _():
        x_blk = x_ref[...]
        prod = (kb.dot_nt if transpose_w else kb.dot_nn)(x_blk, w_ref[...].astype(x_blk.dtype))
        if has_scales:
            prod = prod * s_ref[...]
        if has_x_scales:
            prod = prod * xs_ref[...]
        acc_ref[...] += prod

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        g = group_ref[v]
        rows = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        take = (rows >= start_ref[g]) & (rows < end_ref[g]) & (active_ref[v] == 1)
        kept = jnp.where(first_ref[v] == 1, 0.0, o_ref[...].astype(F32))  # a tile's first visit starts from 0
        o_ref[...] = jnp.where(take, acc_ref[...], kept).astype(o_ref.dtype)


def _launch_tpu_form(x, w, scales_rows, x_scales, group_sizes_G, *, transpose_w, out_dtype, opts, rows):
    from jax.experimental.pallas import tpu as pltpu
    G = w.shape[0]
    I, O = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    Mp = x.shape[0]
    first, last, starts, ends = _tables(group_sizes_G, Mp // BLOCK)
    schedule = _visit_schedule(first, last, G)
    has_scales = scales_rows is not None
    # scales [G, I / 128, 1, O]: a (1, 128) row block per visit, Mosaic's (8, 128) rule met by the unit dim
    s = (scales_rows[:, :, None, :] if has_scales else jnp.zeros((G, 1, 1, BLOCK), F32))
    w_spec = (pl.BlockSpec((None, BLOCK, BLOCK), lambda o, v, c, tile, group, *_: (group[v], o, c)) if transpose_w
              else pl.BlockSpec((None, BLOCK, BLOCK), lambda o, v, c, tile, group, *_: (group[v], c, o)))
    s_spec = (pl.BlockSpec((None, None, 1, BLOCK), lambda o, v, c, tile, group, *_: (group[v], c, 0, o))
              if has_scales else pl.BlockSpec((None, None, 1, BLOCK), lambda o, v, c, *_: (0, 0, 0, 0)))
    has_x_scales = x_scales is not None
    xs = x_scales if has_x_scales else jnp.ones((1, BLOCK, 1), F32)
    xs_spec = (pl.BlockSpec((None, BLOCK, 1), lambda o, v, c, tile, *_: (c, tile[v], 0)) if has_x_scales
               else pl.BlockSpec((None, BLOCK, 1), lambda o, v, c, *_: (0, 0, 0)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6, grid=(O // BLOCK, schedule[0].shape[0], I // BLOCK),
        in_specs=[pl.BlockSpec((BLOCK, BLOCK), lambda o, v, c, tile, *_: (tile[v], c)), w_spec, s_spec, xs_spec],
        out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda o, v, c, tile, *_: (tile[v], o)),
        scratch_shapes=[pltpu.VMEM((BLOCK, BLOCK), F32)])
    return pl.pallas_call(
        functools.partial(_tpu_kernel, transpose_w=transpose_w, has_scales=has_scales, has_x_scales=has_x_scales),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((Mp, O), out_dtype),
        cost_estimate=_work(x, w, scales_rows, x_scales, rows, I, O, out_dtype), **opts)(
        *schedule, starts, ends, x, w, s, xs)


def _work(x, w, scales_rows, x_scales, rows, I, O, out_dtype):
    """Every one of `rows` rows (those in use: tiles past the last group are skipped at run time) times its
    group's [I, O] weight once (the extra visits of tiles a group boundary crosses, at most G - 1 on TPU, are not
    counted); bytes: those rows of x, the weights and scales once, their output."""
    extra = [a for a in (scales_rows, x_scales) if a is not None]
    return kb.cost(flops=2 * rows * I * O,
                   bytes_accessed=(kb.nbytes(w, *extra) + rows * I * jnp.dtype(x.dtype).itemsize
                                   + rows * O * jnp.dtype(out_dtype).itemsize))


def _form(backend, platform) -> str:
    """"tpu" or "gpu": the launch form (see the module docstring). Interpreted runs use the form of `platform`
    when one is named, else the gpu form."""
    if backend == "interpret":
        return "tpu" if platform == "tpu" else "gpu"
    return kb.platform_of(platform)


def _launch(x_MI, w, scales_rows, group_sizes_G, *, transpose_w, backend, platform, x_scales=None,
            out_dtype=None, triton=(4, 2), rows_in_use=None):
    """out [M, O] = grouped x @ W (W[g] = w[g] or w[g]ᵀ), I and O already multiples of BLOCK. scales_rows is
    [G, I / BLOCK, O] (each block scale repeated along its output columns) or None; x_scales [I / BLOCK, M, 1]
    the FP8 activations' block scales or None. triton: (num_warps, num_stages) of the gpu form."""
    out_dtype = out_dtype or x_MI.dtype
    G = w.shape[0]
    I, O = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    x = kb.pad_axis(x_MI, 0, BLOCK)
    Mp = x.shape[0]
    rows = Mp if rows_in_use is None else min(Mp, rows_in_use)
    if x_scales is not None:
        x_scales = kb.pad_axis(x_scales, 1, BLOCK, value=1.0)
    if _form(backend, platform) == "tpu":
        # visits of a tile and the contraction blocks accumulate into one output block: only columns are parallel
        opts = kb.launch_options(backend, platform, 3, sequential=(1, 2))
        out = _launch_tpu_form(x, w, scales_rows, x_scales, group_sizes_G, transpose_w=transpose_w,
                               out_dtype=out_dtype, opts=opts, rows=rows)
        return out[:x_MI.shape[0]]
    tables = _tables(group_sizes_G, Mp // BLOCK)
    has_scales = scales_rows is not None
    if not has_scales:
        scales_rows = jnp.zeros((G, 1, BLOCK), F32)  # unused; keeps one kernel signature
    w_spec = (pl.BlockSpec((G, BLOCK, I), lambda m, o: (0, o, 0)) if transpose_w
              else pl.BlockSpec((G, I, BLOCK), lambda m, o: (0, 0, o)))
    s_spec = (pl.BlockSpec((G, I // BLOCK, BLOCK), lambda m, o: (0, 0, o)) if has_scales
              else pl.BlockSpec((G, 1, BLOCK), lambda m, o: (0, 0, 0)))
    has_x_scales = x_scales is not None
    xs = x_scales if has_x_scales else jnp.ones((1, BLOCK, 1), F32)
    xs_spec = pl.BlockSpec((xs.shape[0], BLOCK, 1),
                           (lambda m, o: (0, m, 0)) if has_x_scales else (lambda m, o: (0, 0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, transpose_w=transpose_w, n_contract=I // BLOCK, has_scales=has_scales,
                          has_x_scales=has_x_scales),
        grid=(Mp // BLOCK, O // BLOCK),
        in_specs=[kb.scalar_table_spec(backend, platform)] * 4 + [pl.BlockSpec((BLOCK, I), lambda m, o: (m, 0)), w_spec,
                                                          s_spec, xs_spec],
        out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda m, o: (m, o)),
        out_shape=jax.ShapeDtypeStruct((Mp, O), out_dtype),
        cost_estimate=_work(x, w, None if not has_scales else scales_rows, x_scales, rows, I, O, out_dtype),
        **kb.launch_options(backend, platform, 2, num_warps=triton[0], num_stages=triton[1]),
    )(*tables, x, w, scales_rows, xs)
    return out[:x_MI.shape[0]]


def _scale_rows(scales_GIbOb, n_out, along_o: bool):
    """Block scales repeated along the output columns: [G, Ib, O] (along_o) or, for the transposed product,
    [G, Ob, I]."""
    s = scales_GIbOb if along_o else scales_GIbOb.swapaxes(1, 2)
    return jnp.repeat(s.astype(F32), BLOCK, axis=2)[:, :, :n_out]


def _pad_to_blocks(a, axes):
    for ax in axes:
        a = kb.pad_axis(a, ax, BLOCK, value=0)
    return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(x_MI, w_GIO, scales, group_sizes_G, opts):
    return _forward(x_MI, w_GIO, scales, group_sizes_G, opts)


def _forward(x_MI, w_GIO, scales, group_sizes_G, opts):
    backend, platform, fp8_activations, triton, rows_in_use = opts
    I, O = w_GIO.shape[1:]
    x = _pad_to_blocks(x_MI, [1])
    w = _pad_to_blocks(w_GIO, [1, 2])
    s = None if scales is None else kb.pad_axis(_scale_rows(scales, O, along_o=True), 2, BLOCK, value=0)
    x_scales = None
    if fp8_activations:
        x, x_scales_MIb = quantize_activations(x)
        x_scales = x_scales_MIb.T[:, :, None]  # [Ib, M, 1]: one [rows, 1] column per contraction block
    out = _launch(x, w, s, group_sizes_G, transpose_w=False, backend=backend, platform=platform,
                  x_scales=x_scales, out_dtype=x_MI.dtype, triton=triton, rows_in_use=rows_in_use)
    return out[:, :O]


def _gmm_fwd(x_MI, w_GIO, scales, group_sizes_G, opts):
    return _forward(x_MI, w_GIO, scales, group_sizes_G, opts), (x_MI, w_GIO, scales, group_sizes_G)


def _gmm_bwd(opts, res, dy_MO):
    backend, platform, _, triton, rows_in_use = opts  # FP8 activations: the quantisation's gradient is taken as the identity
    x_MI, w_GIO, scales, group_sizes_G = res
    I, O = w_GIO.shape[1:]
    dy = _pad_to_blocks(dy_MO.astype(x_MI.dtype), [1])
    w = _pad_to_blocks(w_GIO, [1, 2])
    s = None if scales is None else kb.pad_axis(_scale_rows(scales, I, along_o=False), 2, BLOCK, value=0)
    dx = _launch(dy, w, s, group_sizes_G, transpose_w=True, backend=backend, platform=platform,
                 triton=triton, rows_in_use=rows_in_use)[:, :I]
    if scales is None:
        dw = grouped_weight_grad(x_MI, dy_MO.astype(x_MI.dtype), group_sizes_G, out_dtype=w_GIO.dtype,
                                 backend=backend, platform=platform, rows_in_use=rows_in_use)
        ds = None
    else:  # FP8 weights are frozen: no gradient flows to them or their scales
        dw, ds = jnp.zeros_like(w_GIO), jnp.zeros_like(scales)
    return dx, dw, ds, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ---- dispatch ------------------------------------------------------------------------------------------------
def check_scales(w_GIO: jax.Array, scales_GIbOb: jax.Array | None, caller: str) -> None:
    """FP8 weights come with one float scale per 128x128 block of their last two axes (any leading axes), other
    weights without; else one line, prefixed with `caller`, says what is wrong."""
    if scales_GIbOb is None:
        if w_GIO.dtype == FP8:
            raise ValueError(f"{caller}: float8_e4m3fn weights need their block scales")
        return
    want = w_GIO.shape[:-2] + tuple(-(-d // BLOCK) for d in w_GIO.shape[-2:])
    if scales_GIbOb.shape != want:
        raise ValueError(f"{caller}: scales for w {w_GIO.shape} must be {want} (one per 128x128 block), got "
                         f"{scales_GIbOb.shape}")
    if w_GIO.dtype != FP8:
        raise ValueError(f"{caller}: scales given but w is {w_GIO.dtype}, not float8_e4m3fn")


def fp8_grouped_matmul(x_MI: jax.Array, w_GIO: jax.Array, group_sizes_G: jax.Array,
                       scales_GIbOb: jax.Array | None = None, *, fp8_activations: bool = False,
                       backend: str = "auto", platform: str | None = None, num_warps: int = 4,
                       num_stages: int = 2, rows_in_use: int | None = None) -> jax.Array:
    """[M, I] rows sorted by group, [G, I, O] weights (float8_e4m3fn with [G, ceil(I/128), ceil(O/128)] scales,
    or bf16 / f32 without), [G] group sizes -> [M, O] in x's dtype. fp8_activations: see the module docstring.
    num_warps / num_stages: Triton's, for the gpu form (k2jax.model.target.KERNEL_LAUNCH holds them per dtype).
    rows_in_use: the rows expected to hold data (e.g. the balanced load of an expert-parallel receive buffer),
    for the kernels' cost estimates only; default all M (the kernels skip tiles past the last group)."""
    if x_MI.ndim != 2 or w_GIO.ndim != 3 or group_sizes_G.shape != w_GIO.shape[:1] or x_MI.shape[1] != w_GIO.shape[1]:
        raise ValueError(f"fp8_grouped_matmul: expected x [M, I], w [G, I, O], group_sizes [G]; got x {x_MI.shape}, "
                         f"w {w_GIO.shape}, group_sizes {group_sizes_G.shape}")
    check_scales(w_GIO, scales_GIbOb, "fp8_grouped_matmul")
    if fp8_activations and scales_GIbOb is None:
        raise ValueError("fp8_grouped_matmul: fp8_activations needs FP8 weights (with their scales)")
    backend = kb.resolve(backend, (), platform)
    if backend == "xla":
        return reference(x_MI, w_GIO, group_sizes_G, scales_GIbOb, fp8_activations)
    return _gmm(x_MI, w_GIO, scales_GIbOb, group_sizes_G.astype(jnp.int32),
                (backend, platform, fp8_activations, (num_warps, num_stages), rows_in_use))
