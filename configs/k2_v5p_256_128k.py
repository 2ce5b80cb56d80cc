"""Kimi K2 trained on 131,072-token rows (K2-Instruct's full context) on a v5p-512 slice (256 chips): EP 16 x
context 16, MuonClip.

    python train.py --config=configs/k2_v5p_256_128k.py --workdir=/mnt/bucket/k2-128k \
        --config.init_from=/mnt/bucket/k2-bf16 --config.data.source=array_record:/data/k2-long.arrayrecord
    k2jax-aot --config=configs/k2_v5p_256_128k.py          # compile it for v5p-512 on any machine: fits?

Each row's 131,072 tokens are split over the mesh's context axis (16 shards of 8,192 tokens in the striped order;
attention all-gathers the 576-value latent of the row per layer: sharding.context_parallel); 16 rows per step
(2M tokens), 8K tokens per chip. The weights' hidden axes are split over expert x context (ZeRO-3 over every chip),
the routed experts over `expert` (24 per chip) and their hidden axis over context. Otherwise as
configs/k2_v5p_256.py (float32 parameters and MuonClip state, bfloat16 compute, full remat) but for two settings:
attention expands the gathered row's latent for 2 heads at a time (model.overrides.attention_kv_bytes 128 MiB: all
64 heads' keys and values of the row are 4 GiB per chip, and their gradients as much again) and the expert-parallel
receive buffers hold 1.25x the balanced load (rows past it dropped and counted: ep_dropped_rows; 2x in
k2_v5p_256.py). At this length attention is 72 % of the model's useful FLOPs.

k2jax-aot (2026-12-07, libtpu 0.0.42.1, jax 0.10.2; 658 s of compile on 2 shared CPU cores): fits, parameters 14.94 +
optimizer state 14.97 + temporaries 60.32 + code 0.33 = 90.59 GiB of 95.74 GiB per chip (5.4 % margin); FLOPs
1.229e16 compiled / 7.63e15 useful per chip (1.61); step estimate 35.6 s, MFU 46.7 %. How it got there (112.71 GiB
before): docs/aot.md#long-context-training.
"""

from configs.k2_v5p_256 import get_config as pretraining_config


def get_config():
    config = pretraining_config()
    config.seq_len = 131_072
    config.global_batch = 16
    config.mesh.axes = {"expert": 16, "context": 16}
    config.mesh.strategy = "ep_fsdp"
    # attention expands the gathered row's latent for 2 heads at a time (128 MiB of keys and values), and the
    # expert-parallel receive buffers hold 1.25x the balanced load (rows past it dropped and counted)
    config.model.overrides = {**config.model.overrides, "attention_kv_bytes": 1 << 27, "ep_capacity_factor": 1.25}
    return config
