"""Kimi K2 (1.03T) inference with FP8-resident routed experts on a v5p-32 slice (16 chips): the release's e4m3
expert weights and their 128x128 block scales stay FP8 on the chips and run through fp8_grouped_matmul (EP 16:
24 experts per chip; every other weight bfloat16, split over all chips), 64 rows x 32K-token latent cache, 512-token
prompts (the Generator prefills a longer prompt in chunks by itself: 8192 tokens per pass over all rows, so dropless
expert parallelism's receive buffers stay bounded; one row of 128K or, with the K2-0905 preset, 256K tokens fits:
docs/aot.md, "Long prompts").

    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=decode     # does it fit, and the bound on tokens/s
    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=prefill
    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=decode --config.infer.weights=dequantized \\
        --topology=v5p-64 --config.mesh.axes='{"expert": 32}'       # the same job with bf16 weights
    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=prefill --config.infer.batch=1 \
        --config.infer.prompt_len=131072 --config.infer.max_len=131072  # one 128K-token prompt, in chunks
    k2jax-aot --config=configs/k2_infer_fp8_v5p.py --step=prefill --config.model.preset=kimi_k2_0905 \
        --config.infer.batch=1 --config.infer.prompt_len=262144 --config.infer.max_len=262144  # K2-0905: 256K

In a notebook on the slice: `model = k2jax.load_checkpoint(path, mesh=make_mesh(config.mesh.axes),
shardings=config.mesh.strategy, weights="fp8")` (a `--dtype fp8` conversion) or `k2jax.load_hf_checkpoint(release,
mesh=..., shardings=..., weights="fp8")`, then `k2jax.Generator(model)` at config.infer's batch and max_len.
k2jax-aot: decode 70.25 GiB (2026-12-07; a step moves 1.13 x the least it can); prefill (2026-12-07, 4 passes of 128
tokens per row) 73.15 GiB, one 128K-token prompt 73.35 GiB, K2-0905's 256K 83.04 GiB; all of 95.74 GiB per chip, all
fit. With bf16 weights the job needs v5p-64. The reports are in docs/aot.md.
"""

from configs.k2_infer_v5p import get_config as _k2_infer


def get_config():
    config = _k2_infer()
    config.mesh.axes = {"expert": 16}
    config.infer.weights = "fp8"
    config.infer.batch = 64
    config.infer.prompt_len = 512
    return config
