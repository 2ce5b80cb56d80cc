"""A reduced Kimi K2 for a v5p-8 slice (4 chips, EP 2 x FSDP 2): K2's head dims, MLA ranks, rope and router with a
small hidden size (256), 4 heads, 5 layers (1 dense + 4 MoE: MuonClip's layer-sharded Newton-Schulz splits the 4
stacked layers over the 4 chips with no padding), 8 experts top-2 and a 1K vocabulary; bf16 compute, f32
parameters, full remat. It compiles in about a minute on 2 cores, where the full K2 takes ten: a quick check of the
TPU programs (tests/k2jax/tools/test_aot.py runs it):

    k2jax-aot --config=configs/reduced_k2_v5p_8.py [--step=decode --config.infer.weights=fp8]
"""

from k2jax.job_config import base_config


def get_config():
    config = base_config()
    config.model.preset = "kimi_k2"
    config.model.overrides = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
                              "moe_intermediate_size": 128, "num_hidden_layers": 5, "num_attention_heads": 4,
                              "n_routed_experts": 8, "num_experts_per_tok": 2, "param_dtype": "float32",
                              "dtype": "bfloat16", "remat": "full", "ep_capacity_factor": 2.0}
    config.seq_len, config.global_batch = 256, 8
    config.mesh.axes, config.mesh.strategy = {"fsdp": 2, "expert": 2}, "ep_fsdp"
    config.infer.batch, config.infer.max_len, config.infer.prompt_len = 4, 1024, 256
    return config
