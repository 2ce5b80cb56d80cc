"""sharding.per_shard: a function run on each device's block equals the unsharded call, with the blocks laid out
as activations are, inside jit and nested in another shard_map; and the model's Pallas kernels (interpret mode)
under a mesh give the unsharded model's logits, max logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import k2jax
from k2jax.model.config import tiny
from k2jax.model.placement import shard_model
from sharding.mesh import make_mesh
from sharding.per_shard import per_shard


def _rowwise(x_BNT, seg_BT):
    """A per-(example, head) function whose blocks are independent: each row's running sum, plus its segments."""
    return jnp.cumsum(x_BNT, axis=-1) + seg_BT[:, None, :], jnp.max(x_BNT, axis=-1)


def test_per_shard_equals_the_unsharded_call():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 5)), jnp.float32)
    seg = jnp.arange(20, dtype=jnp.float32).reshape(4, 5)
    want = _rowwise(x, seg)
    f = per_shard(_rowwise, in_axes=(("batch", "heads", None), ("batch", None)),
                  out_axes=(("batch", "heads", None), ("batch", "heads")))
    assert all(np.array_equal(a, b) for a, b in zip(f(x, seg), want))  # no mesh: the function itself
    mesh = make_mesh({"data": 2, "tensor": 2, "fsdp": 2})
    with jax.set_mesh(mesh):
        got = jax.jit(f)(x, seg)
        text = jax.jit(f).lower(x, seg).as_text()
        # nested: inside a shard_map over data, only fsdp and tensor are left to map
        nested = jax.jit(jax.shard_map(f, in_specs=(P("data"), P("data")), out_specs=(P("data"), P("data")),
                                       axis_names={"data"}, check_vma=False))(x, seg)
    assert "shard_map" in text or "manual" in text.lower()
    for g, n, w in zip(got, nested, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(n), np.asarray(w))


def test_per_shard_checks_its_arguments():
    with pytest.raises(ValueError, match="2 arguments but 1 in_axes"):
        per_shard(_rowwise, in_axes=(("batch", None, None),), out_axes=("batch",))(jnp.ones((2, 2, 2)),
                                                                                  jnp.ones((2, 2)))
    f = per_shard(_rowwise, in_axes=(("batch", None, None), ("batch", None)),
                  out_axes=(("batch", "heads", None), ("batch", None)))
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 4})), pytest.raises(ValueError, match="name no argument"):
        f(jnp.ones((2, 2, 2)), jnp.ones((2, 2)))


def test_model_kernels_under_a_mesh_equal_unsharded():
    """attention_impl / moe_impl "interpret": the flash-attention and grouped-matmul kernels run per device
    (per_shard; the experts inside EP's shard_map) on 8 devices, against the same model without a mesh."""
    cfg = tiny(attention_impl="interpret", moe_impl="interpret")
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 24)))
    segment_ids = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24, [3] * 20 + [0] * 4, [1] * 24])

    def loss_and_grads(m):
        def loss(m):
            logits, aux = m(tokens, segment_ids=segment_ids, return_aux=True)
            return jnp.sum(jnp.where(segment_ids[..., None] > 0, jnp.sin(logits), 0.0)), (logits, aux)
        grads, (logits, aux) = nnx.grad(loss, has_aux=True)(m)
        return logits, aux["attn_max_logits"], nnx.to_flat_state(grads)

    want_logits, want_max, want_grads = jax.jit(loss_and_grads)(model)
    # EP (experts inside EP's shard_map), batch over expert x fsdp, heads over tensor
    for axes, strategy in (({"expert": 2, "fsdp": 2, "tensor": 2}, "ep_fsdp"),):
        mesh = make_mesh(axes)
        with jax.set_mesh(mesh):
            logits, max_logits, grads = jax.jit(loss_and_grads)(shard_model(model, mesh, strategy))
        real = np.asarray(segment_ids) > 0
        scale = np.max(np.abs(np.asarray(want_logits)[real]))
        assert np.max(np.abs(np.asarray(logits)[real] - np.asarray(want_logits)[real])) <= 1e-5 * scale, axes
        np.testing.assert_allclose(np.asarray(max_logits), np.asarray(want_max), rtol=1e-5)
        for (path, g), (_, w) in zip(grads, want_grads):
            g, w = np.asarray(g[...]), np.asarray(w[...])
            assert np.max(np.abs(g - w)) <= 1e-5 * max(np.max(np.abs(w)), 1e-30), (axes, path)
