"""Properties of k2jax.Transformer that need no oracle: causality, packing, aux shapes, input checks, axes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
import sharding
from k2jax.model.config import tiny
from k2jax.model.target import Target
from k2jax.model.transformer import segment_positions
from tests.oracle import random_release_tensors

CFG = tiny()


@pytest.fixture(scope="module")
def model():
    return k2jax.from_hf_tensors(CFG, random_release_tensors(CFG, seed=11))


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape))


def _assert_grads_close(grads, want_grads):
    """Every parameter's gradient (nnx flat states) within 1e-5 of the largest |want| of that parameter: the
    losses sum over every token, so float32 reassociation reaches ~1e-6."""
    for (path, g), (_, want) in zip(grads, want_grads, strict=True):
        g, want = np.asarray(g[...]), np.asarray(want[...])
        assert np.max(np.abs(g - want)) <= 1e-5 * max(np.max(np.abs(want)), 1e-30), path


def test_changing_a_future_token_changes_no_past_logit(model):
    tokens = _tokens((2, 36))
    cut = 20
    changed = tokens.at[:, cut].set((tokens[:, cut] + 1) % CFG.vocab_size)
    a, b = np.asarray(model(tokens)), np.asarray(model(changed))
    # Past logits equal up to float32 reassociation: the changed token's routing changes the expert groups' sizes,
    # hence how the CPU grouped FFN tiles the other rows (16/64/128-row matmuls round differently on some CPUs).
    # A leak from the future moves them by far more (the change moves future logits by > 1e-3).
    assert np.max(np.abs(a[:, :cut] - b[:, :cut])) <= 1e-6 * np.max(np.abs(a))
    assert np.max(np.abs(a[:, cut:] - b[:, cut:])) > 1e-3


def test_packed_sequences_equal_separate_runs(model):
    """Three sequences packed in one row (segment ids) against the same three as separate rows of one batch
    (right-padded: causal attention keeps padding out of every real token's view; dropless routing is per token)."""
    lengths = (13, 21, 6)
    seqs = [_tokens((1, n), seed=i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(seqs, axis=1)
    segment_ids = jnp.concatenate([jnp.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    logits, aux = model(packed, segment_ids=segment_ids, return_aux=True)
    rows = jnp.concatenate([jnp.pad(seq, ((0, 0), (0, max(lengths) - n))) for seq, n in zip(seqs, lengths)])
    alone, alone_aux = model(rows, return_aux=True)
    start = 0
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits[0, start:start + n]), np.asarray(alone[i, :n]), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(np.asarray(aux["router_topk_ids"][:, 0, start:start + n]),
                                      np.asarray(alone_aux["router_topk_ids"][:, i, :n]))
        start += n


def test_positions_feed_rope_relatively(model):
    """RoPE sees only relative positions: a uniform shift keeps the logits, a stretch changes them."""
    tokens = _tokens((1, 24))
    base = np.asarray(model(tokens))
    same = np.asarray(model(tokens, positions=jnp.arange(24)[None]))
    shifted = np.asarray(model(tokens, positions=jnp.arange(24)[None] + 40))
    stretched = np.asarray(model(tokens, positions=jnp.arange(24)[None] * 2))
    np.testing.assert_array_equal(base, same)
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(stretched - base)) > 1e-2


def test_padding_is_left_out_of_aux(model):
    tokens = _tokens((2, 24))
    segment_ids = jnp.ones((2, 24), jnp.int32).at[1, 16:].set(0)
    _, aux = model(tokens, segment_ids=segment_ids, return_aux=True)
    assert int(aux["expert_load"][0].sum()) == (24 + 16) * CFG.num_experts_per_tok
    _, real_aux = model(tokens[:1], return_aux=True)
    assert aux["attn_max_logits"].shape == (CFG.num_hidden_layers, CFG.num_attention_heads)
    assert np.all(np.isfinite(np.asarray(aux["attn_max_logits"])))
    assert np.all(np.asarray(aux["attn_max_logits"]) >= np.asarray(real_aux["attn_max_logits"]) - 1e-6)


def test_segment_positions_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(np.asarray(segment_positions(seg)), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_jit_matches_eager(model):
    tokens = _tokens((2, 16))

    @nnx.jit
    def fwd(m, t):
        return m(t)

    jitted, eager = np.asarray(fwd(model, tokens)), np.asarray(model(tokens))
    assert np.max(np.abs(jitted - eager)) <= 1e-5 * np.max(np.abs(eager))


def test_gradients_flow_to_every_param_but_the_router_bias(model):
    tokens = _tokens((2, 16))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(np.asarray(g))), path
        assert np.any(np.asarray(g) != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert not any("e_score_correction_bias" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def test_profiles_and_remat_policies_see_k2_names(model):
    """jax.named_scope on the blocks (a profile's op names) and checkpoint_name on the activations a remat policy
    may keep."""
    graphdef, state = nnx.split(model)
    traced = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).trace(state, _tokens((1, 8)))
    text = traced.lower().as_text(debug_info=True)
    for scope in ("attention", "router", "experts", "shared_experts"):
        assert re.search(rf'[/"]{scope}/', text), scope
    assert "name=attention_out" in str(traced.jaxpr) and "name=ffn_out" in str(traced.jaxpr)


@pytest.mark.parametrize("bad, match", [
    (dict(tokens=jnp.zeros((4,), jnp.int32)), "int array \\[B, T\\]"),
    (dict(tokens=jnp.zeros((1, 4), jnp.float32)), "int array"),
    (dict(tokens=jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.ones((1, 5), jnp.int32)), "segment_ids"),
    (dict(tokens=jnp.zeros((1, 4), jnp.int32), positions=jnp.ones((2, 4), jnp.int32)), "positions"),
])
def test_bad_inputs_fail_clearly(model, bad, match):
    tokens = bad.pop("tokens")
    with pytest.raises(ValueError, match=match):
        model(tokens, **bad)


def test_every_param_has_known_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.shape.__len__(), path
        assert set(axes) <= set(sharding.LOGICAL_AXES), (path, axes)
        if path[0] == "moe_blocks":
            assert axes[0] == "layers"


def test_causal_query_blocks_change_nothing(model, monkeypatch):
    """XLA attention in causal query blocks (each against the keys up to its end) against one block over all keys,
    on packed rows with padding: logits, per-head max logits and every parameter's gradient."""
    from pallas_kernels import mla_attention

    tokens = _tokens((2, 37), seed=3)
    segment_ids = jnp.asarray([[1] * 9 + [2] * 20 + [0] * 8, [3] * 37])

    def run(max_blocks):
        monkeypatch.setattr(mla_attention, "CAUSAL_BLOCK", 8)  # 37 queries: 4 blocks of 9-10
        monkeypatch.setattr(mla_attention, "MAX_CAUSAL_BLOCKS", max_blocks)

        def loss(m):
            logits, aux = m(tokens, segment_ids=segment_ids, return_aux=True)
            return jnp.sum(jnp.where(segment_ids[..., None] > 0, jnp.sin(logits), 0.0)), (logits, aux)

        grads, (logits, aux) = nnx.jit(nnx.grad(loss, has_aux=True))(model)  # traced anew: reads the patch
        return np.asarray(logits), np.asarray(aux["attn_max_logits"]), nnx.to_flat_state(grads)

    (want_logits, want_max, want_grads), (logits, max_logits, grads) = run(1), run(8)
    real = np.asarray(segment_ids) > 0
    assert np.max(np.abs(logits[real] - want_logits[real])) <= 1e-6 * np.max(np.abs(want_logits[real]))
    np.testing.assert_allclose(max_logits, want_max, rtol=1e-6)
    _assert_grads_close(grads, want_grads)


def test_unrolling_the_moe_scan_changes_nothing():
    """The MoE blocks' scan rolled (1 block per iteration) or partly unrolled (2 of 3, a remainder) against the
    CPU default (all unrolled): logits, aux and every parameter's gradient."""
    cfg = tiny(num_hidden_layers=4)  # 3 MoE blocks
    tensors = random_release_tensors(cfg, seed=13)
    tokens = _tokens((2, 24), seed=5)

    def run(scan_unroll):
        model = k2jax.from_hf_tensors(cfg.replace(scan_unroll=scan_unroll), tensors)

        def loss(m):
            logits, aux = m(tokens, return_aux=True)
            return jnp.sum(jnp.sin(logits)), (logits, aux)

        grads, (logits, aux) = nnx.jit(nnx.grad(loss, has_aux=True))(model)
        return np.asarray(logits), jax.tree.map(np.asarray, aux), nnx.to_flat_state(grads)

    assert Target.of(cfg).scan_unroll == 3  # the default on CPU
    want_logits, want_aux, want_grads = run(0)
    for unroll in (1, 2):
        logits, aux, grads = run(unroll)
        assert np.max(np.abs(logits - want_logits)) <= 1e-6 * np.max(np.abs(want_logits)), unroll
        np.testing.assert_array_equal(aux["router_topk_ids"], want_aux["router_topk_ids"])
        np.testing.assert_array_equal(aux["expert_load"], want_aux["expert_load"])
        np.testing.assert_allclose(aux["attn_max_logits"], want_aux["attn_max_logits"], rtol=1e-6)
        _assert_grads_close(grads, want_grads)


def test_moe_impls_agree(model):
    tokens = _tokens((2, 16))
    ragged = k2jax.from_hf_tensors(CFG.replace(moe_impl="ragged_dot"), k2jax.to_hf_tensors(model))
    a, b = np.asarray(model(tokens)), np.asarray(ragged(tokens))
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def test_kernel_impls_agree_with_xla_on_packed_rows_and_gradients():
    """The Pallas kernels (interpret mode) against the XLA path on packed rows with padding (segment 0): logits of
    real tokens, per-head max logits, and the gradient of every parameter (flash backward, grouped-matmul dx)."""
    cfg = tiny(num_hidden_layers=2)  # one dense block, one MoE block: every kernel, half the compile time
    tensors = random_release_tensors(cfg, seed=12)
    model = k2jax.from_hf_tensors(cfg, tensors)
    kernels = k2jax.from_hf_tensors(cfg.replace(attention_impl="interpret", moe_impl="interpret"), tensors)
    tokens = _tokens((2, 20), seed=4)
    segment_ids = jnp.asarray([[1] * 7 + [2] * 10 + [0] * 3, [3] * 20])
    real = np.asarray(segment_ids) > 0

    def loss_and_aux(m):
        logits, aux = m(tokens, segment_ids=segment_ids, return_aux=True)
        return jnp.sum(jnp.where(segment_ids[..., None] > 0, jnp.sin(logits), 0.0)), (logits, aux)

    def run(m):
        grad_fn = nnx.jit(nnx.grad(loss_and_aux, has_aux=True))
        grads, (logits, aux) = grad_fn(m)
        return np.asarray(logits)[real], np.asarray(aux["attn_max_logits"]), nnx.to_flat_state(grads)

    (want_logits, want_max, want_grads), (logits, max_logits, grads) = run(model), run(kernels)
    assert np.max(np.abs(logits - want_logits)) <= 1e-5 * np.max(np.abs(want_logits))
    np.testing.assert_allclose(max_logits, want_max, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("dense", [0, 2])
def test_all_moe_and_all_dense_layouts(dense):
    cfg = tiny(num_hidden_layers=2, first_k_dense_replace=dense)
    logits, aux = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))(_tokens((1, 8)), return_aux=True)
    assert logits.shape == (1, 8, cfg.vocab_size)
    assert aux["attn_max_logits"].shape == (2, cfg.num_attention_heads)
    assert aux["expert_load"].shape == (2 - dense, cfg.n_routed_experts)
    assert aux["router_topk_ids"].shape == (2 - dense, 1, 8, cfg.num_experts_per_tok)
