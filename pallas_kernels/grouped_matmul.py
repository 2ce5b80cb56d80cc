"""Grouped matmul for routed experts: rows sorted by group, row block g multiplied by its own weight matrix.

    out[i] = x[i] @ w[g(i)]   where rows [start_g, start_g + group_sizes[g]) belong to group g
    rows past sum(group_sizes) come out as zeros.

One dispatch point, `grouped_matmul(..., impl=)`:
  - "ragged_dot": `jax.lax.ragged_dot`, native on TPU and GPU. It is also the XLA reference the other paths are
    tested against. On CPU it lowers to a dense form that multiplies every row by every group's matrix (G× the
    work), so it is not used there by default.
  - "tiled": rows are laid out in tiles of `tile` rows that each belong to one group (groups padded to a whole
    number of tiles), and a scan multiplies each non-empty tile by its group's matrix; empty tiles are skipped.
    Only the routed work is done (plus at most tile-1 padding rows per group). Its VJP is written out: dx is the
    same tiled product against wᵀ, dw accumulates xᵀ·dy per tile into its group's slot.
  - "auto": "tiled" on CPU, "ragged_dot" elsewhere.

Letter legend: M rows, K contraction dim, N output dim, G groups, U tiles, P rows per tile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("auto", "ragged_dot", "tiled")
DEFAULT_TILE = 64


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *, impl: str = "auto",
                   tile: int = DEFAULT_TILE) -> jax.Array:
    """[M, K] rows sorted by group, [G, K, N] weights, [G] int32 sizes -> [M, N] in x's dtype."""
    if x_MK.ndim != 2 or w_GKN.ndim != 3 or group_sizes_G.ndim != 1:
        raise ValueError(f"grouped_matmul: expected x [M, K], w [G, K, N], group_sizes [G]; got "
                         f"{x_MK.shape}, {w_GKN.shape}, {group_sizes_G.shape}")
    if x_MK.shape[1] != w_GKN.shape[1] or w_GKN.shape[0] != group_sizes_G.shape[0]:
        raise ValueError(f"grouped_matmul: x {x_MK.shape}, w {w_GKN.shape} and group_sizes "
                         f"{group_sizes_G.shape} do not agree")
    if impl == "auto":
        impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
    if impl == "ragged_dot":
        return reference(x_MK, w_GKN, group_sizes_G)
    if impl == "tiled":
        return _tiled(x_MK, w_GKN.astype(x_MK.dtype), group_sizes_G.astype(jnp.int32), tile)
    raise ValueError(f"grouped_matmul: impl must be one of {IMPLS}, got {impl!r}")


