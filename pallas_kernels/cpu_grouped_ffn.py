"""The CPU form of the routed experts' grouped matmul and SwiGLU FFN (`impl="tiled"` of
pallas_kernels.grouped_matmul, which k2jax.model.target picks for CPU).

    cpu_grouped_matmul(x, w, sizes)            out[i] = x[i] @ w[g(i)]
    cpu_grouped_ffn(x, experts, sizes)         out[i] = (silu(x[i] @ gate[g]) * (x[i] @ up[g])) @ down[g]

rows sorted by group as in `pallas_kernels.grouped_matmul` (whose ragged_dot reference these are tested against;
rows past sum(sizes) come out as zeros). `jax.lax.ragged_dot` has no CPU kernel: XLA:CPU multiplies every row by
every group's matrix (G x the work). Here a scan over groups takes each group's weights once; an inner loop walks
the group's contiguous rows in tiles (`BIG_TILE` rows, then the remainder in up to two `SMALL_TILE`s, or a
`MID_TILE` and at most one small tile, or one more big tile) and multiplies only those. Groups run in order, so the
rows a group's last tile computes past its end are overwritten by the next group: nothing is masked on the
forward. The FFN fuses gate, up, SwiGLU and down per tile (no [M, F] intermediate in memory on the forward; under
differentiation it keeps the gate/up pre-activations). Both have explicit VJPs: dx by the same loop against the
transposed weights, dw added per tile in float32 into the [G, ...] gradient, with rows outside the group masked.

Every expert weight format (pallas_kernels.expert_weights: plain, FP8 blocks, INT4 groups): each group's weights
are dequantised to x's dtype when the loop reaches the group (`ExpertWeights.dense`), so memory holds one
expert's dequantised weights, never a layer's. FP8 and INT4 weights are frozen: the VJP gives dx only.

Scanned layers (`stack=(experts of all scanned layers [L, G, ...], layer)`, gradient stopped): each expert's
weights are read straight from the stacks inside the loop; the layer's own slices would be copied out of the
stacks first (XLA materialises a dynamic slice feeding a loop: ~10 ms per layer in the CPU benchmark, forward and
again backward). The slices (`experts`) still take the gradient.

Letter legend: M rows, I / O a matmul's in (contraction) / out features, D the FFN's in and out width (hidden),
F ffn, G groups, h rows per tile, L layers.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.expert_weights import ExpertWeights

# Tile heights. On 2 CPU cores a SwiGLU tile (D = F = 512, forward + backward) costs about 1.0 ms at 16 rows, 2.9
# at 64 and 4.8 at 128: after the whole big tiles, a group's remainder of r rows runs as up to SMALL_TILES_MAX
# small tiles (r <= 32), else one mid tile and at most one small tile (r <= 80), else one more big tile.
BIG_TILE = 128
MID_TILE = 64
SMALL_TILE = 16
SMALL_TILES_MAX = 2


def cpu_grouped_matmul(x_MI: jax.Array, w_GIO: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """[M, I] rows sorted by group, [G, I, O] plain weights, [G] sizes -> [M, O] in x's dtype (shapes checked by
    the dispatch, pallas_kernels.grouped_matmul)."""
    return _tiled_matmul(x_MI, w_GIO.astype(x_MI.dtype), group_sizes_G.astype(jnp.int32))


def cpu_grouped_ffn(x_MD: jax.Array, experts: ExpertWeights, group_sizes_G: jax.Array, *,
                    stack: tuple[ExpertWeights, jax.Array] | None = None) -> jax.Array:
    """SwiGLU expert FFN over rows sorted by group -> [M, D] in x's dtype (experts checked by the dispatch).
    stack: optional (experts of L layers [L, G, ...], layer) whose [layer] is `experts`: each group's weights are
    read straight from the stacks (module docstring). Gradients still go to `experts` only (plain weights); pass
    the stacks through jax.lax.stop_gradient outside the scan, or the scan carries a zero gradient for them."""
    if stack is not None:
        stacks, layer = stack
        if [a.shape[1:] for a in jax.tree.leaves(stacks)] != [a.shape for a in jax.tree.leaves(experts)] or (
                stacks.fmt, stacks.group_size) != (experts.fmt, experts.group_size):
            raise ValueError(f"cpu_grouped_ffn: stack {jax.tree.map(jnp.shape, stacks)} is not a stack of "
                             f"{jax.tree.map(jnp.shape, experts)}")
        stack = (stacks, jnp.asarray(layer, jnp.int32))
    return _tiled_ffn(x_MD, experts, group_sizes_G.astype(jnp.int32), stack)


# ---- the tile loop -------------------------------------------------------------------------------------------
def _tile_loop(group_sizes_G: jax.Array, prepare: Callable, tile_fn: Callable, out_init):
    """For each group g in order: ctx = prepare(g); then over its rows in tiles (BIG_TILE rows while a whole one
    fits, then the remainder as MID_TILE says) out = tile_fn(ctx, r0, h, n_valid, out), where h is the static
    tile height, r0 its first row and n_valid how many of its rows belong to g (the rest run into the next group
    or the padding). Returns out."""
    ends_G = jnp.cumsum(group_sizes_G)
    starts_G = ends_G - group_sizes_G

    def per_group(out, g):
        ctx, start, size = prepare(g), starts_G[g], group_sizes_G[g]

        def tiles(rows, first, count, state):
            def body(i, st):
                r0 = first + i * rows
                return tile_fn(ctx, r0, rows, start + size - r0, st)
            return jax.lax.fori_loop(0, count, body, state)

        # the remainder (see MID_TILE): a tile may run past the group's end; those rows are masked or overwritten
        rest = size % BIG_TILE
        big_rest = rest > MID_TILE + SMALL_TILE
        n_mid = jnp.where(~big_rest & (rest > SMALL_TILES_MAX * SMALL_TILE), 1, 0)
        small_rows = jnp.where(big_rest, 0, jnp.maximum(rest - n_mid * MID_TILE, 0))
        n_big = size // BIG_TILE + big_rest
        state = tiles(BIG_TILE, start, n_big, out)
        state = tiles(MID_TILE, start + n_big * BIG_TILE, n_mid, state)
        return tiles(SMALL_TILE, start + n_big * BIG_TILE + n_mid * MID_TILE, (small_rows + SMALL_TILE - 1) //
                     SMALL_TILE, state), None

    return jax.lax.scan(per_group, out_init, jnp.arange(group_sizes_G.shape[0]))[0]


def _pad_rows(a: jax.Array) -> jax.Array:
    """a [M, ...] with BIG_TILE zero rows appended, so a tile starting at any row < M stays in bounds."""
    return jnp.concatenate([a, jnp.zeros((BIG_TILE, a.shape[1]), a.dtype)])


def _rows(a, r0, rows):
    return jax.lax.dynamic_slice_in_dim(a, r0, rows)


def _finish(out_padded, group_sizes_G, m):
    """Drops the padding and zeroes rows past the last group (written by the last group's overrun)."""
    return jnp.where((jnp.arange(m) < jnp.sum(group_sizes_G))[:, None], out_padded[:m], 0)


def _dot_t(a, b):
    """a @ b.T without materialising the transpose."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _masked(tile, n_valid, rows):
    return jnp.where((jnp.arange(rows) < n_valid)[:, None], tile, 0)


def _add_weight_grad(dw_GIO, g, a_hI, b_hO):
    """dw[g] += aᵀ b in float32, in place in the [G, I, O] gradient."""
    return dw_GIO.at[g].add(jnp.dot(a_hI.T, b_hO, preferred_element_type=jnp.float32))


def _matmul_rows(x_MI, w_GIO, group_sizes_G, transpose_w: bool):
    """out = x @ w[g] (or x @ w[g].T) per group, by the tile loop."""
    xp = _pad_rows(x_MI)
    n_out = w_GIO.shape[1] if transpose_w else w_GIO.shape[2]

    def tile(w, r0, rows, n_valid, out):
        x_t = _rows(xp, r0, rows)
        y_t = _dot_t(x_t, w) if transpose_w else x_t @ w
        return jax.lax.dynamic_update_slice_in_dim(out, y_t, r0, 0)

    out = _tile_loop(group_sizes_G, lambda g: w_GIO[g], tile, jnp.zeros((xp.shape[0], n_out), x_MI.dtype))
    return _finish(out, group_sizes_G, x_MI.shape[0])


def _weight_grad(x_MI, dy_MO, group_sizes_G):
    """dw[g] = x_gᵀ dy_g, accumulated in float32 over the group's tiles (rows outside the group masked)."""
    xp, dyp = _pad_rows(x_MI), _pad_rows(dy_MO)

    def tile(g, r0, rows, n_valid, dw):
        x_t = _masked(_rows(xp, r0, rows), n_valid, rows)
        dy_t = _masked(_rows(dyp, r0, rows), n_valid, rows)
        return _add_weight_grad(dw, g, x_t, dy_t)

    shape = (group_sizes_G.shape[0], x_MI.shape[1], dy_MO.shape[1])
    return _tile_loop(group_sizes_G, lambda g: g, tile, jnp.zeros(shape, jnp.float32)).astype(x_MI.dtype)


@jax.custom_vjp
def _tiled_matmul(x_MI, w_GIO, group_sizes_G):
    return _matmul_rows(x_MI, w_GIO, group_sizes_G, transpose_w=False)


def _tiled_matmul_fwd(x_MI, w_GIO, group_sizes_G):
    return _tiled_matmul(x_MI, w_GIO, group_sizes_G), (x_MI, w_GIO, group_sizes_G)


def _tiled_matmul_bwd(res, dy_MO):
    x_MI, w_GIO, group_sizes_G = res
    dy_MO = dy_MO.astype(x_MI.dtype)
    dx = _matmul_rows(dy_MO, w_GIO, group_sizes_G, transpose_w=True)
    return dx, _weight_grad(x_MI, dy_MO, group_sizes_G), None


_tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)


