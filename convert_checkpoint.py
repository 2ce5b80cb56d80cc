"""Converts the HF Kimi K2 release to a k2jax checkpoint. See k2jax/tools/convert.py (or --help) for the flags.

    python convert_checkpoint.py --hf_dir=Kimi-K2-Instruct --out_dir=k2-bf16 [--dtype=bfloat16|float32|fp8] [--resume]
    python convert_checkpoint.py --to_hf --ckpt_dir=k2-fp8 --out_dir=Kimi-K2-export [--dtype=fp8]

Without --dtype: bfloat16 (with --resume: the interrupted run's), and --to_hf keeps the checkpoint's own dtype.
Exit codes: 0 OUT_DIR is complete; 1 the input is missing, invalid or damaged, or OUT_DIR exists (one line naming
the file, tensor or chunk); 2 a bad flag; 74 the output could not be written (disk full, read-only), 130 Ctrl-C:
OUT_DIR.partial is kept and --resume continues. --verbosity=0 shows library INFO logs, --verbosity=1 also an error's
traceback.
"""

from k2jax.tools.convert import cli

if __name__ == "__main__":
    cli()
