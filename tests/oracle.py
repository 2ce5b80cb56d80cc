"""The parity oracle: transformers' DeepseekV3ForCausalLM built from a K2Config with release-named weights.

Pitfalls handled here (see shared/DESIGN.md §3): the HF config is built as DeepseekV3Config by hand (transformers
does not register kimi_k2); experts are fused in memory (gate_up_proj [E, 2F, D] gate rows first, down_proj
[E, D, F]); HF's top-k order is unspecified, so expert ids are compared sorted.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds3

from k2jax.checkpoint.hf_mapping import hf_tensor_specs
from k2jax.model.config import K2Config


def hf_config(cfg: K2Config) -> DeepseekV3Config:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim}
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group, topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope, rope_interleave=cfg.rope_interleave,
        tie_word_embeddings=False, attention_bias=False, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None, num_nextn_predict_layers=0)


def random_release_tensors(cfg: K2Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Release-named float32 tensors with random values chosen so nothing is trivial: norm weights != 1, router
    logits spread wide enough that many experts compete, and an e_score_correction_bias large enough to change
    which experts are chosen (scores + bias stays positive)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in hf_tensor_specs(cfg):
        name, shape = spec.name, spec.shape
        if name.endswith("e_score_correction_bias"):
            a = rng.uniform(0.0, 0.25, shape)
        elif len(shape) == 1:  # norms
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("mlp.gate.weight"):
            a = rng.standard_normal(shape) * (2.0 / np.sqrt(shape[1]))
        elif name == "model.embed_tokens.weight":
            a = rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = a.astype(np.float32)
    return out


def oracle_model(cfg: K2Config, tensors: dict[str, np.ndarray], dtype=torch.float32) -> DeepseekV3ForCausalLM:
    """DeepseekV3ForCausalLM with exactly these weights (experts fused as transformers keeps them)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    state = {}
    for name, a in tensors.items():
        if ".mlp.experts." in name:
            continue
        state[name] = torch.from_numpy(np.ascontiguousarray(a))
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        E = cfg.n_routed_experts
        gate = np.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(E)])
        up = np.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(E)])
        state[f"{p}.gate_up_proj"] = torch.from_numpy(np.concatenate([gate, up], axis=1))
        state[f"{p}.down_proj"] = torch.from_numpy(np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(E)]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise AssertionError(f"oracle weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model = model.to(dtype)
    for module in model.modules():  # transformers keeps the router bias in float32
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model


def oracle_forward(model: DeepseekV3ForCausalLM, tokens_BT: np.ndarray) -> dict[str, np.ndarray]:
    """-> {"logits": float32 [B, T, V], "topk_ids": sorted chosen experts [num_moe_layers, B, T, K],
    "max_logits": max pre-softmax logit per head over unmasked pairs [num_layers, N]}."""
    ids, max_logits = [], []

    def record(_module, _inputs, outputs):
        ids.append(outputs[2].detach().cpu().numpy())

    eager = hf_ds3.eager_attention_forward

    def capturing_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        logits = (torch.matmul(query, key.transpose(2, 3)) * scaling).float()
        T, S = logits.shape[-2:]
        visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        if attention_mask is not None:
            visible = visible & (attention_mask[..., :S] == 0)
        masked = torch.where(visible, logits, torch.tensor(-float("inf")))
        max_logits.append(masked.amax(dim=(0, 2, 3)).detach().numpy())
        return eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    hooks = [m.register_forward_hook(record) for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    hf_ds3.eager_attention_forward = capturing_attention
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(np.asarray(tokens_BT, np.int64))).logits.float().numpy()
    finally:
        hf_ds3.eager_attention_forward = eager
        for h in hooks:
            h.remove()
    B, T = tokens_BT.shape
    topk = np.sort(np.stack([i.reshape(B, T, -1) for i in ids]), axis=-1) if ids else np.zeros((0, B, T, 0), int)
    return {"logits": logits, "topk_ids": topk, "max_logits": np.stack(max_logits)}
