"""Training metrics to JSON lines and TensorBoard event files (process 0 writes; others are silent).

    w = MetricWriter(workdir, start_step=0)
    w.write(step, {"loss": 2.3, "tokens_per_s": 1e5, ...})   # scalars; [layers, heads]-shaped values are
    w.close()                                                 # summarised (max) for TensorBoard, kept in JSONL

A run resumed from the checkpoint of step S passes start_step=S: the rows and TensorBoard events the earlier run
wrote for steps >= S (between that checkpoint and the kill) are dropped first, so a resumed run's metrics read
as one run, each step once.

`Throughput` turns the times at which the loop learns that steps are done into steps per second without
counting compilation, checkpoint saves or a step still running; `token_rates` turns a window of it into tokens
per second: all targets (`tokens_per_s`) and the trained ones (`trained_tokens_per_s`: chat data's assistant
tokens). `RowSums` adds up counts of every step between two rows (conversations cut to a row or left out), so a
column's sum over the rows is the run's total.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        """start_step: the step this run starts from (0, or the step of the checkpoint it resumed from); what an
        earlier run logged for that step and later ones is dropped."""
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_jsonl_rows_from(path, start_step)
            self._jsonl = open(path, "a", buffering=1)
            if tensorboard:
                from tensorboardX.event_file_writer import EventsWriter
                from tensorboardX.proto.event_pb2 import Event, SessionLog

                logdir = os.path.join(workdir, "tensorboard")
                _drop_events_from(logdir, start_step)
                os.makedirs(logdir, exist_ok=True)
                # written in this thread (tensorboardX's SummaryWriter queues events to a thread, and its flush()
                # does not wait for them). The file name has the time in seconds: the suffix (ns) keeps files of
                # the same second apart and in order.
                self._tb = EventsWriter(os.path.join(logdir, "events"), f".{time.time_ns()}")
                # a restart marker: TensorBoard itself drops events >= start_step it may still have cached
                self._tb.write_event(Event(wall_time=time.time(), step=start_step,
                                           session_log=SessionLog(status=SessionLog.START)))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row, values = {"step": int(step)}, []
        for name, value in metrics.items():
            a = np.asarray(value)
            row[name] = a.item() if a.ndim == 0 else a.tolist()
            values.append((name if a.ndim == 0 else f"{name}/max", float(np.max(a)) if a.size else 0.0))
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary

            self._tb.write_event(Event(wall_time=time.time(), step=int(step), summary=Summary(
                value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values])))

    def flush(self) -> None:
        """Rows and events written so far into the files (the loop calls this before each checkpoint, so a kill
        after it loses none of them)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """Every row of workdir/metrics.jsonl, in step order (one row per logged step, resumed runs included)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop_jsonl_rows_from(path: str, step: int) -> None:
    """Keeps the rows of steps < `step` (and drops a last line a kill cut short)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["step"] < step:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if keep != lines:
        _atomic_write(path, b"".join(keep))


def _records(path: str) -> tuple[list[bytes], bool]:
    """The records of a TFRecord file (TensorBoard's event files), and whether the file ends with a record a kill
    cut short (dropped)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            break
        out.append(data[pos + 12:pos + 12 + length])
        pos = end
    return out, pos != len(data)


def _record(data: bytes) -> bytes:
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))


def _events(path: str) -> tuple[list, bool]:
    from tensorboardX.proto.event_pb2 import Event

    records, cut = _records(path)
    return [Event.FromString(r) for r in records], cut


def _drop_events_from(logdir: str, step: int) -> None:
    """Rewrites each event file under `logdir` without the summaries of steps >= `step`."""
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        events, cut = _events(path)
        keep = [e for e in events if not (e.HasField("summary") and e.step >= step)]
        if cut or len(keep) != len(events):
            _atomic_write(path, b"".join(_record(e.SerializeToString()) for e in keep))


def read_tensorboard(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in workdir/tensorboard, in the order written."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        for event in _events(path)[0]:
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


class Throughput:
    """Steps per second over the steps finished between two moments the loop knows how many are done.

        t = Throughput()
        t.mark(now, done)      # first call: the start (after compilation, after the first step: no warm-up)
        t.mark(now, done)      # -> (steps, seconds) since the previous mark, or None if no step finished
        t.mark_after_pause(now, done)   # restart the clock (a checkpoint save is not a step)

    `done` counts the steps known finished at `now`: the step whose metrics were just fetched, plus the next one
    if its outputs are ready too (on CPU a dispatch often runs the step before returning). Counting it makes
    windows of synchronous and asynchronous dispatch alike, and never reports the near-zero windows that gave
    millions of tokens per second. A mark at which no step finished since the last one (the previous mark counted
    this step already) returns the last window again and keeps the clock running, so every row after the first
    has a throughput."""

    def __init__(self):
        self._since: tuple[float, int] | None = None
        self._last: tuple[int, float] | None = None

    def mark(self, now: float, done: int) -> tuple[int, float] | None:
        since = self._since
        if since is not None and (done <= since[1] or now <= since[0]):
            return self._last
        self._since = (now, done)
        if since is not None:
            self._last = (done - since[1], now - since[0])
        return self._last

    def mark_after_pause(self, now: float, done: int) -> None:
        self._since = (now, done)


def token_rates(metrics: dict, steps: int, seconds: float) -> dict[str, float]:
    """Tokens per second over a window of `steps` steps like this one: every next-token target within a segment
    (tokens_per_s) and those the loss is computed on (trained_tokens_per_s)."""
    rate = steps / seconds
    return {"tokens_per_s": float(metrics["tokens"]) * rate,
            "trained_tokens_per_s": float(metrics.get("trained_tokens", metrics["tokens"])) * rate}


def describe_rates(rates: dict, *, trained: bool) -> str:
    """", 12,345 tok/s" (trained: ", 12,345 tok/s (4,567 trained)") for a step's line."""
    text = f", {rates['tokens_per_s']:,.0f} tok/s"
    return text + (f" ({rates['trained_tokens_per_s']:,.0f} trained)" if trained else "")


class RowSums:
    """Counts of every step summed until the next metrics row takes them.

        sums = RowSums(("conversations_truncated", "conversations_dropped"))
        sums.add(metrics)     # every step (keys a step does not have are left alone)
        row.update(sums.take())   # at a row: the sums since the previous row, then zero again
    """

    def __init__(self, keys):
        self.keys = tuple(keys)
        self._sums: dict[str, int] = {}

    def add(self, metrics: dict) -> None:
        for k in self.keys:
            if k in metrics:
                self._sums[k] = self._sums.get(k, 0) + int(metrics[k])

    def take(self) -> dict[str, int]:
        sums, self._sums = self._sums, {k: 0 for k in self._sums}
        return sums


def describe_conversations(counts: dict[str, int]) -> str:
    """"; conversations longer than a row since the last line: 3 truncated" (or dropped) and "; 2 conversations
    split into 5 sequences since the last line" for a step's line (chat data's counts, k2jax.training.data); ""
    when there were none."""
    said = [f"{counts[k]} {k.removeprefix('conversations_')}" for k in ("conversations_truncated",
                                                                         "conversations_dropped") if counts.get(k)]
    line = f"; conversations longer than a row since the last line: {', '.join(said)}" if said else ""
    if counts.get("conversations_split"):
        line += (f"; {counts['conversations_split']} conversations split into {counts.get('split_sequences', 0)} "
                 f"sequences since the last line")
    return line
