"""Mixture of experts as in K2: sigmoid router with a selection-only bias, dropless routed experts, shared expert.

Router (per token, float32):
    scores  = sigmoid(x · gate)                                   [E]
    choice  = scores + e_score_correction_bias                    (selection only; the bias gets no gradient)
    groups  = top-`topk_group` of n_group groups, a group scored by the sum of its top-2 `choice`
    ids     = top-K of `choice` inside the chosen groups
    weights = scores[ids] (/ their sum if norm_topk_prob) · routed_scaling_factor

Routed experts (k2jax.model.experts): dropless, their weights plain, FP8 or INT4 (`expert_format`); the T·K (token,
expert) rows sorted by expert run through one grouped FFN in the form k2jax.model.target picks, expert-parallel
under a mesh with an `expert` axis.

Letter legend: B batch, T tokens, D hidden, E experts, K top-k, F expert ffn, M = T·K routed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.experts import RoutedExperts
from k2jax.model.layers import MLP, weight
from pallas_kernels.int4_grouped_matmul import GROUP_SIZE
from sharding.rules import ACTIVATION_BTD, constrain


class RouterBias(nnx.Variable):
    """e_score_correction_bias: float32, changed by the aux-loss-free balancing rule, never by gradients
    (it is not an nnx.Param, so `nnx.state(model, nnx.Param)` leaves it out)."""


class Router(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = weight(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "expert"), cfg)
        self.e_score_correction_bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32),
                                                  logical_axes=("expert",))

    @jax.named_scope("router")
    def __call__(self, x_TD: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """-> (weights [T, K] float32, expert ids [T, K] int32)."""
        cfg = self.cfg
        logits_TE = jnp.dot(x_TD.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        scores_TE = jax.nn.sigmoid(logits_TE)
        choice_TE = scores_TE + self.e_score_correction_bias[...]
        if cfg.n_group > 1:
            choice_TE = _keep_top_groups(choice_TE, cfg.n_group, cfg.topk_group)
        _, ids_TK = jax.lax.top_k(choice_TE, cfg.num_experts_per_tok)
        weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
        return weights_TK * cfg.routed_scaling_factor, ids_TK.astype(jnp.int32)


def _keep_top_groups(choice_TE: jnp.ndarray, n_group: int, topk_group: int) -> jnp.ndarray:
    """Sets the experts of all but the best `topk_group` groups (scored by the sum of their top-2) to -inf."""
    T, E = choice_TE.shape
    grouped = choice_TE.reshape(T, n_group, E // n_group)  # [T, group, expert in the group]
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, top_groups = jax.lax.top_k(group_score, topk_group)
    keep = jnp.zeros((T, n_group), bool).at[jnp.arange(T)[:, None], top_groups].set(True)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(T, E)


class MoE(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs, expert_format: str = "plain",
                 expert_group_size: int = GROUP_SIZE):
        self.gate = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, rngs=rngs, fmt=expert_format, group_size=expert_group_size)
        self.shared_experts = MLP(cfg, cfg.shared_intermediate_size, rngs=rngs) if cfg.n_shared_experts else None
        self.num_experts = cfg.n_routed_experts

    def __call__(self, x_BTD: jnp.ndarray, valid_BT: jnp.ndarray, *, expert_stack=None, layout: str = "default"
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """-> (output [B, T, D], {"expert_load": [E] int32 routed count of valid tokens, "topk_ids": [B, T, K],
        "ep_dropped": int32 routed rows expert parallelism's receive buffers dropped}). expert_stack: see
        RoutedExperts.__call__'s stack; layout: the step's activation layout (sharding.rules)."""
        B, T, D = x_BTD.shape
        x_BTD = constrain(x_BTD, ACTIVATION_BTD, layout)  # the router and the shared expert work in the step's layout
        x_TD = x_BTD.reshape(B * T, D)
        weights_TK, ids_TK = self.gate(x_TD)
        out_TD, dropped = self.experts(x_TD, weights_TK, ids_TK, stack=expert_stack, layout=layout)
        out_BTD = out_TD.reshape(B, T, D)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                out_BTD = out_BTD + self.shared_experts(x_BTD)
        load_E = jnp.zeros((self.num_experts,), jnp.int32).at[ids_TK].add(
            valid_BT.reshape(B * T, 1).astype(jnp.int32))
        return out_BTD, {"expert_load": load_E, "topk_ids": ids_TK.reshape(B, T, -1), "ep_dropped": dropped}
