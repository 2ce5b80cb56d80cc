"""MuonClip vs AdamW: step time on the same model, same batch, one run.

    python benchmarks/optimizer.py [--batch=4 --seq_len=256 --grad_accum=1 --iters=5]

Model: the small K2 of benchmarks/common.py (hidden 512, 4 layers, 32 experts top-4), fp32. Prints
the optimizer update alone and the whole train step (k2jax.training.step: forward + backward over `grad_accum`
microbatches, then one update) for each, and the ratio MuonClip / AdamW (goal for the train step at realistic
shapes: <= 1.3). The update's cost is per step, the model's per token: tokens per step decide the ratio, so
--grad_accum moves this toy towards a real run's tokens per step (Kimi K2: 67M).
"""

from __future__ import annotations

import _repo_root  # noqa: F401  (the repo root first on sys.path: before any project import)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

import k2jax
from benchmarks.common import BENCH_CFG, best_time
from k2jax.model.config import kimi_k2
from k2jax.model.placement import abstract_model
from k2jax.optim.muon_clip import muon_clip, param_rules
from k2jax.tools.host_memory import keep_freed_memory_on_cpu
from k2jax.training.step import TrainState, make_train_step, next_token_loss

_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per microbatch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Microbatches per optimizer step (the train step's accumulation).")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per measurement (after one warm-up).")


def main(argv):
    del argv
    keep_freed_memory_on_cpu()  # both sides of the comparison run with it (k2jax/tools/host_memory.py)
    cfg = BENCH_CFG
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    rows, T = _BATCH.value * _ACCUM.value, _SEQ_LEN.value
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, T + 1)), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(T + 1, dtype=jnp.int32), tokens.shape)}
    optimizers = {
        "adamw": optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1),
        "muon_clip": muon_clip(3e-4, rules=param_rules(model), cfg=cfg),
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    first = {k: v[:_BATCH.value] for k, v in batch.items()}
    grads = jax.jit(jax.grad(lambda p: next_token_loss(nnx.merge(graphdef, p, rest), first)[0]))(params)
    max_logits = jnp.ones((cfg.num_hidden_layers, cfg.num_attention_heads))
    results = {}
    for name, tx in optimizers.items():
        def update(p, s, g, tx=tx):
            u, s = tx.update(g, s, p, attn_max_logits=max_logits)
            return optax.apply_updates(p, u), s

        state = TrainState.create(model, tx)
        step_j = jax.jit(make_train_step(state.graphdef, tx, grad_accum=_ACCUM.value))
        update_j = jax.jit(update)
        t_update = best_time(lambda: jax.block_until_ready(update_j(params, state.opt_state, grads)), _ITERS.value)
        t_step = best_time(lambda: jax.block_until_ready(step_j(state, batch)), _ITERS.value)
        results[name] = (t_update, t_step)
        print(f"{name:10s} update {t_update * 1e3:8.1f} ms   train step {t_step * 1e3:8.1f} ms")
    (ua, sa), (um, sm) = results["adamw"], results["muon_clip"]
    tokens_here = rows * T
    print(f"MuonClip / AdamW: update {um / ua:.2f}x, train step {sm / sa:.2f}x (goal <= 1.3) "
          f"[{cfg.num_params():,} params, {tokens_here:,} tokens per step = {_ACCUM.value} x {_BATCH.value} x {T}, "
          f"{jax.devices()[0].platform}]")
    here = ns_flops(cfg) / (cfg.flops_per_token(T) * tokens_here)
    print(f"Newton-Schulz FLOPs / model FLOPs per step: here {here:.1%}"
          f" ({tokens_here} tokens per step); Kimi K2 at 4K context and {K2_TOKENS_PER_STEP / 1e6:.0f}M tokens per "
          f"step: {ns_flops(kimi_k2()) / (kimi_k2().flops_per_token(4096) * K2_TOKENS_PER_STEP):.2%}")


K2_TOKENS_PER_STEP = 67e6  # the K2 report's global batch


def ns_flops(cfg, steps: int = 5) -> float:
    """FLOPs of Newton-Schulz over every Muon matrix of the model, per optimizer step (m <= n after the
    transpose): each iteration forms X Xᵀ (2 m² n), A A (2 m³) and B X (2 m² n)."""
    abstract = abstract_model(cfg)
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
