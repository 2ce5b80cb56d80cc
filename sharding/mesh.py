"""Named device meshes for k2jax: axes data, fsdp, expert, tensor, stage (any subset, in that order).

    mesh = make_mesh({"expert": 4, "fsdp": -1})        # -1: whatever the other axes leave
    mesh = make_mesh({"data": 2, "expert": 4}, devices=jax.devices()[:8])

Axes are created with AxisType.Auto (GSPMD partitions the computation; explicit collectives live in
shard_map code). Sizes that do not multiply to the device count fail with one line saying so.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "tensor", "stage")


class MeshError(ValueError):
    """A mesh that cannot be built on the devices at hand."""


def resolve_axis_sizes(axis_sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fills in one -1 and checks the product equals the device count. Keeps MESH_AXES order."""
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh axes {unknown} are not k2jax axes {MESH_AXES}")
    sizes = {a: int(axis_sizes[a]) for a in MESH_AXES if a in axis_sizes}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive (or one -1), got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % known:
            raise MeshError(f"{n_devices} devices do not divide into {sizes} "
                            f"(the fixed axes need a multiple of {known})")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} devices, but {n_devices} are available")
    return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(axis_sizes, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return jax.sharding.Mesh(grid, tuple(sizes), axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def abstract_mesh(axis_sizes: Mapping[str, int], n_devices: int) -> jax.sharding.AbstractMesh:
    """A mesh shape with no devices behind it (for planning pod-scale shardings with jax.eval_shape)."""
    sizes = resolve_axis_sizes(axis_sizes, n_devices)
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes),
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
