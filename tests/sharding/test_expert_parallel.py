"""Expert parallelism (shard_map + ragged all-to-all) equals the unsharded model: logits, gradients, loads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.config import tiny
from k2jax.placement import init_sharded, shard_model
from sharding.expert_parallel import ragged_all_to_all
from sharding.mesh import make_mesh

CFG = tiny()


def test_ragged_all_to_all_on_cpu_keeps_the_contract():
    """The CPU exchange against a plain-Python reading of jax.lax.ragged_all_to_all's contract."""
    n, rows, out_rows, D = 4, 10, 24, 3
    rng = np.random.default_rng(0)
    send = rng.integers(0, 4, (n, n))  # send[i, j]: rows device i sends to device j
    send[1] = [0, 0, 9, 0]              # one device sends everything to one place
    in_off = np.cumsum(send, 1) - send
    out_off = np.cumsum(send, 0) - send   # receiver j stacks sources in order
    x = rng.standard_normal((n, rows, D)).astype(np.float32)
    want = np.full((n, out_rows, D), -1.0, np.float32)
    for i in range(n):
        for j in range(n):
            want[j, out_off[i, j]:out_off[i, j] + send[i, j]] = x[i, in_off[i, j]:in_off[i, j] + send[i, j]]
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    spec = jax.sharding.PartitionSpec("expert")
    f = jax.jit(jax.shard_map(
        lambda x, a, b, c, d: ragged_all_to_all(x[0], jnp.full((out_rows, D), -1.0), a[0], b[0], c[0], d[0],
                                                axis_name="expert", impl="all_to_all")[None],
        mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))
    got = f(x, in_off, send, out_off, send.T.copy())
    np.testing.assert_array_equal(np.asarray(got), want)


def _loss_and_grads(model, tokens):
    def loss_fn(m):
        logits, aux = m(tokens, return_aux=True)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), (logits, aux)

    (loss, (logits, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return logits, aux, nnx.to_flat_state(grads)


@pytest.fixture(scope="module")
def reference():
    model = k2jax.Transformer(CFG, rngs=nnx.Rngs(0))
    # uneven routing: a bias that herds tokens to a few experts and starves others
    bias = np.zeros(CFG.n_routed_experts, np.float32)
    bias[[1, 6]], bias[[0, 9, 13]] = 0.5, -0.5
    model.moe_blocks.mlp.gate.e_score_correction_bias[...] = jnp.broadcast_to(bias, (CFG.num_moe_layers, len(bias)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 24)))
    return model, tokens, jax.jit(_loss_and_grads)(model, tokens)


@pytest.mark.parametrize("axes", [{"expert": 2, "fsdp": 4}, {"expert": 4, "data": 2}, {"expert": 8}])
def test_expert_parallel_model_equals_unsharded(reference, axes):
    model, tokens, (want_logits, want_aux, want_grads) = reference
    load = np.asarray(want_aux["expert_load"])
    assert (load == 0).any() and load.max() > 3 * load.mean()  # uneven, with idle experts
    mesh = make_mesh(axes)
    sharded = shard_model(model, mesh, "ep_fsdp")
    with jax.set_mesh(mesh):
        step = jax.jit(_loss_and_grads)
        logits, aux, grads = step(sharded, tokens)
        hlo = step.lower(sharded, tokens).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo  # the exchange really ran
    scale = np.max(np.abs(np.asarray(want_logits)))
    assert np.max(np.abs(np.asarray(logits) - np.asarray(want_logits))) <= 1e-5 * scale
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load)
    for (path, g), (_, w) in zip(grads, want_grads):
        g, w = np.asarray(g[...]), np.asarray(w[...])
        assert np.max(np.abs(g - w)) <= 1e-5 * max(np.max(np.abs(w)), 1e-30), path


def test_init_sharded_builds_the_same_model_in_shards():
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    sharded = init_sharded(CFG, mesh, "ep_fsdp", seed=3)
    plain = k2jax.Transformer(CFG, rngs=nnx.Rngs(3))
    w = sharded.moe_blocks.mlp.experts.down_proj[...]
    assert w.sharding.spec[1] == "expert" and len(w.addressable_shards) == 8
    assert w.addressable_shards[0].data.size == w.size // 8
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
