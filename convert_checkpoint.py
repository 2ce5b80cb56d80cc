"""Converts the HF Kimi K2 release to a k2jax checkpoint. See k2jax/convert.py (or --help) for the flags.

    python convert_checkpoint.py --hf_dir=Kimi-K2-Instruct --out_dir=k2-bf16 [--dtype=bfloat16|float32|fp8] [--resume]
    python convert_checkpoint.py --to_hf --ckpt_dir=k2-fp8 --out_dir=Kimi-K2-export [--dtype=fp8]
"""

from k2jax.convert import cli

if __name__ == "__main__":
    cli()
