"""The tiktoken-based K2 tokenizer and chat template, on a small BPE file the test trains itself."""

import base64
import json
import os

import numpy as np
import pytest

from k2jax.tokenizer import (DEFAULT_SYSTEM_PROMPT, SPECIAL_TOKENS, StreamDecoder, Tokenizer, TokenizerError,
                             read_bpe_ranks, special_tokens_for, train_bpe, write_bpe_ranks)

CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2026; we've 12345 tokens.\n\n",
          "Kimi K2 uses multi-head latent attention. 你好，世界！ Ünïcödé wörds and CamelCaseWords.\n"] * 20
_rng = np.random.default_rng(0)
CORPUS += [" ".join("".join(_rng.choice(list("etaoinshrdlucmfw"), _rng.integers(2, 9))) for _ in range(400))]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_bpe_ranks(path / "tiktoken.model", train_bpe(CORPUS, 400))
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def test_round_trip_and_merges(tok):
    for text in CORPUS + ["", " ", "\t\n  x", "emoji 🙂 and 𝔘nicode", "a" * 30000 + " " * 30000 + "b"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox".encode())  # merges are used
    assert tok.vocab_size == 400 + 256
    assert tok.eos_id == 400 + 2 and tok.special("<|im_middle|>") == 400 + 17  # the release's offsets


def test_special_token_text_in_user_content_stays_text(tok):
    ids = tok.encode("<|im_end|><|im_user|>")
    assert tok.eos_id not in ids and tok.special("<|im_user|>") not in ids
    assert tok.decode(ids) == "<|im_end|><|im_user|>"


def test_chat_template_matches_the_release_rendering(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Why"}, {"type": "text", "text": "?"}]}]
    ids = tok.apply_chat_template(msgs)
    assert tok.decode(ids) == (
        f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Hello!<|im_end|>"
        "<|im_user|>user<|im_middle|>Why?<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert ids.count(tok.eos_id) == 4
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, msgs[0]], add_generation_prompt=False)
    assert tok.decode(own) == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                               "<|im_user|>user<|im_middle|>Hi<|im_end|>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    calls = [{"role": "assistant", "content": "",
              "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                              "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    text = tok.decode(tok.apply_chat_template([msgs[0]] + calls, tools=tools))
    assert text.startswith(f"<|im_system|>tool_declare<|im_middle|>{json.dumps(tools)}<|im_end|><|im_system|>system")
    assert ("<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
            'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
            "<|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>## Return of "
            "functions.get_weather:0\nsunny<|im_end|>") in text
    # a continuation renders only its own turns (no default system prompt)
    assert tok.decode(tok.apply_chat_template([msgs[0]], continuation=True)).startswith("<|im_user|>")


@pytest.mark.parametrize("message, match", [
    ({"content": "x"}, "role"), ({"role": "robot", "content": "x"}, "not one of"),
    ({"role": "user", "content": [{"type": "image"}]}, "content must be"), ("hi", "expected a dict")])
def test_bad_messages(tok, message, match):
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template([message])


def test_stream_decoder_holds_partial_characters(tok):
    text = "你好 🙂 ok"
    ids = tok.encode(text)
    d = StreamDecoder(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_tokenizer_config_names_special_tokens(tok_dir, tmp_path):
    for name in ("tiktoken.model",):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    added = {str(400 + off): {"content": name, "special": True} for off, name in SPECIAL_TOKENS.items()}
    added[str(400 + 5)] = {"content": "<|my_token|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special("<|my_token|>") == 405 and tok.special("<|reserved_token_408|>") == 408
    with pytest.raises(TokenizerError, match="outside the special range"):
        special_tokens_for(400, {10: "<|x|>"})


def _lines(tok_dir):
    return (tok_dir / "tiktoken.model").read_bytes().splitlines()


@pytest.mark.parametrize("damage, match", [
    (lambda ls: ls[:1] + [b"!!!notbase64 1"] + ls[2:], "bad base64"),
    (lambda ls: ls[:1] + [b"QQ=="] + ls[2:], "expected 'base64-token rank'"),
    (lambda ls: ls[:-1], None),  # fine: one rank fewer
    (lambda ls: ls + [ls[300].split()[0] + b" 400"], "appears twice"),
    (lambda ls: ls[:300] + ls[301:], "ranks must be"),
    (lambda ls: [base64.b64encode(bytes([b])) + b" %d" % (b - 1) for b in range(1, 256)], "single-byte tokens"),
    (lambda ls: [], "no BPE ranks"),
])
def test_malformed_bpe_files_fail_clearly(tok_dir, tmp_path, damage, match):
    (tmp_path / "tiktoken.model").write_bytes(b"\n".join(damage(_lines(tok_dir))))
    if match is None:
        assert len(read_bpe_ranks(tmp_path / "tiktoken.model")) == 399
    else:
        with pytest.raises(TokenizerError, match=match):
            Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="cannot read"):
        read_bpe_ranks(os.path.join(tmp_path, "nope.model"))
