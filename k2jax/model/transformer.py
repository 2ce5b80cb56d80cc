"""The K2 transformer: embed -> first_k_dense_replace dense blocks -> scanned MoE blocks -> norm -> lm_head.

The MoE blocks are built once with a leading layer axis (`nnx.vmap`; every parameter's logical axes get
"layers" in front) and run with `jax.lax.scan`, so compile time does not grow with depth. Dense blocks are few
(1 for K2, 3 for DeepSeek-V3) and run as a Python loop.

    logits = model(tokens_BT)                         # [B, T, V] float32
    logits, aux = model(tokens_BT, return_aux=True)   # see `Transformer.__call__`

Packed sequences: `segment_ids` [B, T] (>= 1 for real tokens, 0 for padding) restrict attention to the same
segment; `positions` [B, T] feed RoPE and default to the index within the segment. Padding tokens are left out
of the aux statistics.

Under a mesh with a `context` axis (context parallelism, sharding.context_parallel) each row's T tokens are split
over it: the call puts tokens, segment ids and positions in the striped order, runs the blocks (attention gathers
the latent of the whole row) and returns logits, hidden states and aux in the natural order, as without it.

Profiles read in K2's terms: jax.named_scope "attention", "router", "experts", "shared_experts" and (expert
parallelism) "ep_exchange" name the ops of each block. A block's attention and FFN outputs carry checkpoint_name
"attention_out" / "ffn_out", so a remat policy may keep them (e.g.
`jax.checkpoint_policies.save_only_these_names("attention_out", "ffn_out")`).

Letter legend: B batch, T query len, S key len, D hidden, N heads, V vocab, E experts, K top-k, L layers,
Z = R/2 rope frequencies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from k2jax.model.attention import MLAttention
from k2jax.model.config import K2Config
from k2jax.model.layers import MLP, RMSNorm, project, weight
from k2jax.model.moe import MoE
from k2jax.model.rope import rope_tables
from k2jax.model.target import Target
from pallas_kernels.expert_weights import ExpertWeights
from pallas_kernels.int4_grouped_matmul import GROUP_SIZE
from sharding.context_parallel import context_parallel_size, from_context_order, to_context_order
from sharding.expert_parallel import EXPERT_AXIS, expert_parallel_enabled
from sharding.pipeline import STAGE_AXIS, pipeline_enabled, pipeline_scan
from sharding.rules import ACTIVATION_BTD, constrain


class Layer(NamedTuple):
    """Where run_layers is: the block's index among all layers (a traced scalar inside the MoE scan) and, for a
    scanned MoE block, its routed experts' stacks over all scanned blocks with its own position in them (what the
    grouped FFN may read in place: pallas_kernels.grouped_matmul), else None."""

    index: jax.Array | int
    expert_stack: tuple[ExpertWeights, jax.Array] | None = None


class DecoderBlock(nnx.Module):
    """x + attn(norm(x)), then h + ffn(norm(h)), where ffn is the dense MLP or the MoE."""

    def __init__(self, cfg: K2Config, *, moe: bool, rngs: nnx.Rngs, expert_format: str = "plain",
                 expert_group_size: int = GROUP_SIZE):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg, eps=eps, axis_name="embed")
        self.self_attn = MLAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg, eps=eps, axis_name="embed")
        self.mlp = (MoE(cfg, rngs=rngs, expert_format=expert_format, expert_group_size=expert_group_size) if moe
                    else MLP(cfg, cfg.intermediate_size, rngs=rngs))
        self.is_moe = moe

    def __call__(self, x_BTD, cos_BTZ, sin_BTZ, segment_ids_BT, *, layer: Layer | None = None, context: bool = False
                 ) -> tuple[jnp.ndarray, dict]:
        """context: the row's tokens are split over the mesh's context axis (MLAttention.attend)."""
        attn_BTD, max_logit_N = self.self_attn(self.input_layernorm(x_BTD), cos_BTZ, sin_BTZ, segment_ids_BT,
                                               context=context)
        out_BTD, aux = self.ffn(x_BTD + checkpoint_name(attn_BTD, "attention_out"), segment_ids_BT > 0, layer=layer)
        return out_BTD, {"attn_max_logits": max_logit_N, **aux}

    def cached(self, x_BTD, cos_BTZ, sin_BTZ, positions_BT, valid_BT, cache_LBSX, layer: Layer, *, prefill: bool,
               layout: str = "default") -> tuple[jnp.ndarray, jnp.ndarray]:
        """The generation path: attention through MLAttention.cached (see there for `prefill`) at layer.index of
        the cache; layout: the step's activation layout (sharding.rules: "decode" for one new token per row)."""
        attn_BTD, cache_LBSX = self.self_attn.cached(self.input_layernorm(x_BTD), cos_BTZ, sin_BTZ, positions_BT,
                                                     cache_LBSX, layer.index, prefill=prefill, layout=layout)
        out_BTD, _ = self.ffn(constrain(x_BTD + attn_BTD, ACTIVATION_BTD, layout), valid_BT, layer=layer,
                              layout=layout)
        return constrain(out_BTD, ACTIVATION_BTD, layout), cache_LBSX

    def ffn(self, h_BTD, valid_BT, *, layer: Layer | None = None, layout: str = "default") -> tuple[jnp.ndarray, dict]:
        """h + ffn(norm(h)), and the MoE's aux (empty for a dense block)."""
        if self.is_moe:
            ffn_BTD, aux = self.mlp(self.post_attention_layernorm(h_BTD), valid_BT,
                                    expert_stack=layer.expert_stack if layer is not None else None, layout=layout)
            return h_BTD + checkpoint_name(ffn_BTD, "ffn_out"), aux
        return h_BTD + checkpoint_name(self.mlp(self.post_attention_layernorm(h_BTD)), "ffn_out"), {}


