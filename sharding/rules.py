"""The one table from logical axis names (on every k2jax parameter) to mesh axes, per strategy.

    shardings = param_shardings(params_by_name, mesh, "ep_fsdp")   # {name: NamedSharding}
    model = k2jax.load_checkpoint(path, shardings=lambda name, shape: shardings[name])
    print(sharding_table(params_by_name, mesh, "ep_fsdp"))        # every parameter, its spec, bytes per device
    x_BTD = constrain(x_BTD, ACTIVATION_BTD)                      # activations: batch over data, fsdp, expert;
                                                                  # sequence over context
    x_BTD = constrain(x_BTD, ACTIVATION_BTD, "decode")            # a decode step: rows whole on every device

`params_by_name` is {name: (shape, dtype, logical_axes)}; `k2jax.param_info(model)` builds it. Optimizer state
follows its parameter and is split further over `data` (ZeRO-1): `optimizer_state_specs`. Strategies:
  fsdp     every weight split along its hidden ("embed", or q_lora / kv_lora) axis over fsdp; experts whole
  ep_fsdp  experts split over `expert` (their hidden axis over fsdp), every other weight's hidden axis over
           fsdp x expert together                                            (K2's EP + ZeRO-3 over every chip)
  ep_pp    as ep_fsdp, stacked MoE layers split over `stage`                    (K2's PP16 x EP16)
  tensor   heads / ffn / vocab over `tensor`, hidden over fsdp
With a `context` axis (context parallelism: a row's sequence split; sharding.context_parallel) every strategy splits
the hidden axes over it as well (fsdp x context, fsdp x expert x context): its devices hold different tokens of the
same rows, so it is one more axis to shard the weights over (ZeRO-3), not one more copy of them.
A logical axis maps to the first of its candidates (a mesh axis, or a tuple of mesh axes split together) whose
axes exist in the mesh, are not used by an earlier dimension of the same parameter, and together divide the
dimension. When a candidate's axes are there but none divides the dimension, that dimension would be held whole
on every device (at 1T, an out-of-memory on the pod): partition_spec raises ShardingRuleError naming parameter,
dimension, axis and sizes, unless the strategy lists that logical axis in MAY_REPLICATE (the explicit opt-in).
A dimension none of whose candidate axes are in the mesh (or all taken by earlier dimensions) is whole by design;
so is every axis no strategy lists, e.g. "scale_blocks", the block axes of FP8 weights' 128x128 scale grids: a
scale grid follows its weight on the leading (expert, layers) axes and is whole along its blocks (1/16384 of the
weight's elements, and a block count fsdp rarely divides).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding import LOGICAL_AXES

# hidden-side axes split over fsdp (ZeRO-style); q_b / kv_b have no embed axis, so their latent axis is used
# (and over context where the mesh has it: see above)
_HIDDEN = ("embed", "q_lora", "kv_lora")
_FSDP = {axis: (("fsdp", "context"), "fsdp") for axis in _HIDDEN}
# with expert parallelism, the weights outside the experts (attention, shared expert, embeddings) split their hidden
# axis over fsdp and expert together (ZeRO-3 over every chip: otherwise each of the n expert groups holds a copy,
# 11 GB per chip of K2 on v5p-512, and as much again for momentum and gradients); an expert weight's expert axis
# already takes `expert`, so its hidden axis falls back to fsdp (x context) alone
_FSDP_EP = {axis: (("fsdp", "expert", "context"), ("fsdp", "context"), "fsdp") for axis in _HIDDEN}
RULES: dict[str, dict[str, tuple[str | tuple[str, ...], ...]]] = {
    "fsdp": {**_FSDP},
    "ep_fsdp": {**_FSDP_EP, "expert": ("expert",)},
    "ep_pp": {**_FSDP_EP, "expert": ("expert",), "layers": ("stage",)},
    "tensor": {**_FSDP, "heads": ("tensor",), "mlp": ("tensor",), "moe_mlp": ("tensor",), "vocab": ("tensor",)},
}
STRATEGIES = tuple(RULES)
# per strategy, the logical axes that may stay whole when no candidate divides them (the opt-in to replicating)
MAY_REPLICATE: dict[str, frozenset[str]] = {strategy: frozenset() for strategy in RULES}


class ShardingRuleError(ValueError):
    """A parameter dimension the strategy's mesh axes do not divide, which would be replicated on every device."""

ParamInfo = tuple[tuple[int, ...], np.dtype, tuple[str, ...]]