def reference(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """The XLA reference: jax.lax.ragged_dot."""
    return jax.lax.ragged_dot(x_MK, w_GKN.astype(x_MK.dtype), group_sizes_G.astype(jnp.int32))


class _TileLayout(NamedTuple):
    tile_group_U: jax.Array  # group of each tile (clamped to G-1 for unused tiles)
    tile_used_U: jax.Array  # False for tiles past the last group's
    src_UP: jax.Array  # source row of each tile slot; M (a zero row) for padding
    dst_M: jax.Array  # tile slot of each row; U*P (a zero slot) for rows past sum(group_sizes)


def _layout(group_sizes_G: jax.Array, m: int, tile: int) -> _TileLayout:
    G = group_sizes_G.shape[0]
    n_tiles = -(-m // tile) + G  # sum_g ceil(size_g / P) can never exceed this
    tiles_G = (group_sizes_G + tile - 1) // tile
    tile_end_G = jnp.cumsum(tiles_G)
    tile_start_G = tile_end_G - tiles_G
    row_end_G = jnp.cumsum(group_sizes_G)
    row_start_G = row_end_G - group_sizes_G

    u_U = jnp.arange(n_tiles)
    group_U = jnp.searchsorted(tile_end_G, u_U, side="right")
    used_U = group_U < G
    group_U = jnp.minimum(group_U, G - 1)
    row_in_group_UP = (u_U - tile_start_G[group_U])[:, None] * tile + jnp.arange(tile)[None]
    real_UP = used_U[:, None] & (row_in_group_UP < group_sizes_G[group_U][:, None])
    src_UP = jnp.where(real_UP, row_start_G[group_U][:, None] + row_in_group_UP, m)

    i_M = jnp.arange(m)
    group_M = jnp.searchsorted(row_end_G, i_M, side="right")
    in_group_M = group_M < G
    group_M = jnp.minimum(group_M, G - 1)
    dst_M = jnp.where(in_group_M, tile_start_G[group_M] * tile + i_M - row_start_G[group_M], n_tiles * tile)
    return _TileLayout(group_U, used_U, src_UP, dst_M)


def _to_tiles(a_MX: jax.Array, lay: _TileLayout) -> jax.Array:
    padded = jnp.concatenate([a_MX, jnp.zeros((1, a_MX.shape[1]), a_MX.dtype)])
    return padded[lay.src_UP]  # [U, P, X]


def _from_tiles(t_UPX: jax.Array, lay: _TileLayout) -> jax.Array:
    flat = t_UPX.reshape(-1, t_UPX.shape[-1])
    flat = jnp.concatenate([flat, jnp.zeros((1, flat.shape[1]), flat.dtype)])
    return flat[lay.dst_M]


def _tiled_forward(x_MK, w_GKN, group_sizes_G, tile):
    lay = _layout(group_sizes_G, x_MK.shape[0], tile)
    n_out = w_GKN.shape[2]

    def one_tile(_, args):
        x_PK, g, used = args
        y_PN = jax.lax.cond(used, lambda: jnp.dot(x_PK, w_GKN[g]), lambda: jnp.zeros((tile, n_out), x_PK.dtype))
        return None, y_PN

    _, y_UPN = jax.lax.scan(one_tile, None, (_to_tiles(x_MK, lay), lay.tile_group_U, lay.tile_used_U))
    return _from_tiles(y_UPN, lay)


def _tiled_weight_grad(x_MK, dy_MN, group_sizes_G, tile, n_groups):
    """dw[g] = sum over rows of group g of x[i]ᵀ dy[i], tile by tile."""
    lay = _layout(group_sizes_G, x_MK.shape[0], tile)

    def one_tile(dw_GKN, args):
        x_PK, dy_PN, g, used = args
        dw_GKN = jax.lax.cond(used, lambda: dw_GKN.at[g].add(x_PK.T @ dy_PN), lambda: dw_GKN)
        return dw_GKN, None

    zeros = jnp.zeros((n_groups, x_MK.shape[1], dy_MN.shape[1]), x_MK.dtype)
    dw_GKN, _ = jax.lax.scan(one_tile, zeros, (_to_tiles(x_MK, lay), _to_tiles(dy_MN, lay), lay.tile_group_U,
                                               lay.tile_used_U))
    return dw_GKN


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x_MK, w_GKN, group_sizes_G, tile):
    return _tiled_forward(x_MK, w_GKN, group_sizes_G, tile)


def _tiled_fwd(x_MK, w_GKN, group_sizes_G, tile):
    return _tiled_forward(x_MK, w_GKN, group_sizes_G, tile), (x_MK, w_GKN, group_sizes_G)


def _tiled_bwd(tile, res, dy_MN):
    x_MK, w_GKN, group_sizes_G = res
    dy_MN = dy_MN.astype(x_MK.dtype)
    dx_MK = _tiled_forward(dy_MN, jnp.swapaxes(w_GKN, 1, 2), group_sizes_G, tile)
    dw_GKN = _tiled_weight_grad(x_MK, dy_MN, group_sizes_G, tile, w_GKN.shape[0])
    return dx_MK, dw_GKN, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