def _stacked_moe_blocks(cfg: K2Config, rngs: nnx.Rngs, expert_format: str, expert_group_size: int) -> DecoderBlock:
    """cfg.num_moe_layers MoE blocks as one module whose parameters have a leading "layers" axis."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return DecoderBlock(cfg, moe=True, rngs=nnx.Rngs(params=key), expert_format=expert_format,
                            expert_group_size=expert_group_size)

    blocks = make(jax.random.split(rngs.params(), cfg.num_moe_layers))
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata("logical_axes")))
    return blocks


def _layer_inputs(cfg: K2Config, segment_ids_BT, positions_BT):
    """What every block needs besides x: rope tables and the segment ids (attention mask, real tokens)."""
    cos_BTZ, sin_BTZ = rope_tables(cfg, positions_BT)
    return cos_BTZ, sin_BTZ, segment_ids_BT


def segment_positions(segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
    """Index of each token within its run of equal segment ids (0, 1, 2, ... restarting at each new run)."""
    T = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
    starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    run_start_BT = jax.lax.cummax(jnp.where(starts_BT, idx_BT, 0), axis=1)
    return idx_BT - run_start_BT


class Transformer(nnx.Module):
    """The K2 model (module docstring). expert_format: the routed experts' weights, "plain" (trained), "fp8" or
    "int4" (frozen, as the releases ship them; k2jax.model.experts), with expert_group_size inputs per INT4 scale."""

    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs, expert_format: str = "plain",
                 expert_group_size: int = GROUP_SIZE):
        self.cfg = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = weight(rngs, (V, D), ("vocab", "embed"), cfg)
        self.dense_blocks = nnx.List([DecoderBlock(cfg, moe=False, rngs=rngs) for _ in range(cfg.num_dense_layers)])
        self.moe_blocks = (_stacked_moe_blocks(cfg, rngs, expert_format, expert_group_size) if cfg.num_moe_layers
                           else None)
        self.norm = RMSNorm(D, cfg, eps=cfg.rms_norm_eps, axis_name="embed")
        self.lm_head = weight(rngs, (D, V), ("embed", "vocab"), cfg)

    def __call__(self, tokens_BT: jnp.ndarray, *, segment_ids: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None, return_aux: bool = False, return_hidden: bool = False):
        """tokens [B, T] int -> logits [B, T, V] float32 (with `return_hidden`: the last block's output [B, T, D]
        instead, for a caller that applies `logits` in pieces), and with `return_aux` a dict:
          attn_max_logits  [num_hidden_layers, N]  max pre-softmax logit per head (QK-Clip); -inf for a layer
                                                   that saw no valid token
          expert_load      [num_moe_layers, E]     int32 count of valid tokens routed to each expert
          router_topk_ids  [num_moe_layers, B, T, K] int32 chosen experts (unordered within K)
          ep_dropped       [num_moe_layers]        int32 routed rows expert parallelism's receive buffers dropped
                                                   (cfg.run.ep_capacity_factor; zeros when dropless)
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
        explicit = parallelism(cfg)
        microbatches, context = explicit["pipeline_microbatches"], explicit["context_parallel"]
        if context > 1:  # the tokens and what travels with them in the striped order (sharding.context_parallel)
            if microbatches:
                raise ValueError("Transformer: context parallelism does not run inside a pipeline: give the mesh a "
                                 "context or a stage axis, not both")
            tokens_BT, segment_ids, positions = (to_context_order(jnp.asarray(a), context)
                                                 for a in (tokens_BT, segment_ids, positions))

        def layer_fn(block, x_BTD, inputs, layer):  # inputs (rope tables, segment ids) ride along unchanged
            x_BTD, aux = block(x_BTD, *inputs, layer=layer, context=context > 1)
            return constrain(x_BTD, ACTIVATION_BTD), inputs, aux

        x_BTD, _, dense_aux, moe_aux = self.run_layers(self.embed(tokens_BT), layer_fn,
                                                       _layer_inputs(cfg, segment_ids, positions),
                                                       microbatches=microbatches)
        if context > 1:  # back to the natural order (the router's choices [L, B, T, K] too)
            x_BTD = constrain(from_context_order(x_BTD, context), ACTIVATION_BTD)
            if moe_aux is not None:
                moe_aux = {**moe_aux, "topk_ids": from_context_order(moe_aux["topk_ids"], context, axis=2)}
        if microbatches and moe_aux is not None:  # [M, L, ...] per microbatch -> as an unsplit batch gives it
            moe_aux = {"attn_max_logits": moe_aux["attn_max_logits"].max(0),
                       "expert_load": moe_aux["expert_load"].sum(0), "ep_dropped": moe_aux["ep_dropped"].sum(0),
                       "topk_ids": jnp.concatenate(list(moe_aux["topk_ids"]), axis=1)}  # [L, M x b = B, T, K]
        logits_BTV = x_BTD if return_hidden else self.logits(x_BTD)
        if not return_aux:
            return logits_BTV
        N, E, K = cfg.num_attention_heads, cfg.n_routed_experts, cfg.num_experts_per_tok
        aux = {
            "attn_max_logits": jnp.concatenate([jnp.reshape(a["attn_max_logits"], (-1, N))
                                                for a in dense_aux + ([moe_aux] if moe_aux else [])], axis=0),
            "expert_load": moe_aux["expert_load"] if moe_aux else jnp.zeros((0, E), jnp.int32),
            "router_topk_ids": moe_aux["topk_ids"] if moe_aux else jnp.zeros((0, B, T, K), jnp.int32),
            "ep_dropped": moe_aux["ep_dropped"] if moe_aux else jnp.zeros((0,), jnp.int32),
        }
        return logits_BTV, aux

    def embed(self, tokens_BT: jnp.ndarray, layout: str = "default") -> jnp.ndarray:
        """Token embeddings [B, T, D] in the compute dtype, in activation layout `layout` (sharding.rules)."""
        return constrain(self.embed_tokens[...][tokens_BT].astype(self.cfg.run.dtype), ACTIVATION_BTD, layout)

    def logits(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        """Final norm and lm_head: [B, T, D] -> [B, T, V] float32."""
        return project(self.norm(x_BTD), self.lm_head[...].astype(self.cfg.run.dtype), impl=Target.of(self.cfg).matmul,
                       preferred_element_type=jnp.float32)

    def run_layers(self, x_BTD: jnp.ndarray, layer_fn, carry, *, microbatches: int = 0):
        """Runs every decoder block in order: x, carry, out = layer_fn(block, x, carry, layer), `layer` a Layer.
        The dense blocks run in a Python loop (static index), the stacked MoE blocks in one scan (traced index;
        `cfg.run.remat` recomputes each block's activations in the backward pass, the target sets the unroll); a
        scanned block's Layer also holds the routed experts' stacks (gradient stopped) and its position in them.
        The index counts all layers (0 .. num_hidden_layers - 1). Returns (x, carry, [out of each dense block], the
        MoE blocks' outs stacked along a leading layer axis, or None without MoE blocks).
        microbatches > 0: the MoE scan runs as a GPipe pipeline over the mesh's `stage` axis
        (sharding.pipeline.pipeline_scan, the same step): `carry` then holds per-example inputs with a leading batch
        axis, split into microbatches with x, and the MoE outs come back [microbatches, L, ...]."""
        dense_outs = []
        for i, block in enumerate(self.dense_blocks):
            x_BTD, carry, out = layer_fn(block, x_BTD, carry, Layer(i))
            dense_outs.append(out)
        moe_outs = None
        if self.moe_blocks is not None:
            graphdef, state = nnx.split(self.moe_blocks)
            first = self.cfg.num_dense_layers
            target = Target.of(self.cfg)
            # not inside the pipeline's shard_map, whose stages hold only their own layers
            stacks = (None if microbatches else
                      jax.tree.map(jax.lax.stop_gradient, self.moe_blocks.mlp.experts.weights()))

            def step(x_carry, xs):
                layer_state, index = xs
                layer = Layer(index, None if stacks is None else (stacks, index - first))
                x, c, out = layer_fn(nnx.merge(graphdef, layer_state), *x_carry, layer)
                return (x, c), out

            if self.cfg.run.remat != "none":  # recompute each block's activations in the backward pass
                policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.cfg.run.remat == "dots"
                          else jax.checkpoint_policies.nothing_saveable)
                step = jax.checkpoint(step, policy=policy)

            indices = jnp.arange(first, first + self.cfg.num_moe_layers, dtype=jnp.int32)
            if microbatches:
                (x_BTD, carry), moe_outs = pipeline_scan(step, (state, indices), (x_BTD, carry),
                                                         num_microbatches=microbatches, unroll=target.scan_unroll)
            else:
                (x_BTD, carry), moe_outs = jax.lax.scan(step, (x_BTD, carry), (state, indices),
                                                        unroll=target.scan_unroll)
        return x_BTD, carry, dense_outs, moe_outs


