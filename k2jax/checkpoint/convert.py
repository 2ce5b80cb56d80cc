"""HF release (FP8 / INT4 / BF16 safetensors) <-> k2jax Orbax checkpoint, streamed tensor by tensor.

    k2jax-convert --hf_dir=Kimi-K2-Instruct --out_dir=k2-bf16 [--dtype=bfloat16|float32|fp8|int4] [--resume]
    k2jax-convert --to_hf --ckpt_dir=k2-fp8 --out_dir=Kimi-K2-export [--dtype=fp8|int4|bfloat16|float32]
    (or: python convert_checkpoint.py ...)

--dtype fp8 keeps an FP8 release's e4m3 bytes and block scales, --dtype int4 an INT4 release's (K2-Thinking, K2.5:
compressed-tensors) packed int32 and group scales, its quantization_config recorded in k2jax.json
(k2jax/checkpoint/format.py says how they are stored); bfloat16 / float32 dequantise (W = e4m3 x weight_scale_inv
per 128x128 block, (nibble - 8) x weight_scale per group). No conversion between the two quantised formats: --dtype
int4 of an FP8 release and --dtype fp8 of an INT4 one are errors (requantising would lose the release's exact
values); a BF16 release quantises to either (fp8: block amax / 448; int4: K2-Thinking's scheme, the routed experts
in groups of 32, k2jax.formats.quant.quantize_int4). A K2.5-layout release converts its text model (the vision
tower is left out, its settings kept in k2jax.json). The export writes the release layout (config.json, index,
shards): from an fp8 / int4 checkpoint in its own dtype it reproduces the release's tensors byte for byte (a
K2.5 source as its text model, in the K2-Thinking layout: unprefixed names, config model_type kimi_k2); from a
bf16 / f32 checkpoint --dtype fp8 / int4 quantises as above.

Memory: one release tensor at a time (the largest is the embedding or lm_head, 2.3 GB in BF16), written as it is
(k2jax checkpoints keep the release's [out, in] orientation: no host transpose) into its slot of the stacked
parameter with tensorstore (`checkpoint_stream.StreamingWriter`); nothing is assembled in RAM.
The whole input is validated first (config, index, every shard header, names, shapes, dtypes, scales) so a
bad checkpoint fails in seconds, not hours in.

Crash safety: the run writes into OUT_DIR.partial and records finished tensors in
OUT_DIR.partial/convert_progress.jsonl once they are on disk: written tensors are made durable together every
--sync_gb GB of output (one sync in the background, instead of an fsync per file, which made writes 4x slower),
so a crash loses at most that much work; `--resume` skips the recorded tensors and continues (with the
interrupted run's --dtype unless another is given). OUT_DIR appears (by rename) only when every tensor is durable
and k2jax.json is in place. The export is all-or-nothing (no --resume): it builds OUT_DIR under a temporary name;
it reads every chunk of the checkpoint (a missing one is an error naming it, never zeros).

Without --dtype the conversion writes bfloat16 and the export writes the checkpoint's own dtype (fp8 stays
fp8); the first line printed says which. Exit codes (k2jax/tools/commands.py): 0 OUT_DIR is complete; 1 the input is
missing, invalid or damaged, or OUT_DIR exists (one line naming the file, tensor or chunk; nothing complete is
left); 2 a bad flag; 74 the output could not be written (disk full, read-only): OUT_DIR.partial is kept and
`--resume` continues once that is fixed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import sys
import time
from typing import Any, Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from k2jax.checkpoint.format import (
    DTYPES,
    INT4_SCALES,
    QUANTIZED,
    SCALES,
    CheckpointError,
    local_path,
    read_metadata,
)
from k2jax.checkpoint.hf_checkpoint import HFCheckpoint, write_hf_checkpoint
from k2jax.checkpoint.hf_mapping import HFTensorSpec, fp8_params, int4_params
from k2jax.checkpoint.stream import CheckpointReader, StreamingWriter
from k2jax.formats import quant
from k2jax.model.transformer import param_name

PROGRESS = "convert_progress.jsonl"
SYNC_GB = 2.0


class OutputError(OSError):
    """The output could not be written (disk full, read-only, ...): k2jax-convert exits 74."""


def _say(show: bool, message: str) -> None:
    """A progress line on stderr, next to the progress bar (stdout stays free for the caller)."""
    if show:
        tqdm.write(message, file=sys.stderr)


def _writing(action: Callable[[], Any]) -> Any:
    """Runs a write, reporting its failure (OSError, or tensorstore's ValueError) as an OutputError."""
    try:
        return action()
    except OutputError:
        raise
    except (OSError, ValueError) as e:
        raise OutputError(str(e)) from e


class _ProgressLog:
    """convert_progress.jsonl: a header, then one line per tensor whose output is on disk. Tensors whose writes
    landed are made durable in batches of `sync_bytes` by a background `writer.sync()` and only then recorded, so
    the log never names a tensor a power cut could lose."""

    def __init__(self, path: str, header: dict, writer: StreamingWriter, sync_bytes: float):
        self.file = open(path, "a+b")
        if self.file.tell() > 0:  # resumed: drop a last line a crash cut short, keep the header and records
            self.file.seek(0)
            self.file.truncate(self.file.read().rfind(b"\n") + 1)
            self.file.seek(0, os.SEEK_END)
        if self.file.tell() == 0:
            self.file.write(json.dumps(header).encode() + b"\n")
            self._flush()
        self.writer, self.sync_bytes = writer, sync_bytes
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.syncing: concurrent.futures.Future | None = None

    def _flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def _record(self, names: list[str]) -> None:
        self.writer.sync()
        self.file.writelines(json.dumps({"done": n}).encode() + b"\n" for n in names)
        self._flush()

    def landed(self, name: str, nbytes: int) -> None:
        self.pending.append(name)
        self.pending_bytes += nbytes
        if self.pending_bytes >= self.sync_bytes and (self.syncing is None or self.syncing.done()):
            if self.syncing is not None:
                self.syncing.result()  # re-raises a failed sync
            batch, self.pending, self.pending_bytes = self.pending, [], 0
            self.syncing = self.pool.submit(self._record, batch)

    def close(self) -> None:
        """Everything landed so far durable and recorded."""
        if self.syncing is not None:
            self.syncing.result()
        self._record(self.pending)
        self.pool.shutdown()
        self.file.close()


def _partial_header(partial: str) -> dict | None:
    """The interrupted run's {"source", "dtype"}, or None if it recorded nothing (or not even its header)."""
    path = os.path.join(partial, PROGRESS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        first = f.readline()
    try:
        return json.loads(first)
    except ValueError:
        return None


def _done_tensors(partial: str, source: str, dtype: str) -> set[str]:
    path = os.path.join(partial, PROGRESS)
    if not os.path.exists(path):
        return set()
    done = set()
    with open(path) as f:
        lines = f.read().splitlines()
    header = _partial_header(partial)
    if header is None:
        return done
    if header.get("source") != source:
        raise CheckpointError(f"{partial}: the interrupted conversion reads {header.get('source')}, not {source}: "
                              f"pass --hf_dir={header.get('source')} to resume it, or delete it to start over")
    if header.get("dtype") != dtype:
        raise CheckpointError(f"{partial}: the interrupted conversion writes {header.get('dtype')}, not {dtype}: "
                              f"add --dtype={header.get('dtype')} to resume it, or delete it to start over as "
                              f"{dtype}")
    for line in lines[1:]:
        try:
            done.add(json.loads(line)["done"])
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by the crash: that tensor is redone
    return done


def convert_hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: str | None = None, resume: bool = False,
                        show_progress: bool = True, sync_gb: float = SYNC_GB) -> None:
    """dtype: bfloat16 | float32 | fp8 | int4; None: bfloat16, or with `resume` the interrupted run's.
    show_progress: a progress bar and a line at the start and the end."""
    hf_dir, out_dir = local_path(hf_dir), os.path.abspath(local_path(out_dir))
    partial = out_dir + ".partial"
    if dtype is None:
        header = _partial_header(partial) if resume else None
        dtype = header["dtype"] if header and header.get("dtype") in DTYPES else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not sync_gb >= 0:
        raise ValueError(f"--sync_gb must be >= 0 (GB between syncs; 0: after every tensor), got {sync_gb}")
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir}: already exists; refusing to overwrite")
    if os.path.exists(partial) and not resume:
        raise CheckpointError(f"{partial}: an interrupted conversion is there; pass --resume to continue it or "
                              f"delete it")
    ckpt = HFCheckpoint(hf_dir)
    ckpt.check()
    scheme = _target_scheme(ckpt.scheme, dtype, hf_dir)
    ckpt.check_scales(dtype="bfloat16" if dtype in QUANTIZED else dtype)  # fp8 / int4 load as bf16 by default
    source = os.path.abspath(hf_dir)
    done = _done_tensors(partial, source, dtype) if resume else set()
    writer = _writing(lambda: StreamingWriter(partial, ckpt.config, dtype, scheme, ckpt.multimodal))
    kept = fp8_params(ckpt.config) if dtype == "fp8" else int4_params(ckpt.config, scheme) if dtype == "int4" else {}
    specs = list(ckpt.specs.values())
    total = sum(ckpt.stored_nbytes(s.name) for s in specs)
    _say(show_progress, f"converting {hf_dir} ({len(specs)} tensors, {total / 1e9:.2f} GB) to {out_dir} as {dtype}"
         + (f"; {len(done)} tensors already done" if resume else ""))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not show_progress)
    loop_start = time.perf_counter()
    in_flight: collections.deque = collections.deque()  # (write futures, release name, slots kept alive)
    log = _writing(lambda: _ProgressLog(os.path.join(partial, PROGRESS), {"source": source, "dtype": dtype},
                                        writer, sync_gb * 1e9))

    def land_oldest():
        futures, name, slots = in_flight.popleft()
        for f in futures:
            _writing(f.result)
        _writing(lambda: log.landed(name, sum(slot.nbytes for _, slot in slots)))

    try:
        for spec in specs:
            if spec.name not in done:
                name = param_name(spec.path)
                slot_shape = writer.shapes[name][0][len(spec.index):]
                writes = _stored_slots(ckpt, spec, name, slot_shape, writer.shapes[name][1],
                                       dtype if name in kept else None, scheme)
                futures = [_writing(lambda: writer.write(n, spec.index, slot, wait=False)) for n, slot in writes]
                in_flight.append((futures, spec.name, writes))
                while len(in_flight) > 1:  # one write overlaps the next tensor's read and transform
                    land_oldest()
            bar.update(ckpt.stored_nbytes(spec.name))
        while in_flight:
            land_oldest()
        sync_start = time.perf_counter()
        _writing(log.close)  # everything durable and recorded
    except (CheckpointError, quant.QuantError) as e:  # a bad weight found while streaming (an e4m3 NaN)
        raise type(e)(f"{e}; {partial} is kept: once the input is fixed, run the same command with --resume to "
                      f"continue") from e
    finally:
        bar.close()  # an error message then starts on its own line
    seconds, sync_s = time.perf_counter() - loop_start, time.perf_counter() - sync_start
    _writing(writer.finish)
    _writing(lambda: _publish(partial, out_dir))
    _say(show_progress, f"wrote {out_dir}: streamed {total / 1e9:.3f} GB in {seconds:.1f} s: "
         f"{total / 1e9 / max(seconds, 1e-9):.3f} GB/s (the last {sync_s:.1f} s waiting for the disk to take the rest)")


