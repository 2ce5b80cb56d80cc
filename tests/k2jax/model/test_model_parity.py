"""k2jax.Transformer against the independent oracle (transformers' DeepseekV3ForCausalLM, same weights).

fp32: max |Δlogit| <= 1e-5 · max |logit| over 2 sequences x 40 tokens (positions past the YaRN original
context), identical expert choices per token per layer, identical per-head max pre-softmax logits.
bf16: top-k agreement and KL against the fp32 oracle no worse than the oracle's own bf16 run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import k2jax
from k2jax.model.config import YarnScaling, tiny
from tests.oracle import oracle_forward, oracle_model, random_release_tensors

B, T = 2, 40
CONFIGS = {
    # K2 layout: n_group 1, one dense block first, YaRN factor 4 over 32 positions.
    "k2": tiny(),
    # DeepSeek-V3 layout: group-limited routing, 2 dense blocks, YaRN with mscale != mscale_all_dim.
    "deepseek_v3": tiny(num_hidden_layers=4, first_k_dense_replace=2, n_group=4, topk_group=2,
                        rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=16, beta_fast=32.0,
                                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=0.707)),
    # Moonlight layout: no q_lora, 2 shared experts, top-6, plain RoPE.
    "moonlight": tiny(q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=6, rope_scaling=None),
    # Rope dims as halves instead of interleaved pairs.
    "k2_rope_halves": tiny(rope_interleave=False),
}


def _tokens(cfg, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    tensors = random_release_tensors(cfg, seed=len(request.param))
    tokens = _tokens(cfg)
    oracle = oracle_forward(oracle_model(cfg, tensors), tokens)
    model = k2jax.from_hf_tensors(cfg, tensors)
    logits, aux = model(jnp.asarray(tokens), return_aux=True)
    return dict(cfg=cfg, tensors=tensors, tokens=tokens, oracle=oracle, model=model,
                logits=np.asarray(logits), aux={k: np.asarray(v) for k, v in aux.items()})


def test_fp32_logits_match_oracle(case):
    ref = case["oracle"]["logits"]
    err = np.max(np.abs(case["logits"] - ref))
    assert case["logits"].dtype == np.float32 and case["logits"].shape == (B, T, case["cfg"].vocab_size)
    assert err <= 1e-5 * np.max(np.abs(ref)), f"max |Δlogit| {err:.3g} vs max |logit| {np.max(np.abs(ref)):.3g}"


def test_expert_choices_match_oracle(case):
    ours = np.sort(case["aux"]["router_topk_ids"], axis=-1)
    np.testing.assert_array_equal(ours, case["oracle"]["topk_ids"])


def test_expert_load_counts_choices(case):
    cfg, ids = case["cfg"], case["oracle"]["topk_ids"]
    want = np.stack([np.bincount(layer.reshape(-1), minlength=cfg.n_routed_experts) for layer in ids])
    np.testing.assert_array_equal(case["aux"]["expert_load"], want)
    assert case["aux"]["expert_load"].sum() == cfg.num_moe_layers * B * T * cfg.num_experts_per_tok


def test_max_logits_match_oracle(case):
    ref = case["oracle"]["max_logits"]
    ours = case["aux"]["attn_max_logits"]
    assert ours.shape == (case["cfg"].num_hidden_layers, case["cfg"].num_attention_heads)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_router_bias_changes_choices(case):
    """The fixture is only a real routing test if the selection bias moves some choices."""
    cfg, tensors = case["cfg"], dict(case["tensors"])
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = np.zeros_like(tensors[name])
    _, aux = k2jax.from_hf_tensors(cfg, tensors)(jnp.asarray(case["tokens"]), return_aux=True)
    unbiased = np.sort(np.asarray(aux["router_topk_ids"]), axis=-1)
    changed = np.mean(np.any(unbiased != case["oracle"]["topk_ids"], axis=-1))
    assert changed > 0.1, f"bias changed only {changed:.1%} of token choices"


def _kl(p_logits, q_logits):
    p = torch.log_softmax(torch.tensor(np.array(p_logits), dtype=torch.float64), -1)
    q = torch.log_softmax(torch.tensor(np.array(q_logits), dtype=torch.float64), -1)
    return float(torch.sum(p.exp() * (p - q), -1).mean())


def _agreement(ids, ref_ids):
    """Fraction of (layer, token) expert choices shared with the reference."""
    K = ref_ids.shape[-1]
    shared = [len(set(a) & set(b)) for a, b in zip(ids.reshape(-1, K).tolist(), ref_ids.reshape(-1, K).tolist())]
    return np.sum(shared) / ref_ids.size


def test_bf16_no_worse_than_oracle_bf16():
    cfg = CONFIGS["k2"]
    tensors = random_release_tensors(cfg, seed=7)
    tokens = _tokens(cfg, seed=3)
    ref32 = oracle_forward(oracle_model(cfg, tensors), tokens)
    ref16 = oracle_forward(oracle_model(cfg, tensors, dtype=torch.bfloat16), tokens)
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    logits, aux = k2jax.from_hf_tensors(cfg16, tensors)(jnp.asarray(tokens), return_aux=True)
    ours_ids = np.sort(np.asarray(aux["router_topk_ids"]), axis=-1)

    ours_agree, oracle_agree = _agreement(ours_ids, ref32["topk_ids"]), _agreement(ref16["topk_ids"], ref32["topk_ids"])
    ours_kl, oracle_kl = _kl(ref32["logits"], np.asarray(logits)), _kl(ref32["logits"], ref16["logits"])
    print(f"bf16 vs fp32 oracle: top-k agreement ours {ours_agree:.4f} oracle-bf16 {oracle_agree:.4f}; "
          f"mean KL ours {ours_kl:.3e} oracle-bf16 {oracle_kl:.3e}")
    assert ours_agree >= oracle_agree
    assert ours_kl <= oracle_kl


def test_pallas_kernels_in_interpret_mode_match_oracle(case):
    """attention_impl / moe_impl = "interpret": flash attention and the grouped-matmul kernel inside the model meet
    the same bar as the XLA path (logits, expert choices, per-head max logits), on every config."""
    cfg = case["cfg"].replace(attention_impl="interpret", moe_impl="interpret")
    oracle = case["oracle"]
    model = k2jax.from_hf_tensors(cfg, case["tensors"])
    logits, aux = jax.jit(lambda t: model(t, return_aux=True))(jnp.asarray(case["tokens"]))
    err = np.max(np.abs(np.asarray(logits) - oracle["logits"]))
    assert err <= 1e-5 * np.max(np.abs(oracle["logits"]))
    np.testing.assert_array_equal(np.sort(np.asarray(aux["router_topk_ids"]), axis=-1), oracle["topk_ids"])
    np.testing.assert_allclose(np.asarray(aux["attn_max_logits"]), oracle["max_logits"], rtol=1e-5, atol=1e-6)
