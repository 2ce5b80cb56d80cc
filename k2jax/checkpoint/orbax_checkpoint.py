"""k2jax checkpoints: save a model, and load one (saved, or converted from the release) onto any mesh.

    save_checkpoint("ckpt/", model)                      # an in-memory model
    model = load_checkpoint("ckpt/", mesh=mesh, shardings=fn)   # onto any mesh, each device reads its shard

What is on disk is `k2jax.checkpoint.format`'s (an Orbax PyTree checkpoint plus `k2jax.json`); its matmul weights
keep the release's [out, in] orientation (`k2jax.formats.weight_layout`): `load_checkpoint` transposes and reshapes them
on the devices, where it costs next to nothing, and `save_checkpoint` does the reverse there. So converting the
release is a copy (plus a dequantisation for bf16 / f32): no host transpose, which cost more than everything else
in a conversion. FP8 checkpoints (dtype "fp8", written by the converter) are dequantised on the devices too
(W = e4m3 x scale per block), into cfg.param_dtype (default bfloat16); with weights="fp8" the routed experts stay
e4m3 with their block scales on the devices instead (`k2jax.model.fp8_experts`). Where each array lands on the mesh:
`k2jax.checkpoint.shardings`. The converter writes and the export reads checkpoints slot by slot
(`k2jax.checkpoint.stream`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from k2jax.checkpoint.format import (
    DTYPES,
    SCALES,
    STATE_DIR,
    CheckpointError,
    check_chunks,
    checkpointer,
    metadata,
    nest,
    read_metadata,
    save_tree,
    write_metadata,
)
from k2jax.checkpoint.hf_mapping import fp8_params, matmul_params
from k2jax.checkpoint.shardings import ShardingSpec, replicated_like, resolve_shardings, sharding_for, stored_sharding
from k2jax.formats import quant
from k2jax.formats.weight_layout import Matmul, from_stored, to_stored
from k2jax.model.config import K2Config
from k2jax.model.fp8_experts import EXPERT_PARAMS, resident_experts, scale_sharding
from k2jax.model.transformer import Transformer, param_name

WEIGHTS = ("dequantized", "fp8")  # load_checkpoint / load_hf_checkpoint's weights= options


def abstract_state(cfg: K2Config) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def _flat(tree: Any) -> dict[str, Any]:
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat_like(template: Any, values: Mapping[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [values[param_name(p)] for p, _ in paths])


def stored_template(cfg: K2Config, dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: shape and dtype as stored} for a checkpoint of `dtype`, fp8 scales included."""
    if dtype not in DTYPES:
        raise CheckpointError(f"checkpoint dtype must be one of {DTYPES}, got {dtype!r}")
    _, state = abstract_state(cfg.replace(param_dtype="bfloat16" if dtype == "fp8" else dtype))
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
    return template


