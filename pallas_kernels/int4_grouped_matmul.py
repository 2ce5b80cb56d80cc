"""Grouped matmul for routed experts with INT4 weights in the compressed-tensors `pack-quantized` group format.

    out[i] = x[i] @ W[g(i)]          rows sorted by group: rows [start_g, start_g + group_sizes[g]) use W[g]
    W[g][i, o] = (nibble(packed[g, i // 8, o], i % 8) - 8) * scales[g, i // group_size, o]

The weights are the release's (K2-Thinking, K2.5 and later: `weight_packed` int32 [out, in / 8], eight 4-bit values
per int32 along the input axis, the first in the low nibble, each stored as value + 8; `weight_scale` [out,
in / group_size]; symmetric, W4A16) in k2jax's [in, out] orientation: packed [G, P, O] with P = ceil(I / 8) and
scales [G, S, O] with S = ceil(I / group_size), bf16 or f32. Nothing is repacked: a packed int32 holds the same
eight values as in the release file (the release pads a last partial int32 with the nibble 0; those values meet
zero activation columns here).

`unpack` / `dequantize` are the one INT4 unpacking and dequantisation of the project (any leading axes, the packed
axis given): k2jax.formats.quant runs them on the host, the XLA reference and the CPU form on the devices; the
kernel bodies unpack their blocks with the same nibble extraction (`_nibbles`).

Rows past sum(group_sizes) come out as zeros; empty groups are allowed. Activations are bf16 or f32, accumulation
is f32, the output has x's dtype. `reference` is the XLA form: dequantise to x's dtype, then jax.lax.ragged_dot.

The kernel multiplies 128-row tiles by weight blocks of block_k inputs x 128 outputs, each read as a [block_k / 8,
128] int32 packed block and a [block_k / group_size, 128] scale block (at group 32 with bf16 scales 1/4 + 1/32 of a
bf16 block's bytes). In VMEM / registers the packed block is broadcast against the eight shifts to [block_k / 8, 8,
128], masked to nibbles and collapsed to the block_k contraction rows (row i = 8p + k, the release's order: x is
not permuted); the values are scaled in f32 per group of `group_size` rows (viewed as [block_k / group_size,
group_size, 128]) because the scales vary along the contraction inside a block, then cast to x's dtype for one dot
with f32 accumulation. Mosaic (v5p) and Triton (H100) both accept this form as it is: every reshape merges or splits
the second-minor (sublane) axis at multiples of 8 rows, so no per-nibble sub-products were needed. The tile walk,
visit schedule and launch are pallas_kernels.grouped_tiles', shared with fp8_grouped_matmul; this module brings the
weight operands and the block product. Two launch forms, picked by platform (backend.launch_form):
  "gpu" (Triton; also the default interpreted form): one program per (row tile, column tile) walks the groups
        overlapping its tile and the contraction blocks inside, reading packed weights and scales through
        whole-array refs (pointers on GPU). block_k 128: a [16, 128] packed block, [128 / group_size, 128] scales.
  "tpu" (Mosaic): the scalar-prefetched (row tile, group) visit schedule; grid (column tile, visit, contraction
        block); the index maps DMA only the visited group's packed and scale blocks. block_k 512 by default (a
        [64, 128] packed block, [16, 128] scales at group 32): Mosaic refuses a [4, 128] scale block of a [G, S, O]
        array (a block's last two dims must be multiples of (8, 128) or whole), and viewing the scales as
        [G, I / 128, 4, O] to make the 4 rows whole costs a relayout copy of every scale array per call (seen in the
        compiled program: a bf16 [.., 4, O] tiles differently), while the 16 rows of 512 inputs fill one bf16
        (16, 128) tile (f32 scales need 8 rows) and also take 4x fewer grid steps. `launch_settings` raises a default
        block_k to the scales' tile when group_size needs it and refuses a given one that misses it.
Padding: I to a multiple of block_k and O of 128 (packed rows and scales with zeros, x's contraction columns with 0,
never the row pad value: 0 x a finite weight stays 0, and the garbage nibbles of a last partial int32 meet those
zeros); rows to a multiple of 128 with `backend.pad_value()` (never read into a result: each group's product is
selected by its rows).

Gradients: the INT4 weights are frozen (inference): no gradient flows to them or their scales (symbolic zeros from
the custom_vjp; backend="xla" stops the scales' gradient the same way). d/dx runs the same kernel form on the
transposed product, dx [M, I] = dy [M, O] @ W[g]ᵀ: the output tiles run along I (block_k wide: block_k / 8 packed
rows, block_k / group_size scale rows), the contraction along O in 128s, and the same dequantised block enters a
dot with its O axis contracted (backend.dot_nt): nothing is transposed in memory.

Launch defaults (`LAUNCH`, beside the kernel) per (launch form, activation dtype), used where the caller passes None.
Compiled, not run: both forms compile deviceless (tests/pallas_kernels/test_compile.py) for one TPU v5p chip and one
H100 at K2's expert shapes (7168 -> 2048 and 2048 -> 7168, G = 8, 256 rows, bf16 scales), forward and d/dx, with
these defaults. H100 (ptxas sm_90a; shared memory as XLA's Triton compiler reports it), block_k 128: bf16
activations 8 warps, 2 stages: 105 KiB of shared memory, 238-241 registers, no spills in any of the four launches
(4 warps spill 0.7-1.2 KB; 3 stages: 146 KiB, no spills, d/dx at 255 registers; 16 warps, 2 stages: 104 KiB, 128
registers, no spills; block_k 256 spills); f32 activations 8 warps, 1 stage: 64 KiB, forward spills 8 bytes, d/dx
460 (2 stages: 137 KiB, 148 / 436 bytes; 4 or 16 warps spill more). v5p, block_k 512: scoped VMEM 456 KiB forward
/ 648 KiB d/dx (bf16 activations), 776 / 968 KiB (f32), of 16 MiB. Nothing has run or been timed on a device.
Both forms run in the Pallas interpreter in the tests (backend="interpret", platform="gpu" | "tpu").

Letter legend: M rows, I / O a matmul's in (contraction) / out features, G groups, P packed rows (I / 8), S scale
groups along I (I / group_size).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb
from pallas_kernels import grouped_tiles as gt

F32 = jnp.float32
PACK = 8           # 4-bit values per int32
GROUP_SIZE = 32    # the releases' group size (scales per 32 inputs)
OFFSET = 8         # a value v in [-8, 7] is stored as the nibble v + 8
BLOCK = gt.BLOCK   # the kernel's row tile and output-column tile (128); block_k is a multiple of it

# Launch settings per (launch form, activation dtype) for arguments left None (launch_settings): block_k (inputs
# per weight block) and Triton's num_warps / num_stages (gpu form). Chosen from deviceless compiles at K2's expert
# shapes (module docstring): H100 227 KiB of shared memory per block, no spills in bf16; v5p under 1 MiB of the
# 16 MiB scoped VMEM.
LAUNCH: dict[tuple[str, str], dict] = {
    ("gpu", "bfloat16"): {"block_k": 128, "num_warps": 8, "num_stages": 2},
    ("gpu", "float32"): {"block_k": 128, "num_warps": 8, "num_stages": 1},
    ("tpu", "bfloat16"): {"block_k": 512},
    ("tpu", "float32"): {"block_k": 512},
}
DEFAULTS = {"block_k": BLOCK, "num_warps": 4, "num_stages": 2}  # any other form / dtype


# ---- the format (XLA, and the kernel bodies' unpacking) ----------------------------------------------------------
def _nibbles(packed: jax.Array, axis: int) -> jax.Array:
    """int32 words -> their eight 4-bit values minus OFFSET, int32 in [-8, 7], along `axis` (PACK x as long; value
    i = 8p + k is nibble k of word p, the first in the low bits). Broadcast, shift, mask and one reshape that merges
    [.., P, 8, ..] -> [.., 8P, ..]: the form Mosaic and Triton accept inside a kernel."""
    wide = packed.shape[:axis + 1] + (PACK,) + packed.shape[axis + 1:]
    words = jnp.broadcast_to(jnp.expand_dims(packed, axis + 1), wide)
    shifts = 4 * jax.lax.broadcasted_iota(jnp.int32, wide, axis + 1)
    values = ((words >> shifts) & 0xF) - OFFSET  # the arithmetic shift's sign bits are masked away
    return values.reshape(packed.shape[:axis] + (packed.shape[axis] * PACK,) + packed.shape[axis + 1:])


def unpack(packed: jax.Array, *, axis: int = -2, size: int | None = None) -> jax.Array:
    """int32 packed along `axis` (eight nibbles per int32, the first in the low bits) -> int8 values in [-8, 7]
    along that axis, PACK x as long, cropped to `size` when given."""
    axis = axis % packed.ndim
    if packed.dtype != jnp.int32:
        raise ValueError(f"int4 unpack: packed weights must be int32, got {packed.dtype}")
    values = _nibbles(packed, axis).astype(jnp.int8)
    if size is not None:
        values = jax.lax.slice_in_dim(values, 0, size, axis=axis)
    return values


def dequantize(packed: jax.Array, scales: jax.Array, *, axis: int = -2, size: int | None = None,
               group_size: int = GROUP_SIZE, dtype=F32) -> jax.Array:
    """W = unpack(packed) * scale, one scale per `group_size` values along `axis` (scales has the packed array's
    shape with that axis ceil(size / group_size) long), computed in float32 and cast to `dtype`."""
    axis = axis % packed.ndim
    values = unpack(packed, axis=axis, size=size)
    n = values.shape[axis]
    s = jax.lax.slice_in_dim(jnp.repeat(scales.astype(F32), group_size, axis=axis), 0, n, axis=axis)
    return (values.astype(F32) * s).astype(dtype)


def reference(x_MI: jax.Array, packed_GPO: jax.Array, scales_GSO: jax.Array, group_sizes_G: jax.Array, *,
              group_size: int = GROUP_SIZE) -> jax.Array:
    """The XLA reference: dequantise to x's dtype, then jax.lax.ragged_dot (f32 accumulation), out in x's dtype."""
    w = dequantize(packed_GPO, scales_GSO, axis=1, size=x_MI.shape[1], group_size=group_size, dtype=x_MI.dtype)
    y = jax.lax.ragged_dot(x_MI, w, group_sizes_G.astype(jnp.int32), preferred_element_type=F32)
    return y.astype(x_MI.dtype)


# ---- kernel (the tile walk, schedule and launch: pallas_kernels.grouped_tiles) -----------------------------------
def _dequantize_block(p_blk, s_blk, dtype, group_size):
    """A [block_k / 8, to] packed block and its [block_k / group_size, to] scales -> the [block_k, to] weight
    block: unpacked, scaled per group of rows in f32, cast to `dtype`."""
    values = _nibbles(p_blk, 0).astype(F32)
    n, to = values.shape
    s = s_blk.astype(F32)
    return (values.reshape(s.shape[0], group_size, to) * s[:, None, :]).reshape(n, to).astype(dtype)


def _block_product(x_blk, p_blk, s_blk, transpose_w, group_size):
    """x_blk @ W_blk (forward: the block's I axis contracted) or x_blk @ W_blkᵀ (d/dx: its O axis contracted)."""
    w = _dequantize_block(p_blk, s_blk, x_blk.dtype, group_size)
    return (kb.dot_nt if transpose_w else kb.dot_nn)(x_blk, w)


def _gpu_product(x_ref, p_ref, s_ref, g, c, layer, *, transpose_w, group_size, block_k):
    """Group g's contraction block c from whole-array refs (with a layer: [L, G, ...] stacks read at it):
    block_k packed / scale rows' worth along I (forward), or 128 columns along O (d/dx, where a program's refs hold
    its output tile's rows)."""
    at = (g,) if layer is None else (layer, g)
    if transpose_w:
        cs = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
        return _block_product(x_ref[:, cs], p_ref[(*at, slice(None), cs)], s_ref[(*at, slice(None), cs)],
                              transpose_w, group_size)
    n_p, n_s = block_k // PACK, block_k // group_size
    x_blk = x_ref[:, pl.ds(pl.multiple_of(c * block_k, block_k), block_k)]
    p_blk = p_ref[(*at, pl.ds(pl.multiple_of(c * n_p, n_p), n_p), slice(None))]
    return _block_product(x_blk, p_blk, s_ref[(*at, pl.ds(c * n_s, n_s), slice(None))], transpose_w, group_size)


def _tpu_product(x_ref, p_ref, s_ref, o, *, transpose_w, group_size):
    """The blocks the visit's index maps DMA'd (o, the column tile, is in their index maps already)."""
    del o
    return _block_product(x_ref[...], p_ref[...], s_ref[...], transpose_w, group_size)


def _operands(form, packed, scales, transpose_w, group_size, block_k, n_contract, layered):
    """BlockSpecs of the padded packed weights [(L,) G, Ip / 8, Op] and scales [(L,) G, Ip / group_size, Op]
    (stacks of layers read at the scalar-prefetched layer when `layered`): a weight block covers block_k inputs and
    128 outputs. Forward: I is the contraction (grid axis 2 on TPU, the loop on GPU), O the output tiles; d/dx the
    other way round. On TPU the contraction index is gt.contraction_block's (pinned on inactive visits)."""
    *lead, Pp, Op = packed.shape
    n_p, n_s = block_k // PACK, block_k // group_size
    if form == "tpu":
        none = (None,) * len(lead)

        def w_map(o, v, c, tile, group, active, *rest):
            at = (group[v],) if not layered else (rest[-1][0], group[v])
            cb = gt.contraction_block(c, v, active, n_contract)
            return (*at, o, cb) if transpose_w else (*at, cb, o)  # d/dx: grid (I tile, visit, O block)
        return pl.BlockSpec((*none, n_p, BLOCK), w_map), pl.BlockSpec((*none, n_s, BLOCK), w_map)
    zeros = (0,) * len(lead)
    if transpose_w:  # a program's I tile: its packed and scale rows, every O column
        return (pl.BlockSpec((*lead, n_p, Op), lambda m, j: (*zeros, j, 0)),
                pl.BlockSpec((*lead, n_s, Op), lambda m, j: (*zeros, j, 0)))
    return (pl.BlockSpec((*lead, Pp, BLOCK), lambda m, o: (*zeros, 0, o)),
            pl.BlockSpec((*lead, scales.shape[-2], BLOCK), lambda m, o: (*zeros, 0, o)))


def _launch(x, packed, scales, group_sizes_G, layer, *, transpose_w, opts):
    """x [M, Ip] against the padded weights -> [M, Op] (forward), or dy [M, Op] -> dx [M, Ip] (transposed)."""
    backend, platform, group_size, block_k, triton, rows_in_use, _ = opts
    form = kb.launch_form(backend, platform)
    n_contract = x.shape[1] // (BLOCK if transpose_w else block_k)
    specs = _operands(form, packed, scales, transpose_w, group_size, block_k, n_contract, layer is not None)
    product = (functools.partial(_tpu_product, transpose_w=transpose_w, group_size=group_size) if form == "tpu"
               else functools.partial(_gpu_product, transpose_w=transpose_w, group_size=group_size, block_k=block_k))
    blocks = {"block_k": BLOCK, "block_n": block_k} if transpose_w else {"block_k": block_k, "block_n": BLOCK}
    layers = packed.shape[0] if layer is not None else 1
    return gt.launch(form, product, x, (packed, scales), specs, group_sizes_G,
                     n_out=packed.shape[-2] * PACK if transpose_w else packed.shape[-1],
                     operand_bytes=kb.nbytes(packed, scales) // layers, out_dtype=x.dtype,
                     name="int4_grouped_matmul_dx" if transpose_w else "int4_grouped_matmul", backend=backend,
                     platform=platform, **blocks, triton=triton, rows_in_use=rows_in_use, layer=layer)


def _pad_weights(packed_GPO, scales_GSO, group_size, block_k):
    """I to a multiple of block_k (packed rows and scales), O to 128: with zeros (any leading axes)."""
    p_rows, s_rows = packed_GPO.ndim - 2, scales_GSO.ndim - 2
    packed = gt.pad_to_blocks(gt.pad_to_blocks(packed_GPO, [p_rows], block_k // PACK), [p_rows + 1])
    scales = gt.pad_to_blocks(gt.pad_to_blocks(scales_GSO, [s_rows], block_k // group_size), [s_rows + 1])
    return packed, scales


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gmm(x_MI, packed_GPO, scales_GSO, group_sizes_G, layer, opts):
    return _forward(x_MI, packed_GPO, scales_GSO, group_sizes_G, layer, opts)


def _forward(x_MI, packed_GPO, scales_GSO, group_sizes_G, layer, opts):
    group_size, block_k = opts[2:4]
    packed, scales = _pad_weights(packed_GPO, scales_GSO, group_size, block_k)
    x = gt.pad_to_blocks(x_MI, [1], block_k)  # zeros: 0 x a finite weight stays 0
    return _launch(x, packed, scales, group_sizes_G, layer, transpose_w=False, opts=opts)[:, :packed_GPO.shape[-1]]


def _gmm_fwd(x_MI, packed_GPO, scales_GSO, group_sizes_G, layer, opts):
    return (_forward(x_MI, packed_GPO, scales_GSO, group_sizes_G, layer, opts),
            (packed_GPO, scales_GSO, group_sizes_G, layer))


def _gmm_bwd(opts, res, dy_MO):
    """dx = dy @ W[g]ᵀ by the same kernel; the frozen INT4 weights, their scales and the group sizes get none."""
    packed_GPO, scales_GSO, group_sizes_G, layer = res
    group_size, block_k = opts[2:4]
    packed, scales = _pad_weights(packed_GPO, scales_GSO, group_size, block_k)
    dx = _launch(gt.pad_to_blocks(dy_MO, [1]), packed, scales, group_sizes_G, layer, transpose_w=True, opts=opts)
    return dx[:, :opts[-1]], None, None, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ---- dispatch ------------------------------------------------------------------------------------------------
def _check(x_MI, packed_GPO, group_sizes_G, scales_GSO, group_size) -> None:
    """One line naming what is wrong with the inputs, if anything."""
    name = "int4_grouped_matmul"
    if not isinstance(group_size, int) or group_size < PACK or group_size % PACK:
        raise ValueError(f"{name}: group_size must be a positive multiple of {PACK}, got {group_size!r}")
    if x_MI.ndim != 2 or packed_GPO.ndim != 3 or scales_GSO.ndim != 3 or group_sizes_G.ndim != 1:
        raise ValueError(f"{name}: expected x [M, I], packed [G, P, O], group_sizes [G], scales [G, S, O]; got x "
                         f"{x_MI.shape}, packed {packed_GPO.shape}, group_sizes {group_sizes_G.shape}, scales "
                         f"{scales_GSO.shape}")
    I = x_MI.shape[1]
    G, _, O = packed_GPO.shape
    want_p, want_s = (G, -(-I // PACK), O), (G, -(-I // group_size), O)
    if packed_GPO.shape != want_p or scales_GSO.shape != want_s or group_sizes_G.shape != (G,):
        raise ValueError(f"{name}: x {x_MI.shape} needs packed {want_p} (I / 8 rows), scales {want_s} (I / "
                         f"{group_size} rows), group_sizes ({G},); got packed {packed_GPO.shape}, scales "
                         f"{scales_GSO.shape}, group_sizes {group_sizes_G.shape}")
    if packed_GPO.dtype != jnp.int32:
        raise ValueError(f"{name}: packed weights must be int32, got {packed_GPO.dtype}")
    if not jnp.issubdtype(scales_GSO.dtype, jnp.floating) or not jnp.issubdtype(x_MI.dtype, jnp.floating):
        raise ValueError(f"{name}: x and scales must be floating point, got x {x_MI.dtype}, scales {scales_GSO.dtype}")
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be integers, got {group_sizes_G.dtype}")


def launch_settings(backend: str, platform: str | None, dtype, scales_dtype, group_size: int, **given) -> dict:
    """block_k / num_warps / num_stages for a launch: those given (not None), else LAUNCH's for the launch form
    (backend.launch_form) and the activation dtype, else DEFAULTS (backend.launch_settings). The tpu form's scale
    block (block_k / group_size rows) must fill Mosaic's sublane tile of the scales' dtype (8 rows of 32 bits, 16 of
    16 bits): a default block_k is raised to it, a given one that does not is an error."""
    if BLOCK % group_size:
        raise ValueError(f"int4_grouped_matmul: the kernel's group_size must divide {BLOCK} (its contraction tile), "
                         f"got {group_size} (backend='xla' takes any multiple of {PACK})")
    form = kb.launch_form(backend, platform)
    settings = kb.launch_settings(LAUNCH, DEFAULTS, backend, platform, dtype, **given)
    block_k = settings["block_k"]
    if not isinstance(block_k, int) or block_k <= 0 or block_k % BLOCK:
        raise ValueError(f"int4_grouped_matmul: block_k must be a positive multiple of {BLOCK}, got {block_k!r}")
    if form == "gpu" and block_k & (block_k - 1):
        raise ValueError(f"int4_grouped_matmul: the gpu form's block_k must be a power of two (Triton), got {block_k}")
    if form == "tpu":
        tile = 32 // jnp.dtype(scales_dtype).itemsize
        if (block_k // group_size) % tile and given.get("block_k") is not None:
            raise ValueError(f"int4_grouped_matmul: on TPU block_k / group_size (scale rows per block) must be a "
                             f"multiple of {tile} for {jnp.dtype(scales_dtype).name} scales, got block_k {block_k}")
        while (block_k // group_size) % tile:
            block_k += BLOCK
    settings["block_k"] = block_k
    return settings


def int4_grouped_matmul(x_MI: jax.Array, packed_GPO: jax.Array, group_sizes_G: jax.Array, scales_GSO: jax.Array, *,
                        layer: jax.Array | int | None = None, group_size: int = GROUP_SIZE, backend: str = "pallas",
                        platform: str | None = None, block_k: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, rows_in_use: float | None = None) -> jax.Array:
    """[M, I] rows sorted by group (bf16 or f32), packed INT4 weights int32 [G, ceil(I/8), O], [G] group sizes,
    scales [G, ceil(I/group_size), O] (bf16 or f32) -> [M, O] in x's dtype. layer: the weights and scales are stacks
    of layers [L, G, ...] read in place at this layer index (no copy of the layer's slice). backend: "xla" |
    "pallas" | "interpret"; platform: the one compiled for ("pallas": "tpu" or "gpu"; "interpret": "tpu" runs the tpu
    form, anything else the gpu form). block_k: inputs per weight block (a multiple of 128); num_warps / num_stages:
    Triton's, for the gpu form; None: LAUNCH's (see launch_settings). rows_in_use: the rows expected to hold data,
    for the kernel's cost estimate only (default all M). d/dx by the kernel; the weights are frozen (no gradient on
    any backend)."""
    if layer is not None:
        if packed_GPO.ndim != 4 or scales_GSO.ndim != 4 or packed_GPO.shape[0] != scales_GSO.shape[0]:
            raise ValueError(f"int4_grouped_matmul: with a layer, packed [L, G, P, O] and scales [L, G, S, O]; got "
                             f"packed {packed_GPO.shape}, scales {scales_GSO.shape}")
        _check(x_MI, packed_GPO[0], group_sizes_G, scales_GSO[0], group_size)
    else:
        _check(x_MI, packed_GPO, group_sizes_G, scales_GSO, group_size)
    if kb.check("int4_grouped_matmul", backend, platform) == "xla":  # the weights are frozen on every backend
        if layer is not None:  # the reference reads the layer's slice
            packed_GPO, scales_GSO = (jax.lax.dynamic_index_in_dim(a, layer, 0, False)
                                      for a in (packed_GPO, scales_GSO))
        return reference(x_MI, packed_GPO, jax.lax.stop_gradient(scales_GSO), group_sizes_G, group_size=group_size)
    s = launch_settings(backend, platform, x_MI.dtype, scales_GSO.dtype, group_size, block_k=block_k,
                        num_warps=num_warps, num_stages=num_stages)
    opts = (backend, platform, group_size, s["block_k"], (s["num_warps"], s["num_stages"]), rows_in_use,
            x_MI.shape[1])
    return _gmm(x_MI, packed_GPO, scales_GSO, group_sizes_G.astype(jnp.int32),
                None if layer is None else jnp.asarray(layer, jnp.int32), opts)