def _publish(partial: str, out_dir: str) -> None:
    os.remove(os.path.join(partial, PROGRESS))
    os.rename(partial, out_dir)
    parent = os.open(os.path.dirname(out_dir), os.O_RDONLY)
    try:
        os.fsync(parent)  # the rename itself survives a power cut
    finally:
        os.close(parent)


def _target_scheme(scheme: quant.Scheme | None, dtype: str, source: str) -> quant.Int4Scheme | None:
    """The INT4 scheme a conversion or export to `dtype` writes (int4: the source's, or K2-Thinking's for an
    unquantised source); a CheckpointError for a conversion between the two quantised formats."""
    if dtype in QUANTIZED and scheme is not None and scheme.format != dtype:
        raise CheckpointError(f"{source}: --dtype {dtype} of a {scheme.format} checkpoint would requantise its "
                              f"{scheme.format.upper()} weights, which k2jax does not do (their exact values would be "
                              f"lost): use --dtype {scheme.format}, bfloat16 or float32")
    if dtype != "int4":
        return None
    return scheme if scheme is not None else quant.parse_quantization_config(quant.K2_INT4_QUANTIZATION_CONFIG)


def _stored_slots(ckpt: HFCheckpoint, spec: HFTensorSpec, name: str, slot_shape, target: str, keep: str | None,
                  scheme: quant.Int4Scheme | None):
    """[(parameter name, slot array)] to write for one release tensor; `target` is the parameter's stored dtype.
    A slot holds the release tensor as it is (k2jax.checkpoint.format: no transpose), dequantised unless kept
    (keep: "fp8" / "int4")."""
    if keep == "fp8":
        q, scale = _fp8_pair(ckpt, spec)
        return [(name, q.reshape(slot_shape)), (f"{SCALES}.{name}", scale)]
    if keep == "int4":
        packed, scale = _int4_pair(ckpt, spec, scheme)
        return [(name, packed.reshape(slot_shape)), (f"{INT4_SCALES}.{name}", scale)]
    if ckpt.is_int4(spec.name):  # checked: dequantises to finite values of target
        out = ckpt.read(spec.name, dtype=jnp.dtype(target))
    elif ckpt.stored_dtype(spec.name) == quant.E4M3:
        raw, scale = ckpt.read_fp8(spec.name, dtype=target)  # no NaN, scales that keep the weights finite
        out = quant.dequantize(raw, scale, jnp.dtype(target), name=ckpt.stored(spec.name), checked=True)
    else:
        out = ckpt.read_raw(spec.name).astype(jnp.dtype(target))
    return [(name, out.reshape(slot_shape))]


