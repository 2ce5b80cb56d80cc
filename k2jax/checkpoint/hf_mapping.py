"""The one map between the HF release's tensor names and k2jax's parameter tree.

`hf_tensor_specs(cfg)` lists every tensor the release holds for a config (dequantised view: one `.weight` per
matmul, no `weight_scale_inv`), where it lives in `nnx.state(Transformer)` and how it is laid out:

    model.layers.3.mlp.experts.17.down_proj.weight  [D, F]  ->  moe_blocks/mlp/experts/down_proj[3 - k, 17]  [F, D]

It is also the one table of layouts: a spec's `matmul` says how a linear weight's release [out, in] maps to
k2jax's [in, ...out] (`k2jax.formats.weight_layout`: the out axis split per head where the layer has heads); embeddings,
norms and the router bias (`matmul` None) are copied as they are. `matmul_params(cfg)` / `fp8_params(cfg)` /
`int4_params(cfg, scheme)` are the same table keyed by parameter, which k2jax checkpoints store in the release's
layout. The converter (convert_checkpoint.py) streams through the same specs.

Names are the text model's own (`model.layers...`, `lm_head.weight`); a release that prefixes them (K2.5:
`language_model.model.layers...`, `language_model.lm_head.weight`) is read through a `TextLayout`, found from its
index by `detect_text_layout`. A quantised weight `X.weight` is stored as `X.weight` + `X.weight_scale_inv` (FP8)
or as `X.weight_packed` + `X.weight_scale` + `X.weight_shape` (INT4, k2jax.formats.quant).

Letter legend: D hidden, N heads, Q q_lora, C kv_lora, R rope dim, V vocab, E experts, F ffn.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.checkpoint.format import CheckpointError
from k2jax.formats import quant
from k2jax.formats.weight_layout import Matmul, from_stored, to_stored
from k2jax.model.config import K2Config
from k2jax.model.placement import abstract_model
from k2jax.model.transformer import Transformer, param_name

SCALE_SUFFIX = "_scale_inv"  # an FP8 weight's block scales: "<weight name>_scale_inv"
# an INT4 weight's three tensors: "<weight name>_packed" (int32), "_scale" (group scales), "_shape" ([out, in])
PACKED_SUFFIX, GROUP_SCALE_SUFFIX, SHAPE_SUFFIX = "_packed", "_scale", "_shape"
INT4_SUFFIXES = (PACKED_SUFFIX, GROUP_SCALE_SUFFIX, SHAPE_SUFFIX)


@dataclasses.dataclass(frozen=True)
class HFTensorSpec:
    name: str  # release tensor name
    shape: tuple[int, ...]  # release shape (HF layout)
    path: tuple[str | int, ...]  # key path in nnx.state(Transformer)
    index: tuple[int, ...]  # leading indices into that (stacked) parameter: (layer,) or (layer, expert)
    linear: bool  # HF [out, in] matmul weight: transposed to [in, out] and reshaped to k2jax's per-head layout

    @property
    def matmul(self) -> Matmul | None:
        """The layout of a linear weight's whole (stacked) parameter; None for tensors copied as they are."""
        return Matmul(len(self.index), self.shape[1], self.shape[0]) if self.linear else None


