"""Aux-loss-free router-bias update."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import tiny
from k2jax.optim.router_bias import router_bias_update, update_router_bias
from tests.oracle import random_release_tensors


def test_sign_rule():
    bias = jnp.zeros((2, 4))
    load = jnp.asarray([[1, 2, 3, 2], [0, 0, 8, 0]])  # means 2 and 2
    new = np.asarray(router_bias_update(bias, load, 0.01))
    np.testing.assert_allclose(new, [[0.01, 0, -0.01, 0], [0.01, 0.01, -0.01, 0.01]])
    with pytest.raises(ValueError, match="differ"):
        router_bias_update(bias, load[:1], 0.01)


def test_in_a_jitted_step_it_balances_the_load():
    """Routing-heavy random weights (the parity fixture's) with a zero bias start unbalanced; the sign rule
    brings the load's coefficient of variation down several-fold (a bang-bang rule then hovers at ~rate)."""
    cfg = tiny(router_bias_update_rate=0.005)
    tensors = random_release_tensors(cfg, seed=1)
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = np.zeros_like(tensors[name])
    model = k2jax.from_hf_tensors(cfg, tensors)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32)))

    @nnx.jit
    def step(m):
        _, aux = m(tokens, return_aux=True)
        update_router_bias(m, aux["expert_load"])
        return aux["expert_load"]

    loads = [np.asarray(step(model)) for _ in range(40)]
    cv = [float((load.std(-1) / load.mean(-1)).mean()) for load in loads]
    assert np.mean(cv[-10:]) < 0.4 * cv[0], cv[::5]
    bias = np.asarray(model.moe_blocks.mlp.gate.e_score_correction_bias[...])
    assert bias.dtype == np.float32 and np.any(bias != 0)
    assert "router_bias_update_rate" not in cfg.to_hf()
