"""Mixture of experts as in K2: sigmoid router with a selection-only bias, dropless routed experts, shared expert.

Router (per token, float32):
    scores  = sigmoid(x · gate)                                   [E]
    choice  = scores + e_score_correction_bias                    (selection only; the bias gets no gradient)
    groups  = top-`topk_group` of n_group groups, a group scored by the sum of its top-2 `choice`
    ids     = top-K of `choice` inside the chosen groups
    weights = scores[ids] (/ their sum if norm_topk_prob) · routed_scaling_factor

Routed experts are dropless: the T·K (token, expert) pairs are sorted by expert and run through one grouped
expert FFN in the form k2jax.model.target picks (`pallas_kernels.grouped_matmul.grouped_ffn`'s Pallas kernels on TPU /
GPU, `k2jax.model.cpu_grouped_ffn` on CPU), then unsorted and combined with the router weights.
`k2jax.model.fp8_experts` is their FP8-resident form (the release's e4m3 weights and block scales, through the FP8
grouped matmul). Under a mesh (`with jax.set_mesh(mesh):`) each device routes its own tokens (`sharding.per_shard`: no
global sort, and a Pallas grouped matmul runs per device); with an `expert` axis the experts run expert-parallel
instead: `sharding.expert_parallel` sends each row to the device owning its expert with a ragged all-to-all (shard_map).

Letter legend: B batch, T tokens, D hidden, E experts, K top-k, F expert ffn, M = T·K routed rows.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.cpu_grouped_ffn import cpu_grouped_ffn, current_stacks
from k2jax.model.layers import MLP, weight
from k2jax.model.target import Target
from pallas_kernels.grouped_matmul import grouped_ffn
from sharding.expert_parallel import expert_parallel_enabled, expert_parallel_ffn
from sharding.group_rows import combine_sorted, sort_by_group
from sharding.per_shard import per_shard


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


class RoutedExperts(nnx.Module):
    """The routed experts' stacked SwiGLU weights ([E, D, F] gate / up, [E, F, D] down) and their dropless grouped
    FFN. k2jax.model.fp8_experts.FP8RoutedExperts is the FP8-resident form: it keeps this routing and replaces what the
    FFN reads (`expert_arrays`, `weight_stacks`) and runs (`grouped_ffn`)."""

    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = weight(rngs, (E, D, F), ("expert", "embed", "moe_mlp"), cfg, n_batch=1)
        self.up_proj = weight(rngs, (E, D, F), ("expert", "embed", "moe_mlp"), cfg, n_batch=1)
        self.down_proj = weight(rngs, (E, F, D), ("expert", "moe_mlp", "embed"), cfg, fan_in=F, n_batch=1)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)

    def weight_stacks(self) -> tuple:
        """The (gate, up, down) variables' values as stored: what model.run_layers publishes, stacked over the
        scanned layers, for the CPU FFN to read in place (k2jax.model.cpu_grouped_ffn's `stacked`)."""
        return tuple(p[...] for p in (self.gate_proj, self.up_proj, self.down_proj))

    def expert_arrays(self) -> tuple[jax.Array, ...]:
        """The arrays the grouped FFN takes after the rows, each with the expert axis first: (gate, up, down) in
        the compute dtype."""
        return tuple(w.astype(self.dtype) for w in self.weight_stacks())

    def grouped_ffn(self, target: Target, stacked: tuple | None) -> Callable:
        """ffn(rows [M, D], *expert_arrays, group_sizes [E], rows_in_use=None) -> [M, D] in the target's form.
        stacked: current_stacks() (the scanned layers' weight_stacks and the layer index) or None."""
        if target.moe_impl == "tiled":  # the CPU form; unsharded, it reads a scanned layer's stacks in place
            return functools.partial(cpu_grouped_ffn, stacked=stacked)
        return functools.partial(grouped_ffn, impl=target.moe_impl,
                                 launch=target.launch("fp8_grouped_matmul", self.dtype))

    @jax.named_scope("experts")
    def __call__(self, x_TD: jnp.ndarray, weights_TK: jnp.ndarray, ids_TK: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """-> (sum of each token's routed experts' outputs [T, D], routed rows dropped by expert parallelism's
        receive buffer (cfg.ep_capacity_factor; always 0 without EP or when dropless))."""
        E = self.cfg.n_routed_experts
        target = Target.of(self.cfg)
        mesh = jax.sharding.get_abstract_mesh()
        ffn = self.grouped_ffn(target, current_stacks() if mesh.empty else None)
        w = self.expert_arrays()
        x_TD = x_TD.astype(self.dtype)
        if expert_parallel_enabled(mesh, E):
            y_TD, dropped = expert_parallel_ffn(x_TD, weights_TK, ids_TK, *w, ffn=ffn, impl=target.ep_exchange,
                                                capacity_factor=self.cfg.ep_capacity_factor)
            return y_TD.astype(self.dtype), dropped

        def route_and_run(x_TD, weights_TK, ids_TK, *w):
            order_M, group_sizes_E = sort_by_group(ids_TK, E)
            y_MD = ffn(x_TD[order_M // ids_TK.shape[1]], *w, group_sizes_E)
            return combine_sorted(y_MD, order_M, weights_TK)

        tokens, whole = ("batch", None), tuple((None,) * a.ndim for a in w)
        y_TD = per_shard(route_and_run, in_axes=(tokens,) * 3 + whole, out_axes=tokens)(
            x_TD, weights_TK, ids_TK, *w).astype(self.dtype)
        return y_TD, jnp.zeros((), jnp.int32)


class MoE(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        self.gate = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, rngs=rngs)
        self.shared_experts = MLP(cfg, cfg.shared_intermediate_size, rngs=rngs) if cfg.n_shared_experts else None
        self.num_experts = cfg.n_routed_experts

    def __call__(self, x_BTD: jnp.ndarray, valid_BT: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """-> (output [B, T, D], {"expert_load": [E] int32 routed count of valid tokens, "topk_ids": [B, T, K],
        "ep_dropped": int32 routed rows expert parallelism's receive buffers dropped})."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        weights_TK, ids_TK = self.gate(x_TD)
        out_TD, dropped = self.experts(x_TD, weights_TK, ids_TK)
        out_BTD = out_TD.reshape(B, T, D)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                out_BTD = out_BTD + self.shared_experts(x_BTD)
        load_E = jnp.zeros((self.num_experts,), jnp.int32).at[ids_TK].add(
            valid_BT.reshape(B * T, 1).astype(jnp.int32))
        return out_BTD, {"expert_load": load_E, "topk_ids": ids_TK.reshape(B, T, -1), "ep_dropped": dropped}
