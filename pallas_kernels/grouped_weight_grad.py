"""The weight gradient of a grouped matmul ("tgmm"), as a Pallas kernel.

The forward grouped matmul is out[i] = x[i] @ w[g(i)], rows sorted by group: rows [start_g, start_g + sizes[g])
belong to group g, rows past sum(sizes) to none. Its weight gradient is, per group,

    dw[g] = x[rows of g]ᵀ @ dy[rows of g]          x [M, I], dy [M, O] -> dw [G, I, O]

with float32 accumulation and the result in `out_dtype` (default: x's dtype). An empty group's dw is zeros. Rows
past the groups (and the kernel's own padding) never reach a result: every row outside a group is removed with a
select before the product, so a NaN or Inf there cannot leak in (0 * NaN would).

The XLA reference (`reference`) is `jax.lax.ragged_dot_general` with the ragged dimension contracted: exactly the
op that `jax.vjp` of `jax.lax.ragged_dot` emits for the weights, called directly so that bf16 inputs accumulate in
float32. Compiled for H100 and for TPU v5p (XLA of jax 0.10.2) it is a dense fallback: x and dy are selected into
[G, M, I] and [G, M, O] copies and one batched dot runs over all M rows for every group, G x the work (seen in the
compiled HLO; tests/pallas_kernels/test_grouped_weight_grad.py checks it). Hence this kernel.

dw is computed in 128 x 128 tiles along I and O (block_k x block_n; I and O padded to multiples of them with
`backend.pad_axis`); rows are read in `block_m`-row blocks (M padded to a multiple of block_m). f32 inputs use the
dot's default precision (TF32 tensor cores on H100, as XLA's own f32 dots there). Two launch forms, by platform
(backend.launch_form):
  "gpu" (Triton; also the default interpreted form): grid (G, I / 128, O / 128). A program owns one [128, 128]
        block of dw[g]: it walks the aligned row blocks that overlap group g's rows (none for an empty group),
        reads x and dy blocks through whole-column refs (pointers on GPU), selects the group's rows and
        accumulates x_blkᵀ @ dy_blk in an f32 [128, 128] register tile. Total work: the routed rows plus at most
        one partial block per group edge, never G x M.
  "tpu" (Mosaic; megablox's tgmm): a visit schedule computed outside the kernel lists (row block, group) pairs in
        group order, every group's overlapping blocks (an empty group gets one visit that only zeroes its output),
        at most M / block_m + G - 1 visits, and is scalar-prefetched into SMEM. The grid is (I / 128, O / 128,
        visit); the BlockSpec index maps read the schedule, so only the visited row block of x and dy is DMA'd into
        VMEM, and the output block dw[g] stays resident across the group's consecutive visits, accumulated in a
        VMEM f32 scratch (zeroed on a group's first visit, stored on its last).

Launch settings (keyword arguments; None: LAUNCH's for the launch form and x's dtype, beside the kernel, else
DEFAULTS): block_m (rows per step; 128 on TPU and for 16-bit inputs on GPU, 64 for f32 on GPU), block_k / block_n
(the dw tile, 128; powers of two), num_warps / num_stages (Triton). A Triton stage holds an x and a dy block
([h, 128] each); the GPU settings (3 stages of 64 KiB, an f32 [128, 128] accumulator in registers over 8 warps)
compile for H100 (227 KiB of shared memory per block; 128-row f32 blocks or 4 bf16 stages do not) at K2's expert
shapes (x [1024, 7168], dy [1024, 2048] and the transposed pair, G = 8) in bf16 and f32; the TPU form compiles for
v5p at the same shapes (deviceless compiles in tests/pallas_kernels/test_grouped_weight_grad.py, and with no launch
arguments in tests/pallas_kernels/test_compile.py). Neither has been run or timed on a device yet: with 128 tiles the
TPU form takes (I/128)(O/128)(M/128 + G - 1) grid steps, so larger block_m / block_k / block_n (e.g. 512) are the
first thing to try there. Both forms run in the Pallas interpreter on CPU (backend="interpret", platform="gpu" |
"tpu").

Dispatch (backend.py's rule): "xla" the reference, "pallas" the kernel compiled for platform "tpu" or "gpu" (I and
O are padded, so any sizes fit), "interpret" the kernel in the interpreter in the form of `platform`.

Letter legend: M rows, I x's features (the forward's in / contraction), O dy's features (the forward's out), G groups,
h rows per block (block_m).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb

F32 = jnp.float32
BLOCK = 128  # the default I and O tile
# Launch settings per (launch form, input dtype) for the arguments left None (backend.launch_settings). The gpu
# form's Triton settings are chosen to compile for H100: a stage holds x and dy blocks [h, 128] each (16-bit h = 128
# or f32 h = 64: 64 KiB; 3 stages: 192 KiB of the 227), the f32 [128, 128] accumulator (64 KiB) lives in registers
# over 8 warps. The tpu form takes DEFAULTS (128-row blocks, 128 x 128 dw tiles).
LAUNCH: dict[tuple[str, str], dict] = {
    ("gpu", "bfloat16"): dict(block_m=128, num_warps=8, num_stages=3),
    ("gpu", "float16"): dict(block_m=128, num_warps=8, num_stages=3),
    ("gpu", "float32"): dict(block_m=64, num_warps=8, num_stages=3),
}
DEFAULTS = dict(block_m=128, block_k=BLOCK, block_n=BLOCK, num_warps=4, num_stages=2)  # any other form / dtype


# ---- XLA reference -------------------------------------------------------------------------------------------
_RAGGED_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def reference(x_MI: jax.Array, dy_MO: jax.Array, group_sizes_G: jax.Array, out_dtype=None) -> jax.Array:
    """dw [G, I, O] by XLA: ragged_dot_general contracting the ragged row axis (what ragged_dot's transpose emits
    for its weights), float32 accumulation, cast to out_dtype (default x's dtype)."""
    dw = jax.lax.ragged_dot_general(x_MI, dy_MO, group_sizes_G.astype(jnp.int32), _RAGGED_CONTRACTION,
                                    preferred_element_type=F32)
    return dw.astype(out_dtype or x_MI.dtype)


# ---- kernels -------------------------------------------------------------------------------------------------
def _group_rows(x, first_row, start, end):
    """x [h, ...] (rows first_row .. first_row + h - 1) with the rows outside [start, end) replaced by 0 (a select:
    NaN there never leaks)."""
    rows = first_row + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where((rows >= start) & (rows < end), x, jnp.zeros_like(x))


def _gpu_kernel(start_ref, end_ref, x_ref, dy_ref, o_ref, *, block_m):
    """o = dw[g] block (k, n): sum over the row blocks overlapping group g of x_blkᵀ @ dy_blk, group rows only."""
    g = pl.program_id(0)
    start, end = start_ref[g], end_ref[g]
    first = start // block_m
    stop = jnp.where(end > start, (end + block_m - 1) // block_m, first)  # an empty group visits nothing

    def step(t, acc):
        r0 = pl.multiple_of(t * block_m, block_m)
        x = _group_rows(x_ref[pl.ds(r0, block_m), :], r0, start, end)
        dy = _group_rows(dy_ref[pl.ds(r0, block_m), :], r0, start, end)
        return acc + kb.dot_tn(x, dy)

    acc = jax.lax.fori_loop(first, stop, step, jnp.zeros(o_ref.shape, F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _work(x, dy, G, out_dtype, rows):
    """The outer product x[m]ᵀ dy[m] of each of `rows` rows (those in use: blocks past the last group are skipped
    at run time) once; bytes: those rows of x and dy once, the [G, I, O] result."""
    Ip, Op = x.shape[1], dy.shape[1]
    return kb.cost(flops=2 * rows * Ip * Op,
                   bytes_accessed=(rows * (Ip * jnp.dtype(x.dtype).itemsize + Op * jnp.dtype(dy.dtype).itemsize)
                                   + G * Ip * Op * jnp.dtype(out_dtype).itemsize))


def _launch_gpu_form(x, dy, starts, ends, *, G, block_m, block_k, block_n, out_dtype, backend, platform, opts,
                     rows):
    Mp, Ip = x.shape
    Op = dy.shape[1]
    return pl.pallas_call(
        functools.partial(_gpu_kernel, block_m=block_m),
        grid=(G, Ip // block_k, Op // block_n),
        in_specs=[kb.scalar_table_spec(backend, platform)] * 2 + [
            pl.BlockSpec((Mp, block_k), lambda g, k, n: (0, k)),
            pl.BlockSpec((Mp, block_n), lambda g, k, n: (0, n))],
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda g, k, n: (g, k, n)),
        out_shape=jax.ShapeDtypeStruct((G, Ip, Op), out_dtype), cost_estimate=_work(x, dy, G, out_dtype, rows),
        **opts,
    )(starts, ends, x, dy)


def visit_schedule(starts_G, ends_G, num_blocks: int, block_m: int):
    """The (row block, group) pairs the TPU form visits, in group order: every row block overlapping a group, one
    visit for an empty group; padded to the static bound num_blocks + G - 1 by repeating the last pair.
    -> block [V], group [V], active [V] (1: multiply; 0 on padding and empty groups' visits), first [V] / last [V]
    (1 on a group's first / last visit), all int32."""
    G = starts_G.shape[0]
    V = num_blocks + G - 1
    first_b = jnp.clip(starts_G // block_m, 0, num_blocks - 1)
    nonempty = ends_G > starts_G
    last_b = jnp.where(nonempty, jnp.clip((ends_G - 1) // block_m, 0, num_blocks - 1), first_b)
    count = last_b - first_b + 1
    cum = jnp.cumsum(count)
    v = jnp.arange(V, dtype=jnp.int32)
    real = v < cum[-1]
    vv = jnp.minimum(v, cum[-1] - 1)
    g = jnp.minimum(jnp.searchsorted(cum, vv, side="right"), G - 1).astype(jnp.int32)
    offset = cum[g] - count[g]
    flags = (real & nonempty[g], real & (vv == offset), real & (vv == cum[g] - 1))
    return (first_b[g] + vv - offset).astype(jnp.int32), g, *(f.astype(jnp.int32) for f in flags)


def _tpu_kernel(block_ref, group_ref, active_ref, first_ref, last_ref, start_ref, end_ref, x_ref, dy_ref, o_ref,
                acc_ref):
    v = pl.program_id(2)
    block_m = x_ref.shape[0]

    @pl.when(first_ref[v] == 1)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active_ref[v] == 1)
    def _():
        g = group_ref[v]
        r0 = block_ref[v] * block_m
        x = _group_rows(x_ref[...], r0, start_ref[g], end_ref[g])
        dy = _group_rows(dy_ref[...], r0, start_ref[g], end_ref[g])
        acc_ref[...] += kb.dot_tn(x, dy)

    @pl.when(last_ref[v] == 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _launch_tpu_form(x, dy, starts, ends, *, G, block_m, block_k, block_n, out_dtype, opts, rows):
    from jax.experimental.pallas import tpu as pltpu
    Mp, Ip = x.shape
    Op = dy.shape[1]
    schedule = visit_schedule(starts, ends, Mp // block_m, block_m)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7, grid=(Ip // block_k, Op // block_n, schedule[0].shape[0]),
        in_specs=[pl.BlockSpec((block_m, block_k), lambda k, n, v, blk, *_: (blk[v], k)),
                  pl.BlockSpec((block_m, block_n), lambda k, n, v, blk, *_: (blk[v], n))],
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda k, n, v, blk, grp, *_: (grp[v], k, n)),
        scratch_shapes=[pltpu.VMEM((block_k, block_n), F32)])
    return pl.pallas_call(_tpu_kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((G, Ip, Op), out_dtype),
                          cost_estimate=_work(x, dy, G, out_dtype, rows), **opts)(*schedule, starts, ends, x, dy)


def _launch(x_MI, dy_MO, group_sizes_G, *, out_dtype, backend, platform, settings, rows_in_use):
    M, I = x_MI.shape
    O = dy_MO.shape[1]
    G = group_sizes_G.shape[0]
    form = kb.launch_form(backend, platform)
    settings = dict(settings)
    block_m, block_k, block_n = (settings.pop(key) for key in ("block_m", "block_k", "block_n"))
    ends = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), M)  # rows past M belong to no group
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    x = kb.pad_axis(kb.pad_axis(x_MI, 0, block_m), 1, block_k)
    dy = kb.pad_axis(kb.pad_axis(dy_MO, 0, block_m), 1, block_n)
    blocks = {"block_m": block_m, "block_k": block_k, "block_n": block_n}
    rows = x.shape[0] if rows_in_use is None else min(x.shape[0], rows_in_use)
    if form == "tpu":
        # a group's visits accumulate into one output block: only the I and O tiles are parallel
        opts = kb.launch_options(backend, platform, 3, sequential=(2,))
        out = _launch_tpu_form(x, dy, starts, ends, G=G, **blocks, out_dtype=out_dtype, opts=opts, rows=rows)
    else:
        opts = kb.launch_options(backend, platform, 3, **settings)
        out = _launch_gpu_form(x, dy, starts, ends, G=G, **blocks, out_dtype=out_dtype, backend=backend,
                               platform=platform, opts=opts, rows=rows)
    return out[:, :I, :O]


# ---- dispatch ------------------------------------------------------------------------------------------------
def grouped_weight_grad(x_MI: jax.Array, dy_MO: jax.Array, group_sizes_G: jax.Array, *, out_dtype=None,
                        backend: str = "pallas", platform: str | None = None, rows_in_use: float | None = None,
                        block_m: int | None = None, block_k: int | None = None, block_n: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
    """dw [G, I, O] = per group x[rows of g]ᵀ @ dy[rows of g] (f32 accumulation, out_dtype default x's dtype).
    x [M, I] and dy [M, O] rows sorted by group (dy is cast to x's dtype), group_sizes [G] int (rows past their
    sum belong to no group). backend: "xla" | "pallas" | "interpret"; platform: the one compiled for ("pallas":
    "tpu" or "gpu"; "interpret": "tpu" runs the tpu form, anything else the gpu form). block_m, block_k, block_n,
    num_warps, num_stages: launch settings (None: LAUNCH's, else DEFAULTS; see the module docstring). rows_in_use:
    rows expected to hold data, for the kernel's cost estimate only (default all M)."""
    if (x_MI.ndim != 2 or dy_MO.ndim != 2 or group_sizes_G.ndim != 1 or x_MI.shape[0] != dy_MO.shape[0]
            or not jnp.issubdtype(group_sizes_G.dtype, jnp.integer)):
        raise ValueError(f"grouped_weight_grad: expected x [M, I], dy [M, O], integer group_sizes [G]; got x "
                         f"{x_MI.shape}, dy {dy_MO.shape}, group_sizes {group_sizes_G.shape} {group_sizes_G.dtype}")
    if x_MI.shape[0] == 0 or group_sizes_G.shape[0] == 0:
        raise ValueError(f"grouped_weight_grad: needs at least one row and one group; got x {x_MI.shape}, "
                         f"group_sizes {group_sizes_G.shape}")
    out_dtype = jnp.dtype(out_dtype or x_MI.dtype)
    dy_MO = dy_MO.astype(x_MI.dtype)
    if kb.check("grouped_weight_grad", backend, platform) == "xla":
        return reference(x_MI, dy_MO, group_sizes_G, out_dtype)
    settings = kb.launch_settings(LAUNCH, DEFAULTS, backend, platform, x_MI.dtype, block_m=block_m, block_k=block_k,
                                  block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    for key in ("block_m", "block_k", "block_n"):
        size = settings[key]
        if not isinstance(size, int) or size < 16 or size & (size - 1):
            raise ValueError(f"grouped_weight_grad: {key} must be a power of two >= 16, got {size!r}")
    return _launch(x_MI, dy_MO, group_sizes_G, out_dtype=out_dtype, backend=backend, platform=platform,
                   settings=settings, rows_in_use=rows_in_use)
