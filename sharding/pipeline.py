"""Pipeline parallelism over stacked layers (GPipe schedule) with `jax.shard_map` over the `stage` axis.

    state, aux = pipeline_scan(layer_fn, stacked_params, state, num_microbatches=4)   # inside jax.set_mesh(mesh)

computes what `jax.lax.scan(layer_fn, state, stacked_params)` computes: layer_fn(state, layer_params) ->
(state, aux), `state` a pytree whose leaves have a leading batch axis (activations and whatever per-example
inputs the layers need, e.g. segment ids and positions), `stacked_params` a pytree with a leading layer axis.

The L layers are split over the n stages of the `stage` mesh axis (stage s owns layers [s L/n, (s+1) L/n));
the batch is split into m microbatches. At clock tick t stage s runs its layers on microbatch t - s and passes
the result to stage s + 1 (`ppermute`), so n + m - 1 ticks finish everything; each stage idles for n - 1 of them
(`bubble_fraction`). The backward pass is the same schedule reversed, which JAX derives by differentiating the
shard_map (ppermute's transpose sends the other way). Other mesh axes stay automatic: layers may use data,
fsdp or expert parallelism (sharding.expert_parallel) inside a stage.

aux comes back as [m, L, ...] (per microbatch, per layer); the caller reduces it over microbatches.

Letter legend: L layers, n stages, m microbatches, b examples per microbatch, t clock tick.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

STAGE_AXIS = "stage"


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Share of stage-ticks spent idle in a GPipe schedule: (n - 1) / (m + n - 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def pipeline_enabled(mesh, stage_axis: str = STAGE_AXIS) -> bool:
    return mesh is not None and not mesh.empty and stage_axis in mesh.axis_names and dict(mesh.shape)[stage_axis] > 1


def _split(tree, m):
    def split(a):
        if a.shape[0] % m:
            raise ValueError(f"pipeline: batch {a.shape[0]} does not divide into {m} microbatches")
        return a.reshape((m, a.shape[0] // m) + a.shape[1:])

    return jax.tree.map(split, tree)


def pipeline_scan(layer_fn: Callable, stacked_params, state, *, num_microbatches: int, mesh=None,
                  stage_axis: str = STAGE_AXIS, unroll: int = 1):
    """See the module docstring; `unroll` is jax.lax.scan's over each stage's layers."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if not pipeline_enabled(mesh, stage_axis):
        raise ValueError(f"pipeline_scan: the mesh needs a '{stage_axis}' axis > 1")
    n, m = dict(mesh.shape)[stage_axis], num_microbatches
    L = jax.tree.leaves(stacked_params)[0].shape[0]
    if L % n:
        raise ValueError(f"pipeline_scan: {L} layers do not split evenly into {n} stages")
    if m < 1:
        raise ValueError(f"pipeline_scan: num_microbatches must be >= 1, got {m}")
    micro = _split(state, m)  # [m, b, ...]

    def stage_layers(x, params):
        return jax.lax.scan(layer_fn, x, params, unroll=unroll)

    aux_shape = jax.eval_shape(lambda x, p: stage_layers(x, p)[1], jax.tree.map(lambda a: a[0], micro),
                               jax.tree.map(lambda a: a[:L // n], stacked_params))

    def per_stage(params, micro):
        s = jax.lax.axis_index(stage_axis)
        first = jax.tree.map(lambda a: a[0], micro)
        outputs = jax.tree.map(jnp.zeros_like, micro)
        aux_buf = jax.tree.map(lambda a: jnp.zeros((m,) + a.shape, a.dtype), aux_shape)

        def tick(carry, t):
            incoming, outputs, aux_buf = carry
            mb = t - s
            active = (mb >= 0) & (mb < m)
            mb_c = jnp.clip(mb, 0, m - 1)
            x = jax.tree.map(lambda fresh, got: jnp.where(s == 0, fresh[mb_c], got), micro, incoming)
            y, aux = stage_layers(x, params)
            write = active & (s == n - 1)
            outputs = jax.tree.map(lambda buf, v: buf.at[mb_c].set(jnp.where(write, v, buf[mb_c])), outputs, y)
            aux_buf = jax.tree.map(lambda buf, v: buf.at[mb_c].set(jnp.where(active, v, buf[mb_c])), aux_buf, aux)
            passed = jax.lax.ppermute(y, stage_axis, [(i, (i + 1) % n) for i in range(n)])
            return (passed, outputs, aux_buf), None

        (_, outputs, aux_buf), _ = jax.lax.scan(tick, (first, outputs, aux_buf), jnp.arange(m + n - 1))
        outputs = jax.tree.map(lambda a: jax.lax.psum(jnp.where(s == n - 1, a, jnp.zeros_like(a)), stage_axis),
                               outputs)
        return outputs, aux_buf

    param_specs = jax.tree.map(lambda _: P(stage_axis), stacked_params)
    micro_specs = jax.tree.map(lambda _: P(), micro)
    aux_specs = jax.tree.map(lambda _: P(None, stage_axis), aux_shape)
    run = jax.shard_map(per_stage, mesh=mesh, in_specs=(param_specs, micro_specs), out_specs=(micro_specs, aux_specs),
                        axis_names={stage_axis}, check_vma=False)
    outputs, aux = run(stacked_params, micro)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), outputs), aux