def _attention_specs(cfg: K2Config, prefix: str, path, index) -> Iterable[HFTensorSpec]:
    D, N, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    a = prefix + "self_attn."
    p = path + ("self_attn",)
    if cfg.q_lora_rank is None:
        yield HFTensorSpec(a + "q_proj.weight", (N * cfg.qk_head_dim, D), p + ("q_proj",), index, True)
    else:
        Q = cfg.q_lora_rank
        yield HFTensorSpec(a + "q_a_proj.weight", (Q, D), p + ("q_a_proj",), index, True)
        yield HFTensorSpec(a + "q_a_layernorm.weight", (Q,), p + ("q_a_layernorm", "weight"), index, False)
        yield HFTensorSpec(a + "q_b_proj.weight", (N * cfg.qk_head_dim, Q), p + ("q_b_proj",), index, True)
    yield HFTensorSpec(a + "kv_a_proj_with_mqa.weight", (C + R, D), p + ("kv_a_proj_with_mqa",), index, True)
    yield HFTensorSpec(a + "kv_a_layernorm.weight", (C,), p + ("kv_a_layernorm", "weight"), index, False)
    yield HFTensorSpec(a + "kv_b_proj.weight", (N * (cfg.qk_nope_head_dim + cfg.v_head_dim), C),
                       p + ("kv_b_proj",), index, True)
    yield HFTensorSpec(a + "o_proj.weight", (D, N * cfg.v_head_dim), p + ("o_proj",), index, True)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        yield HFTensorSpec(prefix + norm + ".weight", (D,), path + (norm, "weight"), index, False)


def _mlp_specs(hf_prefix: str, path, index, D: int, F: int) -> Iterable[HFTensorSpec]:
    for proj, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
        yield HFTensorSpec(f"{hf_prefix}{proj}.weight", shape, path + (proj,), index, True)


