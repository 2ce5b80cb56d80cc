"""K2Config: reading config.json, presets, validation, derived counts vs the actual parameter tree."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import PRESETS, ConfigError, K2Config, YarnScaling, kimi_k2, kimi_k2_0905, preset, tiny

# config.json of the Kimi-K2-Instruct release (fields as shipped).
KIMI_K2_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 131072, "model_type": "kimi_k2",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}


def test_release_config_json_reads_as_the_kimi_k2_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K2_CONFIG_JSON))
    assert K2Config.from_hf(tmp_path) == kimi_k2()
    assert K2Config.from_hf(tmp_path / "config.json") == kimi_k2()
    assert K2Config.from_hf(KIMI_K2_CONFIG_JSON, dtype="bfloat16").dtype == "bfloat16"


def test_0905_is_256k_with_factor_64():
    cfg = kimi_k2_0905()
    assert cfg.max_position_embeddings == 262144 and cfg.rope_scaling.factor == 64.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_json(name):
    cfg = preset(name)
    assert K2Config.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_transformers_5_rope_parameters_and_deepseek_model_type():
    raw = dict(KIMI_K2_CONFIG_JSON, model_type="deepseek_v3")
    del raw["rope_scaling"], raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "beta_fast": 1.0,
                              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "original_max_position_embeddings": 4096}
    assert K2Config.from_hf(raw) == kimi_k2()


@pytest.mark.parametrize("change, match", [
    (dict(model_type="llama"), "model_type"),
    (dict(some_new_knob=3), "unknown field.*some_new_knob"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(n_group=5), "not divisible by n_group"),
    (dict(n_group=8, topk_group=9), "topk_group"),
    (dict(n_group=64, topk_group=1), "num_experts_per_tok"),
    (dict(first_k_dense_replace=62), "first_k_dense_replace"),
    (dict(qk_rope_head_dim=63), "even"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'linear' is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "alpha": 1}),
     "unknown rope_scaling"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]}), "quantization_config"),
    (dict(head_dim=128), "head_dim"),
])
def test_contradictory_or_unknown_fields_fail_with_the_field_named(change, match):
    with pytest.raises(ConfigError, match=match):
        K2Config.from_hf({**KIMI_K2_CONFIG_JSON, **change})


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        K2Config.from_hf(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        K2Config.from_hf(tmp_path)


def test_bad_run_options_fail():
    with pytest.raises(ConfigError, match="dtype"):
        tiny(dtype="float8")
    with pytest.raises(ConfigError, match="moe_impl"):
        tiny(moe_impl="magic")
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="scan_unroll"):
            tiny(scan_unroll=bad)


def _tree_counts(cfg):
    """(total, active) counted from the abstract parameter tree k2jax.Transformer builds."""
    state = nnx.state(nnx.eval_shape(lambda: k2jax.Transformer(cfg, rngs=nnx.Rngs(0))))
    total = active = 0
    for path, var in nnx.to_flat_state(state):
        n = int(np.prod(var.shape))
        total += n
        routed = "experts" in path and "shared_experts" not in path
        active += n * cfg.num_experts_per_tok // cfg.n_routed_experts if routed else n
    return total, active


def test_kimi_k2_parameter_counts_match_the_release():
    cfg = kimi_k2()
    total, active = _tree_counts(cfg)
    assert total == cfg.num_params() == 1_026_408_232_448
    assert active == cfg.num_active_params() == 32_861_500_928


@pytest.mark.parametrize("name", ["deepseek_v3", "moonlight_16b", "kimi_k2_0905", "tiny"])
def test_derived_counts_equal_the_parameter_tree(name):
    cfg = preset(name)
    assert _tree_counts(cfg) == (cfg.num_params(), cfg.num_active_params())


def test_flops_per_token():
    cfg = kimi_k2()
    # 6 per active matmul weight: everything active but the embedding table, norms and router bias.
    matmul = cfg.num_active_params() - cfg.vocab_size * cfg.hidden_size - (61 * 2 * 7168 + 7168 + 61 * 512
                                                                            + 61 * 1536) - 60 * 384
    attn_fwd = 61 * 2 * 64 * (192 + 128) * (4096 + 1) / 2
    assert cfg.flops_per_token(4096) == pytest.approx(3 * (2 * matmul + attn_fwd), rel=1e-12)
    assert cfg.flops_per_token(4096, training=False) == pytest.approx(2 * matmul + attn_fwd, rel=1e-12)
    assert 6 * 31.6e9 < cfg.flops_per_token(1) < 6 * 31.8e9  # 32.86B active minus the 1.17B embedding table
    with pytest.raises(ConfigError):
        cfg.flops_per_token(0)


def test_yarn_scaling_values():
    from k2jax.model.rope import cos_sin_scale, softmax_scale
    cfg = kimi_k2()
    mscale = 0.1 * np.log(32.0) + 1
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert cos_sin_scale(cfg) == 1.0
    odd = tiny(rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=16, mscale=1.0,
                                        mscale_all_dim=0.5))
    assert cos_sin_scale(odd) == pytest.approx((0.1 * np.log(8) + 1) / (0.05 * np.log(8) + 1))
