"""Context parallelism: a `context` mesh axis splits every row's sequence; attention gathers the keys' latent.

    tokens_BT = to_context_order(tokens_BT, n)         # the striped order: shard r holds tokens r, r + n, r + 2n, ..
    out = over_context(fn, queries=3, keys=3, out_axes=(2, 2))(q.., k.., *rest)     # under jax.set_mesh(mesh)
    x_BTD = from_context_order(x_BTD, n)               # back to the natural order

The sequence axis of the activations is split over `context` (sharding.rules: "sequence"); whatever works per token
(embedding, norms, projections, the MoE, the loss) runs on each shard's tokens as on any others (the MoE's expert
exchange sees them as more tokens: sharding.rules' "tokens"). Attention is the one place tokens meet:

  exchange  what a device needs of the other shards is the keys' side of its queries' attention. The caller passes
            the smallest form it has (MLA: one compressed latent per token, kv_lora + rope = 576 values for K2, shared
            by all heads, against per-head keys and values of 64 x (192 + 128): 35x fewer bytes), and expands it
            after the exchange. An all-gather over `context` per layer (its backward a reduce-scatter of the
            latent's gradient); the keys' segment ids travel with them.
  balance   causal attention's work grows with a query's place in the row: split in order, the last shard would do
            2n - 1 times the first's. The striped order (Brandon et al., 2023, "Striped Attention") gives shard r the
            tokens r, r + n, r + 2n, ...: every shard's queries meet the same share of the causal triangle (to one
            token per query), and which key blocks a block of queries can see is known from its place alone
            (query t of shard r is token t n + r), so the attention kernel keeps its static causal block skipping
            (pallas_kernels.mla_attention's stride). The gathered keys come back in the natural order by a
            reshape: the all-gather stacks the shards' token t n + r at [t, r].
  packed    segment ids and positions are per-token inputs: the caller puts them in the striped order with the
            tokens (positions computed before, in the natural order); the keys' segment ids are gathered.

`over_context` runs fn per context shard under jax.shard_map over `context` and the axes the rows are split over
(sharding.rules' "batch"; the others, e.g. `tensor` for heads, stay automatic and per-device kernels nest inside):
the query-side arguments' and the outputs' sequence axes are the shard's part, the key-side arguments are gathered
whole, the rest (weights) are passed whole and their gradients summed over the shards. fn also gets each query's
index among the gathered keys.

Letter legend: B batch, T tokens of a row, t tokens of a context shard (T / n), n context-axis size, X any feature.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import activation_spec, mesh_axes

CONTEXT_AXIS = "context"


def context_parallel_size(mesh=None) -> int:
    """The size of `mesh`'s context axis (default: the mesh set with jax.set_mesh); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[CONTEXT_AXIS]


def _check(T: int, n: int) -> None:
    if T % n:
        raise ValueError(f"context parallelism: {T} tokens per row do not split over the context axis ({n})")


def to_context_order(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The natural order along `axis` -> the striped order: position r (T / n) + t holds token t n + r, so a
    contiguous split over n shards gives shard r the tokens r, r + n, ..."""
    T = x.shape[axis]
    _check(T, n)
    return jnp.swapaxes(x.reshape(x.shape[:axis] + (T // n, n) + x.shape[axis + 1:]), axis, axis + 1).reshape(x.shape)


def from_context_order(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The striped order along `axis` -> the natural order (to_context_order's inverse)."""
    T = x.shape[axis]
    _check(T, n)
    return jnp.swapaxes(x.reshape(x.shape[:axis] + (n, T // n) + x.shape[axis + 1:]), axis, axis + 1).reshape(x.shape)


def gather_sequence(x_BtX: jax.Array, axis_name: str = CONTEXT_AXIS) -> jax.Array:
    """Inside shard_map: every shard's [B, t, ...] in the striped order -> the whole sequence [B, t n, ...] in the
    natural order (shard r's token t is token t n + r)."""
    g_BtnX = jax.lax.all_gather(x_BtX, axis_name, axis=2)
    return g_BtnX.reshape((x_BtX.shape[0], -1) + x_BtX.shape[2:])


def over_context(fn: Callable, *, queries: int, keys: int, out_axes: tuple[int, ...]) -> Callable:
    """fn(*query_side, *keys_gathered, query_index_Bt, *rest) run per context shard of the mesh set with
    jax.set_mesh (module docstring). The call takes (*query_side, *key_side, *rest): `queries` arrays [B, T, ...]
    and `keys` arrays [B, T, ...] in the striped order with the sequence on axis 1, then anything else. fn sees its
    shard's rows and queries [b, t, ...], every key-side array of its rows whole in the natural order [b, T, ...],
    the queries' indices among those keys [b, t] int32 (t n + r on shard r) and the rest as given. It returns one
    array per entry of out_axes (> 0), rows first, each with its shard's queries along that axis."""
    def call(*args):
        mesh = jax.sharding.get_abstract_mesh()
        n = context_parallel_size(mesh)
        B, T = args[0].shape[:2]
        _check(T, n)
        # the rows split as activations are (sharding.rules), manual too: left automatic, XLA may gather a shard's
        # rows around the exchange and attend to every row on every device
        rows = activation_spec((B,), ("batch",), mesh)[0]
        manual = {CONTEXT_AXIS, *mesh_axes(rows)}

        def body(*local):
            q_side, k_side, rest = local[:queries], local[queries:queries + keys], local[queries + keys:]
            b, t = q_side[0].shape[:2]
            index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) * n + jax.lax.axis_index(CONTEXT_AXIS), (b, t))
            return fn(*q_side, *(gather_sequence(k) for k in k_side), index_bt, *rest)

        in_specs = (P(rows, CONTEXT_AXIS),) * (queries + keys) + (P(),) * (len(args) - queries - keys)
        out_specs = tuple(P(rows, *(None,) * (axis - 1), CONTEXT_AXIS) for axis in out_axes)
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual,
                             check_vma=False)(*args)

    return call
