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


def _chat_dir(tmp_path):
    """A tokenizer directory with Kimi-K2-Instruct-0905's chat template (tests/k2jax/inference/chat_templates)."""
    import shutil
    template = os.path.join(os.path.dirname(os.path.dirname(__file__)), "inference", "chat_templates",
                            "k2_instruct_0905", "chat_template.jinja")
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
    rendered = [render_chat(tok, c["messages"]) for c in convs]
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
    assert not any(batch[other].any() for batch in batches)
    # the iterator's position restores exactly
    state = it.get_state()
    after = _take(it, 2)
    it2 = make_iterator(cfg, seq_len=T, global_batch=2, vocab_size=tok.vocab_size, seed=0)
    it2.set_state(state)
    for x, y in zip(after, _take(it2, 2)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
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
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "kimi"}]}) + "\n")
    cfg = _cfg(f"chat:{path}", tokenizer_dir=tok_dir, too_long="truncate", packing_bins=1)
    with pytest.raises(DataError, match=rf"^{path}:2: message 1 \(assistant\): the chat template renders the "
                                        r"conversation up to this turn with the generation prompt as .*assistant"):
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
