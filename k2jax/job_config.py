"""The job config: one schema for every k2jax job (training with train.py, inference shapes for k2jax-aot and the
inference configs), and the model it names.

    from k2jax.job_config import base_config, model_config
    config = base_config()              # every option, small CPU-friendly defaults; configs/*.py start from it
    config.model.preset = "kimi_k2"
    cfg = model_config(config)          # the K2Config: preset (or hf_config) + model.overrides

Sections: model (preset / hf_config / overrides), the training run (seed, steps, seq_len, global_batch, grad_accum,
init_from, optimizer, data, checkpoint, metrics, profile, ep_overflow, distributed), mesh (axes, strategy,
overlap_collectives, offload_collectives: training and inference alike) and infer (what k2jax-aot compiles the
Generator for).
"""

from __future__ import annotations

import ml_collections

from k2jax.model.config import ARCHITECTURE, RUN_OPTIONS, ConfigError, K2Config, preset


def base_config() -> ml_collections.ConfigDict:
    """Every option of a job (train.py, k2jax-aot, the inference configs), with small CPU-friendly defaults
    (configs/ override them)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "tiny", "hf_config": "", "overrides": {}})
    c.seed = 0
    c.steps = 100
    c.seq_len = 128
    c.global_batch = 8             # rows of seq_len tokens per step, all hosts together
    c.grad_accum = 1               # microbatches per step (rows split evenly)
    c.init_from = ""               # a converted K2 checkpoint (k2jax-convert output): params only
    c.optimizer = ml_collections.ConfigDict({
        "lr": 3e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.1, "momentum": 0.95,
        "nesterov": True, "ns_steps": 5, "ns_dtype": "float32", "adam_b1": 0.9, "adam_b2": 0.95,
        "qk_clip_tau": 100.0})
    # overlap_collectives: libtpu's async collective fusion (k2jax.tools.startup.OVERLAP_FLAGS), the gathers and
    # reductions running beside compute; offload_collectives: libtpu's SparseCore collective offload (OFFLOAD_FLAGS,
    # v5p and later), the gathers and reductions run on the SparseCores; one or neither, set before libtpu starts
    # (train.py, k2jax-aot), TPU only
    c.mesh = ml_collections.ConfigDict({"axes": {"fsdp": -1}, "strategy": "fsdp", "overlap_collectives": False,
                                        "offload_collectives": False})
    # chat:PATHS (fine-tuning on conversations, k2jax/training/chat_data.py; a conversation is one training sequence,
    # or several where its template renders earlier turns differently once later ones follow): too_long, a sequence
    # longer than a row of seq_len + 1 tokens: "truncate" (cut to the row) or "drop", counted in the metrics either
    # way; packing_bins: rows each row stream packs whole sequences into at a time; print_sample: train.py prints
    # the first conversation with its trained tokens marked at start-up
    c.data = ml_collections.ConfigDict({"source": "synthetic", "tokenizer_dir": "", "text_field": "text",
                                        "eod_token_id": -1, "prefetch": 2, "too_long": "truncate",
                                        "packing_bins": 8, "print_sample": True})
    c.checkpoint = ml_collections.ConfigDict({"every": 50, "keep": 3, "async_save": True})
    c.metrics = ml_collections.ConfigDict({"every": 10, "tensorboard": True, "peak_tflops_per_device": 0.0})
    c.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 3})
    # inference shapes the Generator is compiled for ahead of time (k2jax-aot --step=prefill|decode): rows,
    # cache slots per row, prompt tokens per prefill; weights as load_checkpoint(weights=...) would hold them:
    # "dequantized" (every weight in param_dtype), "fp8" (the routed experts FP8-resident, e4m3 + block scales) or
    # "int4" (INT4-resident: packed 4-bit values + group scales, as the K2-Thinking / K2.5+ releases ship them)
    # prefill_chunk: prompt tokens per row per prefill pass as Generator(prefill_chunk=...) takes it (0: the
    # Generator's default for the platform, k2jax.model.target's prefill_tokens / batch)
    c.infer = ml_collections.ConfigDict({"batch": 8, "max_len": 4096, "prompt_len": 1024,
                                         "weights": "dequantized", "prefill_chunk": 0})
    c.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 1, "process_id": 0})
    # routed rows dropped by expert parallelism's bounded receive buffer (model.overrides.ep_capacity_factor > 0):
    # "drop": counted in the metrics (ep_dropped_rows) and said on the step's line; "fail": the job stops at that
    # step with EPOverflowError before anything after it is saved
    c.ep_overflow = "drop"
    return c


def model_config(config) -> K2Config:
    """The job's K2Config: config.model's preset or hf_config with its overrides, architecture fields and run
    options by name (a ConfigError naming an override that is neither)."""
    overrides = dict(config.model.overrides)
    unknown = sorted(set(overrides) - set(ARCHITECTURE) - set(RUN_OPTIONS))
    if unknown:
        raise ConfigError(f"config.model.overrides.{unknown[0]}: K2Config has no field {unknown[0]!r} (its fields: "
                          f"k2jax.model.config.K2Config, and the run options of k2jax.model.config.RunOptions)")
    if config.model.hf_config:
        return K2Config.from_hf(config.model.hf_config, **overrides)
    return preset(config.model.preset, **overrides)
