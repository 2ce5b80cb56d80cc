"""K2Config: the one description of a Kimi K2 / DeepSeek-V3-family model that every part of k2jax reads.

Two parts, two types: the architecture (K2Config's own fields, named as in the HF `config.json` of the release so a
reader can diff them: exactly what config.json says, `to_hf` / `from_hf`) and how k2jax runs it (`RunOptions`, in
`cfg.run`: dtypes, kernel forms, remat, parallelism knobs; never in config.json). Both are frozen and validated on
construction: a contradictory config fails at once with one line naming the field.

    cfg = tiny(dtype="bfloat16")              # presets, from_hf and replace take either kind of field by name
    cfg.hidden_size, cfg.run.dtype            # an architecture field, a run option
    cfg.replace(remat="full", num_hidden_layers=4)

Presets: `kimi_k2()` (Kimi-K2-Instruct exactly), `kimi_k2_0905()` (256K context), `kimi_k2_thinking()` (the INT4
releases' text model), `moonlight_16b()`,
`deepseek_v3()`, `tiny()`. Derived counts (`num_params`, `num_active_params`, `flops_per_token`) are exact
closed forms of the parameter tree `k2jax.Transformer` builds; tests check them against `jax.eval_shape`.

Letter legend: D hidden, N heads, Q q_lora, C kv_lora, R rope dim, E experts, K top-k, F ffn, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from k2jax.formats import quant
from pallas_kernels.backend import BACKENDS
from pallas_kernels.grouped_matmul import IMPLS as GROUPED_MATMUL_IMPLS

_DTYPES = ("float32", "bfloat16", "float16")
PLATFORMS = ("cpu", "tpu", "gpu")  # what a program is compiled for (k2jax.model.target resolves "auto")
# Run options that are a choice between forms take the values of the module that runs them, or "auto" (resolved
# once, by k2jax.model.target, for the platform compiled for).
_MOE_IMPLS = ("auto",) + GROUPED_MATMUL_IMPLS
_ATTENTION_IMPLS = ("auto",) + BACKENDS
_REMAT = ("none", "full", "dots")
_PLATFORMS = ("auto",) + PLATFORMS
_FP8_ACTIVATIONS = ("auto", "on", "off")


class ConfigError(ValueError):
    """A config.json or K2Config that k2jax cannot run faithfully."""


def _need(owner: str, cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{owner}: {msg}")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How k2jax runs a model; not part of the architecture (config.json never holds these). Every "auto" is
    resolved once, for the platform compiled for, by k2jax.model.target.Target."""

    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax, router and logits are always float32
    moe_impl: str = "auto"  # routed experts' grouped FFN: auto (pallas on TPU/GPU, tiled on CPU) | ragged_dot | tiled
    #                        | pallas | interpret (pallas_kernels.grouped_matmul)
    attention_impl: str = "auto"  # train/prefill flash attention and absorbed decode: auto (pallas on TPU/GPU for
    #     head dims that are powers of two >= 16, else xla) | xla | pallas | interpret (pallas_kernels.mla_*)
    router_bias_update_rate: float = 0.001  # aux-loss-free balancing: bias += rate * sign(mean load - load)
    pipeline_microbatches: int = 0  # under a mesh with a `stage` axis: microbatches per step (0: one per stage)
    remat: str = "none"  # scanned MoE blocks under differentiation: none | full (recompute all) | dots (keep matmuls)
    scan_unroll: int = 0  # MoE blocks per iteration of their scan: 0 = auto (all of them on CPU, 1 on TPU/GPU)
    ep_capacity_factor: float = 0.0  # expert parallelism: a device's receive buffer holds this many times a
    #     balanced load of routed rows, and rows past it are dropped and counted (step metric ep_dropped_rows);
    #     0 = dropless (room for every row of every device: n_expert_devices x the balanced load)
    attention_kv_bytes: int = 1 << 29  # context parallelism: the most bytes per device of expanded keys and values
    #     attention holds at once (as much again for their gradients): the gathered row's latent is expanded and
    #     attended to by groups of the most heads that fit, one group at a time (k2jax.model.attention)
    platform: str = "auto"  # what the program is compiled for: auto (the mesh's devices, else the default
    #                         device) | cpu | tpu | gpu; every per-platform choice follows it (k2jax/model/target.py)
    fp8_activations: str = "auto"  # FP8-resident experts (k2jax.model.experts): quantise the routed rows to e4m3
    #     per row x 128 columns (the release's dynamic activation scheme) for e4m3 x e4m3 dots: auto (on for GPU,
    #     whose FP8 tensor cores run them; off on TPU v5p, which has no FP8 MXU, and CPU) | on | off

    def __post_init__(self):
        def need(cond: bool, msg: str):
            _need("RunOptions", cond, msg)

        def count(name: str, least: int):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= least,
                 f"{name} must be {'a positive int' if least == 1 else f'an int >= {least}'}, got {v!r}")

        for name, allowed in (("param_dtype", _DTYPES), ("dtype", _DTYPES), ("moe_impl", _MOE_IMPLS),
                              ("attention_impl", _ATTENTION_IMPLS), ("platform", _PLATFORMS),
                              ("fp8_activations", _FP8_ACTIVATIONS), ("remat", _REMAT)):
            need(getattr(self, name) in allowed, f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        count("pipeline_microbatches", 0)
        count("scan_unroll", 0)
        count("attention_kv_bytes", 1)
        need(isinstance(self.ep_capacity_factor, (int, float)) and self.ep_capacity_factor >= 0,
             f"ep_capacity_factor must be >= 0 (0: dropless), got {self.ep_capacity_factor!r}")
        need(self.router_bias_update_rate >= 0,
             f"router_bias_update_rate must be >= 0, got {self.router_bias_update_rate}")


RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(RunOptions))


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling as in the release's `rope_scaling` (type "yarn")."""

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class K2Config:
    """The architecture (HF field names; defaults are Kimi-K2-Instruct) and, in `run`, how k2jax runs it."""

    vocab_size: int = 163840
    hidden_size: int = 7168  # D
    intermediate_size: int = 18432  # F of the dense (first_k_dense_replace) blocks
    moe_intermediate_size: int = 2048  # F of one routed expert; shared experts use n_shared_experts x this
    num_hidden_layers: int = 61  # L
    num_attention_heads: int = 64  # N
    # MoE
    n_routed_experts: int = 384  # E
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # K
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    # MLA
    q_lora_rank: int | None = 1536  # Q; None: a single q_proj (Moonlight, DeepSeek-V2-Lite)
    kv_lora_rank: int = 512  # C
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # R
    v_head_dim: int = 128
    # positions
    rope_theta: float = 50000.0
    rope_scaling: YarnScaling | None = YarnScaling()
    rope_interleave: bool = True  # rope dims of q / k_pe are interleaved pairs (the release's layout)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163585
    num_nextn_predict_layers: int = 0  # MTP layers: counted in the config, not built (the release ships none)
    run: RunOptions = RunOptions()  # how k2jax runs it (not the architecture)

    def __post_init__(self):
        def need(cond: bool, msg: str):
            _need("K2Config", cond, msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
                     "n_group", "topk_group", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"q_lora_rank must be None or a positive int, got {self.q_lora_rank!r}")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers="
             f"{self.num_hidden_layers}]")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        need(self.topk_group <= self.n_group, f"topk_group={self.topk_group} > n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        need(self.n_group == 1 or per_group >= 2,
             f"group-limited routing scores groups by their top-2 experts; n_routed_experts / n_group = {per_group}")
        need(self.num_experts_per_tok <= self.topk_group * per_group,
             f"num_experts_per_tok={self.num_experts_per_tok} > experts in the {self.topk_group} chosen group(s) "
             f"({self.topk_group * per_group})")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            need(s.factor >= 1, f"rope_scaling.factor must be >= 1, got {s.factor}")
            need(s.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be > 0")
            need(s.beta_fast > 0 and s.beta_slow > 0, "rope_scaling.beta_fast and beta_slow must be > 0")
        need(isinstance(self.run, RunOptions), f"run must be a RunOptions, got {type(self.run).__name__}")

    # ---- derived shapes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def replace(self, **changes: Any) -> "K2Config":
        """A copy with `changes`: architecture fields and run options (RUN_OPTIONS, set in .run) by name."""
        run = {k: changes.pop(k) for k in list(changes) if k in RUN_OPTIONS}
        if run:
            changes["run"] = dataclasses.replace(changes.get("run", self.run), **run)
        return dataclasses.replace(self, **changes)

    # ---- derived counts (closed forms of the tree k2jax.Transformer builds) -----------------------------------
    def _attention_params(self) -> int:
        D, N, C, R = self.hidden_size, self.num_attention_heads, self.kv_lora_rank, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = D * N * self.qk_head_dim
        else:
            q = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * N * self.qk_head_dim
        kv = D * (C + R) + C + C * N * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + N * self.v_head_dim * self.hidden_size

    def _moe_params(self, experts: int) -> int:
        D, E = self.hidden_size, self.n_routed_experts
        ffn = 3 * D * self.moe_intermediate_size * experts + 3 * D * self.shared_intermediate_size
        return ffn + D * E + E  # + router gate and e_score_correction_bias

    def _count(self, experts: int) -> int:
        D = self.hidden_size
        per_layer = self._attention_params() + 2 * D
        dense = 3 * D * self.intermediate_size
        return (2 * self.vocab_size * D + D + self.num_hidden_layers * per_layer
                + self.num_dense_layers * dense + self.num_moe_layers * self._moe_params(experts))

    def num_params(self) -> int:
        """Every parameter of the tree (embeddings, lm_head, all experts, router biases)."""
        return self._count(self.n_routed_experts)

    def num_active_params(self) -> int:
        """Parameters one token touches: all but the unchosen routed experts (embeddings and lm_head counted)."""
        return self._count(self.num_experts_per_tok)

    def num_active_matmul_params(self) -> int:
        """Active parameters that enter a matmul (no embedding lookup, norms or router bias)."""
        D, L = self.hidden_size, self.num_hidden_layers
        norms = L * 2 * D + D + L * self.kv_lora_rank + (L * self.q_lora_rank if self.q_lora_rank else 0)
        return self.num_active_params() - self.vocab_size * D - norms - self.num_moe_layers * self.n_routed_experts

    def flops_per_token(self, seq_len: int, *, training: bool = True, causal: bool = True) -> float:
        """Model FLOPs per token (for MFU): 2 per active matmul weight, plus attention scores and values over the
        average visible context; x3 for forward + backward when `training`."""
        if seq_len <= 0:
            raise ConfigError(f"flops_per_token: seq_len must be > 0, got {seq_len}")
        context = (seq_len + 1) / 2 if causal else seq_len
        attn = 2 * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * context
        fwd = 2 * self.num_active_matmul_params() + self.num_hidden_layers * attn
        return (3 if training else 1) * fwd

    # ---- HF config.json ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "K2Config":
        """Reads a HF config.json (a file, a directory holding one, or its dict). `overrides` set run options
        (RunOptions' fields, e.g. dtype="bfloat16") or architecture fields after reading. A kimi_k25 config (K2.5
        and later) gives its text model (`text_config`; the vision settings are not part of K2Config:
        split_multimodal returns them). The quantization_config must be one k2jax reads
        (k2jax.formats.quant.parse_quantization_config: 128x128 FP8, or compressed-tensors INT4 groups); it is not
        part of K2Config either."""
        return _from_hf(cls, path_or_dict, overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict (model_type kimi_k2) describing this architecture."""
        d = {name: getattr(self, name) for name in ARCHITECTURE}
        d["rope_scaling"] = None if self.rope_scaling is None else {
            "type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        d.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=
                 self.num_attention_heads, hidden_act="silu", scoring_func="sigmoid", topk_method="noaux_tc",
                 moe_layer_freq=1, attention_bias=False, tie_word_embeddings=False)
        return d


ARCHITECTURE = tuple(f.name for f in dataclasses.fields(K2Config) if f.name != "run")  # what config.json says

# config.json keys that say nothing about the computation (bookkeeping of HF, training-only knobs).
_IGNORED_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pretraining_tp", "aux_loss_alpha", "seq_aux", "ep_size", "output_router_logits", "router_aux_loss_coef",
    "pad_token_id", "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "quantization_config", "model_type",
    # transformers' PretrainedConfig bookkeeping and generation defaults that a config saved through transformers
    # carries (K2.5's text_config does): none changes the computation
    "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task", "is_decoder",
    "prefix", "pruned_heads", "sep_token_id", "task_specific_params", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "torchscript", "use_bfloat16", "_attn_implementation", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
# config.json keys that must hold one value (k2jax implements only that behaviour).
_FIXED_HF_KEYS = {
    "hidden_act": ("silu",), "scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",), "moe_layer_freq": (1,),
    "attention_bias": (False,), "tie_word_embeddings": (False,), "attention_dropout": (0, 0.0),
}
_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


_MULTIMODAL_TYPES = ("kimi_k25",)  # K2.5 / K2.6 / K2.7-Code: the K2 text model under text_config, plus vision


def read_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[str, dict]:
    """(what to call it in errors, the JSON object) of a config.json: a file, a directory holding one, or a dict."""
    if isinstance(path_or_dict, Mapping):
        return "config dict", dict(path_or_dict)
    src = os.fspath(path_or_dict)
    if os.path.isdir(src):
        src = os.path.join(src, "config.json")
    try:
        with open(src) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{src}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{src}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a JSON object, got {type(raw).__name__}")
    return src, raw


def split_multimodal(raw: Mapping[str, Any], src: str) -> tuple[dict, dict | None]:
    """(the language model's config, the multimodal wrapper's other fields or None). A kimi_k25 config (K2.5 and
    later) holds the K2 text model under `text_config`, which takes the wrapper's quantization_config (and
    bos / eos / pad ids) when it has none of its own; the vision tower and projector settings (vision_config,
    media_placeholder_token_id, ...) are returned, not read. Any other config is its own text model."""
    if raw.get("model_type") not in _MULTIMODAL_TYPES:
        return dict(raw), None
    text = raw.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError(f"{src}: model_type {raw['model_type']!r} needs a text_config object (the language "
                          f"model), got {text!r}")
    if raw.get("tie_word_embeddings", False):
        raise ConfigError(f"{src}: tie_word_embeddings={raw['tie_word_embeddings']!r} is not supported (k2jax "
                          f"implements tie_word_embeddings=False)")
    text = dict(text)
    for key in ("quantization_config", "bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in text and raw.get(key) is not None:
            text[key] = raw[key]
    return text, {k: v for k, v in raw.items() if k != "text_config"}


def _from_hf(cls, path_or_dict, overrides) -> K2Config:
    src, raw = read_hf_config(path_or_dict)
    text, wrapper = split_multimodal(raw, src)
    if wrapper is not None:  # K2.5 layout: every error below names the text_config
        try:
            quant.parse_quantization_config(wrapper.get("quantization_config"))
        except quant.QuantError as e:
            raise ConfigError(f"{src}: {e}") from None
        src, raw = f"{src} text_config", text

    def fail(msg: str):
        raise ConfigError(f"{src}: {msg}")

    if raw.get("model_type") not in _MODEL_TYPES:
        fail(f"model_type must be one of {_MODEL_TYPES + _MULTIMODAL_TYPES}, got {raw.get('model_type')!r}")
    for key, allowed in _FIXED_HF_KEYS.items():
        if key in raw and raw[key] not in allowed:
            fail(f"{key}={raw[key]!r} is not supported (k2jax implements {key}={allowed[0]!r})")
    try:
        quant.parse_quantization_config(raw.get("quantization_config"))
    except quant.QuantError as e:
        fail(str(e))

    fields = set(ARCHITECTURE)
    kw: dict[str, Any] = {}
    unknown, run_options = [], sorted(set(raw) & set(RUN_OPTIONS) - _IGNORED_HF_KEYS)
    if run_options:
        fail(f"{run_options} are k2jax run options, not part of a config.json: pass them as overrides "
             f"(K2Config.from_hf(path, {run_options[0]}=...))")
    for key, value in raw.items():
        if key in fields and key != "rope_scaling":
            kw[key] = value
        elif key in _IGNORED_HF_KEYS or key in _FIXED_HF_KEYS or key in (
                "rope_scaling", "rope_parameters", "num_key_value_heads", "head_dim", "qk_head_dim"):
            continue
        else:
            unknown.append(key)
    if unknown:
        fail(f"unknown field(s) {sorted(unknown)}: k2jax does not know what they change")

    heads = raw.get("num_attention_heads", cls.num_attention_heads)
    if raw.get("num_key_value_heads", heads) != heads:
        fail(f"num_key_value_heads={raw['num_key_value_heads']} != num_attention_heads={heads} (MLA has no GQA)")
    rope_dim = raw.get("qk_rope_head_dim", cls.qk_rope_head_dim)
    if "head_dim" in raw and raw["head_dim"] != rope_dim:
        fail(f"head_dim={raw['head_dim']} contradicts qk_rope_head_dim={rope_dim} (HF uses head_dim for rope)")
    qk_dim = raw.get("qk_nope_head_dim", cls.qk_nope_head_dim) + rope_dim
    if "qk_head_dim" in raw and raw["qk_head_dim"] != qk_dim:
        fail(f"qk_head_dim={raw['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim = {qk_dim}")

    kw["rope_scaling"] = _rope_from_hf(raw, kw, fail)
    run = {k: v for k, v in overrides.items() if k in RUN_OPTIONS}
    try:  # the architecture overrides join config.json's fields before they are checked together
        return cls(**{**kw, **{k: v for k, v in overrides.items() if k not in run}}).replace(**run)
    except ConfigError as e:
        raise ConfigError(f"{src}: {str(e).removeprefix('K2Config: ').removeprefix('RunOptions: ')}") from None
    except TypeError as e:
        raise ConfigError(f"{src}: {e}") from None


def _rope_from_hf(raw, kw, fail) -> YarnScaling | None:
    """rope_scaling (transformers 4.x) or rope_parameters (5.x) -> YarnScaling; also sets kw['rope_theta']."""
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    if scaling is not None and params is not None and params.get("rope_type", "default") != "default":
        if any(scaling.get(k) != params.get(k) for k in scaling if k not in ("type", "rope_type")):
            fail(f"rope_scaling {scaling} and rope_parameters {params} disagree")
    if params is not None and "rope_theta" in params:
        if "rope_theta" in raw and raw["rope_theta"] != params["rope_theta"]:
            fail(f"rope_theta={raw['rope_theta']} and rope_parameters.rope_theta={params['rope_theta']} disagree")
        kw["rope_theta"] = params["rope_theta"]
    spec = scaling if scaling is not None else params
    if spec is None:
        return None
    kind = spec.get("type", spec.get("rope_type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        fail(f"rope scaling type {kind!r} is not supported (expected 'yarn')")
    known = {f.name for f in dataclasses.fields(YarnScaling)}
    extra = set(spec) - known - {"type", "rope_type", "rope_theta", "truncate", "attention_factor"}
    if extra:
        fail(f"unknown rope_scaling field(s) {sorted(extra)}")
    if not spec.get("truncate", True) or spec.get("attention_factor") is not None:
        fail("rope_scaling with truncate=false or an explicit attention_factor is not supported")
    if "factor" not in spec or "original_max_position_embeddings" not in spec:
        fail("yarn rope_scaling needs factor and original_max_position_embeddings")
    return YarnScaling(**{k: spec[k] for k in known if k in spec and spec[k] is not None})


# ---- presets ------------------------------------------------------------------------------------------------
def kimi_k2(**overrides: Any) -> K2Config:
    """Kimi-K2-Instruct / Kimi-K2-Base as released (128K context, YaRN factor 32 over 4096)."""
    return K2Config().replace(**overrides)


def kimi_k2_0905(**overrides: Any) -> K2Config:
    """Kimi-K2-Instruct-0905: 256K context, YaRN factor 64 over 4096."""
    return K2Config(max_position_embeddings=262144,
                    rope_scaling=YarnScaling(factor=64.0, original_max_position_embeddings=4096)).replace(**overrides)


def kimi_k2_thinking(**overrides: Any) -> K2Config:
    """Kimi-K2-Thinking's text model, as the INT4 releases (K2-Thinking, and the text_config of K2.5 and later)
    describe it: K2's architecture with 256K context (YaRN factor 64 over 4096), rms_norm_eps 1e-5 and eos
    <|im_end|> (163586). The release's INT4 experts are a loading choice (weights="int4"), not part of the config."""
    return kimi_k2_0905(rms_norm_eps=1e-5, eos_token_id=163586).replace(**overrides)


def moonlight_16b(**overrides: Any) -> K2Config:
    """Moonlight-16B-A3B: no q_lora, 64 experts top-6, 2 shared experts, 27 layers, plain RoPE."""
    return K2Config(vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
                    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446,
                    first_k_dense_replace=1, q_lora_rank=None, rope_theta=50000.0, rope_scaling=None,
                    max_position_embeddings=8192).replace(**overrides)


def deepseek_v3(**overrides: Any) -> K2Config:
    """DeepSeek-V3: 128 heads, 256 experts in 8 groups (top-4 groups), 3 dense layers first."""
    return K2Config(vocab_size=129280, num_attention_heads=128, n_routed_experts=256, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, first_k_dense_replace=3, rope_theta=10000.0,
                    rope_scaling=YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                    max_position_embeddings=163840, bos_token_id=0, eos_token_id=1).replace(**overrides)


def tiny(**overrides: Any) -> K2Config:
    """A K2-shaped model small enough for CPU tests: 3 layers (1 dense), 16 experts top-4, YaRN factor 4 over
    32 positions (so 40-token tests reach past the original context)."""
    return K2Config(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
                    num_experts_per_tok=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128,
                    rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
                                             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                    bos_token_id=1, eos_token_id=2).replace(**overrides)


PRESETS = {"kimi_k2": kimi_k2, "kimi_k2_0905": kimi_k2_0905, "kimi_k2_thinking": kimi_k2_thinking,
           "moonlight_16b": moonlight_16b,
           "deepseek_v3": deepseek_v3, "tiny": tiny}


def preset(name: str, **overrides: Any) -> K2Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)

