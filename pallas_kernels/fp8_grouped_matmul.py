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
Two launch forms, picked by platform (backend.launch_form):
  "gpu" (Triton; also the default interpreted form): one program per (row tile, column tile) walks the groups
        overlapping its tile (a per-tile [first, last] table; empty groups skipped) and loops over the contraction
        blocks inside, reading weights through a whole-array ref (a pointer on GPU).
  "tpu" (Mosaic): a visit schedule computed outside the kernel lists the (row tile, group) pairs in order, at most
        tiles + G - 1 of them, and is scalar-prefetched into SMEM; the grid is (column tile, visit, contraction
        block), and the BlockSpec index maps read the schedule, so only the visited group's [128, 128] weight
        block is DMA'd into VMEM (megablox-style). The contraction accumulates in a VMEM scratch; consecutive
        visits of a tile keep its output block resident, the first zeroes it.
The tile walk, the visit schedule, both kernel bodies and their launch are pallas_kernels.grouped_tiles' (shared with
int4_grouped_matmul); this module brings the weight operands and the block product.

Gradients: d/dx runs the same kernel against the transposed weights (the scales read transposed); d/dw (bf16 /
f32 weights only: FP8 weights are frozen) is `pallas_kernels.grouped_weight_grad` (XLA's ragged_dot transpose
compiles to a dense every-row-by-every-group product on TPU and GPU).

Dispatch (backend.py's rule): backend="xla" the reference, "pallas" the kernel compiled for platform "tpu" or "gpu",
"interpret" the kernel in the interpreter in the form of `platform`. Both forms run in the Pallas interpreter in the
tests (platform="tpu" | "gpu" with backend="interpret") and compile for their platform (TPU v5p, H100) at K2's
expert shapes (7168 -> 2048 and 2048 -> 7168; FP8 weights with bf16 or FP8 activations, bf16 / f32 weights with
their gradient) with no launch arguments: the gpu form takes Triton's num_warps / num_stages from LAUNCH, beside the
kernel (tests/pallas_kernels/test_compile.py); neither has been run or timed on a device yet.

Letter legend: M rows, I / O a matmul's in (contraction) / out features, G groups, Ib / Ob I and O in 128-blocks (the
scale blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as kb
from pallas_kernels import grouped_tiles as gt
from pallas_kernels.grouped_weight_grad import grouped_weight_grad

F32 = jnp.float32
BLOCK = gt.BLOCK  # the release's FP8 scale block (128), and the kernel's tile along every axis
FP8 = jnp.float8_e4m3fn

# Launch settings per (launch form, activation dtype) for the arguments left None (backend.launch_settings): Triton's
# warps and stages of the gpu form (128x128 f32 tiles), compiled for H100: 8 warps (4 spill ~2 KB), 112-128 KiB
# bf16 / 64 KiB f32 of shared memory (227 KiB per block). The tpu form has no settings.
LAUNCH: dict[tuple[str, str], dict] = {
    ("gpu", "bfloat16"): dict(num_warps=8, num_stages=2),
    ("gpu", "float32"): dict(num_warps=8, num_stages=1),
}
DEFAULTS = dict(num_warps=4, num_stages=2)  # any other form / dtype


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


# ---- kernel (the tile walk, schedule and launch: pallas_kernels.grouped_tiles) --------------------------------
def _block_product(x_blk, w_blk, s_row, xs_col, transpose_w):
    """One contraction block: x_blk @ (w_blk or w_blkᵀ) cast to x's dtype, f32 accumulation, times the weights'
    block scale [1, to] and the activations' [tm, 1] when given."""
    prod = (kb.dot_nt if transpose_w else kb.dot_nn)(x_blk, w_blk.astype(x_blk.dtype))
    if s_row is not None:
        prod = prod * s_row
    if xs_col is not None:
        prod = prod * xs_col
    return prod


def _gpu_product(x_ref, w_ref, s_ref, xs_ref, g, c, layer, *, transpose_w, has_scales, has_x_scales):
    """Group g's contraction block c, sliced from whole-array refs (weights stored [G, O, I] when transpose_w; with
    a layer, [L, G, ...] stacks read at it)."""
    cs = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
    at = (g,) if layer is None else (layer, g)
    w_blk = w_ref[(*at, slice(None), cs)] if transpose_w else w_ref[(*at, cs, slice(None))]
    return _block_product(x_ref[:, cs], w_blk, s_ref[g, pl.ds(c, 1), :] if has_scales else None,
                          xs_ref[c] if has_x_scales else None, transpose_w)


def _tpu_product(x_ref, w_ref, s_ref, xs_ref, o, *, transpose_w, has_scales, has_x_scales):
    """The blocks the visit's index maps DMA'd; the scale: column o (the output tile) of the visit's row of block
    scales [1, Ob], picked by a one-hot sum (a [1, 1] block would break Mosaic's (8, 128) rule)."""
    s = None
    if has_scales:
        row = s_ref[...]
        s = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, row.shape, 1) == o, row, 0.0), axis=1,
                    keepdims=True)
    return _block_product(x_ref[...], w_ref[...], s, xs_ref[...] if has_x_scales else None, transpose_w)


