"""k2jax.Chat: the template, streaming, and the cache kept between turns (equal to re-reading everything)."""

import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.chat import Chat
from k2jax.config import tiny
from k2jax.generate import Generator
from k2jax.tokenizer import Tokenizer, special_tokens_for, train_bpe

_rng = np.random.default_rng(0)
CORPUS = [" ".join("".join(_rng.choice(list("etaoinshrdlu"), _rng.integers(2, 8))) for _ in range(3000))]


@pytest.fixture(scope="module")
def setup():
    ranks = train_bpe(CORPUS, 600)
    tok = Tokenizer(ranks, special_tokens_for(len(ranks)))
    model = k2jax.Transformer(tiny(vocab_size=tok.vocab_size), rngs=nnx.Rngs(3))
    return model, tok


def test_turns_reuse_the_cache_and_equal_a_fresh_generation(setup, capsys):
    model, tok = setup
    chat = Chat(model, tok, max_new_tokens=10, max_context=128)
    first = chat.send("hello there")
    assert capsys.readouterr().out == first + "\n"  # streamed to stdout as it came
    gen = Generator(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello there"}])
    want = gen.generate([prompt], max_new_tokens=10, stop_tokens=[tok.eos_id])[0]
    assert first == tok.decode(want.tokens)
    second = "".join(chat.stream("and again"))
    # what the cache saw: turn one as generated, its end (<|im_end|>), then the second user turn
    full = prompt + want.tokens + [tok.eos_id] + tok.apply_chat_template([{"role": "user", "content": "and again"}],
                                                                         continuation=True)
    again = gen.generate([full], max_new_tokens=10, stop_tokens=[tok.eos_id])[0]
    assert second == tok.decode(again.tokens)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[3]["content"] == second


def test_interrupted_turn_and_overflow(setup):
    model, tok = setup
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=6, max_context=64)
    pieces = chat.stream("one")
    next(pieces)
    pieces.close()  # e.g. a KeyboardInterrupt in the notebook
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    reply = chat.send("one", stream=False)  # re-reads the conversation, same seed: same reply
    assert reply == Chat(model, tok, system="Be brief.", max_new_tokens=6, max_context=64).send("one", stream=False)
    with pytest.raises(ValueError, match="exceed"):
        for _ in range(20):
            chat.send("a much longer message " * 3, stream=False)
    with pytest.raises(ValueError, match="vocabulary"):
        Chat(k2jax.Transformer(tiny(), rngs=nnx.Rngs(0)), tok)
