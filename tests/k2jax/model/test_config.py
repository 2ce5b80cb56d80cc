"""K2Config: reading config.json, presets, validation, derived counts vs the actual parameter tree."""

import copy
import json

import numpy as np
import pytest
from flax import nnx

from k2jax.model.config import (
    PRESETS,
    RUN_OPTIONS,
    ConfigError,
    K2Config,
    RunOptions,
    YarnScaling,
    kimi_k2,
    kimi_k2_0905,
    preset,
    split_multimodal,
    tiny,
)
from k2jax.model.placement import abstract_model
from tests.release_configs import (
    INT4_QUANTIZATION_CONFIG,
    KIMI_K2_CONFIG_JSON,
    KIMI_K2_THINKING_CONFIG_JSON,
    KIMI_K25_CONFIG_JSON,
)


def test_release_config_json_reads_as_the_kimi_k2_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K2_CONFIG_JSON))
    assert K2Config.from_hf(tmp_path) == kimi_k2()
    assert K2Config.from_hf(tmp_path / "config.json") == kimi_k2()
    assert K2Config.from_hf(KIMI_K2_CONFIG_JSON, dtype="bfloat16").run.dtype == "bfloat16"


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


def test_k2_thinking_config_reads_every_field():
    """K2-Thinking: the K2 architecture with a 256K context (YaRN factor 64), rms_norm_eps 1e-5, eos <|im_end|>, and
    an INT4 quantization_config (not part of K2Config)."""
    assert K2Config.from_hf(KIMI_K2_THINKING_CONFIG_JSON) == kimi_k2(
        max_position_embeddings=262144, rms_norm_eps=1e-5, eos_token_id=163586,
        rope_scaling=YarnScaling(factor=64.0, original_max_position_embeddings=4096)) == preset("kimi_k2_thinking")


def test_k25_config_reads_its_text_model_and_keeps_the_vision_settings():
    """K2.5 (model_type kimi_k25): the text model under text_config (as transformers 5 writes it: rope_parameters,
    PretrainedConfig bookkeeping fields), beta_fast 32; the vision settings are returned, not read."""
    assert K2Config.from_hf(KIMI_K25_CONFIG_JSON) == kimi_k2(
        max_position_embeddings=262144, rms_norm_eps=1e-5,
        rope_scaling=YarnScaling(factor=64.0, original_max_position_embeddings=4096, beta_fast=32.0))
    text, wrapper = split_multimodal(KIMI_K25_CONFIG_JSON, "config.json")
    assert text["model_type"] == "deepseek_v3" and "text_config" not in wrapper
    assert wrapper["vision_config"]["vt_num_hidden_layers"] == 27 and wrapper["media_placeholder_token_id"] == 163605
    lean = {k: v for k, v in KIMI_K25_CONFIG_JSON.items() if k != "quantization_config"}
    lean["text_config"] = {k: v for k, v in lean["text_config"].items() if k not in ("quantization_config",
                                                                                        "eos_token_id")}
    lean["eos_token_id"] = 163586
    text, _ = split_multimodal(lean, "config.json")  # a text_config without its own takes the wrapper's
    assert "quantization_config" not in text and text["eos_token_id"] == 163586
    assert K2Config.from_hf(lean).eos_token_id == 163586


def _k25(**text_changes):
    config = copy.deepcopy(KIMI_K25_CONFIG_JSON)
    config["text_config"].update(text_changes)
    return config


@pytest.mark.parametrize("config, match", [
    ({**KIMI_K2_THINKING_CONFIG_JSON, "quantization_config": {**INT4_QUANTIZATION_CONFIG, "format": "marlin-24"}},
     "config dict: quantization_config.format: 'marlin-24' is not supported"),
    (_k25(model_type="qwen3"), "config dict text_config: model_type must be one of .*, got 'qwen3'"),
    (_k25(scoring_func="softmax"), "config dict text_config: scoring_func='softmax' is not supported"),
    (_k25(some_new_knob=1), "config dict text_config: unknown field.*some_new_knob"),
    (_k25(quantization_config={**INT4_QUANTIZATION_CONFIG, "kv_cache_scheme": {"num_bits": 8}}),
     "config dict text_config: quantization_config.kv_cache_scheme"),
    ({**KIMI_K25_CONFIG_JSON, "quantization_config": {"quant_method": "gptq"}},
     "config dict: quantization_config.quant_method 'gptq' is not supported"),
    ({**KIMI_K25_CONFIG_JSON, "text_config": None}, "kimi_k25' needs a text_config object"),
    ({**KIMI_K25_CONFIG_JSON, "tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
])
def test_int4_and_k25_configs_k2jax_cannot_read_fail_naming_the_field(config, match):
    with pytest.raises(ConfigError, match=match) as e:
        K2Config.from_hf(config)
    assert "\n" not in str(e.value)


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        K2Config.from_hf(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        K2Config.from_hf(tmp_path)


def test_the_architecture_and_the_run_options_are_two_types():
    """config.json is the architecture and nothing else: run options live in cfg.run (a RunOptions), are set by
    name through presets, from_hf and replace, never written by to_hf and refused when a config.json holds one."""
    cfg = tiny(dtype="bfloat16", remat="full", num_hidden_layers=2)
    assert cfg.run == RunOptions(dtype="bfloat16", remat="full") and cfg.num_hidden_layers == 2
    assert set(RUN_OPTIONS) == {"param_dtype", "dtype", "moe_impl", "attention_impl", "router_bias_update_rate",
                                "pipeline_microbatches", "remat", "scan_unroll", "ep_capacity_factor",
                                "attention_kv_bytes", "platform", "fp8_activations"}
    hf = cfg.to_hf()
    assert "run" not in hf and not set(hf) & set(RUN_OPTIONS)
    assert K2Config.from_hf(hf) == cfg.replace(run=RunOptions())  # the architecture round-trips, not the run
    assert K2Config.from_hf(hf, remat="full", dtype="bfloat16") == cfg
    assert cfg.replace(scan_unroll=2).run == RunOptions(dtype="bfloat16", remat="full", scan_unroll=2)
    assert cfg.replace(run=RunOptions(), dtype="float16").run == RunOptions(dtype="float16")
    with pytest.raises(ConfigError, match=r"\['remat'\] are k2jax run options, not part of a config.json: pass them "
                                          r"as overrides \(K2Config.from_hf\(path, remat=...\)\)"):
        K2Config.from_hf(dict(hf, remat="full"))
    # architecture overrides are checked together with config.json's fields: one can make an invalid one valid
    assert K2Config.from_hf(dict(hf, first_k_dense_replace=3), num_hidden_layers=4).num_moe_layers == 1
    with pytest.raises(ConfigError, match="K2Config: run must be a RunOptions, got dict"):
        cfg.replace(run={"dtype": "bfloat16"})
    with pytest.raises(ConfigError, match=r"RunOptions: remat must be one of \('none', 'full', 'dots'\)"):
        cfg.replace(remat="fool")


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
    state = nnx.state(abstract_model(cfg))
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
