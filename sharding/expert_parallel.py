"""Dropless expert parallelism with `jax.shard_map`: tokens travel to the devices that own their experts.

    with jax.set_mesh(mesh):                  # a mesh with an `expert` axis (see sharding/mesh.py)
        out_TD = expert_parallel_ffn(x_TD, weights_TK, ids_TK, experts, ffn=ffn, impl="native")

`experts` is any pytree of arrays whose leading axis is the expert axis (e.g. a
pallas_kernels.expert_weights.ExpertWeights: the weights and their scales): every leaf is split over `expert`, and
`ffn` gets the same pytree of the local blocks.

Tokens are split over every batch-like mesh axis (data, fsdp and expert) and over context (a row's tokens split by
context parallelism are just more tokens here); the E experts over `expert` (device
j of the expert axis owns experts [j e, (j + 1) e)). Per device:

  1. sort its T x K (token, choice) rows by expert;
  2. exchange row counts (an all_gather of [E] int32 per device: tiny) so every device knows every
     (source, destination, expert) count, hence all offsets;
  3. ragged all-to-all the rows to their experts' devices; re-sort the received rows by local expert;
  4. `ffn(rows, local experts, group_sizes, rows_in_use=M)` on the local experts (a grouped matmul;
     rows_in_use, the balanced load, is for the kernels' cost estimates: the buffer's empty tail is skipped);
  5. the reverse ragged all-to-all brings the results back to the rows' sources, which un-sort them and
     combine each token's K results with its routing weights.

Where every device holds every token (`every_row`: a decode step's few rows, kept whole on each device) nothing is
exchanged: each device runs the rows routed to its own experts, in chunks of a few balanced loads (a while loop over
as many as it has, so no buffer holds every device's rows), and the partial outputs are summed over `expert` (an
all-reduce of [T, D]).

The receive buffer: dropless by default (`capacity_factor=0`): room for every row of every source, n M rows per
device (for K2 on EP 64 with 4K tokens per device that is 2M rows, 30 GB in bf16, and as much again for the
results coming back). With `capacity_factor` c > 0 it holds ceil(c M) rows (c times a balanced load): each
destination keeps its incoming rows in (source, local expert) order up to that bound, and the rows past it are
dropped: they are never sent, their results are zero (the token keeps its other experts), and their number comes
back with the output (`dropped`, summed over every device) so a caller can log it or fail the step. c = 2 leaves
room for a destination receiving twice its balanced share (K2's aux-loss-free bias keeps loads near balanced).

`jax.lax.ragged_all_to_all` is native on TPU and GPU; XLA:CPU has no kernel for it, so on CPU `ragged_all_to_all`
below runs the same exchange as an `all_to_all` of fixed-size chunks (same results, more bytes moved); `impl`
(IMPLS) names which: the caller chooses for the platform compiled for (k2jax.model.target). This module knows
nothing of K2: it works on arrays and a callable.

Letter legend: T tokens (per device inside shard_map), K choices per token, M = T K rows, E experts, e experts
per device (E / n), D hidden, F ffn, n expert-axis size, s source, j destination, r receive-buffer rows, p rows per
peer in the fixed-size all_to_all form.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.group_rows import combine_sorted, sort_by_group
from sharding.rules import ACTIVATION_RULES

EXPERT_AXIS = "expert"
TOKEN_AXES = ACTIVATION_RULES["default"]["tokens"]  # mesh axes the tokens are split over (those present in the mesh)
IMPLS = ("native", "all_to_all")


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str, impl: str, max_send: int | None = None):
    """jax.lax.ragged_all_to_all's contract: rows [input_offsets[j], + send_sizes[j]) of `operand` go to device
    j of `axis_name`, landing at rows [output_offsets[j], ...) of j's `output`; recv_sizes[i] rows arrive
    from device i. impl "native" is jax.lax.ragged_all_to_all (TPU/GPU); "all_to_all" sends a fixed chunk of
    max_send rows (static; default all of operand) to every device and scatters the valid rows (CPU)."""
    if impl == "native":
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis_name)
    if impl != "all_to_all":
        raise ValueError(f"ragged_all_to_all: impl must be one of {IMPLS}, got {impl!r}")
    p = operand.shape[0] if max_send is None else max_send
    padded = jnp.concatenate([operand, jnp.zeros((p,) + operand.shape[1:], operand.dtype)])
    chunks_np = jax.vmap(lambda start: jax.lax.dynamic_slice_in_dim(padded, start, p))(input_offsets)
    n = chunks_np.shape[0]
    got_np = jax.lax.all_to_all(chunks_np.reshape((n * p,) + operand.shape[1:]), axis_name, 0, 0, tiled=True)
    offsets_n = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where source i's rows go here
    rows_np = offsets_n[:, None] + jnp.arange(p)[None, :]
    valid_np = jnp.arange(p)[None, :] < recv_sizes[:, None]
    rows_np = jnp.where(valid_np, rows_np, output.shape[0])  # out of range: dropped
    return output.at[rows_np.reshape(-1)].set(got_np.reshape((-1,) + operand.shape[1:]), mode="drop")


def receive_buffer_rows(rows_per_device: int, n: int, capacity_factor: float) -> int:
    """Rows of a device's receive buffer: n M when dropless (capacity_factor 0), else ceil(c M), at most n M."""
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor must be >= 0 (0: dropless), got {capacity_factor}")
    if not capacity_factor:
        return n * rows_per_device
    return min(n * rows_per_device, max(1, math.ceil(capacity_factor * rows_per_device)))


