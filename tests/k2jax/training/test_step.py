"""The train step: gradient accumulation equals one big batch, remat changes nothing, a bad step changes
nothing; the weighted loss (chat data's loss weights) equals the masked loss by hand, masked-out tokens get exactly
zero gradient, and packed weighted rows over 8 devices equal the unpacked conversations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import tiny
from k2jax.optim.muon_clip import muon_clip, param_rules
from k2jax.training import step as step_module
from k2jax.training.step import TrainState, make_train_step, token_nll

CFG = tiny(num_hidden_layers=2)


def _batch(rows=4, T=17, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((rows, T), np.int32)
    seg[0, 9:], seg[2, 12:] = 2, 0  # packed and padded rows
    pos = np.concatenate([np.arange(9), np.arange(8)])[None].repeat(rows, 0).astype(np.int32)
    pos[1:] = np.arange(T)
    return {"tokens": jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, T)), jnp.int32),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def _run(cfg, grad_accum, batch, steps=2):
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    tx = muon_clip(1e-2, rules=param_rules(model), cfg=cfg, adam_eps=1e-3)
    state = TrainState.create(model, tx)
    step = jax.jit(make_train_step(state.graphdef, tx, grad_accum=grad_accum))
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        out.append(metrics)
    return state, out


def _close(a, b, rel=1e-5):
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.max(np.abs(x - y)) <= rel * max(np.max(np.abs(y)), 1e-30), jax.tree_util.keystr(p)


def test_gradient_accumulation_equals_one_big_batch():
    batch = _batch()
    one, m1 = _run(CFG, 1, batch, steps=1)
    two, m2 = _run(CFG, 2, batch, steps=1)
    for a, b in zip(m1, m2):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(a["loss"]))
        assert int(a["tokens"]) == int(b["tokens"]) == 4 * 16 - 1 - 5  # segment boundary and padding masked
        np.testing.assert_allclose(np.asarray(a["attn_max_logit"]), np.asarray(b["attn_max_logit"]), rtol=1e-5)
    _close(two.params, one.params)
    _close(two.rest, one.rest)  # router biases moved by the summed expert loads
    with pytest.raises(ValueError, match="grad_accum"):
        _run(CFG, 3, batch)


def test_remat_changes_nothing():
    one_plain_step, _ = _run(CFG, 1, _batch(), steps=1)
    rematted, _ = _run(CFG.replace(remat="full"), 1, _batch(), steps=1)
    _close(rematted.params, one_plain_step.params)


def test_a_non_finite_step_changes_nothing(monkeypatch):
    real_loss = step_module.next_token_loss

    def poisoned(model, batch):  # a NaN planted in the loss, and so in every gradient
        loss_sum, rest = real_loss(model, batch)
        return loss_sum * jnp.nan, rest

    monkeypatch.setattr(step_module, "next_token_loss", poisoned)
    batch = _batch()
    state, metrics = _run(CFG, 1, batch, steps=1)
    fresh = TrainState.create(k2jax.Transformer(CFG, rngs=nnx.Rngs(0)), muon_clip(
        1e-2, rules=param_rules(k2jax.Transformer(CFG, rngs=nnx.Rngs(0))), cfg=CFG))
    assert not bool(metrics[0]["finite"]) and int(state.step) == 0
    _close(state.params, fresh.params, rel=0)


def test_token_nll_and_its_gradient_equal_log_softmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 7, 33)) * 5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 33, (2, 7)))

    def reference(l):
        return -jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1), targets[..., None], axis=-1)[..., 0]

    np.testing.assert_allclose(np.asarray(token_nll(logits, targets)), np.asarray(reference(logits)),
                               rtol=1e-6, atol=1e-6)
    weights = jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)
    got = jax.grad(lambda l: jnp.sum(token_nll(l, targets) * weights))(logits)
    want = jax.grad(lambda l: jnp.sum(reference(l) * weights))(logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert token_nll(logits.astype(jnp.bfloat16), targets).dtype == jnp.float32


def test_chunked_loss_equals_whole_logits_and_gradients():
    """The loss over 4 pieces of 16 positions equals token_nll of the whole [B, T, V] logits, value and gradient
    with respect to the hidden states and the model's weights."""
    from k2jax.training.step import chunked_token_nll
    model = k2jax.Transformer(tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 64, model.cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 64)), jnp.int32)

    def run(chunk):
        def loss(m, h):
            return jnp.sum(chunked_token_nll(m, h, targets, chunk=chunk) * jnp.arange(64))
        value, (g_model, g_hidden) = nnx.value_and_grad(loss, argnums=(0, 1))(model, hidden)
        return value, [g_hidden] + jax.tree.leaves(nnx.state(g_model))

    (got, got_grads), (want, want_grads) = run(16), run(64)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    assert len(got_grads) == len(want_grads) > 1
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_chunked_loss_under_context_parallelism_runs_each_part_on_its_devices():
    """A context axis of 4 splits each row of 64 positions in 4 parts: pieces of 8 positions of every part at
    once, each device its own part's (no all-gather of the hidden states), the same loss and gradients as the
    whole logits without a mesh."""
    import re

    from k2jax.model.placement import shard_model
    from k2jax.training.step import chunked_token_nll
    from sharding.mesh import make_mesh
    from sharding.rules import ACTIVATION_BTD, constrain
    model = k2jax.Transformer(tiny(), rngs=nnx.Rngs(0))
    D, rng = model.cfg.hidden_size, np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 64, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 64)), jnp.int32)

    def run(m, h, chunk):
        def loss(m, h):
            return jnp.sum(chunked_token_nll(m, constrain(h, ACTIVATION_BTD), targets, chunk=chunk) * jnp.arange(64))
        value, (g_model, g_hidden) = nnx.value_and_grad(loss, argnums=(0, 1))(m, h)
        return value, [g_hidden] + jax.tree.leaves(nnx.state(g_model))

    want, want_grads = jax.jit(run, static_argnums=2)(model, hidden, 64)
    mesh = make_mesh({"context": 4, "expert": 2})
    sharded = shard_model(model, mesh, "ep_fsdp")
    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(run, static_argnums=2)(sharded, hidden, 8)
        hlo = jax.jit(run, static_argnums=2).lower(sharded, hidden, 8).compile().as_text()
    assert not re.findall(rf"= f32\[[\d,]+,{D}\]\S* all-gather", hlo)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    assert len(got_grads) == len(want_grads) > 1
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def _weights(batch, seed=1):
    """0/1 loss weights for a batch (about half the tokens trained), as chat data carries them."""
    rng = np.random.default_rng(seed)
    return {**batch, "loss_weights": jnp.asarray(rng.integers(0, 2, batch["tokens"].shape), jnp.float32)}


