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
        with rows in its tile and, per group, the contraction blocks: product(x_ref, *weight_refs, g, c, layer)
        reads its own slices of whole-array refs.
  "tpu" (Mosaic): grid (column tile, visit, contraction block) over the scalar-prefetched visit schedule;
        product(x_ref, *weight_refs, o) multiplies the blocks the index maps DMA'd for this step (o: the column
        tile), accumulated in a VMEM f32 scratch. Only visits whose group has rows in their tile fetch and multiply
        weight blocks.
Weights may be stacks of layers ([L, G, ...], the scanned MoE blocks' own arrays) read in place at a layer index
(`layer`): no copy of a layer's slice exists (XLA materialises a dynamic slice that feeds a custom call).

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


def visit_schedule(first, last, starts, ends):
    """The (row tile, group) pairs the TPU form visits, in order, from each tile's first and last group (see
    tables), padded to the static bound tiles + G - 1: tile [V], group [V], active [V], first [V] (1 on a tile's
    first visit). Only a visit whose group has rows in its tile is active (its weight blocks are read and multiplied);
    the others (empty groups, tiles past the last group, the padding) keep the group of the last active visit, so
    their index maps ask for blocks already in VMEM and nothing is fetched, and a tile with no active visit is still
    written (zeros)."""
    num_tiles, num_groups = first.shape[0], starts.shape[0]
    counts = last - first + 1  # every tile gets >= 1 visit, so rows past the groups are written (zeros)
    visits_end = jnp.cumsum(counts)
    V = num_tiles + num_groups - 1
    v = jnp.arange(V, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(visits_end, v, side="right"), num_tiles - 1).astype(jnp.int32)
    listed = v < visits_end[-1]
    group = jnp.where(listed, first[tile] + v - (visits_end - counts)[tile], last[-1]).astype(jnp.int32)
    first_visit = listed & (v == (visits_end - counts)[tile])
    tile_start = tile * BLOCK
    active = listed & (starts[group] < jnp.minimum(ends[group], tile_start + BLOCK)) & (ends[group] > tile_start)
    # an inactive visit keeps the last active visit's group (the first active one's before any)
    last_active = jax.lax.cummax(jnp.where(active, v, -1))
    first_active = jnp.argmax(active)
    group = group[jnp.where(last_active >= 0, last_active, first_active)]
    return tile, group, active.astype(jnp.int32), first_visit.astype(jnp.int32)


def visited_share(rows: int, num_groups: int) -> float:
    """The expected share of num_groups groups that `rows` rows reach when each row's group is uniform: what the
    weights' bytes are scaled by in a launch's cost estimate (the kernels read the blocks of groups with rows only)."""
    return 1.0 - (1.0 - 1.0 / num_groups) ** rows if num_groups else 0.0


def contraction_block(c, v, active_ref, n_contract):
    """The contraction block an index map asks for at grid step (visit v, block c): c on an active visit, the last
    one on an inactive visit (where the previous visit ended: nothing is fetched)."""
    return jnp.where(active_ref[v] == 1, c, n_contract - 1)


def pad_to_blocks(a, axes, multiple=BLOCK):
    """a padded with zeros at the end of each of `axes` to a multiple of `multiple`."""
    for ax in axes:
        a = kb.pad_axis(a, ax, multiple, value=0)
    return a


# ---- kernel bodies -------------------------------------------------------------------------------------------
def _gpu_kernel(first_ref, last_ref, start_ref, end_ref, *refs, product, n_contract, layered):
    """o[tile] = sum over the tile's groups g with rows in it of rows_in(g) ? sum_c product(g, c) : (previous)."""
    layer_ref, *refs = refs if layered else (None, *refs)
    *in_refs, o_ref = refs
    m = pl.program_id(0)
    tm, to = o_ref.shape
    rows = m * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    layer = layer_ref[0] if layered else None

    def group_product(g):
        return jax.lax.fori_loop(0, n_contract, lambda c, acc: acc + product(*in_refs, g, c, layer),
                                 jnp.zeros((tm, to), F32))

    def per_group(g, out):
        start, end = start_ref[g], end_ref[g]

        def take(out):
            in_group = (rows >= start) & (rows < end)
            return jnp.where(in_group, group_product(g), out)
        has_rows_here = (end > start) & (start < (m + 1) * tm) & (end > m * tm)
        return jax.lax.cond(has_rows_here, take, lambda out: out, out)

    out = jax.lax.fori_loop(first_ref[m], last_ref[m] + 1, per_group, jnp.zeros((tm, to), F32))
    o_ref[...] = out.astype(o_ref.dtype)


def _tpu_kernel(tile_ref, group_ref, active_ref, first_ref, start_ref, end_ref, *refs, product, layered):
    if layered:
        refs = refs[1:]  # the layer index: read by the index maps only
    *in_refs, o_ref, acc_ref = refs
    o, v, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tm = o_ref.shape[0]

    @pl.when(c == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active_ref[v] == 1)
    def _():
        acc_ref[...] += product(*in_refs, o)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        g = group_ref[v]
        rows = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        take = (rows >= start_ref[g]) & (rows < end_ref[g]) & (active_ref[v] == 1)
        kept = jnp.where(first_ref[v] == 1, 0.0, o_ref[...].astype(F32))  # a tile's first visit starts from 0
        o_ref[...] = jnp.where(take, acc_ref[...], kept).astype(o_ref.dtype)


# ---- launch --------------------------------------------------------------------------------------------------
def launch(launch_form, product, x_MI, operands, specs, group_sizes_G, *, n_out, operand_bytes, out_dtype, name,
           backend, platform, block_k=BLOCK, block_n=BLOCK, triton=(4, 2), rows_in_use=None, layer=None):
    """out [M, n_out] (out_dtype): the grouped product of x [M, I] (I a multiple of block_k, n_out of block_n;
    rows padded here) with the weights `operands`, read through `specs` (BlockSpecs of `launch_form`: index maps
    (o, v, c, tile, group, active, first, starts, ends[, layer]) on TPU (use contraction_block for the contraction
    index), (m, o) on GPU) by `product` (see the module docstring; on GPU product(*refs, g, c, layer)).
    layer: an int32 scalar when the weights are stacks of layers [L, G, ...] read in place (the TPU index maps get
    it scalar-prefetched as their last argument; the GPU product gets it as `layer`), else None.
    The cost estimate: every one of `rows_in_use` rows (default all; tiles past the last group are skipped at run
    time) times an [I, n_out] weight once (a TPU tile's extra visits at group boundaries, at most G - 1, are not
    counted); bytes: those rows of x, `operand_bytes` (one layer's weights and scales) times the share of the
    groups those rows reach (visited_share: blocks of groups without rows are not read), the output rows. name:
    the kernel's name in the compiled program (and profiles). triton: (num_warps, num_stages) of the gpu form."""
    x = kb.pad_axis(x_MI, 0, BLOCK)
    Mp, I = x.shape
    G = group_sizes_G.shape[0]
    rows = Mp if rows_in_use is None else min(Mp, rows_in_use)
    cost = kb.cost(flops=2 * rows * I * n_out,
                   bytes_accessed=(operand_bytes * visited_share(rows, G) + rows * I * jnp.dtype(x.dtype).itemsize
                                   + rows * n_out * jnp.dtype(out_dtype).itemsize))
    first, last, starts, ends = tables(group_sizes_G, Mp // BLOCK)
    out_shape = jax.ShapeDtypeStruct((Mp, n_out), out_dtype)
    layered = layer is not None
    layer_args = (jnp.asarray(layer, jnp.int32).reshape(1),) if layered else ()
    if launch_form == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        schedule = visit_schedule(first, last, starts, ends)
        n_contract = I // block_k

        def x_map(o, v, c, tile, group, active, *_):
            return tile[v], contraction_block(c, v, active, n_contract)

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6 + layered, grid=(n_out // block_n, schedule[0].shape[0], n_contract),
            in_specs=[pl.BlockSpec((BLOCK, block_k), x_map), *specs],
            out_specs=pl.BlockSpec((BLOCK, block_n), lambda o, v, c, tile, *_: (tile[v], o)),
            scratch_shapes=[pltpu.VMEM((BLOCK, block_n), F32)])
        # visits of a tile and the contraction blocks accumulate into one output block: only columns are parallel
        opts = kb.launch_options(backend, platform, 3, sequential=(1, 2))
        out = pl.pallas_call(functools.partial(_tpu_kernel, product=product, layered=layered), grid_spec=grid_spec,
                             out_shape=out_shape, cost_estimate=cost, name=name, **opts)(
            *schedule, starts, ends, *layer_args, x, *operands)
    else:
        table = kb.scalar_table_spec(backend, platform)
        out = pl.pallas_call(
            functools.partial(_gpu_kernel, product=product, n_contract=I // block_k, layered=layered),
            grid=(Mp // BLOCK, n_out // block_n),
            in_specs=[table] * (4 + layered) + [pl.BlockSpec((BLOCK, I), lambda m, o: (m, 0)), *specs],
            out_specs=pl.BlockSpec((BLOCK, block_n), lambda m, o: (m, o)), out_shape=out_shape, cost_estimate=cost,
            name=name, **kb.launch_options(backend, platform, 2, num_warps=triton[0], num_stages=triton[1]),
        )(first, last, starts, ends, *layer_args, x, *operands)
    return out[:x_MI.shape[0]]
