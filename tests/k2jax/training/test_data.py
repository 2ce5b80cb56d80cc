"""The Grain pipeline: sources, packing, host split invariance, checkpointable position, clear errors."""

import json

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
