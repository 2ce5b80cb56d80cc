"""Kimi K2 (1.03T) inference with FP8-resident routed experts on a v5p-32 slice (16 chips): the release's e4m3
expert weights and their 128x128 block scales stay FP8 on the chips and run through fp8_grouped_matmul (EP 16:
24 experts per chip; every other weight bfloat16, split over all chips), 64 rows x 32K-token latent cache, prompts
prefilled 512 tokens at a time (dropless expert parallelism's receive buffers grow with the tokens per chip; a
longer prompt continues with Generator.extend).

    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=decode     # does it fit, and the bound on tokens/s
    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=prefill
    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=decode --config.infer.weights=dequantized \\
        --topology=v5p-64 --config.mesh.axes='{"expert": 32}'       # the same job with bf16 weights

In a notebook on the slice: `model = k2jax.load_checkpoint(path, mesh=make_mesh(config.mesh.axes),
shardings=config.mesh.strategy, weights="fp8")` (a `--dtype fp8` conversion) or `k2jax.load_hf_checkpoint(release,
mesh=..., shardings=..., weights="fp8")`, then `k2jax.Generator(model)` at config.infer's batch and max_len.
k2jax-aot: decode 70.25 GiB (2026-12-07; a step moves 1.13 x the least it can) and prefill 88.60 GiB (2026-12-02)
of 95.74 GiB per chip, both fit; with bf16 weights the job needs v5p-64. The reports are in docs/aot.md.
"""

from configs.k2_infer_v5p import get_config as _k2_infer


def get_config():
    config = _k2_infer()
    config.mesh.axes = {"expert": 16}
    config.infer.weights = "fp8"
    config.infer.batch = 64
    config.infer.prompt_len = 512
    return config
