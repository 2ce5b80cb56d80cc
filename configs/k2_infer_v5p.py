"""Kimi K2 (1.03T) inference on a v5p-128 slice (64 chips): bfloat16 weights, EP 64 (6 experts per chip, the
other weights split over all chips), 128 rows x 32K-token latent cache, 1024-token prompts (the Generator prefills
them, and longer ones, in chunks of 8192 tokens per pass over all rows: 64 per row for 128 rows, so dropless expert
parallelism's receive buffers stay bounded). The release is the preset (`--config.model.preset=kimi_k2_0905` for
K2-0905's 256K context).

    k2jax-aot --config=configs/k2_infer_v5p.py --step=decode       # does it fit, and the bound on tokens/s
    k2jax-aot --config=configs/k2_infer_v5p.py --step=prefill

In a notebook on the slice: `model = k2jax.load_checkpoint(path, mesh=make_mesh(config.mesh.axes),
shardings=config.mesh.strategy, param_dtype="bfloat16")`, then `k2jax.Generator(model)` at config.infer's batch
and max_len. k2jax-aot: decode 34.75 GiB (2026-12-07; a step moves 1.23 x the least it can) and prefill 72.57 GiB
(2026-12-02, one pass, before chunked prefill) of 95.74 GiB per chip, both fit; the reports are in docs/aot.md.
"""

from k2jax.job_config import base_config


def get_config():
    config = base_config()
    config.model.preset = "kimi_k2"
    config.model.overrides = {"param_dtype": "bfloat16", "dtype": "bfloat16"}
    config.mesh.axes = {"expert": 64}
    config.mesh.strategy = "ep_fsdp"
    config.infer.batch = 128
    config.infer.max_len = 32768
    config.infer.prompt_len = 1024
    return config
