"""A K2 model built abstractly or on a mesh with one of sharding/rules.py's strategies: the one place that does.

    model = abstract_model(cfg)                             # no memory: ShapeDtypeStructs (nnx.eval_shape)
    model = abstract_model(cfg, mesh, "ep_fsdp")            # ... each with its NamedSharding (AOT compiles)
    model = abstract_model(cfg, expert_format="int4")       # any expert weight format (k2jax.model.experts)
    model = init_sharded(cfg, mesh, "ep_fsdp", seed=0)      # random init, each device builds only its shards
    model = shard_model(model, mesh, "ep_fsdp")             # an existing model, moved onto the mesh
    shardings = param_shardings_for(cfg, mesh, "ep_fsdp")   # {parameter name: NamedSharding}
    state_shardings(state, shardings)                       # those shardings laid over an nnx.State

Converted checkpoints load straight onto a mesh with `k2jax.load_checkpoint(path, mesh=mesh, shardings=...)`.
"""

from __future__ import annotations

import jax
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.transformer import Transformer, param_info, param_name
from pallas_kernels.int4_grouped_matmul import GROUP_SIZE
from sharding.rules import param_shardings


def _build(cfg: K2Config, seed: int, expert_format: str, expert_group_size: int) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed), expert_format=expert_format, expert_group_size=expert_group_size)


def abstract_model(cfg: K2Config, mesh: jax.sharding.Mesh | None = None, strategy: str | None = None, *,
                   expert_format: str = "plain", expert_group_size: int = GROUP_SIZE, seed: int = 0) -> Transformer:
    """A Transformer whose variables are ShapeDtypeStructs (any size, no memory); with a mesh and strategy each
    carries its NamedSharding per the rules: what an ahead-of-time compile lowers the model's programs for (the
    mesh's devices may be deviceless)."""
    abstract = nnx.eval_shape(lambda: _build(cfg, seed, expert_format, expert_group_size))
    if mesh is None:
        return abstract
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, param_shardings(param_info(abstract), mesh, strategy))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return nnx.merge(graphdef, state)


def state_shardings(state, by_name: dict):
    """by_name {parameter name: sharding} laid over `state` (an nnx.State, or any tree whose paths name the
    parameters: k2jax.model.transformer.param_name)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: by_name[param_name(path)], state)


def param_shardings_for(cfg: K2Config, mesh: jax.sharding.Mesh, strategy: str, *, expert_format: str = "plain",
                        expert_group_size: int = GROUP_SIZE) -> dict:
    """{parameter name: NamedSharding} of the model per `strategy` on `mesh`."""
    abstract = abstract_model(cfg, expert_format=expert_format, expert_group_size=expert_group_size)
    return param_shardings(param_info(abstract), mesh, strategy)


def init_sharded(cfg: K2Config, mesh: jax.sharding.Mesh, strategy: str, *, seed: int = 0,
                 expert_format: str = "plain", expert_group_size: int = GROUP_SIZE) -> Transformer:
    """A random Transformer created directly in its shards (jit with out_shardings: no full copy anywhere)."""
    abstract = abstract_model(cfg, mesh, strategy, expert_format=expert_format, expert_group_size=expert_group_size,
                              seed=seed)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    state = jax.jit(lambda: nnx.state(_build(cfg, seed, expert_format, expert_group_size)),
                    out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: Transformer, mesh: jax.sharding.Mesh, strategy: str) -> Transformer:
    """The same model with every parameter placed per `strategy` on `mesh`."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, param_shardings(param_info(model), mesh, strategy))
    return nnx.merge(graphdef, jax.device_put(state, shardings))
