"""The Grain pipeline: sources, packing, host split invariance, checkpointable position, clear errors."""

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from k2jax.inference.tokenizer import Tokenizer, train_bpe, write_bpe_ranks
from k2jax.training.data import DataError, make_iterator


def _cfg(source, **kw):
    return ml_collections.ConfigDict({"source": source, "tokenizer_dir": "", "text_field": "text",
                                      "eod_token_id": -1, "prefetch": 2, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_rows_do_not_depend_on_the_number_of_hosts():
    one = _take(make_iterator(_cfg("synthetic"), seq_len=16, global_batch=4, vocab_size=100, seed=1,
                              process_index=0, process_count=1), 3)
    hosts = [_take(make_iterator(_cfg("synthetic"), seq_len=16, global_batch=4, vocab_size=100, seed=1,
                                 process_index=h, process_count=2), 3) for h in range(2)]
    for step in range(3):
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(one[step][key], np.concatenate([hosts[0][step][key], hosts[1][step][key]]))
    b = one[0]
    assert b["tokens"].shape == (4, 17) and b["tokens"].dtype == np.int32
    # packing: segments start at 1 and count up within a row, positions restart with each segment
    seg, pos = b["segment_ids"][0], b["positions"][0]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
    starts = np.flatnonzero(np.diff(seg)) + 1
    assert np.all(pos[starts] == 0)


def test_state_restores_the_exact_position():
    it = make_iterator(_cfg("synthetic"), seq_len=8, global_batch=2, vocab_size=50, seed=0)
    _take(it, 2)
    state = it.get_state()
    want = _take(it, 3)
    it2 = make_iterator(_cfg("synthetic"), seq_len=8, global_batch=2, vocab_size=50, seed=0)
    it2.set_state(state)
    for a, b in zip(want, _take(it2, 3)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_jsonl_is_tokenised_with_end_of_document_tokens(tmp_path):
    words = " ".join("abcdefgh"[i % 8] * (1 + i % 3) for i in range(400))
    write_bpe_ranks(tmp_path / "tiktoken.model", train_bpe([words], 300))
    tok = Tokenizer.from_dir(tmp_path)
    docs = [{"text": f"document {i} " + "hello " * i} for i in range(1, 6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    it = make_iterator(_cfg(f"jsonl:{tmp_path / 'a.jsonl'}", tokenizer_dir=str(tmp_path)), seq_len=31,
                       global_batch=1, vocab_size=tok.vocab_size, seed=0)
    stream = np.concatenate([next(it)["tokens"][0] for _ in range(6)])
    eos = tok.special("[EOS]")
    pieces = np.split(stream, np.flatnonzero(stream == eos))  # rows continue each other: whole documents
    texts = [tok.decode(p[p != eos]) for p in pieces[:-1]]  # the last one may be unfinished
    want = {d["text"] for d in docs}
    assert set(texts) == want  # every document, intact
    assert sorted(texts[:5]) == sorted(want)  # the first epoch visits each document once
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    bad = make_iterator(_cfg(f"jsonl:{tmp_path / 'bad.jsonl'}", tokenizer_dir=str(tmp_path)), seq_len=8,
                        global_batch=1, vocab_size=tok.vocab_size, seed=0)
    with pytest.raises(Exception, match="bad.jsonl at byte .*'text'"):
        _take(bad, 4)


def test_array_record_and_errors(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    path = str(tmp_path / "t.arrayrecord")
    w = ArrayRecordWriter(path, "group_size:1")
    for i in range(10):
        w.write(np.arange(i, i + 5 + i, dtype="<i4").tobytes())
    w.close()
    it = make_iterator(_cfg(f"array_record:{path}"), seq_len=8, global_batch=2, vocab_size=64, seed=0)
    assert next(it)["tokens"].max() < 64
    with pytest.raises(DataError, match="missing files"):
        make_iterator(_cfg(f"array_record:{tmp_path / 'none'}"), seq_len=8, global_batch=2, vocab_size=64, seed=0)
    with pytest.raises(DataError, match="must be synthetic"):
        make_iterator(_cfg("parquet:x"), seq_len=8, global_batch=2, vocab_size=64, seed=0)
    with pytest.raises(DataError, match="tokenizer_dir"):
        make_iterator(_cfg(f"jsonl:{path}"), seq_len=8, global_batch=2, vocab_size=64, seed=0)
    with pytest.raises(DataError, match="does not split"):
        make_iterator(_cfg("synthetic"), seq_len=8, global_batch=3, vocab_size=64, seed=0, process_count=2,
                      process_index=0)
    small = make_iterator(_cfg(f"array_record:{path}"), seq_len=8, global_batch=2, vocab_size=8, seed=0)
    with pytest.raises(Exception, match="outside the model's vocabulary"):
        _take(small, 3)


def _chat_dir(tmp_path, template="k2_instruct_0905"):
    """A tokenizer directory with a release's chat template (Kimi-K2-Instruct-0905's by default;
    tests/k2jax/inference/chat_templates)."""
    import shutil
    template = os.path.join(os.path.dirname(os.path.dirname(__file__)), "inference", "chat_templates",
                            template, "chat_template.jinja")
    path = tmp_path / "tokenizer"
    path.mkdir()
    write_bpe_ranks(path / "tiktoken.model", train_bpe(["Be brief. What is 12 plus 7? It is 19. Thanks!"] * 4, 300))
    shutil.copy(template, path)
    return str(path), Tokenizer.from_dir(path)


def _conversation(i):
    ask = f"What is {i} plus {i}?" + " Please" * (80 if i == 3 else 0)  # conversation 3: longer than a row
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ask},
                         {"role": "assistant", "content": f"It is {2 * i}."},
                         {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Welcome."}]}


def _segments(batch):
    """(tokens, loss_weights) of every conversation in a batch's rows; padding must be segment 0 with weight 0."""
    out = []
    for tokens, seg, w in zip(batch["tokens"], batch["segment_ids"], batch["loss_weights"]):
        assert not w[seg == 0].any()
        out += [(tuple(tokens[seg == s]), tuple(w[seg == s])) for s in np.unique(seg[seg > 0])]
    return out


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_chat_rows_pack_whole_conversations_with_their_weights(tmp_path, too_long):
    from k2jax.training.chat_data import render_chat
    from k2jax.training.data import sample_text
    tok_dir, tok = _chat_dir(tmp_path)
    convs = [_conversation(i) for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    cfg = _cfg(f"chat:{tmp_path / 'c.jsonl'}", tokenizer_dir=tok_dir, too_long=too_long, packing_bins=2)
    T = 127
    rendered = [r for c in convs for r in render_chat(tok, c["messages"])]
    assert len(rendered) == len(convs)  # one sequence each: this template renders earlier turns alike
    assert rendered[3].ids.size > T + 1 >= max(r.ids.size for i, r in enumerate(rendered) if i != 3)
    want = {(tuple(r.ids[:T + 1]), tuple(r.weights[:T + 1])): i for i, r in enumerate(rendered)}
    it = make_iterator(cfg, seq_len=T, global_batch=2, vocab_size=tok.vocab_size, seed=0)
    batches = _take(it, 6)
    b = batches[0]
    assert b["loss_weights"].shape == (2, T + 1) and b["loss_weights"].dtype == np.float32
    assert b["conversations_truncated"].shape == (2,)
    seen = [want[s] for batch in batches for s in _segments(batch)]  # each segment: one whole conversation
    kept = [0, 1, 2, 3, 4, 5] if too_long == "truncate" else [0, 1, 2, 4, 5]
    assert sorted(set(seen)) == kept and min(seen.count(i) for i in kept) >= 2  # epochs of them
    key, other = ("conversations_truncated", "conversations_dropped")[::1 if too_long == "truncate" else -1]
    counted = sum(int(batch[key].sum()) for batch in batches)
    assert counted == seen.count(3) if too_long == "truncate" else counted >= 2
    assert not any(batch[k].any() for batch in batches for k in (other, "conversations_split", "split_sequences"))
    _assert_restores(it, cfg, T, tok.vocab_size)  # the iterator's position restores exactly
    sample = sample_text(cfg, seq_len=T)
    assert sample.startswith(f"sample conversation ({tmp_path / 'c.jsonl'}:1): {rendered[0].ids.size} tokens, "
                             f"{int(rendered[0].weights.sum())} trained (between ⟦ and ⟧")
    assert sample.endswith("<|im_assistant|>assistant<|im_middle|>⟦It is 0.<|im_end|>⟧<|im_user|>user<|im_middle|>"
                           "Thanks!<|im_end|><|im_assistant|>assistant<|im_middle|>⟦Welcome.<|im_end|>⟧")


def test_chat_errors_name_the_line_and_the_option(tmp_path):
    from k2jax.tools.commands import UsageError
    from k2jax.training.data import DataConfigError
    tok_dir, tok = _chat_dir(tmp_path)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(_conversation(1)) + "\n" + json.dumps({"messages": [
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}) + "\n")
    cfg = _cfg(f"chat:{path}", tokenizer_dir=tok_dir, too_long="truncate", packing_bins=1)
    with pytest.raises(DataError, match=rf"^{path}:2: message 0 \(assistant\): the conversation starts with the "
                                        r"assistant: there is no prompt it answers"):
        _take(make_iterator(cfg, seq_len=63, global_batch=1, vocab_size=tok.vocab_size, seed=0), 4)
    for key, value, match in [("too_long", "cut", "config.data.too_long='cut': 'truncate' or 'drop'"),
                              ("packing_bins", 0, "config.data.packing_bins=0: must be a whole number")]:
        with pytest.raises(DataConfigError, match=re.escape(match)):
            make_iterator(_cfg(f"chat:{path}", tokenizer_dir=tok_dir, **{key: value}), seq_len=63, global_batch=1,
                          vocab_size=tok.vocab_size, seed=0)
    with pytest.raises(UsageError, match=rf"its tokenizer has {tok.vocab_size} token ids, more than the model's "
                                         rf"vocab_size 256: .* set config.model.overrides.vocab_size to "
                                         rf"{tok.vocab_size}"):
        make_iterator(cfg, seq_len=63, global_batch=1, vocab_size=256, seed=0)
    path.write_text('{"messages": "hi"}\n')
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object with a 'messages' list"):
        _take(make_iterator(cfg, seq_len=63, global_batch=1, vocab_size=tok.vocab_size, seed=0), 1)


def _agentic(i):
    """K2-Thinking data: odd i an agentic conversation with reasoning (a tool call, its result, an answer; a second
    user turn and its answer), two training sequences; even i the same without reasoning, one sequence."""
    call = {"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": f"[{i}, {i}]"}}
    think = (lambda text: {"reasoning_content": text}) if i % 2 else (lambda text: {})
    thanks = "Thanks!" + " Please" * (40 if i == 3 else 0)  # conversation 3: its second sequence longer than a row
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call], **think("add")},
                         {"role": "tool", "tool_call_id": "functions.add:0", "content": str(2 * i)},
                         {"role": "assistant", "content": f"It is {2 * i}.", **think("so")},
                         {"role": "user", "content": thanks},
                         {"role": "assistant", "content": "Welcome.", **think("be nice")}]}


def test_chat_rows_pack_the_sequences_of_split_conversations_and_count_them(tmp_path):
    """A conversation its template splits (K2-Thinking, reasoning: k2jax.training.chat_data) packs as its
    sequences, each whole in a row with its weights; the metrics count the split conversations and their sequences
    once, truncation counts per sequence; the position restores exactly between two sequences of a conversation."""
    from k2jax.training.chat_data import render_chat
    from k2jax.training.data import sample_text
    tok_dir, tok = _chat_dir(tmp_path, "k2_thinking")
    convs = [_agentic(i) for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    cfg = _cfg(f"chat:{tmp_path / 'c.jsonl'}", tokenizer_dir=tok_dir, too_long="truncate", packing_bins=2)
    T = 255
    rendered = [render_chat(tok, c["messages"]) for c in convs]
    assert [len(r) for r in rendered] == [1, 2, 1, 2, 1, 2]
    assert rendered[3][1].ids.size > T + 1 >= max(s.ids.size for r in rendered for s in r if s is not rendered[3][1])
    want = {(tuple(s.ids[:T + 1]), tuple(s.weights[:T + 1])): (i, n) for i, r in enumerate(rendered)
            for n, s in enumerate(r)}
    it = make_iterator(cfg, seq_len=T, global_batch=2, vocab_size=tok.vocab_size, seed=0)
    batches = _take(it, 12)
    seen = [want[s] for batch in batches for s in _segments(batch)]  # each segment: one whole sequence
    assert sorted(set(seen)) == sorted(want.values()) and min(seen.count(v) for v in want.values()) >= 2
    firsts = sum(seen.count((i, 0)) for i in (1, 3, 5))  # a split conversation is counted with its first sequence
    assert sum(int(b["conversations_split"].sum()) for b in batches) == firsts
    assert sum(int(b["split_sequences"].sum()) for b in batches) == 2 * firsts
    assert sum(int(b["conversations_truncated"].sum()) for b in batches) == seen.count((3, 1))
    for skip in range(3):  # the iterator's position restores exactly, wherever it is
        _assert_restores(it, cfg, T, tok.vocab_size)
    (tmp_path / "one.jsonl").write_text(json.dumps(convs[1]) + "\n")
    sample = sample_text(_cfg(f"chat:{tmp_path / 'one.jsonl'}", tokenizer_dir=tok_dir, too_long="truncate"),
                         seq_len=T)
    first, second = rendered[1]
    assert sample.startswith(f"sample conversation ({tmp_path / 'one.jsonl'}:1): split into 2 sequences (its chat "
                             f"template renders earlier turns differently once later ones follow")
    assert (f"\nsequence 1 of 2: {first.ids.size} tokens, {int(first.weights.sum())} trained\n" in sample
            and f"\nsequence 2 of 2: {second.ids.size} tokens, {int(second.weights.sum())} trained\n" in sample)
    assert sample.endswith("<|im_assistant|>assistant<|im_middle|>⟦<think>be nice</think>Welcome.<|im_end|>⟧")


def _assert_restores(it, cfg, T, vocab_size):
    """A new iterator set to `it`'s state yields the next two batches `it` yields (and `it` moves past them)."""
    state = it.get_state()
    after = _take(it, 2)
    it2 = make_iterator(cfg, seq_len=T, global_batch=2, vocab_size=vocab_size, seed=0)
    it2.set_state(state)
    for x, y in zip(after, _take(it2, 2)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
