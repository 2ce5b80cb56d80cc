"""ZeRO-1: MuonClip's state follows each parameter's sharding and is split further over `data`; a jitted step on
8 devices equals the unsharded step; the 1T model's parameters and optimizer state fit a v5p chip's 95 GiB."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import k2jax
from k2jax.model.config import kimi_k2, tiny
from k2jax.model.placement import abstract_model
from k2jax.model.transformer import param_name
from k2jax.optim.muon_clip import muon_clip, param_rules
from sharding.mesh import abstract_mesh, make_mesh
from sharding.rules import (
    optimizer_state_specs,
    param_shardings,
    total_bytes_per_device,
    tree_bytes_per_device,
    zero1_spec,
)

HBM = 95 * 2**30


def test_zero1_spec():
    mesh_shape = {"data": 2, "expert": 4, "fsdp": 2}
    assert zero1_spec(PartitionSpec(None, "expert", "fsdp", None), (3, 8, 64, 6), mesh_shape) == \
        PartitionSpec(None, "expert", "fsdp", "data")  # the first whole dimension the axis divides
    assert zero1_spec(PartitionSpec(None), (5,), mesh_shape) == PartitionSpec(None)  # nothing divides: replicated
    assert zero1_spec(PartitionSpec("fsdp"), (8,), {"fsdp": 2}) == PartitionSpec("fsdp")  # no data axis


def _step(graphdef, tx):
    def step(params, rest, opt_state, tokens):
        def loss_fn(p):
            logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1], return_aux=True)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, attn_max_logits=aux["attn_max_logits"])
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def test_zero1_step_on_8_devices_equals_unsharded():
    cfg = tiny()
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # adam_eps 1e-3: with 1e-8, Adam turns the rounding noise of near-zero gradients (lm_head rows of tokens that
    # never occur, ~1e-9), which any other reduction order changes, into full-size updates of either sign
    tx = muon_clip(1e-2, rules=param_rules(model), cfg=cfg, qk_clip_tau=5.0, adam_eps=1e-3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)))
    step = _step(graphdef, tx)
    want_params, want_state = params, tx.init(params)
    for _ in range(2):
        want_params, want_state, _ = jax.jit(step)(want_params, rest, want_state, tokens)

    mesh = make_mesh({"data": 2, "expert": 2, "fsdp": 2})
    info = k2jax.param_info(model)
    by_name = param_shardings(info, mesh, "ep_fsdp")
    p_shard = jax.tree_util.tree_map_with_path(lambda path, _: by_name[param_name(path)], params)
    r_shard = jax.tree_util.tree_map_with_path(lambda path, _: by_name[param_name(path)], rest)
    specs = optimizer_state_specs(jax.eval_shape(tx.init, params), info, dict(mesh.shape), "ep_fsdp", param_name)
    s_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    state = jax.jit(tx.init, out_shardings=s_shard)(jax.device_put(params, p_shard))
    flat_specs = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}
    zero1 = [k for k, s in flat_specs.items() if "data" in tuple(s)]
    assert any("moe_blocks" in k and "experts" in k for k in zero1), "expert momentum is not split over data"
    # the sharded step's Newton-Schulz runs layer-sharded (its rules carry the shardings): over fsdp, then data
    layered = muon_clip(1e-2, rules=param_rules(model, by_name), cfg=cfg, qk_clip_tau=5.0, adam_eps=1e-3)
    sharded_step = jax.jit(_step(graphdef, layered), out_shardings=(p_shard, s_shard, None))
    got_params, got_state = jax.device_put(params, p_shard), state
    got_rest = jax.device_put(rest, r_shard)
    for _ in range(2):
        got_params, got_state, _ = sharded_step(got_params, got_rest, got_state, tokens)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_params)[0], jax.tree.leaves(want_params)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30), jax.tree_util.keystr(path)
    leaf = jax.tree.leaves(got_state)
    assert any("data" in tuple(x.sharding.spec) for x in leaf if hasattr(x, "sharding"))


def test_kimi_k2_params_and_optimizer_state_fit_a_v5p_chip():
    """fp32 parameters (master copy) + MuonClip state, planned with eval_shape on 256 and 1024 chip meshes."""
    cfg = kimi_k2(param_dtype="float32")
    abstract = abstract_model(cfg)
    info = k2jax.param_info(abstract)
    params = nnx.state(abstract, nnx.Param)
    tx = muon_clip(1e-3, rules=param_rules(abstract), cfg=cfg)
    state = jax.eval_shape(tx.init, params)
    for axes, chips in (({"expert": 64, "fsdp": 4}, 256), ({"data": 4, "expert": 64, "fsdp": 4}, 1024)):
        mesh_shape = dict(abstract_mesh(axes, chips).shape)
        p_bytes = total_bytes_per_device(info, mesh_shape, "ep_fsdp")
        specs = optimizer_state_specs(state, info, mesh_shape, "ep_fsdp", param_name)
        s_bytes = tree_bytes_per_device(state, specs, mesh_shape)
        replicated = tree_bytes_per_device(state, optimizer_state_specs(state, info, mesh_shape, "ep_fsdp",
                                                                        param_name, zero1=False), mesh_shape)
        print(f"{chips} chips {axes}: params {p_bytes / 2**30:.2f} GiB + optimizer state {s_bytes / 2**30:.2f} GiB"
              f" (without ZeRO-1 {replicated / 2**30:.2f}) per chip")
        assert p_bytes + s_bytes < HBM
        if "data" in axes:
            assert s_bytes < replicated / 3  # ZeRO-1 splits the state 4 ways over data