def partition_spec(shape: tuple[int, ...], logical_axes: tuple[str, ...], mesh_shape: Mapping[str, int],
                   strategy: str, name: str = "a parameter") -> PartitionSpec:
    """The spec RULES[strategy] give a parameter `name` of `shape` on a mesh of `mesh_shape`; ShardingRuleError when
    a dimension's candidates are in the mesh but none divides it (unless MAY_REPLICATE[strategy] lists its axis)."""
    if strategy not in RULES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    unknown = sorted(set(logical_axes) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"logical axes {unknown} are not in sharding.LOGICAL_AXES")
    used: set[str] = set()
    spec = []
    for i, (dim, axis) in enumerate(zip(shape, logical_axes)):
        choice, refused = None, []
        for candidate in RULES[strategy].get(axis, ()):
            together = (candidate,) if isinstance(candidate, str) else tuple(candidate)
            present = tuple(a for a in together if mesh_shape.get(a, 1) > 1)
            if not present or used & set(together):
                continue
            if dim % math.prod(mesh_shape[a] for a in present) == 0:
                choice = present[0] if len(present) == 1 else present
                used.update(present)
                break
            tried = " x ".join(f"{a} ({mesh_shape[a]})" for a in present)
            refused += [tried] if tried not in refused else []  # (fsdp, expert) without expert is fsdp again
        if choice is None and refused and axis not in MAY_REPLICATE[strategy]:
            raise ShardingRuleError(
                f"{name} {tuple(shape)}: dimension {i} ({axis!r}, size {dim}) is not divisible by mesh axis "
                f"{' or '.join(refused)} under strategy {strategy!r}, so every device would hold it whole: pick "
                f"mesh sizes that divide it, or list {axis!r} in sharding.rules.MAY_REPLICATE[{strategy!r}]")
        spec.append(choice)
    return PartitionSpec(*spec)


def mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_specs(params: Mapping[str, ParamInfo], mesh_shape: Mapping[str, int], strategy: str
                ) -> dict[str, PartitionSpec]:
    """{name: PartitionSpec} of every parameter; ShardingRuleError for the first the mesh cannot split."""
    return {name: partition_spec(shape, axes, mesh_shape, strategy, name) for name, (shape, _, axes) in params.items()}


def param_shardings(params: Mapping[str, ParamInfo], mesh: jax.sharding.Mesh, strategy: str
                    ) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, spec) for name, spec in param_specs(params, dict(mesh.shape), strategy).items()}


def bytes_per_device(shape: tuple[int, ...], dtype, spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
    split = math.prod(mesh_shape[a] for entry in spec for a in mesh_axes(entry))
    return math.prod(shape) * np.dtype(dtype).itemsize // split


def sharding_table(params: Mapping[str, ParamInfo], mesh_shape: Mapping[str, int], strategy: str) -> str:
    """Every parameter's shape, partition spec and bytes per device, and the total per device."""
    rows = [f"{'parameter':48s} {'shape':28s} {'spec':40s} {'per device':>12s}"]
    total = 0
    for name, (shape, dtype, axes) in params.items():
        spec = partition_spec(shape, axes, mesh_shape, strategy, name)
        b = bytes_per_device(shape, dtype, spec, mesh_shape)
        total += b
        rows.append(f"{name:48s} {str(shape):28s} {str(tuple(spec)):40s} {b / 2**20:10.1f} MiB")
    rows.append(f"{'total per device':118s} {total / 2**30:10.2f} GiB")
    return "\n".join(rows)


def total_bytes_per_device(params: Mapping[str, ParamInfo], mesh_shape: Mapping[str, int], strategy: str) -> int:
    return sum(bytes_per_device(shape, dtype, partition_spec(shape, axes, mesh_shape, strategy, name), mesh_shape)
               for name, (shape, dtype, axes) in params.items())


ZERO1_AXIS = "data"

# Activations: the batch is split over every batch-like axis (tokens travel to experts only inside EP), a row's
# sequence over context (context parallelism), a flattened batch x sequence axis ("tokens": the MoE's rows) over
# both, batch-major, attention heads over tensor, the rest stays whole. The one place activation layouts are
# decided, per layout:
#   "default"  training and prefill (many tokens per row: compute-bound): each device computes its own rows, and the
#              weights split over fsdp / expert are gathered to it
#   "decode"   one new token per row (a few rows, bandwidth-bound): the rows are whole on every device, so a weight
#              split along its hidden axis is used where it lies (each device contracts its part of the hidden axis
#              and the [rows, ...] results are summed across devices: activations move, weights never do)
# The latent cache is laid out the same in both: its rows over the batch-like axes as far as they divide, its slots
# over the batch-like axes its rows leave (a batch of fewer rows than devices is split along the sequence, never
# replicated; k2jax.model.attention merges the devices' partial softmaxes).
_BATCH_AXES = ("data", "fsdp", "expert")
_CACHE = {"cache_rows": _BATCH_AXES, "cache_slots": _BATCH_AXES}
ACTIVATION_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "default": {"batch": _BATCH_AXES, "sequence": ("context",), "tokens": _BATCH_AXES + ("context",),
                "heads": ("tensor",), **_CACHE},
    # "latent": MLA's kv_lora axis of the absorbed query and output, split as the weights' hidden axes are, so they
    # meet kv_b where it lies (q_nope . W_UK and o_lat . W_UV contract per device; the few rows move instead)
    "decode": {"batch": (), "sequence": (), "tokens": (), "heads": ("tensor",), "latent": ("fsdp", "expert"),
               **_CACHE},
}
ACTIVATION_LAYOUTS = tuple(ACTIVATION_RULES)
ACTIVATION_BTD = ("batch", "sequence", None)
CACHE_AXES_LBSX = (None, "cache_rows", "cache_slots", None)  # a latent cache [layers, rows, slots, values]


