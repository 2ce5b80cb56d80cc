"""Context parallelism (a row's sequence split over `context`, the latent all-gathered, the striped order) equals
the unsharded model on packed rows: logits, each head's max logit, expert loads, loss and gradients; with expert
parallelism and FSDP on the other axes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import tiny
from k2jax.model.placement import shard_model
from k2jax.model.transformer import parallelism
from sharding.context_parallel import from_context_order, to_context_order
from sharding.mesh import make_mesh
from sharding.rules import partition_spec

CFG = tiny()
T = 24


def test_striped_order_gives_shard_r_the_tokens_r_r_plus_n_and_back():
    x = np.arange(2 * T).reshape(2, T)
    for n in (2, 4):
        striped = np.asarray(to_context_order(jnp.asarray(x), n))
        for r in range(n):  # contiguous shard r of the striped row
            np.testing.assert_array_equal(striped[:, r * T // n:(r + 1) * T // n], x[:, r::n])
        np.testing.assert_array_equal(np.asarray(from_context_order(jnp.asarray(striped), n)), x)
    with pytest.raises(ValueError, match="do not split over the context axis"):
        to_context_order(jnp.zeros((1, 10)), 4)


def test_the_rules_split_weights_over_context_too():
    """Hidden axes over fsdp x context (x expert with EP): the context axis holds different tokens, not copies."""
    mesh = {"fsdp": 2, "expert": 2, "context": 2}
    assert partition_spec((64, 32), ("embed", "q_lora"), mesh, "ep_fsdp") == jax.sharding.PartitionSpec(
        ("fsdp", "expert", "context"), None)
    assert partition_spec((16, 64, 32), ("expert", "embed", "moe_mlp"), mesh, "ep_fsdp") == \
        jax.sharding.PartitionSpec("expert", ("fsdp", "context"), None)
    assert partition_spec((64, 96), ("embed", "mlp"), {"context": 4}, "fsdp") == jax.sharding.PartitionSpec(
        "context", None)


def _rows():
    """Two packed rows: segments crossing every shard boundary, a short one, padding (segment 0) at the end."""
    seg = np.array([[1] * 7 + [2] * 11 + [3] * 6, [4] * 3 + [5] * 15 + [0] * 6], np.int32)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, T))
    return jnp.asarray(tokens), jnp.asarray(seg)


def _loss_and_grads(model, tokens, seg):
    """Next-token loss within segments (as the train step weighs it), from logits; its gradients."""
    def loss_fn(m):
        logits, aux = m(tokens, segment_ids=seg, return_aux=True)
        within = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits[:, :-1], -1) - jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * within) / jnp.sum(within), (logits, aux)

    (loss, (logits, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, aux, nnx.to_flat_state(grads)


@pytest.fixture(scope="module")
def reference():
    model = k2jax.Transformer(CFG, rngs=nnx.Rngs(0))
    tokens, seg = _rows()
    return model, tokens, seg, jax.jit(_loss_and_grads)(model, tokens, seg)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize("axes", [{"context": 2, "expert": 2, "fsdp": 2}, {"context": 4, "expert": 2},
                                  {"context": 4, "fsdp": 2}], ids=["cp2_ep2_fsdp2", "cp4_ep2", "cp4_fsdp2"])
def test_context_parallel_model_equals_unsharded(reference, axes):
    model, tokens, seg, (want_loss, want_logits, want_aux, want_grads) = reference
    mesh = make_mesh(axes)
    sharded = shard_model(model, mesh, "ep_fsdp" if "expert" in axes else "fsdp")
    assert parallelism(CFG, mesh)["context_parallel"] == axes["context"]
    with jax.set_mesh(mesh):
        step = jax.jit(_loss_and_grads)
        loss, logits, aux, grads = step(sharded, tokens, seg)
        hlo = step.lower(sharded, tokens, seg).compile().as_text()
    # attention's exchange is the latent (kv_lora + rope values a token) and the segment ids, never per-head keys or
    # values: [b, t, n, X] float, [b, t, n] int
    latent = CFG.kv_lora_rank + CFG.qk_rope_head_dim
    gathered = re.findall(r"= (\w+)\[([\d,]+)\]\S* all-gather(?:-start)?\(.*attention\)?/shard_map/all_gather", hlo)
    assert {(dtype, tuple(shape.split(",")[2:])) for dtype, shape in gathered} == {
        ("f32", (str(axes["context"]), str(latent))), ("s32", (str(axes["context"]),))}, gathered
    assert _rel(logits, want_logits) <= 1e-5
    assert _rel(loss, want_loss) <= 1e-5
    np.testing.assert_allclose(np.asarray(aux["attn_max_logits"]), np.asarray(want_aux["attn_max_logits"]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), np.asarray(want_aux["expert_load"]))
    np.testing.assert_array_equal(np.sort(np.asarray(aux["router_topk_ids"]), -1),
                                  np.sort(np.asarray(want_aux["router_topk_ids"]), -1))
    for (path, g), (_, w) in zip(grads, want_grads):
        assert _rel(g[...], w[...]) <= 1e-5, path


def test_rows_that_do_not_split_over_the_context_axis_fail_clearly(reference):
    model, _, _, _ = reference
    mesh = make_mesh({"context": 4, "fsdp": 2})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="22 tokens per row do not split over the context axis"):
        jax.eval_shape(lambda m, t: m(t), model, jnp.zeros((2, 22), jnp.int32))


def test_the_attention_kernel_under_context_parallelism_equals_unsharded(reference):
    """The Pallas kernel (interpret mode) per device inside the context shard_map: each shard's striped queries over
    the gathered row (the kernel's stride), rows split over expert."""
    _, tokens, seg, (want_loss, want_logits, want_aux, want_grads) = reference
    model = k2jax.Transformer(CFG.replace(attention_impl="interpret"), rngs=nnx.Rngs(0))  # the same weights
    mesh = make_mesh({"context": 4, "expert": 2})
    sharded = shard_model(model, mesh, "ep_fsdp")
    with jax.set_mesh(mesh):
        loss, logits, aux, grads = jax.jit(_loss_and_grads)(sharded, tokens, seg)
    assert _rel(logits, want_logits) <= 1e-5 and _rel(loss, want_loss) <= 1e-5
    np.testing.assert_allclose(np.asarray(aux["attn_max_logits"]), np.asarray(want_aux["attn_max_logits"]), rtol=1e-5)
    for (path, g), (_, w) in zip(grads, want_grads):
        assert _rel(g[...], w[...]) <= 1e-5, path


def test_attention_splits_the_heads_into_the_fewest_groups_whose_keys_and_values_fit():
    """cfg.run.attention_kv_bytes bounds one group's expanded keys and values of the gathered row: tiny's 4 heads of
    16 + 16 float32 values a key position take 128 bytes per head and position."""
    from k2jax.model.attention import MLAttention
    for kv_bytes, groups in [(1 << 20, 1), (2 * 128 * 24, 2), (128 * 24, 4), (1, 4)]:
        attn = MLAttention(CFG.replace(attention_kv_bytes=kv_bytes), rngs=nnx.Rngs(0))
        with jax.set_mesh(make_mesh({"context": 4, "expert": 2})):
            assert attn._head_groups(24) == groups, kv_bytes
        with jax.set_mesh(make_mesh({"context": 2, "tensor": 2, "expert": 2})):  # a group: whole heads per device
            assert attn._head_groups(24) == min(groups, 2), kv_bytes
    with pytest.raises(Exception, match="attention_kv_bytes must be a positive int"):
        CFG.replace(attention_kv_bytes=0)


@pytest.mark.parametrize("axes,kv_bytes,impl", [({"context": 4, "expert": 2}, 128 * 24, "xla"),
                                                ({"context": 2, "expert": 2, "fsdp": 2}, 2 * 128 * 24, "xla"),
                                                ({"context": 4, "expert": 2}, 2 * 128 * 24, "interpret")],
                         ids=["cp4_ep2_1head", "cp2_ep2_fsdp2_2heads", "cp4_ep2_2heads_kernel"])
def test_context_parallel_attention_by_head_groups_equals_unsharded(reference, axes, kv_bytes, impl):
    """Heads attended one group at a time (each group's keys and values expanded from the gathered latent and
    recomputed in the backward pass): logits, max logits, loss and gradients as the unsharded model's."""
    _, tokens, seg, (want_loss, want_logits, want_aux, want_grads) = reference
    cfg = CFG.replace(attention_kv_bytes=kv_bytes, attention_impl=impl)
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))  # the reference's weights
    mesh = make_mesh(axes)
    sharded = shard_model(model, mesh, "ep_fsdp")
    with jax.set_mesh(mesh):
        assert model.moe_blocks.self_attn._head_groups(T) > 1  # b rows x T keys: at least T
        loss, logits, aux, grads = jax.jit(_loss_and_grads)(sharded, tokens, seg)
    assert _rel(logits, want_logits) <= 1e-5 and _rel(loss, want_loss) <= 1e-5
    np.testing.assert_allclose(np.asarray(aux["attn_max_logits"]), np.asarray(want_aux["attn_max_logits"]), rtol=1e-5)
    for (path, g), (_, w) in zip(grads, want_grads):
        assert _rel(g[...], w[...]) <= 1e-5, path