def _kept(sizes_sje, r: int):
    """The rows each destination keeps of sizes_sje [source, destination, local expert] in a buffer of r rows,
    filled in (source, local expert) order: a prefix of every (source, destination) segment."""
    n, _, e = sizes_sje.shape
    per_dest = jnp.transpose(sizes_sje, (1, 0, 2)).reshape(n, n * e)
    ends = jnp.cumsum(per_dest, axis=1)
    kept = jnp.clip(ends, 0, r) - jnp.clip(ends - per_dest, 0, r)
    return jnp.transpose(kept.reshape(n, n, e), (1, 0, 2))


def _local_expert_ffn(x_TD, weights_TK, ids_TK, local_experts, local_stack, *, ffn: Callable, expert_axis: str,
                      other_token_axes: tuple[str, ...], impl: str, capacity_factor: float):
    """One device's part (inside shard_map; local_experts: its blocks of the expert arrays, [e, ...] each;
    local_stack: (its blocks of the stacks [L, e, ...], layer) or None) -> (combined output [T, D], rows dropped on
    every device)."""
    n = jax.lax.axis_size(expert_axis)
    me = jax.lax.axis_index(expert_axis)
    T, K = ids_TK.shape
    e = jax.tree.leaves(local_experts)[0].shape[0]
    M = T * K
    r = receive_buffer_rows(M, n, capacity_factor)
    # 1. this device's rows sorted by expert, hence by destination device
    order_M, sizes_E = sort_by_group(ids_TK, n * e)
    x_MD = x_TD[order_M // K]
    # 2. every device's counts: [source, destination, local expert], and what fits the destinations' buffers
    sizes_sje = jax.lax.all_gather(sizes_E, expert_axis).reshape(n, n, e)
    kept_sje = _kept(sizes_sje, r) if r < n * M else sizes_sje
    dropped = jnp.sum(sizes_sje - kept_sje)
    if other_token_axes:
        dropped = jax.lax.psum(dropped, other_token_axes)
    pair_sj = kept_sje.sum(-1)                         # rows from source s to destination j
    send_j, recv_s = pair_sj[me], pair_sj[:, me]
    src_offsets_sj = _exclusive_cumsum(sizes_sje.sum(-1), axis=1)  # where source s keeps its rows for j
    dst_offsets_sj = _exclusive_cumsum(pair_sj, axis=0)            # where destination j puts source s's rows
    # 3. rows to their experts' devices, laid out by source, then by local expert
    with jax.named_scope("ep_exchange"):
        recv_rD = ragged_all_to_all(x_MD, jnp.zeros((r, x_MD.shape[1]), x_MD.dtype), src_offsets_sj[me], send_j,
                                    dst_offsets_sj[me], recv_s, axis_name=expert_axis, max_send=min(M, r), impl=impl)
    segment_ends = jnp.cumsum(kept_sje[:, me, :].reshape(-1))    # (source, local expert) segments in order
    segment_r = jnp.searchsorted(segment_ends, jnp.arange(r), side="right")
    local_r = jnp.where(segment_r < n * e, segment_r % e, e)         # empty buffer rows sort last
    by_expert_r = jnp.argsort(local_r, stable=True)
    # 4. the local experts
    # (a balanced load fills M of the r rows: the kernels' cost estimates count those, the empty rest is skipped)
    stack = {} if local_stack is None else {"stack": local_stack}
    y_rD = ffn(recv_rD[by_expert_r], local_experts, kept_sje[:, me, :].sum(0), rows_in_use=min(M, r), **stack)
    y_rD = y_rD[jnp.argsort(by_expert_r)]
    # 5. back to the sources, un-sorted, combined (dropped rows come back as the buffer's zeros)
    with jax.named_scope("ep_exchange"):
        back_MD = ragged_all_to_all(y_rD, jnp.zeros((M, y_rD.shape[1]), y_rD.dtype), dst_offsets_sj[:, me], recv_s,
                                    src_offsets_sj[:, me], send_j, axis_name=expert_axis, max_send=min(M, r),
                                    impl=impl)
    return combine_sorted(back_MD, order_M, weights_TK), dropped


def every_row_chunk(rows: int, n: int) -> int:
    """Rows per chunk of the every_row form (expert_parallel_ffn): room for twice a balanced load (rows / n), in
    whole 128-row kernel tiles, and never more than all the rows."""
    return min(rows, max(128, -(-2 * -(-rows // n) // 128) * 128))


def _local_experts_every_row(x_TD, weights_TK, ids_TK, local_experts, local_stack, *, ffn: Callable,
                             expert_axis: str, chunk_rows: int | None):
    """One device's part when every device holds every token (rows whole: a decode step): the rows routed to its
    own experts run through them where they are, with no exchange, and the partial sums are added up over the expert
    axis -> (combined output [T, D] in x's dtype, 0 rows dropped). Its rows (sorted by expert, first) go through the
    FFN in chunks of every_row_chunk rows, as many as it has (a while loop: one chunk for a balanced load, more for a
    hot device; nothing dropped), so no buffer holds every device's rows. Forward only."""
    n, me = jax.lax.axis_size(expert_axis), jax.lax.axis_index(expert_axis)
    T, K = ids_TK.shape
    e = jax.tree.leaves(local_experts)[0].shape[0]
    R = chunk_rows or every_row_chunk(T * K, n)
    local_TK = ids_TK - me * e
    mine_TK = (local_TK >= 0) & (local_TK < e)
    order_M, sizes_g = sort_by_group(jnp.where(mine_TK, local_TK, e), e + 1)  # the others' rows sort last
    ends_e = jnp.cumsum(sizes_g[:e])
    starts_e, count = ends_e - sizes_g[:e], ends_e[-1]
    order_M = jnp.pad(order_M, (0, R))  # a chunk past the end reads padding (weight 0)
    weights_M = jnp.pad(jnp.where(mine_TK, weights_TK, 0).reshape(-1)[order_M[:T * K]], (0, R))
    stack = {} if local_stack is None else {"stack": local_stack}

    def chunk(c, out_TD):
        first = c * R
        token_R = jax.lax.dynamic_slice_in_dim(order_M, first, R) // K
        sizes_e = jnp.clip(ends_e - first, 0, R) - jnp.clip(starts_e - first, 0, R)  # the chunk's part of each group
        # a balanced load puts T K / n rows here (fewer than one for a row on many devices): the kernels' cost
        # estimates count those (they skip the rest)
        y_RD = ffn(x_TD[token_R], local_experts, sizes_e, rows_in_use=min(R, T * K / n), **stack)
        w_R = jnp.where(first + jnp.arange(R) < count, jax.lax.dynamic_slice_in_dim(weights_M, first, R), 0)
        return out_TD.at[token_R].add(y_RD.astype(jnp.float32) * w_R[:, None])  # rows past the groups come out 0

    out_TD = jax.lax.fori_loop(0, -(-count // R), chunk, jnp.zeros(x_TD.shape, jnp.float32))
    return jax.lax.psum(out_TD.astype(x_TD.dtype), expert_axis), jnp.zeros((), jnp.int32)


def expert_parallel_enabled(mesh, num_experts: int, expert_axis: str = EXPERT_AXIS) -> bool:
    """True when `mesh` (e.g. jax.sharding.get_abstract_mesh()) has an expert axis > 1 dividing num_experts."""
    if mesh is None or mesh.empty or expert_axis not in mesh.axis_names:
        return False
    n = dict(mesh.shape)[expert_axis]
    return n > 1 and num_experts % n == 0


def expert_parallel_ffn(x_TD, weights_TK, ids_TK, experts, *, ffn: Callable, impl: str, mesh=None,
                        expert_axis: str = EXPERT_AXIS, token_axes: tuple[str, ...] = TOKEN_AXES,
                        capacity_factor: float = 0.0, stack=None, every_row: bool = False,
                        chunk_rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum_k weights[t, k] * ffn_{ids[t, k]}(x[t]) -> [T, D] float32, rows dropped: int32 scalar), with experts
    split over `expert_axis` of `mesh` (default: the mesh set with jax.set_mesh). experts: a pytree of [E, ...]
    arrays (module docstring). impl: the row exchange (IMPLS). T is padded to a multiple of the token-axis devices.
    capacity_factor: the receive buffer (module docstring); 0 drops nothing. stack: optional (a pytree of stacks of
    layers [L, E, ...] whose [layer] is `experts`, layer): split on their expert axis too, and ffn gets
    stack=(its blocks [L, e, ...], layer) to read in place. every_row: every device holds every token (a decode
    step's layout): no exchange; each device runs the rows of its own experts (in chunks of chunk_rows rows,
    default every_row_chunk's) and the
    outputs are summed over `expert_axis` in x's dtype (an all-reduce of [T, D]: a few rows), nothing dropped;
    forward only."""
    if impl not in IMPLS:
        raise ValueError(f"expert_parallel_ffn: impl must be one of {IMPLS}, got {impl!r}")
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    E = jax.tree.leaves(experts)[0].shape[0]
    if not expert_parallel_enabled(mesh, E, expert_axis):
        raise ValueError(f"expert_parallel_ffn: the mesh {dict(mesh.shape) if mesh is not None else None} needs an "
                         f"'{expert_axis}' axis > 1 that divides the {E} experts")
    stack_specs = None if stack is None else (jax.tree.map(lambda _: P(None, expert_axis), stack[0]), P())
    expert_specs = jax.tree.map(lambda _: P(expert_axis), experts)
    if every_row:
        local = jax.shard_map(
            lambda *a: _local_experts_every_row(*a, ffn=ffn, expert_axis=expert_axis, chunk_rows=chunk_rows),
            mesh=mesh,
            in_specs=(P(), P(), P(), expert_specs, stack_specs), out_specs=(P(), P()), check_vma=False)
        return local(x_TD, weights_TK, ids_TK, experts, stack)
    axes = tuple(a for a in token_axes if a in mesh.axis_names and dict(mesh.shape)[a] > 1)
    shards = 1
    for a in axes:
        shards *= dict(mesh.shape)[a]
    T = x_TD.shape[0]
    pad = -T % shards
    if pad:  # padding rows get weight 0 (they still travel, a few rows at most)
        x_TD = jnp.pad(x_TD, ((0, pad), (0, 0)))
        weights_TK = jnp.pad(weights_TK, ((0, pad), (0, 0)))
        ids_TK = jnp.pad(ids_TK, ((0, pad), (0, 0)))
    tok = P(axes or None)
    others = tuple(a for a in axes if a != expert_axis)
    local = jax.shard_map(
        lambda *a: _local_expert_ffn(*a, ffn=ffn, expert_axis=expert_axis, other_token_axes=others, impl=impl,
                                     capacity_factor=capacity_factor), mesh=mesh,
        in_specs=(tok, tok, tok, expert_specs, stack_specs), out_specs=(tok, P()), check_vma=False)
    out_TD, dropped = local(x_TD, weights_TK, ids_TK, experts, stack)
    return out_TD[:T], dropped