def _tpu_operands(w, scales, x_scales, transpose_w, n_contract, layered):
    """The TPU form's operands and BlockSpecs: the weight block (stacked weights: at the scalar-prefetched layer),
    its row of block scales and the activations' scales, each at the visit's group and contraction block
    (gt.contraction_block: pinned on inactive visits, so nothing is fetched for them)."""
    G = w.shape[-3]
    # scales [G, I / 128, 1, O / 128]: the contraction block's row of block scales per visit (a few hundred bytes),
    # Mosaic's (8, 128) rule met by whole dims
    s = scales[:, :, None, :] if scales is not None else jnp.zeros((G, 1, 1, 1), F32)
    lead = (None,) * (w.ndim - 2)

    def w_map(o, v, c, tile, group, active, *rest):
        cb = gt.contraction_block(c, v, active, n_contract)
        at = (group[v],) if not layered else (rest[-1][0], group[v])
        return (*at, o, cb) if transpose_w else (*at, cb, o)

    def s_map(o, v, c, tile, group, active, *_):
        return group[v], gt.contraction_block(c, v, active, n_contract), 0, 0

    def xs_map(o, v, c, tile, group, active, *_):
        return gt.contraction_block(c, v, active, n_contract), tile[v], 0

    w_spec = pl.BlockSpec((*lead, BLOCK, BLOCK), w_map)
    s_spec = (pl.BlockSpec((None, None, 1, s.shape[-1]), s_map) if scales is not None
              else pl.BlockSpec((None, None, 1, 1), lambda o, v, c, *_: (0, 0, 0, 0)))
    xs = x_scales if x_scales is not None else jnp.ones((1, BLOCK, 1), F32)
    xs_spec = (pl.BlockSpec((None, BLOCK, 1), xs_map) if x_scales is not None
               else pl.BlockSpec((None, BLOCK, 1), lambda o, v, c, *_: (0, 0, 0)))
    return (w, s, xs), (w_spec, s_spec, xs_spec)


