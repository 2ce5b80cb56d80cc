"""The one table from logical axis names (on every k2jax parameter) to mesh axes, per strategy.

    shardings = param_shardings(params_by_name, mesh, "ep_fsdp")   # {name: NamedSharding}
    model = k2jax.load_checkpoint(path, shardings=lambda name, shape: shardings[name])
    print(sharding_table(params_by_name, mesh, "ep_fsdp"))        # every parameter, its spec, bytes per device

`params_by_name` is {name: (shape, dtype, logical_axes)}; `k2jax.param_info(model)` builds it. Strategies:
  fsdp     every weight split along its hidden ("embed", or q_lora / kv_lora) axis over fsdp; experts whole
  ep_fsdp  experts split over `expert`, the rest as fsdp                       (K2's EP + ZeRO)
  ep_pp    as ep_fsdp, stacked MoE layers split over `stage`                    (K2's PP16 x EP16)
  tensor   heads / ffn / vocab over `tensor`, hidden over fsdp
A logical axis maps to the first of its mesh axes that exists in the mesh, is not used by an earlier dimension
of the same parameter, and divides the dimension; otherwise that dimension is replicated (the table shows it).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding import LOGICAL_AXES

# hidden-side axes split over fsdp (ZeRO-style); q_b / kv_b have no embed axis, so their latent axis is used
_FSDP = {"embed": ("fsdp",), "q_lora": ("fsdp",), "kv_lora": ("fsdp",)}
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "fsdp": {**_FSDP},
    "ep_fsdp": {**_FSDP, "expert": ("expert",)},
    "ep_pp": {**_FSDP, "expert": ("expert",), "layers": ("stage",)},
    "tensor": {**_FSDP, "heads": ("tensor",), "mlp": ("tensor",), "moe_mlp": ("tensor",), "vocab": ("tensor",)},
}
STRATEGIES = tuple(RULES)

ParamInfo = tuple[tuple[int, ...], np.dtype, tuple[str, ...]]


def partition_spec(shape: tuple[int, ...], logical_axes: tuple[str, ...], mesh_shape: Mapping[str, int],
                   strategy: str) -> PartitionSpec:
    if strategy not in RULES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    unknown = sorted(set(logical_axes) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"logical axes {unknown} are not in sharding.LOGICAL_AXES")
    used: set[str] = set()
    spec = []
    for dim, axis in zip(shape, logical_axes):
        choice = None
        for mesh_axis in RULES[strategy].get(axis, ()):
            size = mesh_shape.get(mesh_axis, 1)
            if size > 1 and mesh_axis not in used and dim % size == 0:
                choice = mesh_axis
                used.add(mesh_axis)
                break
        spec.append(choice)
    return PartitionSpec(*spec)


def param_shardings(params: Mapping[str, ParamInfo], mesh: jax.sharding.Mesh, strategy: str
                    ) -> dict[str, NamedSharding]:
    mesh_shape = dict(mesh.shape)
    return {name: NamedSharding(mesh, partition_spec(shape, axes, mesh_shape, strategy))
            for name, (shape, _, axes) in params.items()}


def bytes_per_device(shape: tuple[int, ...], dtype, spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
    split = math.prod(mesh_shape[a] for a in spec if a is not None)
    return math.prod(shape) * np.dtype(dtype).itemsize // split


def sharding_table(params: Mapping[str, ParamInfo], mesh_shape: Mapping[str, int], strategy: str) -> str:
    """Every parameter's shape, partition spec and bytes per device, and the total per device."""
    rows = [f"{'parameter':48s} {'shape':28s} {'spec':40s} {'per device':>12s}"]
    total = 0
    for name, (shape, dtype, axes) in params.items():
        spec = partition_spec(shape, axes, mesh_shape, strategy)
        b = bytes_per_device(shape, dtype, spec, mesh_shape)
        total += b
        rows.append(f"{name:48s} {str(shape):28s} {str(tuple(spec)):40s} {b / 2**20:10.1f} MiB")
    rows.append(f"{'total per device':118s} {total / 2**30:10.2f} GiB")
    return "\n".join(rows)


def total_bytes_per_device(params: Mapping[str, ParamInfo], mesh_shape: Mapping[str, int], strategy: str) -> int:
    return sum(bytes_per_device(shape, dtype, partition_spec(shape, axes, mesh_shape, strategy), mesh_shape)
               for shape, dtype, axes in params.values())
