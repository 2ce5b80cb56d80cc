"""Training data with Grain: token sources, per-host sharding, sequence packing, a checkpointable iterator.

    it = make_iterator(config.data, seq_len=T, global_batch=R, vocab_size=V, seed=0)
    batch = next(it)      # this host's rows {"tokens", "segment_ids", "positions"}: int32 [R / hosts, T + 1]
    it.get_state() / it.set_state(state)                 # bytes; saved with every checkpoint (grain.checkpoint)

Sources (`config.data.source`):
  synthetic                     random documents from the seed (smoke runs and tests)
  jsonl:PATH[,PATH...]          one JSON object per line; `config.data.text_field` is tokenised on the fly with
                                the tokenizer in `config.data.tokenizer_dir` (the release's tiktoken.model)
  array_record:PATH[,PATH...]   records of little-endian int32 token ids, one document per record

Pipeline: documents -> global shuffle (seeded; every epoch a new permutation) -> row r of every global batch (of R rows)
is its own stream of documents r, r + R, r + 2R, ..., tokenised, ended with an end-of-document token, packed end
to end into rows of T + 1 tokens with segment ids / positions (no padding; a document cut in two continues in
that row of the next batch) -> a host interleaves the streams of its own rows -> batch -> prefetch (a thread).
So the global batch is the same whatever the number of hosts, the same seed gives the same batches, and
restoring the iterator state resumes exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np

from k2jax.inference.tokenizer import Tokenizer


class DataError(ValueError):
    """A data source that cannot be read."""


class _JsonlText:
    """The text field of every line of some JSONL files, addressed by (file, byte offset)."""

    def __init__(self, paths: list[str], field: str):
        self._index: list[tuple[str, int]] = []
        self.field = field
        for path in paths:
            if not os.path.exists(path):
                raise DataError(f"{path}: no such JSONL file")
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        self._index.append((path, offset))
                    offset += len(line)
        if not self._index:
            raise DataError(f"{paths}: no documents")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> str:
        path, offset = self._index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            record = json.loads(line)
            return record[self.field]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} at byte {offset}: not a JSON object with a {self.field!r} string ({e})") from None


class _Synthetic:
    """Random documents of 8..256 tokens, a pure function of (seed, index)."""

    def __init__(self, vocab_size: int, seed: int, size: int = 1 << 20):
        self.vocab_size, self.seed, self.size = vocab_size, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(i)])
        # a learnable structure: each document repeats a short random motif
        motif = rng.integers(0, self.vocab_size, int(rng.integers(2, 8)), dtype=np.int32)
        return np.resize(motif, int(rng.integers(8, 257))).astype(np.int32)


def _source(data_cfg, vocab_size: int, seed: int):
    kind, _, spec = data_cfg.source.partition(":")
    paths = [p for p in spec.split(",") if p]
    if kind == "synthetic":
        return _Synthetic(vocab_size, seed), None
    if kind == "jsonl":
        if not data_cfg.get("tokenizer_dir"):
            raise DataError("data.source jsonl needs data.tokenizer_dir (a directory with tiktoken.model)")
        return _JsonlText(paths, data_cfg.get("text_field", "text")), Tokenizer.from_dir(data_cfg.tokenizer_dir)
    if kind == "array_record":
        missing = [p for p in paths if not os.path.exists(p)]
        if not paths or missing:
            raise DataError(f"data.source array_record: missing files {missing or spec!r}")
        return grain.sources.ArrayRecordDataSource(paths), None
    raise DataError(f"data.source must be synthetic, jsonl:PATHS or array_record:PATHS, got {data_cfg.source!r}")


def make_iterator(data_cfg, *, seq_len: int, global_batch: int, vocab_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None):
    """The grain iterator of this host's rows of each global batch (see the module docstring)."""
    source, tokenizer = _source(data_cfg, vocab_size, seed)
    eod = int(data_cfg.get("eod_token_id", -1))
    if tokenizer is not None and eod < 0:
        eod = tokenizer.special("[EOS]")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = global_batch // process_count

    def to_tokens(doc) -> dict:
        if tokenizer is not None:
            ids = np.asarray(tokenizer.encode(doc), np.int32)
        elif isinstance(doc, bytes):
            ids = np.frombuffer(doc, "<i4").astype(np.int32)
        else:
            ids = np.asarray(doc, np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(f"token ids outside the model's vocabulary [0, {vocab_size}): {ids.min()}..{ids.max()}")
        if eod >= 0:
            ids = np.append(ids, np.int32(eod))
        return {"tokens": ids}

    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} does not split over {process_count} processes")
    documents = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)  # each epoch: a new permutation

    def row_stream(row: int):
        """Global row `row` of every batch: documents row, row + R, row + 2R, ... packed end to end."""
        ds = documents[row::global_batch].map(to_tokens).filter(lambda ex: ex["tokens"].size > 0)
        ds = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
        return ds.map(lambda ex: {"tokens": ex["tokens"], "segment_ids": ex["tokens_segment_ids"],
                                  "positions": ex["tokens_positions"]})

    rows = range(process_index * batch_size, (process_index + 1) * batch_size)  # this host's rows
    ds = grain.experimental.InterleaveIterDataset(grain.MapDataset.source(list(rows)).map(row_stream),
                                                  cycle_length=batch_size)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(data_cfg.get("prefetch", 2)))
    return DataIterator(iter(ds))


class DataIterator:
    """The pipeline's iterator with its state as exact bytes. Grain's own checkpoint form is plain JSON, which
    turns the packer's tuples into lists that it then misreads on restore (batches after a resume would differ);
    here tuples are tagged so the state round-trips exactly. grain.checkpoint.CheckpointSave/Restore accept it."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> bytes:
        return json.dumps(_tag_tuples(self._iterator.get_state())).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(_untag_tuples(json.loads(state)))

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls this after a restore
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()


def _tag_tuples(x):
    if isinstance(x, tuple):
        return {"__tuple__": [_tag_tuples(v) for v in x]}
    if isinstance(x, list):
        return [_tag_tuples(v) for v in x]
    if isinstance(x, dict):
        if any(not isinstance(k, str) for k in x):
            return {"__items__": [[_tag_tuples(k), _tag_tuples(v)] for k, v in x.items()]}
        return {k: _tag_tuples(v) for k, v in x.items()}
    return x


def _untag_tuples(x):
    if isinstance(x, list):
        return [_untag_tuples(v) for v in x]
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_untag_tuples(v) for v in x["__tuple__"])
        if set(x) == {"__items__"}:
            return {_untag_tuples(k): _untag_tuples(v) for k, v in x["__items__"]}
        return {k: _untag_tuples(v) for k, v in x.items()}
    return x
