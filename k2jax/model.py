"""The K2 transformer: embed -> first_k_dense_replace dense blocks -> scanned MoE blocks -> norm -> lm_head.

The MoE blocks are built once with a leading layer axis (`nnx.vmap`; every parameter's logical axes get
"layers" in front) and run with `jax.lax.scan`, so compile time does not grow with depth. Dense blocks are few
(1 for K2, 3 for DeepSeek-V3) and run as a Python loop.

    logits = model(tokens_BT)                         # [B, T, V] float32
    logits, aux = model(tokens_BT, return_aux=True)   # see `Transformer.__call__`

Packed sequences: `segment_ids` [B, T] (>= 1 for real tokens, 0 for padding) restrict attention to the same
segment; `positions` [B, T] feed RoPE and default to the index within the segment. Padding tokens are left out
of the aux statistics.

Letter legend: B batch, T query len, S key len, D hidden, N heads, V vocab, E experts, K top-k, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.attention import MLAttention
from k2jax.config import K2Config
from k2jax.layers import MLP, RMSNorm, project, weight
from k2jax.moe import MoE
from k2jax.rope import rope_tables


class DecoderBlock(nnx.Module):
    """x + attn(norm(x)), then h + ffn(norm(h)), where ffn is the dense MLP or the MoE."""

    def __init__(self, cfg: K2Config, *, moe: bool, rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg, eps=eps, axis_name="embed")
        self.self_attn = MLAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg, eps=eps, axis_name="embed")
        self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)
        self.is_moe = moe

    def __call__(self, x_BTD, cos_BTK, sin_BTK, mask_BTS, valid_BT) -> tuple[jnp.ndarray, dict]:
        attn_BTD, max_logit_N = self.self_attn(self.input_layernorm(x_BTD), cos_BTK, sin_BTK, mask_BTS, valid_BT)
        h_BTD = x_BTD + attn_BTD
        aux = {"attn_max_logits": max_logit_N}
        if self.is_moe:
            ffn_BTD, moe_aux = self.mlp(self.post_attention_layernorm(h_BTD), valid_BT)
            aux.update(moe_aux)
        else:
            ffn_BTD = self.mlp(self.post_attention_layernorm(h_BTD))
        return h_BTD + ffn_BTD, aux


def _stacked_moe_blocks(cfg: K2Config, rngs: nnx.Rngs) -> DecoderBlock:
    """cfg.num_moe_layers MoE blocks as one module whose parameters have a leading "layers" axis."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return DecoderBlock(cfg, moe=True, rngs=nnx.Rngs(params=key))

    blocks = make(jax.random.split(rngs.params(), cfg.num_moe_layers))
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata("logical_axes")))
    return blocks


def segment_positions(segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
    """Index of each token within its run of equal segment ids (0, 1, 2, ... restarting at each new run)."""
    T = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
    starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    run_start_BT = jax.lax.cummax(jnp.where(starts_BT, idx_BT, 0), axis=1)
    return idx_BT - run_start_BT


def attention_mask(segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
    """[B, T, S] bool: key s is visible to query t when s <= t and both are in the same segment."""
    T = segment_ids_BT.shape[1]
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal_TS[None] & same_BTS


class Transformer(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = weight(rngs, (V, D), ("vocab", "embed"), cfg)
        self.dense_blocks = nnx.List([DecoderBlock(cfg, moe=False, rngs=rngs) for _ in range(cfg.num_dense_layers)])
        self.moe_blocks = _stacked_moe_blocks(cfg, rngs) if cfg.num_moe_layers else None
        self.norm = RMSNorm(D, cfg, eps=cfg.rms_norm_eps, axis_name="embed")
        self.lm_head = weight(rngs, (D, V), ("embed", "vocab"), cfg)

    def __call__(self, tokens_BT: jnp.ndarray, *, segment_ids: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None, return_aux: bool = False):
        """tokens [B, T] int -> logits [B, T, V] float32, and with `return_aux` a dict:
          attn_max_logits  [num_hidden_layers, N]  max pre-softmax logit per head (QK-Clip); -inf for a layer
                                                   that saw no valid token
          expert_load      [num_moe_layers, E]     int32 count of valid tokens routed to each expert
          router_topk_ids  [num_moe_layers, B, T, K] int32 chosen experts (unordered within K)
        """
        cfg = self.cfg
        tokens_BT = jnp.asarray(tokens_BT)
        if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise ValueError(f"Transformer: tokens must be an int array [B, T], got {tokens_BT.dtype}{tokens_BT.shape}")
        B, T = tokens_BT.shape
        for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
            if arr is not None and jnp.shape(arr) != (B, T):
                raise ValueError(f"Transformer: {name} must have the tokens' shape {(B, T)}, got {jnp.shape(arr)}")
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)

        valid_BT = segment_ids > 0
        mask_BTS = attention_mask(segment_ids)
        cos_BTK, sin_BTK = rope_tables(cfg, positions)
        x_BTD = self.embed_tokens[...][tokens_BT].astype(cfg.dtype)

        max_logits = []
        for block in self.dense_blocks:
            x_BTD, aux = block(x_BTD, cos_BTK, sin_BTK, mask_BTS, valid_BT)
            max_logits.append(aux["attn_max_logits"])

        moe_aux = None
        if self.moe_blocks is not None:
            graphdef, state = nnx.split(self.moe_blocks)

            def layer(x, layer_state):
                return nnx.merge(graphdef, layer_state)(x, cos_BTK, sin_BTK, mask_BTS, valid_BT)

            x_BTD, moe_aux = jax.lax.scan(layer, x_BTD, state)
            max_logits.append(moe_aux["attn_max_logits"])

        x_BTD = self.norm(x_BTD)
        logits_BTV = project(x_BTD, self.lm_head[...].astype(cfg.dtype), preferred_element_type=jnp.float32)
        if not return_aux:
            return logits_BTV
        N, E, K = cfg.num_attention_heads, cfg.n_routed_experts, cfg.num_experts_per_tok
        aux = {
            "attn_max_logits": jnp.concatenate([jnp.reshape(m, (-1, N)) for m in max_logits], axis=0),
            "expert_load": moe_aux["expert_load"] if moe_aux else jnp.zeros((0, E), jnp.int32),
            "router_topk_ids": moe_aux["topk_ids"] if moe_aux else jnp.zeros((0, B, T, K), jnp.int32),
        }
        return logits_BTV, aux


def param_name(path) -> str:
    """'moe_blocks.mlp.experts.down_proj': the name a parameter goes by in checkpoints, optimizer rules and
    sharding tables. `path` is an nnx state path (strings and ints) or a jax tree path (dict keys and indices;
    attribute keys such as a Variable's .value are skipped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif not isinstance(key, (jax.tree_util.GetAttrKey, jax.tree_util.FlattenedIndexKey)):
            parts.append(str(key))
    return ".".join(parts)


def param_info(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], object, tuple[str, ...]]]:
    """{name: (shape, dtype, logical axes)} for every variable of a model (concrete or from nnx.eval_shape),
    named as in checkpoints ("moe_blocks.mlp.experts.down_proj"). sharding.rules turns it into shardings."""
    return {param_name(path): (tuple(var.shape), var.dtype, tuple(var.get_metadata()["logical_axes"]))
            for path, var in nnx.to_flat_state(nnx.state(model))}