def _gpu_operands(w, scales, x_scales, transpose_w, n_contract, layered):
    del n_contract
    G = w.shape[-3]
    I = w.shape[-1] if transpose_w else w.shape[-2]
    # each block scale repeated along its output columns [G, I / 128, O] (a (G, I / 128, 128) block per program)
    scales_rows = None if scales is None else jnp.repeat(scales, BLOCK, axis=2)
    s = scales_rows if scales_rows is not None else jnp.zeros((G, 1, BLOCK), F32)  # unused; one kernel signature
    whole = w.shape[:-2]  # the (layer,) group axes: whole-array refs
    zeros = (0,) * len(whole)
    w_spec = (pl.BlockSpec((*whole, BLOCK, I), lambda m, o: (*zeros, o, 0)) if transpose_w
              else pl.BlockSpec((*whole, I, BLOCK), lambda m, o: (*zeros, 0, o)))
    s_spec = (pl.BlockSpec((G, I // BLOCK, BLOCK), lambda m, o: (0, 0, o)) if scales_rows is not None
              else pl.BlockSpec((G, 1, BLOCK), lambda m, o: (0, 0, 0)))
    xs = x_scales if x_scales is not None else jnp.ones((1, BLOCK, 1), F32)
    xs_spec = pl.BlockSpec((xs.shape[0], BLOCK, 1),
                           (lambda m, o: (0, m, 0)) if x_scales is not None else (lambda m, o: (0, 0, 0)))
    return (w, s, xs), (w_spec, s_spec, xs_spec)


def _launch(x_MI, w, scales, group_sizes_G, *, transpose_w, backend, platform, x_scales=None,
            out_dtype=None, triton=(4, 2), rows_in_use=None, layer=None):
    """out [M, O] = grouped x @ W (W[g] = w[g] or w[g]ᵀ; with `layer`, w is a stack [L, G, ...] read at it), I and O
    already multiples of BLOCK. scales is the layer's block-scale grid [G, I / BLOCK, O / BLOCK] float32 (contraction
    blocks, then output blocks) or None; x_scales [I / BLOCK, M, 1] the FP8 activations' block scales or None.
    triton: (num_warps, num_stages) of the gpu form."""
    O = w.shape[-2] if transpose_w else w.shape[-1]
    I = x_MI.shape[1]
    if x_scales is not None:
        x_scales = kb.pad_axis(x_scales, 1, BLOCK, value=1.0)
    one_layer = kb.nbytes(w) // (w.shape[0] if layer is not None else 1)
    form = kb.launch_form(backend, platform)
    operands, specs = (_tpu_operands if form == "tpu" else _gpu_operands)(w, scales, x_scales, transpose_w,
                                                                          I // BLOCK, layer is not None)
    given = [a for a, arg in zip(operands[1:], (scales, x_scales)) if arg is not None]  # not the placeholders
    operand_bytes = one_layer + kb.nbytes(*given)
    product = functools.partial(_tpu_product if form == "tpu" else _gpu_product, transpose_w=transpose_w,
                                has_scales=scales is not None, has_x_scales=x_scales is not None)
    return gt.launch(form, product, x_MI, operands, specs, group_sizes_G, n_out=O, operand_bytes=operand_bytes,
                     name=("fp8_" if scales is not None else "") + "grouped_matmul" + ("_dx" if transpose_w else ""),
                     out_dtype=out_dtype or x_MI.dtype, backend=backend, platform=platform, triton=triton,
                     rows_in_use=rows_in_use, layer=layer)


def _scale_grid(scales_GIbOb, along_o: bool):
    """The block scales as [G, contraction blocks, output blocks] float32: [G, Ib, Ob] (along_o) or, for the
    transposed product, [G, Ob, Ib]."""
    return (scales_GIbOb if along_o else scales_GIbOb.swapaxes(1, 2)).astype(F32)


def _layer_scales(scales, layer):
    """The block scales of the weights at `layer` (a stack's [L, G, ...]: one layer's, 1/16384 of its weights),
    or all of them."""
    return scales if scales is None or layer is None else jax.lax.dynamic_index_in_dim(scales, layer, 0, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gmm(x_MI, w_GIO, scales, group_sizes_G, layer, opts):
    return _forward(x_MI, w_GIO, scales, group_sizes_G, layer, opts)


def _forward(x_MI, w_GIO, scales, group_sizes_G, layer, opts):
    backend, platform, fp8_activations, triton, rows_in_use = opts
    I, O = w_GIO.shape[-2:]
    x = gt.pad_to_blocks(x_MI, [1])
    w = gt.pad_to_blocks(w_GIO, [w_GIO.ndim - 2, w_GIO.ndim - 1])
    scales = _layer_scales(scales, layer)
    s = None if scales is None else _scale_grid(scales, along_o=True)
    x_scales = None
    if fp8_activations:
        x, x_scales_MIb = quantize_activations(x)
        x_scales = x_scales_MIb.T[:, :, None]  # [Ib, M, 1]: one [rows, 1] column per contraction block
    out = _launch(x, w, s, group_sizes_G, transpose_w=False, backend=backend, platform=platform,
                  x_scales=x_scales, out_dtype=x_MI.dtype, triton=triton, rows_in_use=rows_in_use, layer=layer)
    return out[:, :O]


def _gmm_fwd(x_MI, w_GIO, scales, group_sizes_G, layer, opts):
    return (_forward(x_MI, w_GIO, scales, group_sizes_G, layer, opts),
            (x_MI, w_GIO, scales, group_sizes_G, layer))


def _gmm_bwd(opts, res, dy_MO):
    backend, platform, _, triton, rows_in_use = opts  # FP8 activations: the quantisation's gradient is the identity
    x_MI, w_GIO, scales, group_sizes_G, layer = res
    I, O = w_GIO.shape[-2:]
    dy = gt.pad_to_blocks(dy_MO.astype(x_MI.dtype), [1])
    w = gt.pad_to_blocks(w_GIO, [w_GIO.ndim - 2, w_GIO.ndim - 1])
    layer_scales = _layer_scales(scales, layer)
    s = None if scales is None else _scale_grid(layer_scales, along_o=False)
    dx = _launch(dy, w, s, group_sizes_G, transpose_w=True, backend=backend, platform=platform,
                 triton=triton, rows_in_use=rows_in_use, layer=layer)[:, :I]
    if scales is None and layer is None:
        dw = grouped_weight_grad(x_MI, dy_MO.astype(x_MI.dtype), group_sizes_G, out_dtype=w_GIO.dtype,
                                 backend=backend, platform=platform, rows_in_use=rows_in_use)
        ds = None
    else:  # FP8 weights are frozen, and a stack read at a layer is read-only: no gradient flows to them
        dw = ds = None
    return dx, dw, ds, None, None


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
                       scales_GIbOb: jax.Array | None = None, *, layer: jax.Array | int | None = None,
                       fp8_activations: bool = False, backend: str = "pallas", platform: str | None = None,
                       num_warps: int | None = None, num_stages: int | None = None,
                       rows_in_use: float | None = None) -> jax.Array:
    """[M, I] rows sorted by group, [G, I, O] weights (float8_e4m3fn with [G, ceil(I/128), ceil(O/128)] scales,
    or bf16 / f32 without), [G] group sizes -> [M, O] in x's dtype. layer: the weights (and scales) are stacks of
    layers [L, G, ...] read in place at this layer index (no copy of the layer's slice; no gradient reaches them).
    fp8_activations: see the module docstring. backend: "xla" | "pallas" | "interpret"; platform: the one compiled
    for ("pallas": "tpu" or "gpu"; "interpret": "tpu" runs the tpu form, anything else the gpu form). num_warps /
    num_stages: Triton's, for the gpu form; None: LAUNCH's for x's dtype, else DEFAULTS.
    rows_in_use: the rows expected to hold data (e.g. the balanced load of an expert-parallel receive buffer; an
    expectation, so it may be fractional), for the kernels' cost estimates only; default all M (the kernels skip
    tiles past the last group)."""
    stacked = layer is not None
    lead = w_GIO.shape[:1 + stacked]
    if (x_MI.ndim != 2 or w_GIO.ndim != 3 + stacked or group_sizes_G.shape != lead[-1:]
            or x_MI.shape[1] != w_GIO.shape[-2]):
        raise ValueError(f"fp8_grouped_matmul: expected x [M, I], w {'[L, G, I, O]' if stacked else '[G, I, O]'}, "
                         f"group_sizes [G]; got x {x_MI.shape}, w {w_GIO.shape}, group_sizes {group_sizes_G.shape}")
    check_scales(w_GIO, scales_GIbOb, "fp8_grouped_matmul")
    if fp8_activations and scales_GIbOb is None:
        raise ValueError("fp8_grouped_matmul: fp8_activations needs FP8 weights (with their scales)")
    if kb.check("fp8_grouped_matmul", backend, platform) == "xla":
        if stacked:  # the reference reads the layer's slice
            w_GIO = jax.lax.dynamic_index_in_dim(w_GIO, layer, 0, False)
            scales_GIbOb = _layer_scales(scales_GIbOb, layer)
        return reference(x_MI, w_GIO, group_sizes_G, scales_GIbOb, fp8_activations)
    s = kb.launch_settings(LAUNCH, DEFAULTS, backend, platform, x_MI.dtype, num_warps=num_warps, num_stages=num_stages)
    return _gmm(x_MI, w_GIO, scales_GIbOb, group_sizes_G.astype(jnp.int32),
                None if layer is None else jnp.asarray(layer, jnp.int32),
                (backend, platform, fp8_activations, (s["num_warps"], s["num_stages"]), rows_in_use))