@pytest.fixture(scope="module")
def model():
    return k2jax.Transformer(CFG, rngs=nnx.Rngs(0))


def test_the_weighted_loss_equals_the_masked_loss_by_hand(model):
    from k2jax.training.step import next_token_loss
    batch = _weights(_batch())

    def both(m, b):
        return next_token_loss(m, b), m(b["tokens"][:, :-1], segment_ids=b["segment_ids"][:, :-1],
                                        positions=b["positions"][:, :-1])

    (loss_sum, (weight, aux)), logits = nnx.jit(both)(model, batch)
    tokens, seg, w = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "loss_weights"))
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32))), tokens[:, 1:, None],
                              -1)[..., 0]
    within = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    trained = within & (w[:, 1:] > 0)
    assert 0 < trained.sum() < within.sum()
    assert abs(float(loss_sum / weight) - nll[trained].mean()) <= 1e-6 * nll[trained].mean()
    assert (int(aux["tokens"]), int(aux["trained_tokens"]), float(weight)) == (within.sum(), trained.sum(),
                                                                              trained.sum())


def test_the_logits_of_masked_out_tokens_get_exactly_zero_gradient(model):
    """Through the chunked loss (4 pieces of 16 positions): the final hidden states, so the logits, of a position of
    weight 0 get exactly 0 gradient; the trained ones do get some. (The whole step with every weight 0: below.)"""
    from k2jax.training.step import weighted_nll_sum
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 64, model.cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 64)), jnp.int32)
    weights = rng.integers(0, 2, (2, 64)).astype(np.float32)
    grad = np.asarray(nnx.jit(nnx.grad(lambda h, m: weighted_nll_sum(m, h, targets, jnp.asarray(weights))))(
        hidden, model))
    assert np.all(grad[weights == 0] == 0.0)
    assert np.all(np.abs(grad[weights == 1]).max(-1) > 0)


