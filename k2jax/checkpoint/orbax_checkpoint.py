"""k2jax checkpoints: save a model, and load one (saved, or converted from the release) onto any mesh.

    save_checkpoint("ckpt/", model)                      # an in-memory model
    model = load_checkpoint("ckpt/", mesh=mesh, shardings=fn)   # onto any mesh, each device reads its shard

What is on disk is `k2jax.checkpoint.format`'s (an Orbax PyTree checkpoint plus `k2jax.json`); its matmul weights
keep the release's [out, in] orientation (`k2jax.formats.weight_layout`): `load_checkpoint` transposes and reshapes them
on the devices, where it costs next to nothing, and `save_checkpoint` does the reverse there. So converting the
release is a copy (plus a dequantisation for bf16 / f32): no host transpose, which cost more than everything else
in a conversion. FP8 and INT4 checkpoints (dtype "fp8" / "int4", written by the converter) are dequantised on the
devices too (W = e4m3 x scale per block, or (nibble - 8) x scale per group), into cfg.run.param_dtype (default
bfloat16); with weights="fp8" / "int4" the routed experts stay quantised with their scales on the devices instead
(the model is built with that expert format: `k2jax.model.experts`). Where each array lands on the mesh:
`k2jax.checkpoint.shardings`. The converter writes and the export reads checkpoints slot by slot
(`k2jax.checkpoint.stream`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from k2jax.checkpoint.format import (
    DTYPES,
    INT4_SCALES,
    QUANTIZED,
    SCALES,
    STATE_DIR,
    CheckpointError,
    check_chunks,
    checkpointer,
    local_path,
    metadata,
    nest,
    read_metadata,
    save_tree,
    write_metadata,
)
from k2jax.checkpoint.hf_mapping import fp8_params, int4_params, matmul_params
from k2jax.checkpoint.shardings import ShardingSpec, replicated_like, resolve_shardings, sharding_for, stored_sharding
from k2jax.formats import quant
from k2jax.formats.weight_layout import Matmul, from_stored, to_stored
from k2jax.model.config import K2Config
from k2jax.model.experts import EXPERT_PARAMS, SCALE_SUFFIX, expert_format_of, scale_sharding
from k2jax.model.placement import abstract_model
from k2jax.model.transformer import Transformer, param_name


def abstract_state(cfg: K2Config) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(abstract_model(cfg))


def _flat(tree: Any) -> dict[str, Any]:
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat_like(template: Any, values: Mapping[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [values[param_name(p)] for p, _ in paths])


def stored_template(cfg: K2Config, dtype: str, scheme: quant.Int4Scheme | None = None
                    ) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: shape and dtype as stored} for a checkpoint of `dtype`, fp8 / int4 scales included. scheme: an int4
    checkpoint's (which matmuls are INT4, the group size and scale dtype)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"checkpoint dtype must be one of {DTYPES}, got {dtype!r}")
    if (dtype == "int4") != isinstance(scheme, quant.Int4Scheme):
        raise CheckpointError(f"a {dtype} checkpoint {'needs' if dtype == 'int4' else 'takes no'} an INT4 scheme")
    _, state = abstract_state(cfg.replace(param_dtype="bfloat16" if dtype in QUANTIZED else dtype))
    template = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in _flat(nnx.to_pure_dict(state)).items()}
    for name, m in matmul_params(cfg).items():
        template[name] = jax.ShapeDtypeStruct(template[name].shape[:m.n_lead] + (m.out_dim, m.in_dim),
                                              template[name].dtype)
    if dtype == "fp8":
        for name, m in fp8_params(cfg).items():
            lead = template[name].shape[:m.n_lead]
            template[name] = jax.ShapeDtypeStruct(template[name].shape, quant.E4M3)
            template[f"{SCALES}.{name}"] = jax.ShapeDtypeStruct(lead + quant.scale_shape((m.out_dim, m.in_dim)),
                                                                jnp.float32)
    if dtype == "int4":
        for name, m in int4_params(cfg, scheme).items():
            lead = template[name].shape[:m.n_lead]
            packed, scales = quant.int4_shapes((m.out_dim, m.in_dim), scheme.group_size)
            template[name] = jax.ShapeDtypeStruct(lead + packed, jnp.int32)
            template[f"{INT4_SCALES}.{name}"] = jax.ShapeDtypeStruct(lead + scales, jnp.dtype(scheme.scale_dtype))
    return template


def save_checkpoint(path: str | os.PathLike, model: Transformer) -> None:
    """Saves the model's whole state (params and router biases) in cfg.run.param_dtype. The matmul weights are
    transposed to the stored layout on their devices first (a transient copy of each)."""
    path = local_path(path)
    if os.path.exists(path):
        raise CheckpointError(f"{path}: already exists; refusing to overwrite")
    flat = _flat(nnx.to_pure_dict(nnx.state(model)))
    for name, m in matmul_params(model.cfg).items():
        flat[name] = jax.jit(to_stored, static_argnums=1)(flat[name], m)
    os.makedirs(path)
    save_tree(os.path.join(path, STATE_DIR), nest(flat))
    shapes = {n: (tuple(a.shape), str(a.dtype)) for n, a in flat.items()}
    write_metadata(path, metadata(model.cfg, model.cfg.run.param_dtype, shapes))


def load_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, shardings: ShardingSpec = None,
                    weights: str = "dequantized", **config_overrides) -> Transformer:
    """Restores a k2jax checkpoint as a Transformer.

    shardings: None (with a mesh: replicated on it; without: the default device), a strategy name from
    sharding.rules (e.g. "ep_fsdp"; needs the mesh), a mapping from parameter name to Sharding, or a function
    (name, shape) -> Sharding. Each device reads only its own shard from disk.
    weights: "dequantized" (default): every weight in cfg.run.param_dtype (an fp8 / int4 checkpoint dequantised on the
    devices); "fp8" (an fp8 checkpoint only): the routed experts stay FP8-resident (k2jax.model.experts): their e4m3
    weights read and transposed on the devices with the parameter's sharding, their block scales with its split
    of the leading (layer, expert) axes and whole along the blocks, never dequantised; "int4" (an int4 checkpoint
    only): the same for the routed experts' packed int32 ([..., ceil(I/8), O] with the parameter's sharding) and
    group scales ([..., ceil(I/G), O], split like their weight: k2jax.model.experts.scale_sharding); every other
    weight as with
    "dequantized"."""
    expert_format_of(weights, "load_checkpoint: weights")
    path = os.fspath(path)
    meta = read_metadata(path)
    check_chunks(path)
    stored_dtype = meta["dtype"]
    overrides = {"param_dtype": "bfloat16" if stored_dtype in QUANTIZED else stored_dtype, **config_overrides}
    cfg = K2Config.from_hf(meta["config"], **overrides)
    try:
        scheme = quant.scheme_from_json(meta.get("quantization")) if stored_dtype == "int4" else None
    except quant.QuantError as e:
        raise CheckpointError(f"{path}: k2jax.json: {e}") from None
    graphdef, state = abstract_state(cfg)
    shardings = resolve_shardings(shardings, mesh, nnx.merge(graphdef, state), "load_checkpoint")
    stored = stored_template(cfg, stored_dtype, scheme)
    listed = meta["params"]
    if set(listed) != set(stored):
        missing, extra = sorted(set(stored) - set(listed)), sorted(set(listed) - set(stored))
        raise CheckpointError(f"{path}: parameters do not match the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    abstract = _flat(nnx.to_pure_dict(state))
    param_shapes = {n: tuple(a.shape) for n, a in abstract.items()}
    matmuls = matmul_params(cfg)
    fp8 = fp8_params(cfg) if stored_dtype == "fp8" else {}
    int4 = int4_params(cfg, scheme) if stored_dtype == "int4" else {}
    if weights != "dequantized" and stored_dtype != weights:
        raise CheckpointError(f"{path}: weights={weights!r} needs an {weights} checkpoint (converted with --dtype "
                              f"{weights}); this one is {stored_dtype}: load it with weights='dequantized'")
    resident = resident_names(path, fp8 or int4, weights) if weights != "dequantized" else ()
    targets, final_shardings = {}, {}
    for name, leaf in stored.items():
        if tuple(listed[name]["shape"]) != tuple(leaf.shape):
            raise CheckpointError(f"{path}: {name} has shape {listed[name]['shape']}, config implies "
                                  f"{list(leaf.shape)}")
        if _scaled_weight(name) is None:
            final_shardings[name] = sharding_for(name, param_shapes[name], mesh, shardings)
    for name, leaf in stored.items():
        weight = _scaled_weight(name)
        if name.startswith(SCALES + ".") and weight in resident:  # kept: split like its weight
            sharding = scale_sharding(final_shardings[weight], len(param_shapes[weight]))
        elif name.startswith(SCALES + "."):  # small: every device of its weight's sharding gets all of it
            sharding = replicated_like(final_shardings[weight])
        elif weight is not None or name in int4:  # INT4: as its weight's stored form, where the axes divide
            sharding = _divisible(stored_sharding(final_shardings[weight or name], matmuls[weight or name],
                                                  param_shapes[weight or name]), leaf.shape)
        elif name in matmuls:
            sharding = stored_sharding(final_shardings[name], matmuls[name], param_shapes[name])
        else:
            sharding = final_shardings[name]
        targets[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    target = nest(targets)
    try:
        restored = _flat(checkpointer().restore(os.path.join(path, STATE_DIR), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    except Exception as e:  # Orbax wraps tensorstore's read errors (a truncated chunk, ...) in bare Exceptions
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise CheckpointError(f"{path}: cannot read it: {' '.join(str(cause).split())[:400]}") from e
    params = {n: v for n, v in restored.items() if _scaled_weight(n) is None and n not in resident}
    for name in [n for n in params if n in matmuls]:  # dequantise and transpose on the devices, into the final
        m, shape, dtype = matmuls[name], param_shapes[name], jnp.dtype(abstract[name].dtype)  # sharding
        if name in int4:
            params[name] = jax.jit(_packed_to_param, static_argnums=(2, 3, 4, 5), out_shardings=final_shardings[
                name])(params[name], restored.pop(f"{INT4_SCALES}.{name}"), m, shape, dtype, scheme.group_size)
        else:
            scale = restored.pop(f"{SCALES}.{name}") if name in fp8 else None
            params[name] = jax.jit(_stored_to_param, static_argnums=(2, 3, 4), out_shardings=final_shardings[name])(
                params[name], scale, m, shape, dtype)
        restored[name] = None  # the stored copy can go as soon as the parameter exists
    params = {n: v.astype(abstract[n].dtype) if v.dtype != abstract[n].dtype else v for n, v in params.items()}
    kept = _resident_arrays(restored, resident, weights, matmuls, param_shapes, final_shardings)
    return with_resident(cfg, params, kept, weights, scheme)


def _resident_arrays(restored, resident, fmt, matmuls, param_shapes, final_shardings) -> dict[str, tuple]:
    """{expert parameter: (weight, scales)} for weights="fp8" / "int4": the stored e4m3 [..., O, I] / packed int32
    [..., O, ceil(I/8)] and scales transposed to the model's [..., in, out] on the devices, the weight with the
    parameter's sharding, the scales with k2jax.model.experts.scale_sharding's."""
    kept = {}
    for name in resident:  # each stored copy dropped as soon as its transposed one exists
        scales = restored.pop(f"{SCALES if fmt == 'fp8' else INT4_SCALES}.{name}")
        sharding, ndim = final_shardings[name], len(param_shapes[name])
        if fmt == "fp8":
            weight = jax.jit(from_stored, static_argnums=(1, 2), out_shardings=sharding)(
                restored.pop(name), matmuls[name], param_shapes[name])
        else:
            weight = jax.jit(_swap, out_shardings=sharding)(restored.pop(name))
        kept[name] = (weight, jax.jit(_swap, out_shardings=scale_sharding(sharding, ndim, fmt))(scales))
    return kept


def _swap(a: jax.Array) -> jax.Array:
    return a.swapaxes(-1, -2)


def with_resident(cfg: K2Config, params: dict, kept: dict, weights: str, scheme) -> Transformer:
    """The Transformer of `params`, built with the expert format weights= asks for, its routed experts holding the
    resident arrays `kept` ({expert parameter: (weight, scales)}; none for weights="dequantized")."""
    fmt = expert_format_of(weights, "load_checkpoint: weights")
    group_size = {"expert_group_size": scheme.group_size} if fmt == "int4" else {}
    graphdef, state = nnx.split(abstract_model(cfg, expert_format=fmt, **group_size))
    values = dict(params)
    for name, (w, s) in kept.items():
        values[name], values[name + SCALE_SUFFIX[fmt]] = w, s
    nnx.replace_by_pure_dict(state, _unflat_like(nnx.to_pure_dict(state), values))
    return nnx.merge(graphdef, state)


def resident_names(path: str, quantized: Mapping[str, Matmul], fmt: str = "fp8") -> tuple[str, ...]:
    """The routed expert weights weights=fmt ("fp8" / "int4") keeps quantised (`quantized`: the parameters stored
    in fmt): a CheckpointError when there are none."""
    if not all(name in quantized for name in EXPERT_PARAMS):
        raise CheckpointError(f"{path}: weights={fmt!r} keeps the routed experts {fmt.upper()}, and this model has no "
                              f"{fmt.upper()} routed experts (no MoE layers): load it with weights='dequantized'")
    return EXPERT_PARAMS


def _scaled_weight(name: str) -> str | None:
    """The weight whose FP8 / INT4 scales array `name` is; None for any other array."""
    for prefix in (SCALES, INT4_SCALES):
        if name.startswith(prefix + "."):
            return name[len(prefix) + 1:]
    return None


def _divisible(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """`sharding` with every axis its mesh axes do not divide held whole (packed INT4 and group-scale axes are
    8 and G times shorter than the weight's)."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    def size(axes):
        return 1 if axes is None else int(np.prod([sharding.mesh.shape[a] for a in
                                                   ((axes,) if isinstance(axes, str) else axes)]))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        *(axes if n % size(axes) == 0 else None for axes, n in zip(spec, shape))))


def _stored_to_param(w, scale, m: Matmul, shape: tuple[int, ...], dtype) -> jax.Array:
    if scale is not None:
        w = quant.dequantize_blocks(w, scale, dtype)
    return from_stored(w.astype(dtype), m, shape)


def _packed_to_param(packed, scale, m: Matmul, shape: tuple[int, ...], dtype, group_size: int) -> jax.Array:
    w = quant.dequantize_groups(packed, scale, axis=-1, size=m.in_dim, group_size=group_size, dtype=dtype)
    return from_stored(w, m, shape)
