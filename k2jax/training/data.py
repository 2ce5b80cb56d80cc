"""Training data with Grain: token sources, per-host sharding, sequence packing, a checkpointable iterator.

    it = make_iterator(config.data, seq_len=T, global_batch=R, vocab_size=V, seed=0)
    batch = next(it)      # this host's rows {"tokens", "segment_ids", "positions"}: int32 [R / hosts, T + 1]
    it.get_state() / it.set_state(state)                 # bytes; saved with every checkpoint (grain.checkpoint)

Sources (`config.data.source`):
  synthetic                     random documents from the seed (smoke runs and tests)
  jsonl:PATH[,PATH...]          one JSON object per line; `config.data.text_field` is tokenised on the fly with
                                the tokenizer in `config.data.tokenizer_dir` (the release's tiktoken.model)
  array_record:PATH[,PATH...]   records of little-endian int32 token ids, one document per record
  chat:PATH[,PATH...]           conversations for fine-tuning, one JSON object per line: {"messages": [...],
                                "tools": [...]} (OpenAI / release form: tool calls, tool results, reasoning),
                                rendered by the chat template of `config.data.tokenizer_dir` (the release's own)
                                with a loss weight per token: 1 on what the assistant produces, 0 elsewhere
                                (k2jax.training.chat_data)

Pipeline: documents -> global shuffle (seeded; every epoch a new permutation) -> row r of every global batch (of R rows)
is its own stream of documents r, r + R, r + 2R, ..., tokenised, ended with an end-of-document token, packed end
to end into rows of T + 1 tokens with segment ids / positions (no padding; a document cut in two continues in
that row of the next batch) -> a host interleaves the streams of its own rows -> batch -> prefetch (a thread).
So the global batch is the same whatever the number of hosts, the same seed gives the same batches, and
restoring the iterator state resumes exactly where the checkpoint was taken.

Chat data is packed differently: a conversation becomes its training sequences (one, or several where its template
renders earlier turns differently once later ones follow: k2jax.training.chat_data), and a sequence is never split
between rows (it would lose its context). Each row stream packs whole sequences first-fit into
`config.data.packing_bins` rows at a time, padding the rest (segment 0), and the batch carries `loss_weights`
float32 [R, T + 1] (the weight of each token as a target) and per-row counts int32 [R] (CONVERSATION_COUNTS):
`conversations_truncated` / `conversations_dropped`, a sequence longer than a row (seq_len + 1 tokens) cut to the row
or left out, as `config.data.too_long` says ("truncate" | "drop"); `conversations_split` / `split_sequences`, the
conversations made into several sequences and how many sequences those are; all summed in the step's metrics.
`batch_shapes(config.data, R, T)` says which leaves a source's batches have.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np

from k2jax.inference.chat_template import ChatTemplateError
from k2jax.inference.tokenizer import Tokenizer
from k2jax.tools.commands import UsageError
from k2jax.training.chat_data import CONVERSATION_COUNTS, ChatMaskError, render_chat, show_trained


class DataError(ValueError):
    """A data source that cannot be read."""


class DataConfigError(DataError, UsageError):
    """A data option that cannot work (train.py exits 2: a bad config value; nothing is trained)."""


TOO_LONG = ("truncate", "drop")  # what config.data.too_long can say about a conversation longer than a row


class _Jsonl:
    """The lines of some JSONL files, addressed by (file, byte offset, line number)."""

    def __init__(self, paths: list[str]):
        self._index: list[tuple[str, int, int]] = []
        for path in paths:
            if not os.path.exists(path):
                raise DataError(f"{path}: no such JSONL file")
            with open(path, "rb") as f:
                offset = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self._index.append((path, offset, number))
                    offset += len(line)
        if not self._index:
            raise DataError(f"{paths}: no documents")

    def __len__(self) -> int:
        return len(self._index)

    def _line(self, i: int) -> bytes:
        path, offset, _ = self._index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            return f.readline()


class _JsonlText(_Jsonl):
    """The text field of every line."""

    def __init__(self, paths: list[str], field: str):
        super().__init__(paths)
        self.field = field

    def __getitem__(self, i: int) -> str:
        line = self._line(i)
        try:
            record = json.loads(line)
            return record[self.field]
        except (ValueError, KeyError, TypeError) as e:
            path, offset, _ = self._index[i]
            raise DataError(f"{path} at byte {offset}: not a JSON object with a {self.field!r} string ({e})") from None


class _JsonlChats(_Jsonl):
    """Every line as (record, "path:line")."""

    def __getitem__(self, i: int) -> tuple[object, str]:
        path, _, number = self._index[i]
        where = f"{path}:{number}"
        try:
            return json.loads(self._line(i)), where
        except ValueError as e:
            raise DataError(f"{where}: not a JSON line ({e})") from None


def render_record(tokenizer: Tokenizer, record, where: str):
    """A chat line's conversation -> its training sequences, [chat_data.RenderedChat] (one unless the template
    renders earlier turns differently depending on what follows); DataError naming the line (and the turn)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list (and optionally 'tools'), got "
                        f"{str(record)[:80]!r}")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of JSON schemas, got {str(tools)[:80]!r}")
    try:
        return render_chat(tokenizer, record["messages"], tools=tools)
    except (ChatMaskError, ChatTemplateError) as e:
        raise DataError(f"{where}: {e}") from None


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


