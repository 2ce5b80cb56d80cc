"""Shared by the benchmark scripts: the small compute-dominated K2 they run, and a timer."""

from __future__ import annotations

import time

from k2jax.model.config import YarnScaling, tiny

# Compute-dominated small K2: hidden 512, 4 layers (1 dense), 32 experts top-4.
BENCH_CFG = tiny(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=512,
                 num_hidden_layers=4, num_attention_heads=8, n_routed_experts=32, num_experts_per_tok=4,
                 q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                 max_position_embeddings=1024,
                 rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=256))


def best_time(fn, iters: int) -> float:
    """Best of `iters` timed calls after one warm-up (machines are noisy: the minimum is the stable figure)."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
