"""The model: what a K2 release's config.json describes, and the modules that compute it.

    config.py          K2Config (the release's architecture) with its RunOptions (cfg.run), presets, from_hf / to_hf
    target.py          the platform a program is compiled for; every `auto` resolved there, once
    rope.py            YaRN RoPE, softmax scale
    layers.py          parameters with logical axes, RMSNorm, dense projection, SwiGLU MLP
    attention.py       MLA: expanded (train / prefill) and absorbed (decode) attention over one latent
    moe.py             router, shared experts, the MoE block
    experts.py         the routed experts: weights plain, FP8 (e4m3 + 128x128 block scales) or INT4 (packed nibbles +
                       group scales), a constructor option; their dropless grouped FFN; quantize_experts
    transformer.py     Transformer: embeddings, dense blocks, scanned MoE blocks, head; param_info / param_name
    placement.py       a model built abstractly (the one eval_shape), on a mesh, or placed per sharding strategy
"""