def _kind(data_cfg) -> str:
    return data_cfg.source.partition(":")[0]


def _source(data_cfg, vocab_size: int, seed: int):
    kind, _, spec = data_cfg.source.partition(":")
    paths = [p for p in spec.split(",") if p]
    if kind == "synthetic":
        return _Synthetic(vocab_size, seed), None
    if kind in ("jsonl", "chat"):
        if not data_cfg.get("tokenizer_dir"):
            raise DataError(f"data.source {kind} needs data.tokenizer_dir (a directory with tiktoken.model)")
        tokenizer = Tokenizer.from_dir(data_cfg.tokenizer_dir)
        if tokenizer.vocab_size > vocab_size:
            raise DataConfigError(
                f"config.data.tokenizer_dir={data_cfg.tokenizer_dir}: its tokenizer has {tokenizer.vocab_size:,} "
                f"token ids, more than the model's vocab_size {vocab_size:,}: use the release's model "
                f"(config.model.hf_config) or set config.model.overrides.vocab_size to {tokenizer.vocab_size}")
        if kind == "chat":
            return _JsonlChats(paths), tokenizer
        return _JsonlText(paths, data_cfg.get("text_field", "text")), tokenizer
    if kind == "array_record":
        missing = [p for p in paths if not os.path.exists(p)]
        if not paths or missing:
            raise DataError(f"data.source array_record: missing files {missing or spec!r}")
        return grain.sources.ArrayRecordDataSource(paths), None
    raise DataError(f"data.source must be synthetic, jsonl:PATHS, chat:PATHS or array_record:PATHS, got "
                    f"{data_cfg.source!r}")


