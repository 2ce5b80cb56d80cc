"""What the grouped-matmul kernels share (fp8_grouped_matmul: FP8 or plain weights; int4_grouped_matmul: INT4
weights): the per-tile group tables, the TPU visit schedule, both launch forms' kernel bodies and their launch.

    out[i] = x[i] @ W[g(i)]          rows sorted by group: rows [start_g, start_g + group_sizes[g]) use W[g]

A kernel module brings its weights (the arrays and their BlockSpecs for the form launched) and `product`, the f32
[128, block_n] product of one row tile's contraction block (block_k columns) with one weight block; everything about
rows and groups is here. Row tiles are 128 rows; block_k and block_n are 128 unless the caller asks otherwise. Rows
past sum(group_sizes) come out 0 and empty groups are skipped; a tile's rows may belong to several groups, and each
group's product is taken by its own rows only (a select: other rows' values, NaN included, never mix in). The two
forms (backend.launch_form picks one; see fp8_grouped_matmul's docstring):
  "gpu" (Triton; also the default interpreted form): grid (row tile, column tile); a program walks the groups
        overlapping its tile and, per group, the contraction blocks: product(x_ref, *weight_refs, g, c) reads its
        own slices of whole-array refs.
  "tpu" (Mosaic): grid (column tile, visit, contraction block) over the scalar-prefetched visit schedule;
        product(x_ref, *weight_refs) multiplies the blocks the index maps DMA'd for this step, accumulated in a
        VMEM f32 scratch.

Letter legend: M rows, I / O a matmul's in (contraction) / out features, G groups, V visits of the TPU form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb

F32 = jnp.float32
BLOCK = 128  # the row tile, and the default contraction block and output tile


def tables(group_sizes_G, num_tiles):
    """Per group [start, end) rows; per row tile the first and last group overlapping it."""
    ends = jnp.cumsum(group_sizes_G.astype(jnp.int32))
    starts = ends - group_sizes_G.astype(jnp.int32)
    first_row = jnp.arange(num_tiles, dtype=jnp.int32) * BLOCK
    G = group_sizes_G.shape[0]
    first = jnp.minimum(jnp.searchsorted(ends, first_row, side="right"), G - 1).astype(jnp.int32)
    last = jnp.minimum(jnp.searchsorted(ends, first_row + BLOCK - 1, side="right"), G - 1).astype(jnp.int32)
    return first, last, starts, ends


def visit_schedule(first, last, num_groups):
    """The (row tile, group) pairs the TPU form visits, in order, from each tile's first and last group (see
    tables), padded to the static bound tiles + G - 1: tile [V], group [V], active [V] (0 on padding visits, which
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


def pad_to_blocks(a, axes, multiple=BLOCK):
    """a padded with zeros at the end of each of `axes` to a multiple of `multiple`."""
    for ax in axes:
        a = kb.pad_axis(a, ax, multiple, value=0)
    return a


# ---- kernel bodies -------------------------------------------------------------------------------------------
def _gpu_kernel(first_ref, last_ref, start_ref, end_ref, *refs, product, n_contract):
    """o[tile] = sum over the tile's groups g of rows_in(g) ? sum_c product(g, c) : (previous value)."""
    *in_refs, o_ref = refs
    m = pl.program_id(0)
    tm, to = o_ref.shape
    rows = m * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def group_product(g):
        return jax.lax.fori_loop(0, n_contract, lambda c, acc: acc + product(*in_refs, g, c), jnp.zeros((tm, to), F32))

    def per_group(g, out):
        start, end = start_ref[g], end_ref[g]

        def take(out):
            in_group = (rows >= start) & (rows < end)
            return jnp.where(in_group, group_product(g), out)
        return jax.lax.cond(end > start, take, lambda out: out, out)

    out = jax.lax.fori_loop(first_ref[m], last_ref[m] + 1, per_group, jnp.zeros((tm, to), F32))
    o_ref[...] = out.astype(o_ref.dtype)


def _tpu_kernel(tile_ref, group_ref, active_ref, first_ref, start_ref, end_ref, *refs, product):
    *in_refs, o_ref, acc_ref = refs
    v, c = pl.program_id(1), pl.program_id(2)
    tm = o_ref.shape[0]

    @pl.when(c == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active_ref[v] == 1)
    def _():
        acc_ref[...] += product(*in_refs)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        g = group_ref[v]
        rows = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        take = (rows >= start_ref[g]) & (rows < end_ref[g]) & (active_ref[v] == 1)
        kept = jnp.where(first_ref[v] == 1, 0.0, o_ref[...].astype(F32))  # a tile's first visit starts from 0
        o_ref[...] = jnp.where(take, acc_ref[...], kept).astype(o_ref.dtype)


# ---- launch --------------------------------------------------------------------------------------------------
def launch(launch_form, product, x_MI, operands, specs, group_sizes_G, *, n_out, operand_bytes, out_dtype, name,
           backend, platform, block_k=BLOCK, block_n=BLOCK, triton=(4, 2), rows_in_use=None):
    """out [M, n_out] (out_dtype): the grouped product of x [M, I] (I a multiple of block_k, n_out of block_n;
    rows padded here) with the weights `operands`, read through `specs` (BlockSpecs of `launch_form`: index maps
    (o, v, c, *schedule) on TPU, (m, o) on GPU) by `product` (see the module docstring). The cost estimate: every one of
    `rows_in_use` rows (default all; tiles past the last group are skipped at run time) times an [I, n_out] weight
    once (a TPU tile's extra visits at group boundaries, at most G - 1, are not counted); bytes: those rows of x,
    `operand_bytes` (weights, scales) once, the output rows. name: the kernel's name in the compiled program (and
    profiles). triton: (num_warps, num_stages) of the gpu form."""
    x = kb.pad_axis(x_MI, 0, BLOCK)
    Mp, I = x.shape
    rows = Mp if rows_in_use is None else min(Mp, rows_in_use)
    cost = kb.cost(flops=2 * rows * I * n_out, bytes_accessed=(operand_bytes + rows * I * jnp.dtype(x.dtype).itemsize
                                                               + rows * n_out * jnp.dtype(out_dtype).itemsize))
    first, last, starts, ends = tables(group_sizes_G, Mp // BLOCK)
    out_shape = jax.ShapeDtypeStruct((Mp, n_out), out_dtype)
    if launch_form == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        schedule = visit_schedule(first, last, group_sizes_G.shape[0])
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(n_out // block_n, schedule[0].shape[0], I // block_k),
            in_specs=[pl.BlockSpec((BLOCK, block_k), lambda o, v, c, tile, *_: (tile[v], c)), *specs],
            out_specs=pl.BlockSpec((BLOCK, block_n), lambda o, v, c, tile, *_: (tile[v], o)),
            scratch_shapes=[pltpu.VMEM((BLOCK, block_n), F32)])
        # visits of a tile and the contraction blocks accumulate into one output block: only columns are parallel
        opts = kb.launch_options(backend, platform, 3, sequential=(1, 2))
        out = pl.pallas_call(functools.partial(_tpu_kernel, product=product), grid_spec=grid_spec,
                             out_shape=out_shape, cost_estimate=cost, name=name, **opts)(
            *schedule, starts, ends, x, *operands)
    else:
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, product=product, n_contract=I // block_k),
            grid=(Mp // BLOCK, n_out // block_n),
            in_specs=[kb.scalar_table_spec(backend, platform)] * 4 + [pl.BlockSpec((BLOCK, I), lambda m, o: (m, 0)),
                                                                      *specs],
            out_specs=pl.BlockSpec((BLOCK, block_n), lambda m, o: (m, o)), out_shape=out_shape, cost_estimate=cost,
            name=name, **kb.launch_options(backend, platform, 2, num_warps=triton[0], num_stages=triton[1]),
        )(first, last, starts, ends, x, *operands)
    return out[:x_MI.shape[0]]