def save_checkpoint(path: str | os.PathLike, model: Transformer) -> None:
    """Saves the model's whole state (params and router biases) in cfg.param_dtype. The matmul weights are
    transposed to the stored layout on their devices first (a transient copy of each)."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise CheckpointError(f"{path}: already exists; refusing to overwrite")
    flat = _flat(nnx.to_pure_dict(nnx.state(model)))
    for name, m in matmul_params(model.cfg).items():
        flat[name] = jax.jit(to_stored, static_argnums=1)(flat[name], m)
    os.makedirs(path)
    save_tree(os.path.join(path, STATE_DIR), nest(flat))
    shapes = {n: (tuple(a.shape), str(a.dtype)) for n, a in flat.items()}
    write_metadata(path, metadata(model.cfg, model.cfg.param_dtype, shapes))


def load_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, shardings: ShardingSpec = None,
                    weights: str = "dequantized", **config_overrides) -> Transformer:
    """Restores a k2jax checkpoint as a Transformer.

    shardings: None (with a mesh: replicated on it; without: the default device), a strategy name from
    sharding.rules (e.g. "ep_fsdp"; needs the mesh), a mapping from parameter name to Sharding, or a function
    (name, shape) -> Sharding. Each device reads only its own shard from disk.
    weights: "dequantized" (default): every weight in cfg.param_dtype (an fp8 checkpoint dequantised on the
    devices); "fp8" (an fp8 checkpoint only): the routed experts stay FP8-resident (k2jax.model.fp8_experts): their e4m3
    weights read and transposed on the devices with the parameter's sharding, their block scales with its split
    of the leading (layer, expert) axes and whole along the blocks, never dequantised; every other weight as with
    "dequantized"."""
    check_weights(weights, "load_checkpoint")
    path = os.fspath(path)
    meta = read_metadata(path)
    check_chunks(path)
    stored_dtype = meta["dtype"]
    overrides = {"param_dtype": "bfloat16" if stored_dtype == "fp8" else stored_dtype, **config_overrides}
    cfg = K2Config.from_hf(meta["config"], **overrides)
    graphdef, state = abstract_state(cfg)
    shardings = resolve_shardings(shardings, mesh, nnx.merge(graphdef, state), "load_checkpoint")
    stored = stored_template(cfg, stored_dtype)
    listed = meta["params"]
    if set(listed) != set(stored):
        missing, extra = sorted(set(stored) - set(listed)), sorted(set(listed) - set(stored))
        raise CheckpointError(f"{path}: parameters do not match the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    abstract = _flat(nnx.to_pure_dict(state))
    param_shapes = {n: tuple(a.shape) for n, a in abstract.items()}
    matmuls = matmul_params(cfg)
    fp8 = fp8_params(cfg) if stored_dtype == "fp8" else {}
    if weights == "fp8" and stored_dtype != "fp8":
        raise CheckpointError(f"{path}: weights='fp8' needs an fp8 checkpoint (converted with --dtype fp8); this one "
                              f"is {stored_dtype}: load it with weights='dequantized'")
    resident = resident_names(path, fp8) if weights == "fp8" else ()
    targets, final_shardings = {}, {}
    for name, leaf in stored.items():
        if tuple(listed[name]["shape"]) != tuple(leaf.shape):
            raise CheckpointError(f"{path}: {name} has shape {listed[name]['shape']}, config implies "
                                  f"{list(leaf.shape)}")
        if not name.startswith(SCALES + "."):
            final_shardings[name] = sharding_for(name, param_shapes[name], mesh, shardings)
    for name, leaf in stored.items():
        if name.startswith(SCALES + ".") and name[len(SCALES) + 1:] in resident:  # kept: split like its weight
            weight = name[len(SCALES) + 1:]
            sharding = scale_sharding(final_shardings[weight], len(param_shapes[weight]))
        elif name.startswith(SCALES + "."):  # small: every device of its weight's sharding gets all of it
            sharding = replicated_like(final_shardings[name[len(SCALES) + 1:]])
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
    params, kept = {}, {}
    for name, value in restored.items():
        if name.startswith(SCALES + "."):
            continue
        if name in resident:  # e4m3 and scales transposed to the model's [..., in, out] on the devices
            m, scale = matmuls[name], restored[f"{SCALES}.{name}"]
            value = jax.jit(from_stored, static_argnums=(1, 2), out_shardings=final_shardings[name])(
                value, m, param_shapes[name])
            scale = jax.jit(lambda s: s.swapaxes(-1, -2), out_shardings=scale_sharding(
                final_shardings[name], len(param_shapes[name])))(scale)
            restored[name] = restored[f"{SCALES}.{name}"] = None
            kept[name] = (value, scale)
            params[name] = value  # holds the Param's slot until resident_experts replaces the experts
            continue
        if name in matmuls:  # dequantise (FP8) and transpose on the devices, straight into the final sharding
            scale = restored.get(f"{SCALES}.{name}") if name in fp8 else None
            value = jax.jit(_stored_to_param, static_argnums=(2, 3, 4), out_shardings=final_shardings[name])(
                value, scale, matmuls[name], param_shapes[name], jnp.dtype(abstract[name].dtype))
            restored[name] = None  # the stored copy can go as soon as the parameter exists
        params[name] = value.astype(abstract[name].dtype) if value.dtype != abstract[name].dtype else value
    template = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, _unflat_like(template, params))
    model = nnx.merge(graphdef, state)
    return resident_experts(model, kept) if kept else model


def check_weights(weights: str, caller: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"{caller}: weights must be one of {WEIGHTS}, got {weights!r}")


def resident_names(path: str, fp8: Mapping[str, Matmul]) -> tuple[str, ...]:
    """The routed expert weights weights="fp8" keeps FP8 (`fp8`: the parameters stored FP8): a CheckpointError
    when there are none."""
    if not all(name in fp8 for name in EXPERT_PARAMS):
        raise CheckpointError(f"{path}: weights='fp8' keeps the routed experts FP8, and this model has no FP8 "
                              f"routed experts (no MoE layers): load it with weights='dequantized'")
    return EXPERT_PARAMS


def _stored_to_param(w, scale, m: Matmul, shape: tuple[int, ...], dtype) -> jax.Array:
    if scale is not None:
        w = quant.dequantize_blocks(w, scale, dtype)
    return from_stored(w.astype(dtype), m, shape)