def parallelism(cfg: K2Config, mesh=None) -> dict[str, int]:
    """What the model runs explicitly (shard_map) under `mesh` (default: the one set with jax.set_mesh):
    expert_parallel, the groups the routed experts are split into (sharding.expert_parallel; 1: none),
    pipeline_stages x pipeline_microbatches (sharding.pipeline; 1 x 0: none) and context_parallel, the shards a
    row's sequence is split into (sharding.context_parallel; 1: none). The rest is XLA's automatic sharding of the
    rules' layout."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    ep = dict(mesh.shape)[EXPERT_AXIS] if expert_parallel_enabled(mesh, cfg.n_routed_experts) else 1
    stages = dict(mesh.shape)[STAGE_AXIS] if pipeline_enabled(mesh) and cfg.num_moe_layers else 1
    return {"expert_parallel": ep, "pipeline_stages": stages,
            "pipeline_microbatches": (cfg.run.pipeline_microbatches or stages) if stages > 1 else 0,
            "context_parallel": context_parallel_size(mesh)}


def describe_parallelism(p: dict[str, int]) -> str:
    """parallelism()'s dict in words, for a job's banner."""
    parts = []
    if p["expert_parallel"] > 1:
        parts.append(f"expert parallel over {p['expert_parallel']} groups (shard_map all-to-all)")
    if p["context_parallel"] > 1:
        parts.append(f"context parallel over {p['context_parallel']} shards of each row (striped; the latent "
                     f"all-gathered)")
    if p["pipeline_stages"] > 1:
        parts.append(f"pipeline of {p['pipeline_stages']} stages x {p['pipeline_microbatches']} microbatches")
    return ", ".join(parts) or "no expert or pipeline parallelism (XLA shards the layout of the rules)"


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
