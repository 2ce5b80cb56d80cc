"""config.json of the K2 family's releases (K2-Instruct: FP8; K2-Thinking, K2.5: INT4), in the releases' own shape
(every field the real ones have; sources in each comment). K2-Thinking's text fields follow DESIGN.md section 2
(K2-Instruct's, with a 256K context, rms_norm_eps 1e-5 and another eos id); K2.5's are a public dump of the
release's config as transformers 5.7 reads it."""

# Kimi-K2-Thinking's quantization_config (K2.5's text_config holds the same)
INT4_QUANTIZATION_CONFIG = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}

# config.json of the Kimi-K2-Instruct release (fields as shipped): the FP8 release
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

# Kimi-K2-Thinking's config.json: K2-Instruct's fields, 256K context (YaRN factor 64), rms_norm_eps 1e-5, eos
# <|im_end|> (163586), and the INT4 quantization_config
KIMI_K2_THINKING_CONFIG_JSON = {
    **KIMI_K2_CONFIG_JSON, "eos_token_id": 163586, "max_position_embeddings": 262144, "rms_norm_eps": 1e-05,
    "quantization_config": INT4_QUANTIZATION_CONFIG, "transformers_version": "4.56.2",
    "rope_scaling": {**KIMI_K2_CONFIG_JSON["rope_scaling"], "factor": 64.0}}

# Kimi-K2.5's config.json as transformers 5.7 reads it (a public dump of the release's KimiK25Config): the text
# model under text_config (model_type deepseek_v3, rope_parameters, PretrainedConfig bookkeeping fields), the
# quantization_config at both levels, the vision tower's settings
_K25_TEXT = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": KIMI_K2_THINKING_CONFIG_JSON["auto_map"], "aux_loss_alpha": 0.001, "bos_token_id": 163584,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "dtype": "bfloat16", "eos_token_id": 163585, "ep_size": 1, "finetuning_task": None, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 7168, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02, "intermediate_size": 18432, "is_decoder": False, "is_encoder_decoder": False,
    "kv_lora_rank": 512, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "max_position_embeddings": 262144,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 0,
    "output_attentions": False, "output_hidden_states": False, "pad_token_id": 163839, "prefix": None,
    "pretraining_tp": 1, "problem_type": None, "pruned_heads": {}, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "quantization_config": INT4_QUANTIZATION_CONFIG, "return_dict": True,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "original_max_position_embeddings": 4096, "rope_theta": 50000.0, "rope_type": "yarn",
                        "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "sep_token_id": None,
    "seq_aux": True, "task_specific_params": None, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": False, "tokenizer_class": None, "topk_group": 1, "topk_method": "noaux_tc",
    "torchscript": False, "use_bfloat16": False, "use_cache": True, "v_head_dim": 128, "vocab_size": 163840}
KIMI_K25_CONFIG_JSON = {
    "architectures": ["KimiK25ForConditionalGeneration"],
    "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                 "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
    "bos_token_id": 163584, "dtype": "bfloat16", "eos_token_id": 163585, "ignore_index": -100,
    "media_placeholder_token_id": 163605, "model_type": "kimi_k25", "pad_token_id": 163839,
    "quantization_config": INT4_QUANTIZATION_CONFIG, "text_config": _K25_TEXT, "tie_word_embeddings": False,
    "transformers_version": "5.7.0", "use_unified_vision_chunk": True,
    "video_placeholder": "<|kimi_k25_video_placeholder|>",
    "vision_config": {"init_pos_emb_height": 64, "init_pos_emb_time": 4, "init_pos_emb_width": 64,
                      "merge_kernel_size": [2, 2], "merge_type": "sd2_tpool", "mm_hidden_size": 1152,
                      "mm_projector_type": "patchmerger", "model_type": "", "patch_size": 14,
                      "pos_emb_type": "divided_fixed", "projector_hidden_act": "gelu", "projector_ln_eps": 1e-05,
                      "text_hidden_size": 7168, "video_attn_type": "spatial_temporal", "vt_hidden_size": 1152,
                      "vt_intermediate_size": 4304, "vt_num_attention_heads": 16, "vt_num_hidden_layers": 27}}
