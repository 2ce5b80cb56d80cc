"""Long prompts prefilled in chunks (Generator(prefill_chunk=...)): the same logits (f32, 1e-5 of max|logit|) and
greedy tokens as one pass, for chunk lengths that divide the prompts and ones that do not, over a batch of
different prompt lengths, unsharded and with expert parallelism on the 8 fake devices; a long extend in chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax.inference.generate import Generator
from k2jax.model.config import tiny
from k2jax.model.placement import shard_model
from k2jax.model.target import Target
from sharding.mesh import make_mesh
from tests.oracle import random_release_tensors

CFG = tiny()
# 37, 12 and 23 tokens: a 64-token bucket; chunks of 16 divide it, 5 and 12 do not (nor any prompt)
PROMPTS = [[int(t) for t in np.random.default_rng(b).integers(0, CFG.vocab_size, n)] for b, n in enumerate((37, 12, 23))]


@pytest.fixture(scope="module")
def model():
    return k2jax.from_hf_tensors(CFG, random_release_tensors(CFG, seed=11))


@pytest.fixture(scope="module")
def one_pass(model):
    """The one-pass prefill's logits at every prompt position and its greedy tokens."""
    gen = Generator(model)
    assert gen.chunk_len(len(PROMPTS)) >= 64  # the whole bucket in one pass
    logits, _ = gen.prefill(PROMPTS, gen.new_cache(len(PROMPTS), 96), all_logits=True)
    return logits, gen.generate(PROMPTS, max_new_tokens=12)


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), np.max(np.abs(got - want))


def _same_as_one_pass(gen, one_pass):
    want_logits, want_tokens = one_pass
    logits, cache = gen.prefill(PROMPTS, gen.new_cache(len(PROMPTS), 96), all_logits=True)
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), [len(p) for p in PROMPTS])
    for b, p in enumerate(PROMPTS):
        _close(logits[b, :len(p)], want_logits[b, :len(p)])
    last, _ = gen.prefill(PROMPTS, gen.new_cache(len(PROMPTS), 96))  # the last token's logits only
    _close(last, jnp.stack([want_logits[b, len(p) - 1] for b, p in enumerate(PROMPTS)]))
    assert gen.generate(PROMPTS, max_new_tokens=12) == want_tokens


@pytest.mark.parametrize("chunk", [16, 5, 12])
def test_chunked_prefill_equals_one_pass(model, one_pass, chunk):
    _same_as_one_pass(Generator(model, prefill_chunk=chunk), one_pass)


def test_chunked_prefill_equals_one_pass_with_expert_parallelism(model, one_pass):
    """The model's experts split over 4 of the 8 devices (fsdp 2 x expert 4): every chunk's tokens go through the
    shard_map all-to-all exchange."""
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    sharded = shard_model(model, mesh, "ep_fsdp")
    with jax.set_mesh(mesh):
        _same_as_one_pass(Generator(sharded, prefill_chunk=12), one_pass)


def test_a_long_extend_runs_in_chunks(model):
    """Extending filled rows by more tokens than a chunk (ragged: 30, 3 and 17 new tokens) gives the logits of the
    one-pass extend."""
    rng = np.random.default_rng(7)
    more = [[int(t) for t in rng.integers(0, CFG.vocab_size, n)] for n in (30, 3, 17)]
    results = []
    for chunk in (None, 8):
        gen = Generator(model, prefill_chunk=chunk)
        _, cache = gen.prefill(PROMPTS, gen.new_cache(len(PROMPTS), 96))
        logits, cache = gen.extend(more, cache, all_logits=True)
        results.append((logits, np.asarray(cache.lengths_B)))
    np.testing.assert_array_equal(results[1][1], [len(p) + len(m) for p, m in zip(PROMPTS, more)])
    for b, m in enumerate(more):
        _close(results[1][0][b, :len(m)], results[0][0][b, :len(m)])


def test_the_default_chunk_is_the_platform_budget_over_the_rows(model):
    budget = Target.of(CFG).prefill_tokens
    gen = Generator(model)
    assert gen.chunk_len(1) == budget and gen.chunk_len(3) == budget // 4 and gen.chunk_len(10 ** 6) == 8
    assert Generator(model, prefill_chunk=5).chunk_len(3) == 5
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
        Generator(model, prefill_chunk=0)
