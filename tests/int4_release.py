"""Tiny INT4 releases as the K2 family ships them since K2-Thinking, written without k2jax: the routed experts
quantised and packed by compressed-tensors (calculate_qparams on each 32-input group, PackedQuantizationCompressor),
every file written by safetensors.torch, config.json in the releases' own shape (tests/release_configs.py: every
field the real ones have, tiny dimensions).

`write_int4_release(path, cfg, tensors, layout="thinking" | "k25")` returns the release's tensors dequantised by
compressed-tensors (PackedQuantizationCompressor.decompress), under the text model's names: what the parity oracle
is built on. K2.5 layout: model_type kimi_k25 with the text model's config under text_config, tensors prefixed
`language_model.model.` / `language_model.`, weight_shape int32 (K2.5's; compressed-tensors writes int64), a
vision tower and projector.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file

from k2jax.model.config import K2Config
from tests.release_configs import INT4_QUANTIZATION_CONFIG, KIMI_K2_THINKING_CONFIG_JSON, KIMI_K25_CONFIG_JSON

# a few of K2.5's vision tensors (names as released; tiny shapes): left out by k2jax
VISION_TENSORS = {"vision_tower.patch_embed.proj.weight": (8, 3, 2, 2), "vision_tower.patch_embed.proj.bias": (8,),
                  "vision_tower.encoder.blocks.0.wqkv.weight": (24, 8),
                  "vision_tower.encoder.blocks.0.wo.weight": (8, 8),
                  "vision_tower.encoder.final_layernorm.weight": (8,), "mm_projector.pre_norm.weight": (8,),
                  "mm_projector.proj.0.weight": (32, 32), "mm_projector.proj.2.weight": (16, 32)}
_ARCH = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
         "num_attention_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
         "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
         "max_position_embeddings", "rms_norm_eps", "routed_scaling_factor", "rope_theta", "bos_token_id",
         "eos_token_id")


def release_config(cfg: K2Config, layout: str) -> dict:
    """config.json of a `layout` ("thinking" / "k25") release whose text model is `cfg` (the real releases' fields,
    cfg's architecture)."""
    arch = {k: getattr(cfg, k) for k in _ARCH} | {"num_key_value_heads": cfg.num_attention_heads}
    yarn = {k: float(v) for k, v in vars(cfg.rope_scaling).items() if k != "original_max_position_embeddings"}
    yarn["original_max_position_embeddings"] = cfg.rope_scaling.original_max_position_embeddings
    if layout == "thinking":
        return {**copy.deepcopy(KIMI_K2_THINKING_CONFIG_JSON), **arch,
                "rope_scaling": {**yarn, "type": "yarn"}}
    config = copy.deepcopy(KIMI_K25_CONFIG_JSON)
    config["text_config"].update(arch, rope_parameters={**yarn, "rope_theta": cfg.rope_theta, "rope_type": "yarn",
                                                        "type": "yarn"})
    config.update(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    return config


def _ct_scheme() -> QuantizationScheme:
    return QuantizationScheme(**INT4_QUANTIZATION_CONFIG["config_groups"]["group_0"])


def compress(weight_OI: np.ndarray) -> dict[str, torch.Tensor]:
    """compressed-tensors' weight_packed / weight_scale / weight_shape of a weight, quantised as the release's
    bf16 weights were: per-group min / max -> calculate_qparams (bf16 scales), then PackedQuantizationCompressor."""
    scheme = _ct_scheme()
    w = torch.from_numpy(np.asarray(weight_OI, np.float32)).to(torch.bfloat16)
    groups = w.unflatten(-1, (-1, scheme.weights.group_size))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)


def decompress(parts: dict[str, torch.Tensor]) -> np.ndarray:
    """compressed-tensors' dequantisation of a release weight, in float32 (the bf16 scales widened first, so the
    products (value - 8) x scale are exact rather than rounded to bf16)."""
    state = {**parts, "weight_scale": parts["weight_scale"].float(), "weight_shape": parts["weight_shape"].long()}
    return PackedQuantizationCompressor.decompress(state, _ct_scheme())["weight"].float().numpy()


def _is_int4(name: str) -> bool:
    return ".mlp.experts." in name and name.endswith("_proj.weight")


def write_int4_release(path: str | os.PathLike, cfg: K2Config, tensors: dict[str, np.ndarray], *,
                       layout: str = "thinking", num_shards: int = 3) -> dict[str, np.ndarray]:
    """Writes `tensors` (release-named float32, the text model's names) as a `layout` release in `num_shards` text
    shards (+ a vision shard for K2.5) with an index. -> the release's tensors as compressed-tensors dequantises
    them (float32), the others as stored (bf16, the router bias f32) widened to float32."""
    path = os.fspath(path)
    os.makedirs(path)
    body, head = ("language_model.model.", "language_model.") if layout == "k25" else ("model.", "")
    stored, dequantised = {}, {}
    for name, value in tensors.items():
        prefixed = head + name if name.startswith("lm_head.") else body + name.removeprefix("model.")
        if _is_int4(name):
            parts = compress(value)
            if layout == "k25":
                parts["weight_shape"] = parts["weight_shape"].to(torch.int32)
            stored.update({f"{prefixed}_{k.removeprefix('weight_')}": v for k, v in parts.items()})
            dequantised[name] = decompress(parts)
        else:
            t = torch.from_numpy(value)
            t = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
            stored[prefixed] = t
            dequantised[name] = t.float().numpy()
    names = list(stored)
    bounds = np.linspace(0, len(names), num_shards + 1).round().astype(int)
    files = [names[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if layout == "k25":
        rng = np.random.default_rng(0)
        vision = {n: torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(torch.bfloat16)
                  for n, s in VISION_TENSORS.items()}
        stored.update(vision)
        files.append(list(vision))
    weight_map = {}
    for i, group in enumerate(files, 1):
        file = f"model-{i:05d}-of-{len(files):06d}.safetensors"
        save_file({n: stored[n].contiguous() for n in group}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in stored.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(release_config(cfg, layout), f, indent=2)
    return dequantised
