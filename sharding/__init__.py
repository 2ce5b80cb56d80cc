"""Meshes, logical-axis rules, expert and pipeline parallelism over jax.sharding. Knows nothing of K2's modules.

Logical axis names k2jax parameters carry (`logical_axes` metadata on every variable). mesh.py builds meshes,
rules.py maps these names to mesh axes per strategy (the one table), expert_parallel.py and pipeline.py run EP and
PP with shard_map, context_parallel.py splits a row's sequence (attention gathers the keys' latent), per_shard.py
runs kernels and other per-device code under shard_map.
"""

LOGICAL_AXES = (
    "layers",        # stacked MoE blocks (scan axis; pipeline stages split it)
    "vocab", "embed",
    "heads", "qk_head_dim", "kv_head_dim", "v_head_dim",
    "q_lora", "kv_lora", "kv_lora_rope",
    "mlp",           # dense / shared-expert FFN
    "expert", "moe_mlp",
    "scale_blocks",  # the two block axes of an FP8 weight's 128x128 scale grid (no strategy splits them)
)
