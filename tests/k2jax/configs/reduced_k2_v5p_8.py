"""A reduced Kimi K2 (tests/compile_targets.reduced_k2: K2's head dims, MLA ranks, rope and router; 8 experts)
with 5 layers (1 dense + 4 MoE: MuonClip's layer-sharded Newton-Schulz splits the 4 stacked layers over the 4
chips with no padding) on a v5p-8 slice (4 chips, EP 2 x FSDP 2), for tests/k2jax/tools/test_aot.py:

    k2jax-aot --config=tests/k2jax/configs/reduced_k2_v5p_8.py [--step=decode]
"""

from k2jax.training.loop import base_config
from tests.compile_targets import reduced_k2

_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "param_dtype", "dtype")


def get_config():
    config = base_config()
    cfg = reduced_k2()
    config.model.preset = "kimi_k2"
    config.model.overrides = {**{f: getattr(cfg, f) for f in _FIELDS}, "num_hidden_layers": 5, "remat": "full",
                              "ep_capacity_factor": 2.0}
    config.seq_len, config.global_batch = 256, 8
    config.mesh.axes, config.mesh.strategy = {"fsdp": 2, "expert": 2}, "ep_fsdp"
    config.infer.batch, config.infer.max_len, config.infer.prompt_len = 4, 1024, 256
    return config