def hf_tensor_specs(cfg: K2Config) -> list[HFTensorSpec]:
    """Every tensor of the (dequantised) release for `cfg`, in file order."""
    D, V, E = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts
    specs = [HFTensorSpec("model.embed_tokens.weight", (V, D), ("embed_tokens",), (), False)]
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        if layer < cfg.num_dense_layers:
            path, index = ("dense_blocks", layer), ()
            specs += _attention_specs(cfg, prefix, path, index)
            specs += _mlp_specs(prefix + "mlp.", path + ("mlp",), index, D, cfg.intermediate_size)
            continue
        path, index = ("moe_blocks",), (layer - cfg.num_dense_layers,)
        specs += _attention_specs(cfg, prefix, path, index)
        gate = path + ("mlp", "gate")
        specs.append(HFTensorSpec(prefix + "mlp.gate.weight", (E, D), gate + ("weight",), index, True))
        specs.append(HFTensorSpec(prefix + "mlp.gate.e_score_correction_bias", (E,),
                                  gate + ("e_score_correction_bias",), index, False))
        for e in range(E):
            specs += _mlp_specs(f"{prefix}mlp.experts.{e}.", path + ("mlp", "experts"), index + (e,), D,
                                cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            specs += _mlp_specs(prefix + "mlp.shared_experts.", path + ("mlp", "shared_experts"), index, D,
                                cfg.shared_intermediate_size)
    specs.append(HFTensorSpec("model.norm.weight", (D,), ("norm", "weight"), (), False))
    specs.append(HFTensorSpec("lm_head.weight", (V, D), ("lm_head",), (), True))
    return specs


def release_dtype(spec: HFTensorSpec) -> str:
    """How the release stores a tensor: "fp8" (e4m3 + 128x128 weight_scale_inv) for every attention, dense-MLP
    and expert matmul; "bfloat16" for embeddings, lm_head, norms and the router gate; "float32" for the router's
    e_score_correction_bias."""
    if spec.name.endswith("e_score_correction_bias"):
        return "float32"
    if spec.linear and not spec.name.endswith("mlp.gate.weight") and spec.name != "lm_head.weight":
        return "fp8"
    return "bfloat16"


def is_router(spec: HFTensorSpec) -> bool:
    """The MoE router's gate: a matmul, but not an nn.Linear in the release's modeling code (never quantised)."""
    return spec.name.endswith("mlp.gate.weight")


def int4_quantized(spec: HFTensorSpec, scheme: quant.Int4Scheme) -> bool:
    """Whether an INT4 release stores this tensor as weight_packed / weight_scale / weight_shape: a Linear (a
    matmul but the router) that no entry of the scheme's ignore list matches, by the text model's module name or
    by the release's (prefixed: scheme.text_prefixes) one."""
    stored = TextLayout(*scheme.text_prefixes).stored(spec.name)
    modules = [n.removesuffix(".weight") for n in (spec.name, stored)]
    return spec.linear and not is_router(spec) and not scheme.ignores(*modules)


def int4_params(cfg: K2Config, scheme: quant.Int4Scheme) -> dict[str, Matmul]:
    """The matmul weights an INT4 release stores packed (every slot of the parameter; a parameter the ignore list
    splits, some layers INT4 and some not, is a CheckpointError: k2jax stores a parameter in one format)."""
    by_param: dict[str, set[bool]] = {}
    for spec in hf_tensor_specs(cfg):
        by_param.setdefault(param_name(spec.path), set()).add(int4_quantized(spec, scheme))
    mixed = sorted(n for n, kinds in by_param.items() if len(kinds) > 1)
    if mixed:
        raise CheckpointError(f"quantization_config ignore list {list(scheme.ignore)} quantises only some slots of "
                              f"{mixed[0]}: k2jax stores each parameter in one format")
    return {n: m for n, m in matmul_params(cfg).items() if by_param[n] == {True}}


def matmul_params(cfg: K2Config) -> dict[str, Matmul]:
    """Every matmul weight (the release's [out, in] linear layers) by parameter name, with its layout."""
    return {param_name(s.path): s.matmul for s in hf_tensor_specs(cfg) if s.linear}


def fp8_params(cfg: K2Config) -> dict[str, Matmul]:
    """The matmul weights the release stores in FP8."""
    fp8 = {param_name(s.path) for s in hf_tensor_specs(cfg) if release_dtype(s) == "fp8"}
    return {n: m for n, m in matmul_params(cfg).items() if n in fp8}


def _slot_matmul(spec: HFTensorSpec) -> Matmul:
    """The layout of one slot (the release tensor itself: no lead axes)."""
    return spec.matmul._replace(n_lead=0)


def hf_to_k2(spec: HFTensorSpec, array: np.ndarray, slot_shape: tuple[int, ...]) -> np.ndarray:
    """A release tensor in k2jax's layout for one slot of its parameter (shape `slot_shape`)."""
    return from_stored(array, _slot_matmul(spec), slot_shape) if spec.linear else array.reshape(slot_shape)


def k2_to_hf(spec: HFTensorSpec, slot: np.ndarray) -> np.ndarray:
    """The inverse of `hf_to_k2`: one parameter slot back to the release's layout."""
    return to_stored(slot, _slot_matmul(spec)) if spec.linear else slot.reshape(spec.shape)


def is_mtp_tensor(name: str, cfg: K2Config) -> bool:
    """Names of multi-token-prediction layers (index >= num_hidden_layers): not part of the model k2jax builds."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def quantized_weight(name: str) -> str | None:
    """The weight a quantisation tensor belongs to ("X.weight" for X.weight_scale_inv / _packed / _scale / _shape);
    None for any other name."""
    for suffix in (SCALE_SUFFIX,) + INT4_SUFFIXES:
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)]
    return None


def check_names(cfg: K2Config, names: Iterable[str], specs: list[HFTensorSpec] | None = None, *,
                source: str = "tensors", quantized: bool = False, display: Callable[[str], str] = str) -> None:
    """Raises CheckpointError naming missing or unexpected tensors (MTP layers are neither). quantized: names may
    include quantisation tensors (a release directory: FP8 `weight_scale_inv`, INT4 `weight_packed` /
    `weight_scale` / `weight_shape` standing for their `weight`; HFCheckpoint checks each against its weight);
    otherwise they mean the weights are still quantised. display: how to name a tensor in the message (the
    release's own, prefixed, name)."""
    specs = hf_tensor_specs(cfg) if specs is None else specs
    names = set(names)
    companions = sorted(n for n in names if quantized_weight(n) is not None)
    if companions and not quantized:
        raise CheckpointError(f"{source}: {display(companions[0])} (and {len(companions) - 1} more) belong to "
                              f"quantised weights; dequantise first (k2jax.formats.quant) or use convert_checkpoint.py")
    present = (names - set(companions)) | {quantized_weight(n) for n in companions if n.endswith(PACKED_SUFFIX)}
    expected = {s.name for s in specs}
    missing = sorted(expected - present)
    unexpected = sorted(n for n in present - expected if not is_mtp_tensor(n, cfg))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) the config needs, e.g. "
                              f"{[display(n) for n in missing[:3]]}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensor(s) the config does not describe, e.g. "
                              f"{[display(n) for n in unexpected[:3]]} (config/weights mismatch?)")


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Where a release keeps the text model's tensors: `model.X` is stored as `body + X` and `lm_head.X` as
    `head + lm_head.X` (K2: "model." and ""; K2.5: "language_model.model." and "language_model.")."""

    body: str = "model."
    head: str = ""

    def stored(self, name: str) -> str:
        return self.head + name if name.startswith("lm_head.") else self.body + name.removeprefix("model.")

    def canonical(self, stored: str) -> str | None:
        """The text model's name of a stored tensor; None for a tensor outside the text model (a vision tower)."""
        if stored.startswith(self.head + "lm_head."):
            return stored[len(self.head):]
        if stored.startswith(self.body):
            return "model." + stored[len(self.body):]
        return None


