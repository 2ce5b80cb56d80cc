"""Pipeline parallelism (GPipe over the `stage` axis) equals the unsharded model: loss, gradients, aux; also
combined with expert parallelism and data parallelism on a 2 x 2 x 2 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import tiny
from k2jax.model.placement import shard_model
from k2jax.model.transformer import parallelism
from sharding.mesh import make_mesh
from sharding.pipeline import bubble_fraction, pipeline_scan

CFG = tiny(num_hidden_layers=5)  # 1 dense + 4 MoE layers: 2 or 4 stages


def _loss_and_grads(model, tokens, segment_ids):
    def loss_fn(m):
        logits, aux = m(tokens[:, :-1], segment_ids=segment_ids[:, :-1], return_aux=True)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * (segment_ids[:, 1:] > 0)) / jnp.sum(segment_ids[:, 1:] > 0), aux

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, aux, nnx.to_flat_state(grads)


@pytest.fixture(scope="module")
def reference():
    model = k2jax.Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 21)))
    segments = np.ones((8, 21), np.int32)
    segments[1, 12:], segments[5, 7:], segments[6, 15:] = 2, 0, 0  # packed rows and padding
    segments = jnp.asarray(segments)
    return model, tokens, segments, jax.jit(_loss_and_grads)(model, tokens, segments)


def _check(got, want):
    loss, aux, grads = got
    want_loss, want_aux, want_grads = want
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), np.asarray(want_aux["expert_load"]))
    np.testing.assert_array_equal(np.sort(np.asarray(aux["router_topk_ids"]), -1),
                                  np.sort(np.asarray(want_aux["router_topk_ids"]), -1))
    np.testing.assert_allclose(np.asarray(aux["attn_max_logits"]), np.asarray(want_aux["attn_max_logits"]),
                               rtol=1e-5)
    assert len(grads) == len(want_grads)
    for (path, g), (_, w) in zip(grads, want_grads):
        g, w = np.asarray(g[...]), np.asarray(w[...])
        assert np.max(np.abs(g - w)) <= 1e-5 * max(np.max(np.abs(w)), 1e-30), path


@pytest.mark.parametrize("stages, microbatches, remat", [(2, 4, "none"), (4, 8, "full")])
def test_pipeline_equals_unsharded(reference, stages, microbatches, remat):
    """The pipeline runs the model's own layer step (run_layers), remat included."""
    model, tokens, segments, want = reference
    mesh = make_mesh({"stage": stages, "fsdp": -1})
    sharded = shard_model(model, mesh, "ep_pp")
    sharded.cfg = sharded.cfg.replace(pipeline_microbatches=microbatches, remat=remat)
    for block in [sharded.moe_blocks]:  # the stacked MoE parameters are split over stage
        assert block.self_attn.q_b_proj[...].sharding.spec[0] == "stage"
    with jax.set_mesh(mesh):
        step = jax.jit(_loss_and_grads)
        got = step(sharded, tokens, segments)
        hlo = step.lower(sharded, tokens, segments).as_text()
        jaxpr = str(jax.make_jaxpr(_loss_and_grads)(sharded, tokens, segments))
    assert "collective_permute" in hlo or "collective-permute" in hlo
    assert "shard_map" in jaxpr and ("remat" in jaxpr) == (remat != "none")
    _check(got, want)


def test_expert_pipeline_and_data_parallel_together(reference):
    model, tokens, segments, want = reference
    mesh = make_mesh({"data": 2, "expert": 2, "stage": 2})
    sharded = shard_model(model, mesh, "ep_pp")
    sharded.cfg = sharded.cfg.replace(pipeline_microbatches=2)
    assert parallelism(sharded.cfg, mesh) == {"expert_parallel": 2, "pipeline_stages": 2, "pipeline_microbatches": 2,
                                             "context_parallel": 1}
    with jax.set_mesh(mesh):
        step = jax.jit(_loss_and_grads)
        got = step(sharded, tokens, segments)
        hlo = step.lower(sharded, tokens, segments).as_text()
    assert ("all_to_all" in hlo or "all-to-all" in hlo) and ("collective_permute" in hlo
                                                             or "collective-permute" in hlo)
    _check(got, want)


def test_bubble_fraction_and_errors():
    assert bubble_fraction(4, 4) == 3 / 7 and bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 64) < 0.05
    mesh = make_mesh({"stage": 4, "fsdp": -1})
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match="do not split evenly"):
            pipeline_scan(lambda s, p: (s, None), jnp.zeros((6, 2)), jnp.zeros((4, 2)), num_microbatches=2)
        with pytest.raises(ValueError, match="microbatches"):
            pipeline_scan(lambda s, p: (s, None), jnp.zeros((8, 2)), jnp.zeros((5, 2)), num_microbatches=2)
