"""Generation steps of a reduced Kimi K2 (K2's head dims and MLA ranks: tests/compile_targets.reduced_k2) compiled
for deviceless TPU v5p chips and H100s with `Generator.lower`, on an abstract sharded model (no weights in
memory): prefill runs the flash-attention kernel (in chunks: the absorbed-decode kernel over the cache written so
far), decode the absorbed-decode kernel over the latent cache, each per device under shard_map; expert parallelism
uses the native ragged all-to-all in prefill (a decode step's rows are on every device: no exchange)."""

import jax
import pytest

from k2jax.inference.generate import Generator
from k2jax.model.placement import abstract_model
from tests.compile_targets import gpu_mesh, kernel_calls, reduced_k2, tpu_mesh

CFG = reduced_k2(param_dtype="bfloat16")
KERNELS_PER_STEP = 2  # one attention kernel for the dense block, one in the MoE blocks' scan body


@pytest.mark.parametrize("platform,axes", [("tpu", {"expert": 4}), ("gpu", {"expert": 1}), ("gpu", {"expert": 8})],
                         ids=["v5p-4chips", "h100", "h100x8"])
@pytest.mark.parametrize("step,chunk", [("prefill", None), ("prefill", 64), ("decode", None)],
                         ids=["prefill", "prefill-chunked", "decode"])
def test_generation_steps_compile(platform, axes, step, chunk):
    """prefill-chunked: the 200-token prompts in chunks of 64 tokens per row (the absorbed-decode kernel over the
    cache, a query-row block at a time), in the Generator's device-side loop."""
    mesh = (tpu_mesh if platform == "tpu" else gpu_mesh)(axes)
    with jax.set_mesh(mesh):
        gen = Generator(abstract_model(CFG, mesh, "ep_fsdp"), prefill_chunk=chunk)
        compiled = gen.lower(step, batch=8, max_len=1024, prompt_len=200).compile()
    text = compiled.as_text()
    assert kernel_calls(text, platform) >= KERNELS_PER_STEP
    # a decode step's rows are whole on every device (sharding.rules' decode layout): its experts need no exchange
    assert ("ragged-all-to-all" in text) == (axes["expert"] > 1 and step == "prefill")
    assert 0 < compiled.memory_analysis().argument_size_in_bytes < 80 * 2**30
