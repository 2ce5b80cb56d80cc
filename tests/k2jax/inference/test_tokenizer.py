"""The tiktoken-based K2 tokenizer, on a small BPE file the test trains itself, and the release's file layout at
its real size. The chat template's tests are in test_chat_template.py."""

import base64
import json
import logging
import os
import shutil
import time
import tracemalloc

import numpy as np
import pytest
import tiktoken.load

from k2jax.inference.chat_template import BUILTIN_SOURCE
from k2jax.inference.tokenizer import (
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    read_bpe_ranks,
    special_tokens_for,
    train_bpe,
    write_bpe_ranks,
)

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


def test_a_directory_without_a_template_uses_the_builtin_one_and_says_so(tok_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        tok = Tokenizer.from_dir(tok_dir)
    assert tok.chat_template.builtin and tok.chat_template.source == BUILTIN_SOURCE
    assert "has no chat template" in caplog.text and BUILTIN_SOURCE in caplog.text
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot "
                               "AI.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant"
                               "<|im_middle|>")
    assert tok.encode("<|im_end|>", allow_special=True) == [tok.eos_id]


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


RELEASE_RANKS = 163_584  # lines in the release's tiktoken.model (2,795,286 bytes)


def test_release_sized_bpe_file_speed_memory_and_a_corrupt_line(tmp_path):
    """A tiktoken.model laid out like the release's: 163,584 "base64 rank" lines. It loads about as fast as
    tiktoken's own (unchecked) loader, in tens of MB; with the release's tokenizer_config.json the special ids are
    the release's; a corrupt line deep in the file is named by its number."""
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    lines += [base64.b64encode(b"k2" + rank.to_bytes(3, "big") * (1 + rank % 3)) + b" %d" % rank
              for rank in range(256, RELEASE_RANKS)]
    path = tmp_path / "tiktoken.model"
    path.write_bytes(b"\n".join(lines) + b"\n")
    start = time.perf_counter()
    ranks = read_bpe_ranks(path)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    assert ranks == tiktoken.load.load_tiktoken_bpe(str(path))
    theirs = time.perf_counter() - start
    assert ours < 3 * theirs + 1.0, (ours, theirs)
    tracemalloc.start()
    try:
        read_bpe_ranks(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * path.stat().st_size, peak  # ~11x the file's size, measured
    shutil.copy(os.path.join(os.path.dirname(__file__), "chat_templates", "k2_instruct_0905",
                             "tokenizer_config.json"), tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.vocab_size, tok.eos_id, tok.special("<|im_middle|>"), tok.special("<|tool_calls_section_begin|>")) == (
        163_840, 163_586, 163_601, 163_595)
    lines[123_456] = b"k2!! 123456"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(TokenizerError, match=r"tiktoken.model:123457: bad base64 token or rank"):
        read_bpe_ranks(path)
