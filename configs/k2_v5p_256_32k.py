"""Kimi K2 trained on 32,768-token rows on a v5p-512 slice (256 chips): EP 32 x context 8, MuonClip.

    python train.py --config=configs/k2_v5p_256_32k.py --workdir=/mnt/bucket/k2-32k \
        --config.init_from=/mnt/bucket/k2-bf16 --config.data.source=array_record:/data/k2-long.arrayrecord
    k2jax-aot --config=configs/k2_v5p_256_32k.py           # compile it for v5p-512 on any machine: fits?

Each row's 32,768 tokens are split over the mesh's context axis (8 shards of 4,096 tokens in the striped order;
attention all-gathers the 576-value latent of the row per layer: sharding.context_parallel); 32 rows per step (1M
tokens), 4K tokens per chip as in configs/k2_v5p_256.py; otherwise as configs/k2_v5p_256_128k.py (float32
parameters and MuonClip state, bfloat16 compute, full remat, attention_kv_bytes 128 MiB: here 8 heads at a time),
but receive buffers of 2x the balanced load as in k2_v5p_256.py. At this length attention is 39 % of the model's
useful FLOPs.

k2jax-aot (2026-12-07, libtpu 0.0.42.1, jax 0.10.2; 650 s of compile on 2 shared CPU cores): fits, parameters 14.94 +
optimizer state 14.97 + temporaries 44.37 + code 0.32 = 74.64 GiB of 95.74 GiB per chip (22.0 % margin); FLOPs
2.633e15 compiled / 1.898e15 useful per chip (1.39); step estimate 10.2 s, MFU 40.5 %
(docs/aot.md#long-context-training).
"""

from configs.k2_v5p_256_128k import get_config as longest_rows_config


def get_config():
    config = longest_rows_config()
    config.seq_len, config.global_batch = 32_768, 32
    config.mesh.axes = {"expert": 32, "context": 8}
    config.model.overrides = {**config.model.overrides, "ep_capacity_factor": 2.0}  # 4K tokens per chip: as at 4K
    return config
