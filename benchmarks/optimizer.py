"""MuonClip vs AdamW: step time on the same model, same batch, one run.

    python benchmarks/optimizer.py [--batch=4 --seq_len=256 --iters=5]

Model: the small K2 of benchmarks/common.py (hidden 512, 4 layers, 32 experts top-4), fp32. Prints
the optimizer update alone and the whole train step (forward + backward + update) for each, and the ratio
MuonClip / AdamW (goal for the train step at realistic shapes: <= 1.3).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import k2jax  # noqa: E402
from benchmarks.common import BENCH_CFG, best_time  # noqa: E402
from k2jax.config import kimi_k2  # noqa: E402
from k2jax.optim.muon_clip import muon_clip, param_rules  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per measurement (after one warm-up).")


def main(argv):
    del argv
    cfg = BENCH_CFG
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (_BATCH.value, _SEQ_LEN.value + 1)))
    optimizers = {
        "adamw": optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1),
        "muon_clip": muon_clip(3e-4, rules=param_rules(model), cfg=cfg),
    }

    def loss_fn(p):
        logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1], return_aux=True)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), aux

    grads, aux = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
    results = {}
    for name, tx in optimizers.items():
        extra = {"attn_max_logits": aux["attn_max_logits"]} if name == "muon_clip" else {}

        def update(p, s, g, tx=tx, extra=extra):
            u, s = tx.update(g, s, p, **extra)
            return optax.apply_updates(p, u), s

        def train_step(p, s, tx=tx, name=name):
            (_, a), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            kw = {"attn_max_logits": a["attn_max_logits"]} if name == "muon_clip" else {}
            u, s = tx.update(g, s, p, **kw)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        update_j, step_j = jax.jit(update), jax.jit(train_step)
        t_update = best_time(lambda: jax.block_until_ready(update_j(params, state, grads)), _ITERS.value)
        t_step = best_time(lambda: jax.block_until_ready(step_j(params, state)), _ITERS.value)
        results[name] = (t_update, t_step)
        print(f"{name:10s} update {t_update * 1e3:8.1f} ms   train step {t_step * 1e3:8.1f} ms")
    (ua, sa), (um, sm) = results["adamw"], results["muon_clip"]
    print(f"MuonClip / AdamW: update {um / ua:.2f}x, train step {sm / sa:.2f}x (goal <= 1.3) "
          f"[{cfg.num_params():,} params, batch {_BATCH.value} x {_SEQ_LEN.value}, {jax.devices()[0].platform}]")
    tokens_here = _BATCH.value * _SEQ_LEN.value
    print(f"Newton-Schulz FLOPs / model FLOPs per step: here {ns_flops(cfg) / (cfg.flops_per_token(_SEQ_LEN.value) * tokens_here):.1%}"
          f" ({tokens_here} tokens per step); Kimi K2 at 4K context and {K2_TOKENS_PER_STEP / 1e6:.0f}M tokens per "
          f"step: {ns_flops(kimi_k2()) / (kimi_k2().flops_per_token(4096) * K2_TOKENS_PER_STEP):.2%}")


K2_TOKENS_PER_STEP = 67e6  # the K2 report's global batch


def ns_flops(cfg, steps: int = 5) -> float:
    """FLOPs of Newton-Schulz over every Muon matrix of the model, per optimizer step (m <= n after the
    transpose): each iteration forms X Xᵀ (2 m² n), A A (2 m³) and B X (2 m² n)."""
    abstract = nnx.eval_shape(lambda: k2jax.Transformer(cfg, rngs=nnx.Rngs(0)))
    rules = param_rules(abstract)
    total = 0.0
    for name, (shape, _, _) in k2jax.param_info(abstract).items():
        rule = rules.get(name)  # None for the router bias (not a Param)
        if rule is None or rule.rule != "muon":
            continue
        m, n = sorted((rule.fan_in, rule.fan_out))
        batch = int(np.prod(shape)) // (m * n)
        total += batch * steps * (4 * m * m * n + 2 * m ** 3)
    return total


if __name__ == "__main__":
    app.run(main)
