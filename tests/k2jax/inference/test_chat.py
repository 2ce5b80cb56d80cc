"""k2jax.Chat: every turn is the chat template's rendering of the conversation (equal to a fresh generation from
it), the cache is reused when it holds a prefix of that rendering, streaming, tool calls and tool results."""

import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.inference.chat import Chat
from k2jax.inference.generate import Generator
from k2jax.inference.tokenizer import Tokenizer, special_tokens_for, train_bpe
from k2jax.model.config import tiny

_rng = np.random.default_rng(0)
CORPUS = [" ".join("".join(_rng.choice(list("etaoinshrdlu"), _rng.integers(2, 8))) for _ in range(3000))]
CORPUS += ["Checking the weather in Paris. It is sunny. functions get_weather city Sunny\n"] * 20


@pytest.fixture(scope="module")
def setup():
    ranks = train_bpe(CORPUS, 600)
    tok = Tokenizer(ranks, special_tokens_for(len(ranks)))
    # replies of random ids re-render long (special ids become their names as text): room for 256 positions
    model = k2jax.Transformer(tiny(vocab_size=tok.vocab_size, max_position_embeddings=256), rngs=nnx.Rngs(3))
    return model, tok, Generator(model)


def _chat(setup, **kwargs):
    model, tok, gen = setup
    chat = Chat(model, tok, **kwargs)
    chat.generator = gen  # the same jitted functions for every chat of the test (compiles once per shape)
    return chat


def _fresh(setup, messages, max_new_tokens):
    """The reply a fresh generation from the template's rendering of these messages gives."""
    _, tok, gen = setup
    prompt = tok.apply_chat_template(messages)
    out = gen.generate([prompt], max_new_tokens=max_new_tokens, stop_tokens=[tok.eos_id], max_len=256)[0]
    return k2jax.parse_tool_calls(out.tokens, tok)


def test_turns_reuse_the_cache_and_equal_a_fresh_generation(setup, capsys):
    tok = setup[1]
    # a one-token first reply leaves exactly the first prompt in the cache: a prefix of the second prompt
    chat = _chat(setup, max_new_tokens=1, max_context=256)
    first = chat.send("hello there")
    out = capsys.readouterr().out
    assert out.startswith(first.content) and out.endswith("\n")  # streamed to stdout as it came
    assert chat.reused_tokens == 0 and first == _fresh(setup, [{"role": "user", "content": "hello there"}], 1)
    chat.max_new_tokens = 8
    second = "".join(chat.stream("and again"))
    assert chat.reused_tokens == len(tok.apply_chat_template(chat.messages[:1]))
    assert chat.last_reply.content == second
    assert chat.last_reply == _fresh(setup, chat.messages[:3], 8)  # the cached turn is the rendered conversation
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1] == first.to_message()


class ScriptedGenerator:
    """Stands in for k2jax.Generator: each turn yields the next scripted reply; records what it was fed."""

    def __init__(self, replies):
        self.replies, self.fed = list(replies), []

    def stream(self, prompts, *, cache, **kwargs):
        self.fed.append((list(prompts[0]), cache))
        for token in self.replies.pop(0):
            yield np.array([token])
        self.last_cache = f"cache after turn {len(self.fed)}"


def test_tool_calls_come_back_and_tool_results_go_back(setup, capsys):
    model, tok, _ = setup
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    sp = tok.special
    calling = (tok.encode("Checking.") + [sp("<|tool_calls_section_begin|>"), sp("<|tool_call_begin|>")]
               + tok.encode("functions.get_weather:0") + [sp("<|tool_call_argument_begin|>")]
               + tok.encode('{"city": "Paris"}') + [sp("<|tool_call_end|>"), sp("<|tool_calls_section_end|>")])
    answer = tok.encode("It is sunny.")
    chat = Chat(model, tok, tools=[weather], max_new_tokens=64)
    chat.generator = ScriptedGenerator([calling + [tok.eos_id], answer + [tok.eos_id]])

    reply = chat.send("Weather in Paris?")
    assert reply.ok and reply.content == "Checking."
    assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"})]
    assert capsys.readouterr().out == 'Checking.\n[tool call functions.get_weather:0: get_weather({"city": "Paris"})]\n'
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=[weather])
    assert chat.generator.fed[0] == (prompt, None)
    assert chat.messages[-1] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}

    result = {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "name": "get_weather", "content": "Sunny"}
    final = chat.send(result, stream=False)
    assert final.content == "It is sunny." and final.tool_calls == ()
    # the template renders the tool-calling turn back to the ids generated: the cache is reused as it is
    full = tok.apply_chat_template(chat.messages[:3], tools=[weather])
    assert full[:len(prompt) + len(calling)] == prompt + calling
    assert chat.generator.fed[1] == (full[len(prompt) + len(calling):], "cache after turn 1")
    assert tok.decode(chat.generator.fed[1][0]) == ("<|im_end|><|im_system|>get_weather<|im_middle|>## Return of "
                                                    "functions.get_weather:0\n    Sunny<|im_end|>"
                                                    "<|im_assistant|>assistant<|im_middle|>")
    # an edited history no longer extends what the cache holds: the whole conversation is read again
    chat.generator.replies.append(answer + [tok.eos_id])
    chat.messages[0]["content"] = "Weather in Lyon?"
    chat.send([{"role": "user", "content": "And tomorrow?"}], stream=False)
    assert chat.reused_tokens == 0
    assert chat.generator.fed[2] == (tok.apply_chat_template(chat.messages[:5], tools=[weather]), None)
    with pytest.raises(ValueError, match="send text, a message dict or a list"):
        chat.send(42)


def test_interrupted_turn_and_overflow(setup):
    tok = setup[1]
    chat = _chat(setup, system="Be brief.", max_new_tokens=6, max_context=64)
    pieces = chat.stream("one")
    next(pieces)
    pieces.close()  # e.g. a KeyboardInterrupt in the notebook
    assert chat.messages == [{"role": "system", "content": "Be brief."}] and chat.last_reply is None
    reply = chat.send("one", stream=False)  # re-reads the conversation, same seed: same reply
    assert reply == _chat(setup, system="Be brief.", max_new_tokens=6, max_context=64).send("one", stream=False)
    with pytest.raises(ValueError, match="exceed"):
        for _ in range(20):
            chat.send("a much longer message " * 3, stream=False)
    with pytest.raises(ValueError, match="vocabulary"):
        Chat(k2jax.Transformer(tiny(), rngs=nnx.Rngs(0)), tok)
