"""Kimi K2-Thinking (1.03T, the K2 family's INT4 releases) inference with INT4-resident routed experts on a v5p-16
slice (8 chips): the release's packed 4-bit expert weights (compressed-tensors pack-quantized, int32 words of eight
values) and their bf16 group scales stay on the chips and run through int4_grouped_matmul (EP 8: 48 experts per
chip; every other weight bfloat16, split over all chips), 32 rows x 32K-token latent cache, prompts prefilled 256
tokens at a time (dropless expert parallelism's receive buffers grow with the tokens per chip; a longer prompt
continues with Generator.extend).

    k2jax-aot --config=configs/k2_infer_int4_v5p.py --step=decode     # does it fit, and the bound on tokens/s
    k2jax-aot --config=configs/k2_infer_int4_v5p.py --step=prefill

In a notebook on the slice: `model = k2jax.load_hf_checkpoint("Kimi-K2-Thinking", mesh=make_mesh(config.mesh.axes),
shardings=config.mesh.strategy, weights="int4")` (the release as shipped, streamed) or `k2jax.load_checkpoint(path,
..., weights="int4")` (a `k2jax-convert --dtype int4` conversion), then `k2jax.Generator(model)` at config.infer's
batch and max_len. Compiled per chip (2026-12-07): decode 78.84 GiB of 95.74 GiB (a step moves 1.12 x the least it
can), prefill 90.20 GiB; the report in docs/aot.md.
"""

from configs.k2_infer_v5p import get_config as _k2_infer


def get_config():
    config = _k2_infer()
    config.model.preset = "kimi_k2_thinking"
    config.mesh.axes = {"expert": 8}
    config.infer.weights = "int4"
    config.infer.batch = 32
    config.infer.prompt_len = 256
    return config