def _group_weights(experts: ExpertWeights, stack, dt) -> Callable:
    """g -> group g's (gate, up, down) weights in dt: experts' [g] or, from stacks, stacks' [layer, g]."""
    if stack is None:
        return lambda g: experts.dense(g, dt)
    stacks, layer = stack
    return lambda g: stacks.dense((layer, g), dt)


def _ffn_forward(x_MD, experts, stack, group_sizes_G, *, keep_activations: bool):
    """-> (out [M, D], (gate, up) pre-activations [M, F] each if keep_activations else None)."""
    xp = _pad_rows(x_MD)
    F = experts.ffn

    def tile(w, r0, rows, n_valid, out):
        wg, wu, wd = w
        x_t = _rows(xp, r0, rows)
        gate_t, up_t = x_t @ wg, x_t @ wu
        y_t = (jax.nn.silu(gate_t) * up_t) @ wd
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, v, r0, 0)
                     for o, v in zip(out, (y_t, gate_t, up_t) if keep_activations else (y_t,)))

    init = (jnp.zeros_like(xp),) + ((jnp.zeros((xp.shape[0], F), xp.dtype),) * 2 if keep_activations else ())
    out = _tile_loop(group_sizes_G, _group_weights(experts, stack, xp.dtype), tile, init)
    y = _finish(out[0], group_sizes_G, x_MD.shape[0])
    return y, (out[1], out[2]) if keep_activations else None


