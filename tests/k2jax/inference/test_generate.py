"""Generation with the MLA latent cache: cached logits equal the full forward, greedy equals transformers'
generate, sampling rules, stop tokens, a sharded FP8 converted checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import k2jax
from k2jax.checkpoint.convert import convert_hf_to_orbax
from k2jax.checkpoint.hf_checkpoint import load_hf_checkpoint, write_hf_checkpoint
from k2jax.inference.generate import FINISHED, Generator, LatentCache, Sampling, sample
from k2jax.model.config import kimi_k2, tiny
from sharding.mesh import make_mesh
from sharding.rules import param_shardings
from tests.oracle import oracle_model, random_release_tensors

CFG = tiny()
PROMPTS = [[5, 17, 3, 99, 250, 7, 1, 42, 42, 8, 60, 61, 200], [9, 31, 4, 4, 12], [77, 2, 150, 18, 90, 33, 3]]


@pytest.fixture(scope="module")
def tensors():
    return random_release_tensors(CFG, seed=5)


@pytest.fixture(scope="module")
def model(tensors):
    return k2jax.from_hf_tensors(CFG, tensors)


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model)


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), np.max(np.abs(got - want))


def test_cached_logits_equal_the_full_forward_at_every_position(model, gen):
    """Prefill (all positions), then decode and a multi-token extend (absorbed attention) over a batch of
    different lengths, reaching past the YaRN original context (32)."""
    cache = gen.new_cache(len(PROMPTS), 64)
    logits_BTV, cache = gen.prefill(PROMPTS, cache, all_logits=True)
    rows = [list(p) for p in PROMPTS]
    seen = [[logits_BTV[b, t] for t in range(len(p))] for b, p in enumerate(PROMPTS)]
    rng = np.random.default_rng(0)
    for step in range(24):
        token_B = rng.integers(0, CFG.vocab_size, len(rows))
        logits_BV, cache = gen.decode(token_B, cache)
        for b in range(len(rows)):
            rows[b].append(int(token_B[b]))
            seen[b].append(logits_BV[b])
    more = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 1, 9)]  # a ragged multi-token extend
    logits_BTV, cache = gen.extend(more, cache, all_logits=True)
    for b, m in enumerate(more):
        rows[b] += [int(t) for t in m]
        seen[b] += [logits_BTV[b, t] for t in range(len(m))]
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), [len(r) for r in rows])
    assert max(len(r) for r in rows) > 40
    for b, row in enumerate(rows):
        _close(jnp.stack(seen[b]), model(jnp.asarray([row]))[0])


def test_decode_kernel_matches_the_xla_decode(tensors, gen):
    """attention_impl="interpret": prefill by the flash-attention kernel, decode and a ragged extend by the
    absorbed-decode kernel over the latent cache give the XLA generator's logits."""
    kernels = Generator(k2jax.from_hf_tensors(CFG.replace(attention_impl="interpret"), tensors))
    extend = [[3, 4], [5], [6, 7, 8]]
    results = []
    for g in (gen, kernels):
        cache = g.new_cache(len(PROMPTS), 32)
        prefill_BTV, cache = g.prefill(PROMPTS, cache, all_logits=True)
        decode_BV, cache = g.decode(np.array([11, 12, 13]), cache)
        extend_BTV, cache = g.extend(extend, cache, all_logits=True)
        results.append((prefill_BTV, decode_BV, extend_BTV))
    for b, p in enumerate(PROMPTS):
        _close(results[1][0][b, :len(p)], results[0][0][b, :len(p)])
        _close(results[1][2][b, :len(extend[b])], results[0][2][b, :len(extend[b])])
    _close(results[1][1], results[0][1])