def _keep_gradients():
    """An 'optimizer' that changes nothing and keeps the step's gradients as its state."""
    def update(grads, state, params=None, **extra):
        return jax.tree.map(jnp.zeros_like, grads), grads
    return optax.GradientTransformationExtraArgs(lambda params: jax.tree.map(jnp.zeros_like, params), update)


def _pack(convs, rows: int, row_len: int, first_fit: bool = True) -> dict:
    """Conversations [(tokens, weights)] packed first-fit into `rows` rows of row_len tokens, padded (or one per
    row)."""
    packed = {k: np.zeros((rows, row_len), dt) for k, dt in (("tokens", np.int32), ("segment_ids", np.int32),
                                                            ("positions", np.int32), ("loss_weights", np.float32))}
    fill = np.zeros(rows, int)
    for i, (toks, w) in enumerate(convs):
        r = int(np.argmax(fill + toks.size <= row_len)) if first_fit else i  # the first row with room
        assert fill[r] + toks.size <= row_len
        at = slice(fill[r], fill[r] + toks.size)
        packed["tokens"][r, at], packed["loss_weights"][r, at], packed["positions"][r, at] = toks, w, np.arange(
            toks.size)
        packed["segment_ids"][r, at] = packed["segment_ids"][r].max() + 1
        fill[r] += toks.size
    return packed


def test_packed_weighted_rows_across_8_devices_equal_the_unpacked_conversations(model):
    """Conversations of 6..20 tokens with 0/1 weights, packed first-fit into 8 rows of 33 tokens (padded) and split
    over 8 devices, give the loss, token counts and gradients of the same conversations one per row on one
    device: the step's loss is the weighted mean over every device's trained tokens. With every weight 0 the
    step's loss and every gradient are exactly 0."""
    rng = np.random.default_rng(3)
    convs = [(rng.integers(0, CFG.vocab_size, n), rng.integers(0, 2, n).astype(np.float32))
             for n in rng.integers(6, 21, 14)]
    packed = _pack(convs, 8, 33)
    assert (packed["segment_ids"].max(1) >= 2).sum() >= 4 and (packed["segment_ids"] == 0).any()
    unpacked = _pack(convs, len(convs), max(t.size for t, _ in convs), first_fit=False)
    tx = _keep_gradients()
    state = TrainState.create(model, tx)
    step = jax.jit(make_train_step(state.graphdef, tx))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    with jax.set_mesh(mesh):
        got, got_m = step(state, jax.device_put(packed, rows))
        none, none_m = step(state, jax.device_put({**packed, "loss_weights": np.zeros((8, 33), np.float32)}, rows))
    want, want_m = step(state, unpacked)
    for k in ("tokens", "trained_tokens"):
        assert int(got_m[k]) == int(want_m[k])
    assert int(got_m["trained_tokens"]) == int(sum(w[1:].sum() for _, w in convs))
    assert abs(float(got_m["loss"]) - float(want_m["loss"])) <= 1e-5 * abs(float(want_m["loss"]))
    _close(got.opt_state, want.opt_state, rel=1e-4)
    assert float(none_m["loss"]) == 0.0 and int(none_m["trained_tokens"]) == 0
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(none.opt_state))