@jax.custom_vjp
def _tiled_ffn(x_MD, experts, group_sizes_G, stack):
    """The weights are read from `stack` (stacks, layer) when given, else from experts."""
    return _ffn_forward(x_MD, experts, stack, group_sizes_G, keep_activations=False)[0]


def _tiled_ffn_fwd(x_MD, experts, group_sizes_G, stack):
    out, (gate, up) = _ffn_forward(x_MD, experts, stack, group_sizes_G, keep_activations=True)
    return out, (x_MD, gate, up, experts, stack, group_sizes_G)


def _tiled_ffn_bwd(res, dy_MD):
    """Per tile, from the saved gate/up pre-activations: dx, and dw_gate, dw_up, dw_down added in float32 into
    their [G, ...] gradients in place (no per-group accumulator to copy out). Rows of a tile outside its group get
    x, dy, gate and up = 0, so they add nothing (not even NaN) to any gradient. The stacks get none, and neither
    do FP8 / INT4 weights (frozen: dx only)."""
    x_MD, gate_MF, up_MF, experts, stack, group_sizes_G = res
    dt = x_MD.dtype
    xp, dyp = _pad_rows(x_MD), _pad_rows(dy_MD.astype(dt))
    frozen = experts.fmt != "plain"
    D, F = experts.hidden, experts.ffn
    f32 = jnp.float32

    def tile(g_w, r0, rows, n_valid, out):
        g, (wg, wu, wd) = g_w
        dx, *dws = out
        x_t = _masked(_rows(xp, r0, rows), n_valid, rows)
        dy_t = _masked(_rows(dyp, r0, rows), n_valid, rows)
        gate, up = (_masked(_rows(a, r0, rows), n_valid, rows) for a in (gate_MF, up_MF))
        sig = jax.nn.sigmoid(gate)
        silu = gate * sig
        dh = _dot_t(dy_t, wd)
        d_up = dh * silu
        d_gate = dh * up * sig * (1 + gate * (1 - sig))
        if dws:
            dwg, dwu, dwd = dws
            dws = (_add_weight_grad(dwg, g, x_t, d_gate), _add_weight_grad(dwu, g, x_t, d_up),
                   _add_weight_grad(dwd, g, silu * up, dy_t))
        dx_t = _dot_t(d_gate, wg) + _dot_t(d_up, wu)
        return (jax.lax.dynamic_update_slice_in_dim(dx, dx_t, r0, 0), *dws)

    group_weights = _group_weights(experts, stack, dt)
    G = group_sizes_G.shape[0]
    dw_init = () if frozen else (jnp.zeros((G, D, F), f32), jnp.zeros((G, D, F), f32), jnp.zeros((G, F, D), f32))
    dx, *dws = _tile_loop(group_sizes_G, lambda g: (g, group_weights(g)), tile, (jnp.zeros_like(xp), *dw_init))
    d_experts = None if frozen else ExpertWeights("plain", *(dw.astype(w.dtype) for dw, w in
                                                             zip(dws, (experts.gate, experts.up, experts.down))))
    return _finish(dx, group_sizes_G, x_MD.shape[0]), d_experts, None, None


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)