def test_the_cache_holds_only_the_latent(model, gen):
    cache = gen.new_cache(2, 32)
    X = CFG.kv_lora_rank + CFG.qk_rope_head_dim
    assert cache.kv_LBSX.shape == (CFG.num_hidden_layers, 2, 32, X)
    assert LatentCache.values_per_token(CFG) == CFG.num_hidden_layers * X
    assert LatentCache.values_per_token(kimi_k2()) == 61 * 576
    _, cache = gen.prefill([[3, 4, 5], [6, 7]], cache)
    # slot t of layer 0 holds that token's normed latent and roped shared key
    block = model.dense_blocks[0]
    x = block.input_layernorm(model.embed(jnp.asarray([[3, 4, 5]])))
    cos, sin = k2jax.model.rope.rope_tables(CFG, jnp.arange(3)[None])
    c, k_rope = block.self_attn.latent(x, cos, sin)
    _close(cache.kv_LBSX[0, 0, :3], jnp.concatenate([c, k_rope], -1)[0])
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), [3, 2])


def test_greedy_equals_transformers_generate(tensors, gen):
    """fp32, 40 new tokens per prompt, our batch of three different lengths against the oracle one by one."""
    ours = gen.generate(PROMPTS, max_new_tokens=40)
    oracle = oracle_model(CFG, tensors)
    oracle.generation_config.eos_token_id = None
    oracle.generation_config.pad_token_id = 0
    for prompt, out in zip(PROMPTS, ours):
        with torch.no_grad():
            ids = oracle.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
        assert out.tokens == ids[0, len(prompt):].tolist()
        assert out.finish_reason == "length"


def test_stop_tokens_end_rows_independently(gen):
    greedy = gen.generate(PROMPTS, max_new_tokens=12)
    stop = greedy[1].tokens[4]  # row 1 stops at its 5th token; the others may or may not meet it
    steps = list(gen.stream(PROMPTS, max_new_tokens=12, stop_tokens=[stop]))
    outs = gen.generate(PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    for b, (full, out) in enumerate(zip(greedy, outs)):
        cut = full.tokens.index(stop) if stop in full.tokens else len(full.tokens)
        assert out.tokens == full.tokens[:cut]
        assert out.finish_reason == ("stop" if stop in full.tokens else "length")
        column = [int(s[b]) for s in steps]
        assert column[:cut] == full.tokens[:cut] and all(t == FINISHED for t in column[cut + 1:])


def _host_loop(gen, prompts, max_new_tokens, sampling, seed, stop_tokens):
    """The step-by-step loop the device loop replaces: sample on the host's call, one decode per call."""
    key, stops = jax.random.key(seed), np.asarray(stop_tokens)
    logits, cache = gen.prefill(prompts, gen.new_cache(len(prompts), 32))
    done, steps = np.zeros(len(prompts), bool), []
    for step in range(max_new_tokens):
        token = np.asarray(gen.sample(logits, sampling, jax.random.fold_in(key, step)))
        steps.append(np.where(done, FINISHED, token))
        done |= np.isin(token, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = gen.decode(jnp.asarray(token), cache)
    return np.stack(steps), cache


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_k=40, top_p=0.9)])
def test_device_loop_equals_the_host_loop(gen, sampling):
    """stream() decodes steps_per_call steps per host call on the device: the same tokens (a stop token that ends
    one row early, sampled rows included), the same number of steps, and the same cache afterwards, whether the
    chunks divide the steps or not."""
    first, _ = _host_loop(gen, PROMPTS, 10, sampling, 4, [])
    stop = int(first[3, 1])  # row 1 stops at its 4th token; the others go on (or meet it too)
    want, want_cache = _host_loop(gen, PROMPTS, 10, sampling, 4, [stop])
    for steps_per_call in (1, 3, 16):
        got = np.stack(list(gen.stream(PROMPTS, max_new_tokens=10, sampling=sampling, seed=4, stop_tokens=[stop],
                                       max_len=32, steps_per_call=steps_per_call)))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.asarray(gen.last_cache.lengths_B), np.asarray(want_cache.lengths_B))
        np.testing.assert_array_equal(np.asarray(gen.last_cache.kv_LBSX), np.asarray(want_cache.kv_LBSX))
    with pytest.raises(ValueError, match="steps_per_call must be an int >= 1"):
        next(gen.stream(PROMPTS, max_new_tokens=4, steps_per_call=0))


