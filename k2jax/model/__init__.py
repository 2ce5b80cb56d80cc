"""The model: what a K2 release's config.json describes, and the modules that compute it.

    config.py          K2Config (the release's architecture + run options), presets, from_hf / to_hf
    target.py          the platform a program is compiled for; every `auto` resolved there, once
    rope.py            YaRN RoPE, softmax scale
    layers.py          parameters with logical axes, RMSNorm, dense projection, SwiGLU MLP
    attention.py       MLA: expanded (train / prefill) and absorbed (decode) attention over one latent
    moe.py             router, routed experts, shared experts
    fp8_experts.py     the routed experts FP8-resident (e4m3 + 128x128 block scales)
    cpu_grouped_ffn.py, cpu_matmul.py   the CPU forms of the routed experts and the dense projections
    transformer.py     Transformer: embeddings, dense blocks, scanned MoE blocks, head; param_info / param_name
    placement.py       a model built, placed or described abstractly on a mesh per sharding strategy
"""
