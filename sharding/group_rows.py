"""Routed rows in the layout every grouped matmul takes: each (token, choice) row sorted by its group (expert), and
back. The MoE (k2jax.model.moe) and expert parallelism (sharding.expert_parallel) both route through these.

    order_M, sizes_G = sort_by_group(ids_TK, G)          # x_TD[order_M // K] are the rows, group by group
    out_TD = combine_sorted(y_MD, order_M, weights_TK)   # each token's K rows back, summed with its weights

Letter legend: T tokens, K choices per token (top-k), M = T x K rows, G groups, D row width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_group(ids_TK: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """The T x K (token, choice) rows ordered by group: (order_M, group_sizes_G). Row m of the sorted rows is
    token order_M[m] // K; sizes count each group's rows (int32)."""
    flat_M = ids_TK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    return order_M, jnp.bincount(flat_M, length=num_groups).astype(jnp.int32)


def combine_sorted(y_MD: jax.Array, order_M: jax.Array, weights_TK: jax.Array) -> jax.Array:
    """Undoes sort_by_group and sums each token's K rows with its weights: [T, D] float32."""
    T, K = weights_TK.shape
    y_TKD = y_MD[jnp.argsort(order_M)].reshape(T, K, -1)
    return jnp.einsum("tkd,tk->td", y_TKD, weights_TK.astype(y_TKD.dtype), preferred_element_type=jnp.float32)
