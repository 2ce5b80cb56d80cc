"""Where each array of a k2jax checkpoint lands when `load_checkpoint` restores it onto devices.

A parameter's sharding comes from the caller (`ShardingSpec`: a function, a mapping, or replicated on a mesh,
`sharding_for`); its stored form ([*lead, out, in], `k2jax.formats.weight_layout`) is read with that sharding carried
over (`stored_sharding`), so each device reads about the part it keeps; FP8 block scales are small and read whole
by every device of their weight (`replicated_like`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax

from k2jax.checkpoint.format import CheckpointError
from k2jax.formats.weight_layout import Matmul
from k2jax.model.transformer import param_info
from sharding.rules import param_shardings

ShardingSpec = (Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | Mapping[str, jax.sharding.Sharding] | str
                | None)


def resolve_shardings(shardings: ShardingSpec, mesh, abstract_model, caller: str) -> ShardingSpec:
    """A strategy name from sharding.rules -> its {parameter name: NamedSharding} for `abstract_model` on `mesh`;
    any other ShardingSpec as it is."""
    if not isinstance(shardings, str):
        return shardings
    if mesh is None:
        raise ValueError(f"{caller}: shardings={shardings!r} names a strategy; pass the mesh too")
    return param_shardings(param_info(abstract_model), mesh, shardings)


def sharding_for(name, shape, mesh, shardings) -> jax.sharding.Sharding:
    """The sharding `shardings` (a function or mapping; None: replicated on `mesh`, or the default device without
    one) gives parameter `name` of `shape`."""
    if callable(shardings):
        return shardings(name, tuple(shape))
    if isinstance(shardings, Mapping):
        if name not in shardings:
            raise CheckpointError(f"load_checkpoint: shardings has no entry for {name}")
        return shardings[name]
    if mesh is not None:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def stored_sharding(sharding: jax.sharding.Sharding, m: Matmul, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """A parameter's sharding carried over to its stored [*lead, out, in] form, so each device reads about the
    part it keeps: the lead axes keep their mesh axes; the out / in axis takes those of the first model axis it
    merges (a split of the major axis is the same split of the merged one) when the others are unsharded, and is
    unsharded otherwise (the transpose then reshards)."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return replicated_like(sharding)
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    lead, rest = spec[:m.n_lead], spec[m.n_lead:]
    n_in = next(k for k in range(1, len(rest) + 1) if math.prod(shape[m.n_lead:m.n_lead + k]) == m.in_dim)

    def merged(axes):
        return axes[0] if all(a is None for a in axes[1:]) else None

    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *lead, merged(rest[n_in:]), merged(rest[:n_in])))


def replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """Every device of `sharding` holds the whole array."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if len(sharding.device_set) == 1:
        return sharding
    raise CheckpointError(f"load_checkpoint: FP8 weights need NamedSharding or single-device shardings, got "
                          f"{type(sharding).__name__}")
