"""k2jax-convert (convert_checkpoint.py): the command line of k2jax.checkpoint.convert.

    k2jax-convert --hf_dir=Kimi-K2-Instruct --out_dir=k2-bf16 [--dtype=bfloat16|float32|fp8|int4] [--resume]
    k2jax-convert --to_hf --ckpt_dir=k2-fp8 --out_dir=Kimi-K2-export [--dtype=fp8|int4|bfloat16|float32]

What each flag does, crash safety and memory: k2jax/checkpoint/convert.py. Exit codes (k2jax/tools/commands.py):
0 OUT_DIR is complete; 1 the input is missing, invalid or damaged, or OUT_DIR exists; 2 a bad flag; 74 the output
could not be written (disk full, read-only): OUT_DIR.partial is kept and `--resume` continues once that is fixed;
130 Ctrl-C: OUT_DIR.partial is kept and `--resume` continues (an export leaves nothing).
"""

from __future__ import annotations

from k2jax.tools import startup

startup.quiet()  # before jax is imported: no CUDA / libtpu start-up lines on a machine without those devices

import os  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402

from k2jax.checkpoint.convert import SYNC_GB, OutputError, convert_hf_to_orbax, export_to_hf  # noqa: E402
from k2jax.checkpoint.format import DTYPES, CheckpointError, local_path  # noqa: E402
from k2jax.formats import quant  # noqa: E402
from k2jax.model.config import ConfigError  # noqa: E402
from k2jax.tools import commands  # noqa: E402

_FLAGS = ["hf_dir", "ckpt_dir", "out_dir", "dtype", "resume", "sync_gb", "to_hf"]


def _define_flags() -> None:
    """Flags exist only for the command line (defining them at import would clash with other entry points)."""
    flags.DEFINE_string("hf_dir", None, "Directory of the HF release: config.json, model.safetensors.index.json "
                        "and the safetensors shards.")
    flags.DEFINE_string("ckpt_dir", None, "With --to_hf: the k2jax checkpoint to export.")
    flags.DEFINE_string("out_dir", None, "Where to write the output (a k2jax checkpoint, or with --to_hf the "
                        "release layout); must not exist.")
    flags.DEFINE_enum("dtype", None, list(DTYPES), "Output dtype. bfloat16 / float32: FP8 / INT4 weights are "
                      "dequantised (W = fp8 * weight_scale_inv per 128x128 block, (nibble - 8) * weight_scale per "
                      "group); fp8: an FP8 release's e4m3 weights and scales are kept, int4: an INT4 release's "
                      "(K2-Thinking, K2.5) packed weights and group scales (from a bf16 / f32 source either "
                      "quantises; fp8 of an INT4 release and int4 of an FP8 one are refused). Default: bfloat16 "
                      "(with --resume: the interrupted run's); with --to_hf the checkpoint's own dtype.")
    flags.DEFINE_bool("resume", False, "Continue an interrupted conversion found at OUT_DIR.partial.")
    flags.DEFINE_float("sync_gb", SYNC_GB, "Make written tensors durable (and resumable) every this many GB of "
                       "output; a crash redoes at most that much. 0: after every tensor (slower).", lower_bound=0)
    flags.DEFINE_bool("to_hf", False, "Export --ckpt_dir back to the HF release layout in --out_dir.")


def _kept(to_hf: bool, out_dir: str, first: str = "") -> str:
    """What a conversion or export stopped part-way leaves, and how to continue (after `first`)."""
    partial = os.path.abspath(out_dir) + ".partial"
    if to_hf:
        return f"nothing was left at {out_dir} (the export is all-or-nothing): {first}run it again"
    if os.path.exists(partial):
        return f"{partial} is kept: {first}run the same command with --resume to continue"
    return "nothing was written"


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise commands.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.to_hf:
        if not FLAGS.ckpt_dir or not FLAGS.out_dir or FLAGS.hf_dir or FLAGS.resume:
            raise commands.UsageError("--to_hf takes --ckpt_dir and --out_dir (and no --hf_dir or --resume)")
    elif not FLAGS.hf_dir or not FLAGS.out_dir or FLAGS.ckpt_dir:
        raise commands.UsageError("--hf_dir and --out_dir are required (--ckpt_dir goes with --to_hf)")
    out_dir = local_path(FLAGS.out_dir)  # "out/" is "out": OUT_DIR.partial sits beside it
    try:
        if FLAGS.to_hf:
            export_to_hf(local_path(FLAGS.ckpt_dir), out_dir, dtype=FLAGS.dtype)
        else:
            convert_hf_to_orbax(local_path(FLAGS.hf_dir), out_dir, dtype=FLAGS.dtype, resume=FLAGS.resume,
                                sync_gb=FLAGS.sync_gb)
    except OutputError as e:
        raise OutputError(f"cannot write the output: {e}; {_kept(FLAGS.to_hf, out_dir, 'once that is fixed, ')}") \
            from None
    except KeyboardInterrupt:
        raise commands.Interrupted(f"interrupted (Ctrl-C); {_kept(FLAGS.to_hf, out_dir)}") from None


def cli():
    _define_flags()
    for name in _FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --help lists it
    commands.run(main, doc=__doc__, errors={
        OutputError: commands.IO_ERROR, CheckpointError: commands.FAILED, ConfigError: commands.FAILED,
        quant.QuantError: commands.FAILED})
