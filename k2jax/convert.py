"""HF release (FP8 / BF16 safetensors) -> k2jax Orbax checkpoint, streamed tensor by tensor.

    k2jax-convert --hf_dir=Kimi-K2-Instruct --out_dir=k2-bf16 [--dtype=bfloat16|float32] [--resume]
    (or: python convert_checkpoint.py ...)

Memory: one release tensor at a time (the largest is the embedding or lm_head, 2.3 GB in BF16), written into its
slot of the stacked parameter with tensorstore (`checkpoint.StreamingWriter`); nothing is assembled in RAM.
The whole input is validated first (config, index, every shard header, names, shapes, dtypes, scales) so a
bad checkpoint fails in seconds, not hours in.

Crash safety: the run writes into OUT_DIR.partial and records each finished tensor in
OUT_DIR.partial/convert_progress.jsonl; `--resume` skips those and continues. OUT_DIR appears (by rename) only
when every tensor is written and k2jax.json is in place.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from k2jax.checkpoint import StreamingWriter, param_name
from k2jax.config import ConfigError
from k2jax.hf_checkpoint import HFCheckpoint
from k2jax.hf_mapping import CheckpointError, hf_to_k2

DTYPES = ("bfloat16", "float32")
PROGRESS = "convert_progress.jsonl"


def _done_tensors(partial: str, source: str, dtype: str) -> set[str]:
    path = os.path.join(partial, PROGRESS)
    if not os.path.exists(path):
        return set()
    done = set()
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return done
    header = json.loads(lines[0])
    if header != {"source": source, "dtype": dtype}:
        raise CheckpointError(f"{partial}: the partial run converted {header}, not {source} to {dtype}; "
                              f"delete it or convert to another --out_dir")
    for line in lines[1:]:
        try:
            done.add(json.loads(line)["done"])
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by the crash: that tensor is redone
    return done


def convert_hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", resume: bool = False,
                        show_progress: bool = True) -> None:
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    out_dir = os.path.abspath(out_dir)
    partial = out_dir + ".partial"
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir}: already exists; refusing to overwrite")
    if os.path.exists(partial) and not resume:
        raise CheckpointError(f"{partial}: an interrupted conversion is there; pass --resume to continue it or "
                              f"delete it")
    ckpt = HFCheckpoint(hf_dir)
    ckpt.check()
    ckpt.check_scales()
    source = os.path.abspath(hf_dir)
    done = _done_tensors(partial, source, dtype) if resume else set()
    writer = StreamingWriter(partial, ckpt.config, dtype)
    specs = list(ckpt.specs.values())
    total = sum(ckpt.stored_nbytes(s.name) for s in specs)
    logging.info("converting %d tensors (%.2f GB) from %s to %s (%s); %d already done", len(specs), total / 1e9,
                 hf_dir, out_dir, dtype, len(done))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not show_progress)
    with open(os.path.join(partial, PROGRESS), "a") as progress:
        if not done:
            progress.write(json.dumps({"source": source, "dtype": dtype}) + "\n")
        for spec in specs:
            size = ckpt.stored_nbytes(spec.name)
            if spec.name not in done:
                name = param_name(spec.path)
                slot_shape = writer.shapes[name][0][len(spec.index):]
                writer.write(name, spec.index, hf_to_k2(spec, ckpt.read(spec.name, np.float32), slot_shape))
                progress.write(json.dumps({"done": spec.name}) + "\n")
                progress.flush()
                os.fsync(progress.fileno())
            bar.update(size)
    bar.close()
    writer.finish()
    os.remove(os.path.join(partial, PROGRESS))
    os.rename(partial, out_dir)
    logging.info("wrote %s", out_dir)


_HF_DIR = flags.DEFINE_string("hf_dir", None, "Directory of the HF release: config.json, "
                              "model.safetensors.index.json and the safetensors shards.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the k2jax (Orbax) checkpoint; must not exist.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Parameter dtype of the output (FP8 weights are "
                           "dequantised: W = fp8 * weight_scale_inv per 128x128 block).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue an interrupted conversion found at OUT_DIR.partial.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _HF_DIR.value or not _OUT_DIR.value:
        raise app.UsageError("--hf_dir and --out_dir are required")
    try:
        convert_hf_to_orbax(_HF_DIR.value, _OUT_DIR.value, dtype=_DTYPE.value, resume=_RESUME.value)
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"convert_checkpoint: {e}") from None


def cli():
    app.run(main)