def batch_shapes(data_cfg, rows: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """{leaf: (shape, dtype)} of a batch of `rows` rows from this source (what the train step is compiled for)."""
    shapes = {k: ((rows, seq_len + 1), np.int32) for k in ("tokens", "segment_ids", "positions")}
    if _kind(data_cfg) == "chat":
        shapes["loss_weights"] = ((rows, seq_len + 1), np.float32)
        shapes.update({k: ((rows,), np.int32) for k in CONVERSATION_COUNTS})
    return shapes


def sample_text(data_cfg, *, seq_len: int) -> str | None:
    """Chat data: its first conversation rendered, the trained tokens between ⟦ and ⟧ (train.py prints it at
    start-up); None for other sources. Raises DataError as the pipeline would for that conversation."""
    if _kind(data_cfg) != "chat":
        return None
    source, tokenizer = _source(data_cfg, vocab_size=1 << 62, seed=0)
    chats = render_record(tokenizer, *source[0])
    off = "(between ⟦ and ⟧; turn this off with config.data.print_sample=False)"

    def described(chat, off: str = "") -> str:
        fate = (f"; longer than a row of seq_len + 1 = {seq_len + 1} tokens: {data_cfg.too_long}"
                if chat.ids.size > seq_len + 1 else "")
        return (f"{chat.ids.size} tokens, {int(np.count_nonzero(chat.weights))} trained{off}{fate}\n"
                f"{show_trained(tokenizer, chat.ids, chat.weights)}")

    if len(chats) == 1:
        return f"sample conversation ({source[0][1]}): {described(chats[0], ' ' + off)}"
    return (f"sample conversation ({source[0][1]}): split into {len(chats)} sequences (its chat template renders "
            f"earlier turns differently once later ones follow: each assistant turn is trained in one that starts "
            f"with its own prompt) {off}" + "".join(f"\nsequence {n} of {len(chats)}: {described(chat)}"
                               for n, chat in enumerate(chats, 1)))


def make_iterator(data_cfg, *, seq_len: int, global_batch: int, vocab_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None):
    """The grain iterator of this host's rows of each global batch (see the module docstring)."""
    source, tokenizer = _source(data_cfg, vocab_size, seed)
    eod = int(data_cfg.get("eod_token_id", -1))
    if tokenizer is not None and eod < 0:
        eod = tokenizer.special("[EOS]")
    if isinstance(source, _JsonlChats):
        _chat_options(data_cfg)  # a bad option fails here, not in the pipeline's threads
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
        if isinstance(source, _JsonlChats):
            return _chat_rows(documents[row::global_batch], tokenizer, data_cfg, seq_len)
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


def _chat_options(data_cfg) -> tuple[str, int]:
    """(config.data.too_long, config.data.packing_bins), checked."""
    too_long, bins = data_cfg.get("too_long", "truncate"), data_cfg.get("packing_bins", 8)
    if too_long not in TOO_LONG:
        raise DataConfigError(f"config.data.too_long={too_long!r}: 'truncate' or 'drop' (what to do with a "
                              f"conversation longer than a row of seq_len + 1 tokens)")
    if not isinstance(bins, int) or bins < 1:
        raise DataConfigError(f"config.data.packing_bins={bins!r}: must be a whole number, at least 1")
    return too_long, bins


def _chat_rows(conversations, tokenizer: Tokenizer, data_cfg, seq_len: int):
    """Rows of whole conversations (first-fit, padded; never one split between rows) with their loss weights and
    the count of conversations cut to a row or left out (config.data.too_long)."""
    (too_long, bins), row_len = _chat_options(data_cfg), seq_len + 1

    def to_examples(item) -> list[dict]:  # (ids below vocab_size: _source checked the tokenizer's size)
        chats = render_record(tokenizer, *item)
        split = len(chats) > 1
        examples = []
        for n, chat in enumerate(chats):
            over = chat.ids.size > row_len
            keep = 0 if over and too_long == "drop" else row_len  # a dropped one: no tokens, only its count
            examples.append({"tokens": chat.ids[:keep], "loss_weights": chat.weights[:keep],
                             "conversations_truncated": np.int32(over and too_long == "truncate"),
                             "conversations_dropped": np.int32(over and too_long == "drop"),
                             "conversations_split": np.int32(split and n == 0),  # counted once, on the first
                             "split_sequences": np.int32(len(chats) if split and n == 0 else 0)})
        return examples

    # rendering is Python work: a few conversations ahead per stream, not grain's default 500 on 16 threads
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * bins)
    sequences = grain.experimental.FlatMapIterDataset(conversations.map(to_examples).to_iter_dataset(read),
                                                      _Sequences())
    ds = grain.experimental.FirstFitPackIterDataset(
        sequences, length_struct={"tokens": row_len, "loss_weights": row_len},
        num_packing_bins=bins, shuffle_bins=False, meta_features=CONVERSATION_COUNTS)
    return ds.map(lambda ex: {"tokens": ex["tokens"], "segment_ids": ex["tokens_segment_ids"],
                              "positions": ex["tokens_positions"], "loss_weights": ex["loss_weights"],
                              **{k: np.int32(sum(ex[k])) for k in CONVERSATION_COUNTS}})


class _Sequences(grain.experimental.FlatMapTransform):
    """A conversation's list of sequences (examples) -> its sequences one by one, in order."""

    max_fan_out = 1 << 16

    def flat_map(self, element):
        return element


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
