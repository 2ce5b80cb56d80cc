"""Aux-loss-free load balancing (DeepSeek-V3 / K2): the router's e_score_correction_bias is moved, outside the
gradient, toward balancing the experts' load.

    b <- b + rate * sign(mean_e(load) - load)        per MoE layer, rate = cfg.run.router_bias_update_rate

An expert that got fewer tokens than the mean is pushed up (chosen more), one that got more is pushed down;
an exactly average one is left alone. `expert_load` is the forward's aux["expert_load"] [num_moe_layers, E].

    logits, aux = model(tokens, return_aux=True)
    update_router_bias(model, aux["expert_load"])     # in the train step, after the optimizer update

Letter legend: L MoE layers, E routed experts.
"""

from __future__ import annotations

import jax.numpy as jnp

from k2jax.model.transformer import Transformer


def router_bias_update(bias_LE: jnp.ndarray, expert_load_LE: jnp.ndarray, rate: float) -> jnp.ndarray:
    """The new bias: bias + rate * sign(mean load - load), per layer, in float32."""
    if bias_LE.shape != expert_load_LE.shape:
        raise ValueError(f"router_bias_update: bias {bias_LE.shape} and expert_load {expert_load_LE.shape} differ")
    load = expert_load_LE.astype(jnp.float32)
    return bias_LE + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_router_bias(model: Transformer, expert_load_LE: jnp.ndarray, rate: float | None = None) -> None:
    """Applies `router_bias_update` to the model's stacked router biases in place (nnx)."""
    if model.moe_blocks is None:
        return
    bias = model.moe_blocks.mlp.gate.e_score_correction_bias
    rate = model.cfg.run.router_bias_update_rate if rate is None else rate
    bias[...] = router_bias_update(bias[...], expert_load_LE, rate)