def check_layout(layout: str) -> str:
    """`layout` if it names an activation layout (ACTIVATION_RULES), else a ValueError naming them."""
    if layout not in ACTIVATION_RULES:
        raise ValueError(f"activation layout must be one of {ACTIVATION_LAYOUTS}, got {layout!r}")
    return layout


def activation_spec(shape: tuple[int, ...], logical_axes: tuple[str | None, ...], mesh, layout: str = "default"
                    ) -> PartitionSpec:
    """The spec ACTIVATION_RULES[layout] give an activation on `mesh`: a dimension takes every listed mesh axis that
    exists (and is not manual), is not taken by an earlier dimension and, together, divides it."""
    sizes = dict(mesh.shape)
    manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual}
    rules, used = ACTIVATION_RULES[check_layout(layout)], set(manual)
    spec = []
    for dim, axis in zip(shape, logical_axes):
        chosen, split = [], 1
        for mesh_axis in rules.get(axis, ()) if axis else ():
            n = sizes.get(mesh_axis, 1)
            if n > 1 and mesh_axis not in used and dim % (split * n) == 0:
                chosen.append(mesh_axis)
                split *= n
        used.update(chosen)
        spec.append(tuple(chosen) if chosen else None)
    return PartitionSpec(*spec)


def spec_axes(shape: tuple[int, ...], logical_axes: tuple[str | None, ...], mesh, axis: str,
              layout: str = "default") -> tuple[str, ...]:
    """The mesh axes activation_spec splits the dimension named `axis` over (() without a mesh)."""
    if mesh is None or mesh.empty:
        return ()
    return mesh_axes(activation_spec(shape, logical_axes, mesh, layout)[list(logical_axes).index(axis)])


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], layout: str = "default") -> jax.Array:
    """with_sharding_constraint by activation_spec (in `layout`) against the mesh set with jax.set_mesh (no-op
    without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(x.shape, logical_axes, mesh, layout))


def zero1_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh_shape: Mapping[str, int],
               axis: str = ZERO1_AXIS) -> PartitionSpec:
    """ZeRO-1: optimizer state is split further over the data-parallel axis, on the first dimension the
    parameter's spec leaves whole and the axis divides. Parameters themselves stay replicated over it."""
    size = mesh_shape.get(axis, 1)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if size <= 1 or any(axis in mesh_axes(e) for e in entries):
        return PartitionSpec(*entries)
    for i, (dim, entry) in enumerate(zip(shape, entries)):
        if entry is None and dim % size == 0:
            entries[i] = axis
            break
    return PartitionSpec(*entries)


def optimizer_state_specs(opt_state, params: Mapping[str, ParamInfo], mesh_shape: Mapping[str, int], strategy: str,
                          name_of, *, zero1: bool = True):
    """A PartitionSpec for every leaf of an optimizer state (concrete or from jax.eval_shape). A leaf that
    mirrors a parameter (its tree path ends in the parameter's path: momentum, Adam moments) gets the
    parameter's spec, plus ZeRO-1 over `data` when `zero1`; anything else (step counts) is replicated.
    name_of(path) turns a tree path into a parameter name (k2jax.model.transformer.param_name)."""
    def spec_for(path, leaf):
        shape = tuple(np.shape(leaf))
        for start in range(len(path)):
            name = name_of(path[start:])
            info = params.get(name)
            if info is not None and tuple(info[0]) == shape:
                spec = partition_spec(shape, info[2], mesh_shape, strategy, name)
                return zero1_spec(spec, shape, mesh_shape) if zero1 else spec
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, opt_state)


def tree_bytes_per_device(tree, specs, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `specs` (same structure)."""
    leaves = jax.tree_util.tree_leaves(tree)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(bytes_per_device(tuple(np.shape(a)), a.dtype, s, mesh_shape) for a, s in zip(leaves, spec_leaves))