def detect_text_layout(names: Iterable[str]) -> TextLayout:
    """The layout of a release's text tensors, from the one `...embed_tokens.weight` and the one
    `...lm_head.weight` outside any layer (MTP layers carry their own embed_tokens); the plain K2 layout when
    either is missing or ambiguous (check_names then names what is wrong)."""
    def prefixes(suffix: str) -> set[str]:
        return {n[: -len(suffix)] for n in names if n.endswith(suffix) and "layers." not in n}

    names = list(names)
    body, head = prefixes("embed_tokens.weight"), prefixes("lm_head.weight")
    if len(body) != 1 or len(head) != 1:
        return TextLayout()
    return TextLayout(body.pop(), head.pop())


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def from_hf_tensors(cfg: K2Config, tensors: Mapping[str, Any]) -> Transformer:
    """Builds a Transformer whose parameters are the given release tensors ({name: array}, dequantised).

    Every tensor the config needs must be present with the release's shape; anything else (but MTP layers)
    is an error. Arrays are cast to cfg.run.param_dtype."""
    specs = hf_tensor_specs(cfg)
    check_names(cfg, tensors.keys(), specs)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    buffers: dict[tuple, np.ndarray] = {}
    for spec in specs:
        array = np.asarray(tensors[spec.name])
        if tuple(array.shape) != spec.shape:
            raise CheckpointError(f"tensor {spec.name}: expected shape {spec.shape}, got {tuple(array.shape)}")
        if not np.issubdtype(array.dtype, np.floating) and array.dtype != jnp.bfloat16:
            raise CheckpointError(f"tensor {spec.name}: expected a floating dtype, got {array.dtype}")
        var = _get(abstract, spec.path)
        if spec.path not in buffers:
            buffers[spec.path] = np.empty(var.shape, var.dtype)
        buf = buffers[spec.path]
        buf[spec.index] = hf_to_k2(spec, array, buf.shape[len(spec.index):]).astype(buf.dtype)
    for path, buf in buffers.items():
        _get(abstract, path).set_value(jnp.asarray(buf))
    return nnx.merge(graphdef, abstract)


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's parameters as release-named numpy arrays (the inverse of from_hf_tensors)."""
    state = nnx.state(model)
    out = {}
    for spec in hf_tensor_specs(model.cfg):
        full = np.asarray(jax.device_get(_get(state, spec.path)[...]))
        out[spec.name] = k2_to_hf(spec, full[spec.index])
    return out