def test_sampling_rules(gen):
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3)
    greedy = np.asarray(sample(logits, jax.random.key(0), Sampling()))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    keys = jax.random.split(jax.random.key(1), 4000)
    draw = jax.jit(jax.vmap(sample, in_axes=(None, 0, None)), static_argnums=2)
    assert np.array_equal(draw(logits, keys[:8], Sampling(temperature=1.0, top_k=1))[0], greedy)
    assert np.array_equal(draw(logits, keys[:8], Sampling(temperature=1.0, top_p=1e-6))[0], greedy)
    # top-k: only the k best tokens ever come out, and all of them do
    got = np.asarray(draw(logits, keys, Sampling(temperature=1.0, top_k=5)))
    best5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    for b in range(4):
        assert set(got[:, b]) == set(best5[b])
    # top-p: the support is the smallest prefix reaching p, sampled in proportion to the renormalised softmax
    p = 0.7
    got = np.asarray(draw(logits, keys, Sampling(temperature=1.0, top_p=p)))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for b in range(4):
        order = np.argsort(-probs[b])
        n = int(np.searchsorted(np.cumsum(probs[b][order]), p) + 1)
        assert set(got[:, b]) <= set(order[:n]) and len(set(got[:, b])) >= min(n, 2)
        want = probs[b][order[:n]] / probs[b][order[:n]].sum()
        freq = np.array([(got[:, b] == t).mean() for t in order[:n]])
        assert np.max(np.abs(freq - want)) < 0.04
    # the same seed gives the same tokens, another seed other tokens
    g = gen
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    a = g.generate(PROMPTS, max_new_tokens=16, sampling=s, seed=3)
    assert a == g.generate(PROMPTS, max_new_tokens=16, sampling=s, seed=3)
    assert a != g.generate(PROMPTS, max_new_tokens=16, sampling=s, seed=4)


