"""Putting a K2 model on a mesh with one of sharding/rules.py's strategies.

    model = init_sharded(cfg, mesh, "ep_fsdp", seed=0)     # random init, each device builds only its shards
    model = shard_model(model, mesh, "ep_fsdp")            # an existing model, moved onto the mesh
    shardings = param_shardings_for(cfg, mesh, "ep_fsdp")  # {parameter name: NamedSharding}
    model = abstract_model(cfg, mesh, "ep_fsdp")           # no memory: ShapeDtypeStructs with their shardings

Converted checkpoints load straight onto a mesh with `k2jax.load_checkpoint(path, mesh=mesh, shardings=...)`.
"""

from __future__ import annotations

import jax
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.transformer import Transformer, param_info, param_name
from sharding.rules import param_shardings


def param_shardings_for(cfg: K2Config, mesh: jax.sharding.Mesh, strategy: str) -> dict:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return param_shardings(param_info(abstract), mesh, strategy)


def _state_shardings(state: nnx.State, by_name: dict) -> nnx.State:
    return jax.tree_util.tree_map_with_path(lambda path, _: by_name[param_name(path)], state)


def init_sharded(cfg: K2Config, mesh: jax.sharding.Mesh, strategy: str, *, seed: int = 0) -> Transformer:
    """A random Transformer created directly in its shards (jit with out_shardings: no full copy anywhere)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = _state_shardings(abstract_state, param_shardings(param_info(abstract), mesh, strategy))
    state = jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: K2Config, mesh: jax.sharding.Mesh, strategy: str) -> Transformer:
    """A Transformer whose variables are ShapeDtypeStructs carrying their NamedShardings per `strategy`: what an
    ahead-of-time compile lowers the model's programs for (any size, no memory; mesh devices may be deviceless)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = _state_shardings(state, param_shardings(param_info(abstract), mesh, strategy))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return nnx.merge(graphdef, state)


def shard_model(model: Transformer, mesh: jax.sharding.Mesh, strategy: str) -> Transformer:
    """The same model with every parameter placed per `strategy` on `mesh`."""
    graphdef, state = nnx.split(model)
    shardings = _state_shardings(state, param_shardings(param_info(model), mesh, strategy))
    return nnx.merge(graphdef, jax.device_put(state, shardings))
