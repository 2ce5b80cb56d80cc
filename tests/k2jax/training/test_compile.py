"""The train step of a reduced Kimi K2 (K2's head dims and MLA ranks, see tests/compile_targets.reduced_k2)
compiled for deviceless TPU v5p slices and H100s, as train.py builds it (MuonClip, router-bias update, the
config's mesh and strategy): the Pallas attention kernels run per device under shard_map, expert parallelism
exchanges rows with the native ragged all-to-all, and the program fits in memory. About a minute of compile per
test on 2 cores; the 8-chip EP x FSDP, FSDP-only and single-H100 programs are in the slow set (`-m slow`). The
4-chip pipeline program is the fine-tuning step (data.source chat:...): per-token loss weights in the batch."""

import re

import jax
import pytest

from k2jax.job_config import base_config
from k2jax.training.loop import train_program
from tests.compile_targets import gpu_mesh, kernel_calls, reduced_k2, tpu_mesh

ATTENTION_KERNELS = 3  # forward, dq, dk/dv: once for the dense block, once in the MoE blocks' scan body
GROUPED_MATMUL_KERNELS = 3 * 3  # gate, up, down: forward, dx and dw each (once, in the MoE blocks' scan body)


def _config(axes: dict, strategy: str, sft: bool = False, **model):
    config = base_config()
    if sft:  # the batch carries loss_weights and conversation counts (k2jax.training.data.batch_shapes)
        config.data.source, config.data.tokenizer_dir = "chat:conversations.jsonl", "Kimi-K2-Instruct"
    config.model.preset = "kimi_k2"
    cfg = reduced_k2(**model)
    config.model.overrides = {f: getattr(cfg, f) for f in ("vocab_size", "hidden_size", "intermediate_size",
                                                           "moe_intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "n_routed_experts",
                                                           "num_experts_per_tok")}
    config.model.overrides.update({f: getattr(cfg.run, f) for f in ("param_dtype", "dtype", "remat")})
    config.seq_len, config.global_batch = 256, 8
    config.mesh.axes, config.mesh.strategy = axes, strategy
    return config


def _compile(config, mesh):
    with jax.set_mesh(mesh):
        program = train_program(config, mesh)
        batch = program.abstract_batch(config.global_batch, config.seq_len)
        assert ("loss_weights" in batch) == config.data.source.startswith("chat:")
        return program.step_fn.lower(program.abstract_state(), batch).compile()


@pytest.mark.parametrize("axes,strategy,remat,sft", [
    # 8 chips: EP inside FSDP, full remat (slow set: tests/k2jax/tools/test_aot.py compiles EP x FSDP with full remat on
    # 4 chips through k2jax-aot in CI)
    pytest.param({"fsdp": 2, "expert": 4}, "ep_fsdp", "full", False, marks=pytest.mark.slow),
    pytest.param({"fsdp": 4}, "fsdp", "none", False, marks=pytest.mark.slow),  # 4 chips: FSDP only (ep8 has FSDP)
    ({"expert": 2, "stage": 2}, "ep_pp", "none", True),     # 4 chips: 2 pipeline stages, EP inside each; SFT
], ids=["ep8", "fsdp4", "pp4_sft"])
def test_train_step_compiles_for_tpu_v5p(axes, strategy, remat, sft):
    compiled = _compile(_config(axes, strategy, sft, remat=remat), tpu_mesh(axes))
    text = compiled.as_text()
    assert kernel_calls(text, "tpu") >= ATTENTION_KERNELS + GROUPED_MATMUL_KERNELS
    assert ("ragged-all-to-all" in text) == ("expert" in axes)
    assert "ragged-dot" not in text  # XLA's ragged_dot: its weight gradient is a dense every-row-by-every-expert dot
    memory = compiled.memory_analysis()
    assert 0 < memory.temp_size_in_bytes + memory.argument_size_in_bytes < 95 * 2**30
    assert compiled.cost_analysis()["flops"] > 0


@pytest.mark.parametrize("axes,strategy", [pytest.param({"fsdp": 1}, "fsdp", marks=pytest.mark.slow),
                                           ({"expert": 8}, "ep_fsdp")], ids=["h100", "h100x8"])
def test_train_step_compiles_for_h100(axes, strategy):
    compiled = _compile(_config(axes, strategy), gpu_mesh(axes))
    text = compiled.as_text()
    assert kernel_calls(text, "gpu") >= ATTENTION_KERNELS + GROUPED_MATMUL_KERNELS
    assert ("ragged-all-to-all" in text) == ("expert" in axes)
    assert "ragged-dot" not in text and "ragged_dot" not in text
    assert 0 < compiled.memory_analysis().temp_size_in_bytes < 80 * 2**30


def test_context_parallel_train_step_compiles_for_tpu_v5p():
    """4 chips, each row's 256 tokens split over context 2 inside EP 2: the attention kernels run per device on a
    shard's striped queries against the gathered row, and the exchange is the latent (576 bf16 values a token)."""
    axes = {"expert": 2, "context": 2}
    compiled = _compile(_config(axes, "ep_fsdp", remat="full"), tpu_mesh(axes))
    text = compiled.as_text()
    assert kernel_calls(text, "tpu") >= ATTENTION_KERNELS + GROUPED_MATMUL_KERNELS
    assert "ragged-all-to-all" in text
    # [rows, t, context x (kv_lora + rope)]: the latent of the row's 256 tokens, gathered per layer
    assert re.search(r"bf16\[\d+,128,(2,576|1152)\]\S* all-gather.*attention/shard_map/all_gather", text)
    memory = compiled.memory_analysis()
    assert 0 < memory.temp_size_in_bytes + memory.argument_size_in_bytes < 95 * 2**30