def test_bad_inputs_fail_clearly(gen):
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([[1, 2, CFG.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen.generate([[1, 2]], max_new_tokens=2, max_len=CFG.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="exceeds the cache"):
        gen.generate([[1, 2, 3]], max_new_tokens=10, max_len=8)
    cache = gen.new_cache(1, 16)
    _, cache = gen.prefill([[1, 2, 3]], cache)
    with pytest.raises(ValueError, match="empty cache"):
        gen.prefill([[1]], cache)
    with pytest.raises(ValueError, match="free slots"):
        gen.extend([list(range(1, 15))], cache)


def test_sharded_fp8_converted_checkpoint_generates_the_same(tmp_path):
    """HF FP8 release layout -> Orbax fp8 -> loaded with expert-parallel shardings on 8 devices, run with GSPMD
    and with shard_map expert parallelism: the same greedy tokens and logits as the unsharded model read straight
    from the release files."""
    cfg = tiny(hidden_size=160, q_lora_rank=144, kv_lora_rank=136)  # ragged 128x128 scale blocks
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "k2-fp8")
    write_hf_checkpoint(hf_dir, cfg, random_release_tensors(cfg, seed=8), dtype="fp8")
    convert_hf_to_orbax(hf_dir, out, dtype="fp8", show_progress=False)
    reference = load_hf_checkpoint(hf_dir)
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    shardings = param_shardings(k2jax.param_info(reference), mesh, "ep_fsdp")
    sharded = k2jax.load_checkpoint(out, shardings=lambda name, shape: shardings[name], param_dtype="float32")
    assert sharded.moe_blocks.mlp.experts.up_proj[...].sharding.spec[1] == "expert"
    want = Generator(reference).generate(PROMPTS, max_new_tokens=20)
    g = Generator(sharded)
    assert g.generate(PROMPTS, max_new_tokens=20) == want
    with jax.set_mesh(mesh):  # experts run expert-parallel (shard_map + all-to-all) in prefill and decode
        assert Generator(sharded).generate(PROMPTS, max_new_tokens=20) == want
    cache = g.new_cache(len(PROMPTS), 32)
    got, _ = g.prefill(PROMPTS, cache, all_logits=True)
    ref, _ = Generator(reference).prefill(PROMPTS, Generator(reference).new_cache(len(PROMPTS), 32), all_logits=True)
    for b, p in enumerate(PROMPTS):
        _close(got[b, :len(p)], ref[b, :len(p)])


@pytest.mark.parametrize("axes,rows,cache_spec", [
    ({"expert": 8}, 8, (None, "expert", None, None)),                # a row per device: rows split
    ({"expert": 8}, 2, (None, None, "expert", None)),                # fewer rows than devices: slots split
    ({"fsdp": 2, "expert": 4}, 2, (None, "fsdp", "expert", None)),   # rows over fsdp, their slots over expert
    ({"fsdp": 2, "expert": 4}, 1, (None, None, ("fsdp", "expert"), None)),
], ids=["rows", "slots", "rows-and-slots", "one-row"])
def test_decode_sharding_equals_unsharded(tensors, model, axes, rows, cache_spec):
    """The decode layout (sharding.rules: rows whole on every device, the ep_fsdp weights used where they lie, the
    experts run without an exchange) and a latent cache split over its rows and then its slots, merged by
    log-sum-exp: the logits of several decode steps equal the unsharded model's (f32, 1e-5 of max |logit|), rows of
    different lengths, stale slots past each row's end, greedy tokens the same."""
    prompts = [PROMPTS[b % len(PROMPTS)][:13 - 3 * (b % 4)] for b in range(rows)]
    mesh = make_mesh(axes)
    sharded = k2jax.model.placement.shard_model(k2jax.from_hf_tensors(CFG, tensors), mesh, "ep_fsdp")
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (6, rows))

    def run(gen):
        cache = gen.new_cache(rows, 64)
        logits, cache = gen.prefill(prompts, cache)
        steps = [logits]
        for token_B in tokens:
            logits, cache = gen.decode(token_B, cache)
            steps.append(logits)
        return jnp.stack(steps), cache

    want, _ = run(Generator(model))
    with jax.set_mesh(mesh):
        gen = Generator(sharded)
        got, cache = run(gen)
        greedy = gen.generate(prompts, max_new_tokens=6, max_len=64)
    spec = tuple(cache.kv_LBSX.sharding.spec)
    assert spec + (None,) * (4 - len(spec)) == cache_spec
    _close(got, want)
    assert greedy == Generator(model).generate(prompts, max_new_tokens=6, max_len=64)


def test_slot_split_decode_kernel_equals_the_xla_decode(tensors, model):
    """The absorbed-decode kernel (interpret) on a cache split over its slots on 8 devices gives the unsharded XLA
    decode's logits, including positions that reach into a later device's slots over the steps."""
    mesh = make_mesh({"expert": 8})
    kernels = k2jax.model.placement.shard_model(
        k2jax.from_hf_tensors(CFG.replace(attention_impl="interpret"), tensors), mesh, "ep_fsdp")
    prompts = [PROMPTS[0][:7], PROMPTS[1]]

    def run(gen):
        logits, cache = gen.prefill(prompts, gen.new_cache(2, 16))
        steps = [logits]
        for token_B in ([1, 2], [3, 4]):
            logits, cache = gen.decode(np.array(token_B), cache)
            steps.append(logits)
        return jnp.stack(steps)

    want = run(Generator(model))
    with jax.set_mesh(mesh):
        got = run(Generator(kernels))
    _close(got, want)
