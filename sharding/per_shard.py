"""Run a function on each device's shard of its arguments: how Pallas kernels (and other per-device code) sit
under a mesh.

    out = per_shard(kernel, in_axes=(("batch", "heads", None, None), ("batch", None)),
                    out_axes=("batch", "heads", None, None))(q_BNTD, seg_BT)

Mosaic and Triton kernels cannot be partitioned automatically by XLA, so every kernel call a sharded program
makes goes through `jax.shard_map`: each argument's dimensions are split as `sharding.rules.activation_spec`
lays out an activation with those logical axes (batch over data, fsdp and expert; heads over tensor; whatever
divides), and the function sees its device's block. Mesh axes an argument is not split over are replicated to it
(each device computes its own block in full), so any function whose blocks along the named axes are independent
(attention per example and head, decode per row) gives the same result as unsharded.

Inside another shard_map (expert or pipeline parallelism) only the mesh axes still automatic are mapped; with no
mesh set, or none left, the function runs as it is.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from sharding.rules import activation_spec

Axes = tuple[str | None, ...]


def _auto_axes(mesh) -> frozenset[str]:
    manual = jax.sharding.AxisType.Manual
    return frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != manual)


def per_shard(fn: Callable, in_axes: Sequence[Axes], out_axes: Axes | Sequence[Axes], layout: str = "default"
              ) -> Callable:
    """fn(*args) run per device under the mesh in context (see the module docstring). in_axes: one tuple of
    logical axis names (or None) per argument, one entry per dimension; out_axes: the same for the output, or a
    sequence of them for a tuple output; layout: the activation layout they are read in (sharding.rules)."""
    multi_out = bool(out_axes) and not isinstance(out_axes[0], (str, type(None)))

    def call(*args):
        if len(args) != len(in_axes):
            raise ValueError(f"per_shard: {len(args)} arguments but {len(in_axes)} in_axes")
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or not _auto_axes(mesh):
            return fn(*args)
        in_specs = tuple(activation_spec(a.shape, ax, mesh, layout) for a, ax in zip(args, in_axes))
        # an output dimension's split follows from the size its logical axis has in the arguments
        size_of = {name: dim for a, ax in zip(args, in_axes) for dim, name in zip(a.shape, ax) if name}

        def out_spec(axes):
            missing = [name for name in axes if name and name not in size_of]
            if missing:
                raise ValueError(f"per_shard: output axes {missing} name no argument's axis")
            return activation_spec(tuple(size_of.get(name, 1) for name in axes), axes, mesh, layout)

        out_specs = tuple(out_spec(ax) for ax in out_axes) if multi_out else out_spec(out_axes)
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names=_auto_axes(mesh),
                             check_vma=False)(*args)

    return call
