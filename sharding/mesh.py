"""Named device meshes for k2jax: axes data, fsdp, expert, context, tensor, stage (any subset, in that order).

    mesh = make_mesh({"expert": 4, "fsdp": -1})        # -1: whatever the other axes leave
    mesh = make_mesh({"data": 2, "expert": 4}, devices=jax.devices()[:8])
    mesh = make_mesh({"expert": 8, "fsdp": 2}, dcn={"data": 4})  # multi-slice: 4 slices of 16 chips, data over DCN
    mesh = make_mesh({"expert": 64, "context": 4})     # long rows: each row's sequence split 4 ways (context parallel)

Axes are created with AxisType.Auto (GSPMD partitions the computation; explicit collectives live in
shard_map code). Sizes that do not multiply to the device count fail with one line saying so.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor", "stage")


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


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None, *,
              dcn: Mapping[str, int] | None = None, num_slices: int | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all). axis_sizes are the sizes within one slice (ICI); `dcn` gives how
    many slices each axis spans (data-center network between slices; usually only `data`), so an axis's size
    is ici x dcn with the slice as its outer factor and no ICI axis ever crosses a slice. Slices come from the
    devices' `slice_index` (TPU multi-slice) or, where devices have none, `num_slices` equal contiguous groups."""
    devices = list(jax.devices() if devices is None else devices)
    if not dcn:
        sizes = resolve_axis_sizes(axis_sizes, len(devices))
        grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
        return jax.sharding.Mesh(grid, tuple(sizes), axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
    slices = _slices(devices, num_slices)
    dcn_sizes = resolve_axis_sizes(dcn, len(slices))
    ici_sizes = resolve_axis_sizes(axis_sizes, len(slices[0]))
    names = [a for a in MESH_AXES if a in dcn_sizes or a in ici_sizes]
    ici_shape = [ici_sizes.get(a, 1) for a in names]
    dcn_shape = [dcn_sizes.get(a, 1) for a in names]
    per_slice = np.stack([np.asarray(s, dtype=object).reshape(ici_shape) for s in slices])  # [slices, *ici]
    grid = per_slice.reshape(dcn_shape + ici_shape)
    k = len(names)  # interleave (dcn_i, ici_i) pairs, then merge each pair into one axis, dcn outer
    grid = grid.transpose([j for i in range(k) for j in (i, k + i)]).reshape(
        [d * i for d, i in zip(dcn_shape, ici_shape)])
    return jax.sharding.Mesh(grid, tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * k)


def _slices(devices: list, num_slices: int | None) -> list[list]:
    if all(getattr(d, "slice_index", None) is not None for d in devices) and num_slices is None:
        by_slice: dict[int, list] = {}
        for d in devices:
            by_slice.setdefault(d.slice_index, []).append(d)
        slices = [by_slice[i] for i in sorted(by_slice)]
    else:
        n = num_slices or 1
        if len(devices) % n:
            raise MeshError(f"{len(devices)} devices do not split into {n} equal slices")
        slices = [devices[i * len(devices) // n:(i + 1) * len(devices) // n] for i in range(n)]
    if len({len(s) for s in slices}) != 1:
        raise MeshError(f"slices have different device counts: {[len(s) for s in slices]}")
    return slices


def abstract_mesh(axis_sizes: Mapping[str, int], n_devices: int) -> jax.sharding.AbstractMesh:
    """A mesh shape with no devices behind it (for planning pod-scale shardings with jax.eval_shape)."""
    sizes = resolve_axis_sizes(axis_sizes, n_devices)
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes),
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
