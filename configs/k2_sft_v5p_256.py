"""Kimi K2 fine-tuned on conversations (SFT) on a v5p-512 slice (256 chips): EP 64 x FSDP 4, MuonClip.

    python train.py --config=configs/k2_sft_v5p_256.py --workdir=/mnt/bucket/k2-sft \
        --config.init_from=/mnt/bucket/k2-bf16 --config.data.tokenizer_dir=/mnt/bucket/Kimi-K2-Instruct \
        --config.data.source=chat:/data/sft/conversations.jsonl
    k2jax-aot --config=configs/k2_sft_v5p_256.py          # compile it for v5p-512 on any machine: fits?

The release's own chat template (in data.tokenizer_dir) renders each conversation; the loss is the weighted mean
over the assistant's tokens only (content, tool calls, reasoning where the template renders it, end of turn), on
rows of 4K tokens packed with whole conversations (a longer one is truncated to the row and counted:
data.too_long). init_from: a k2jax-convert output of the release (bf16, or FP8 / INT4, dequantised to float32 on
load). Otherwise as configs/k2_v5p_256.py: float32 parameters and MuonClip state, bfloat16 compute, full remat,
expert-parallel receive buffers of 2x the balanced load. k2jax-aot (2026-12-07, libtpu 0.0.42.1, jax 0.10.2):
74.97 GiB of 95.74 GiB per chip (parameters 14.94 + optimizer state 14.97 + temporaries 44.70 + code 0.33), fits,
21.7 % margin; docs/training.md#fine-tuning-on-conversations.
"""

from configs.k2_v5p_256 import get_config as pretraining_config


def get_config():
    config = pretraining_config()
    config.steps = 5_000
    config.optimizer.lr = 2e-5
    config.optimizer.warmup_steps = 100
    config.data.source = "chat:conversations.jsonl"  # pass your files: --config.data.source=chat:PATH[,PATH...]
    config.data.too_long = "truncate"
    config.checkpoint.every = 250
    return config