def _fp8_pair(ckpt: HFCheckpoint, spec: HFTensorSpec) -> tuple[np.ndarray, np.ndarray]:
    """The release's (e4m3 weight, scale) as stored, or quantised now if the source holds it unquantised."""
    if ckpt.stored_dtype(spec.name) == quant.E4M3:
        return ckpt.read_fp8(spec.name, dtype="bfloat16")  # what load_checkpoint dequantises to by default
    return quant.quantize(ckpt.read_raw(spec.name).astype(np.float32), name=spec.name)


def _int4_pair(ckpt: HFCheckpoint, spec: HFTensorSpec, scheme: quant.Int4Scheme) -> tuple[np.ndarray, np.ndarray]:
    """The release's (weight_packed, weight_scale) as stored, or quantised now if the source holds it unquantised."""
    if ckpt.is_int4(spec.name):
        return ckpt.read_int4(spec.name, dtype="bfloat16")  # what load_checkpoint dequantises to by default
    return quant.quantize_int4(ckpt.read_raw(spec.name).astype(np.float32), name=spec.name,
                               group_size=scheme.group_size, scale_dtype=scheme.scale_dtype)


def export_to_hf(ckpt_dir: str, out_dir: str, *, dtype: str | None = None, show_progress: bool = True) -> None:
    """A k2jax checkpoint -> the release layout, one tensor in memory at a time. dtype: fp8 | int4 | bfloat16 |
    float32; None: the checkpoint's own (an fp8 / int4 checkpoint exports its e4m3 bytes and scales, or packed
    int32, group scales and weight_shapes, unchanged, with the release's quantization_config)."""
    ckpt_dir, out_dir = local_path(ckpt_dir), local_path(out_dir)
    source_dtype = read_metadata(ckpt_dir)["dtype"]
    chosen = dtype is not None
    dtype = dtype or source_dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _say(show_progress, f"exporting {ckpt_dir} ({source_dtype} checkpoint) to {out_dir} as {dtype}"
         + ("" if chosen else " (the checkpoint's dtype; --dtype chooses another)"))
    reader = CheckpointReader(ckpt_dir)  # every chunk checked to be on disk
    scheme = _target_scheme(reader.scheme or (quant.Fp8Scheme() if reader.dtype == "fp8" else None), dtype, ckpt_dir)
    fp8 = fp8_params(reader.cfg) if reader.dtype == "fp8" else {}
    int4 = int4_params(reader.cfg, reader.scheme) if reader.dtype == "int4" else {}
    dequantized = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32

    def source(spec: HFTensorSpec):  # a slot is the release tensor as it is (k2jax.checkpoint.format)
        name = param_name(spec.path)
        slot = reader.slot(name, spec.index)
        if name in int4:
            scale = reader.slot(f"{INT4_SCALES}.{name}", spec.index)
            return (slot, scale) if dtype == "int4" else quant.dequantize_int4(
                slot, scale, spec.shape, dequantized, name=spec.name, group_size=reader.scheme.group_size)
        slot = slot.reshape(spec.shape)
        if name not in fp8:
            return slot.astype(np.float32)
        scale = reader.slot(f"{SCALES}.{name}", spec.index)
        return (slot, scale) if dtype == "fp8" else quant.dequantize(slot, scale, dequantized, name=spec.name)

    try:
        write_hf_checkpoint(out_dir, reader.cfg, source, dtype=dtype, scheme=scheme)
    except OSError as e:
        raise OutputError(str(e)) from e
    _say(show_progress, f"wrote {out_dir}")
