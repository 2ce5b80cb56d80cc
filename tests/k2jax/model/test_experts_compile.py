"""The FP8-resident decode step of a reduced Kimi K2 (tests/compile_targets.reduced_k2) compiled for deviceless
TPU v5p chips on an abstract sharded model (k2jax.model.placement.abstract_model(..., expert_format="fp8"): no
weights in memory): the
routed experts stay float8_e4m3fn on the chips and run through fp8_grouped_matmul's Mosaic kernel inside the
expert-parallel shard_map (each chip its own experts' rows of the whole batch), next to the attention kernels. For
a deviceless H100 the same step runs Triton kernels on e4m3 rows as well (fp8_activations' GPU default: the FP8
tensor cores); v5p's reads bf16 rows."""

import jax

from k2jax.inference.generate import Generator
from k2jax.model.placement import abstract_model
from tests.compile_targets import gpu_mesh, kernel_calls, reduced_k2, tpu_mesh

CFG = reduced_k2(param_dtype="bfloat16")
# one attention kernel for the dense block, one in the MoE blocks' scan body, and the expert FFN's three grouped
# matmuls (gate, up, down) in the scan body
KERNELS_PER_STEP = 2 + 3


def test_fp8_decode_step_compiles_for_v5p():
    mesh = tpu_mesh({"expert": 4})
    with jax.set_mesh(mesh):
        model = abstract_model(CFG, mesh, "ep_fsdp", expert_format="fp8")
        compiled = Generator(model).lower("decode", batch=8, max_len=1024).compile()
    text = compiled.as_text()
    assert kernel_calls(text, "tpu") >= KERNELS_PER_STEP
    fp8_kernels = [line for line in text.splitlines()
                   if 'custom_call_target="tpu_custom_call"' in line and "f8e4m3fn" in line]
    assert len(fp8_kernels) >= 3  # the grouped matmuls read the e4m3 weights themselves
    # the step's rows are whole on every chip (sharding.rules' decode layout): each chip runs its own experts' rows
    # and the outputs are summed, no exchange
    assert "ragged-all-to-all" not in text and "all-reduce" in text
    L, E, D, F = CFG.num_moe_layers, CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
    assert f"f8e4m3fn[{L},{E // 4},{D},{F}]" in text  # each chip holds its experts' e4m3 weights, not bf16
    # the kernels read a layer's experts and cache straight from the stacks: no copy of a layer's slice exists
    X = CFG.kv_lora_rank + CFG.qk_rope_head_dim
    assert f"f8e4m3fn[{E // 4},{D},{F}]" not in text and f"f8e4m3fn[{E // 4},{F},{D}]" not in text
    assert f"[{8 // 4},1024,{X}]" not in text
    assert 0 < compiled.memory_analysis().argument_size_in_bytes < 80 * 2**30
    M = 8 * CFG.num_experts_per_tok  # no FP8 MXU on v5p: the rows stay bf16 (fp8_activations' TPU default)
    assert f"f8e4m3fn[{M},{CFG.hidden_size}]" not in text and f"bf16[{M},{CFG.hidden_size}]" in text


def test_fp8_decode_step_on_h100_quantises_the_routed_rows():
    mesh = gpu_mesh({"expert": 1})
    with jax.set_mesh(mesh):
        model = abstract_model(CFG, mesh, "ep_fsdp", expert_format="fp8")
        text = Generator(model).lower("decode", batch=8, max_len=1024).compile().as_text()
    assert kernel_calls(text, "gpu") >= KERNELS_PER_STEP
    M, D, F = 8 * CFG.num_experts_per_tok, CFG.hidden_size, CFG.moe_intermediate_size
    assert f"f8e4m3fn[{M},{D}]" in text and f"f8e4m3fn[{M},{F}]" in text  # the rows into gate / up, into down
