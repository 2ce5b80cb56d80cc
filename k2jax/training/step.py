"""The train step: next-token loss on packed rows, gradient accumulation, MuonClip, router-bias update, NaN guard.

    state = TrainState.create(model, tx)
    step_fn = make_train_step(state.graphdef, tx, grad_accum=2)
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)   # batch leaves [b, T + 1]

The batch's rows are split into `grad_accum` microbatches run one after another (a scan), gradients summed
weighted by their target-token counts, so the update equals one big batch's. The QK-Clip statistics are the max
over microbatches; expert loads and the routed rows dropped by expert parallelism's bounded receive buffers
(`ep_dropped_rows`, 0 when dropless) are summed. A step whose loss or gradients are not finite changes nothing
(`metrics["finite"]` is False): the caller stops before saving it. The metrics also say which explicit
parallelism the step was traced with (`expert_parallel`, `pipeline_stages`, `pipeline_microbatches`:
k2jax.model.transformer.parallelism of the mesh set with jax.set_mesh).

Letter legend: A accumulation microbatches, b rows per microbatch, T tokens per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2jax.model.transformer import parallelism
from k2jax.optim.router_bias import router_bias_update


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any      # nnx.State of nnx.Param
    rest: Any        # nnx.State of everything else (router biases)
    opt_state: Any
    graphdef: Any = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation) -> "TrainState":
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(jnp.zeros((), jnp.int32), params, rest, tx.init(params), graphdef)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] at each position [B, T], float32, as logsumexp minus the target's logit
    (picked by comparing against iota, which fuses): its gradient is softmax - one-hot with no scatter, 2.3x
    faster on CPU than log_softmax + take_along_axis, and a vocab-sharded logits array needs no gather."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    is_target_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    return jax.nn.logsumexp(logits_BTV, axis=-1) - jnp.sum(jnp.where(is_target_BTV, logits_BTV, 0.0), axis=-1)


LOSS_CHUNK = 1024  # tokens per row whose logits exist at once in the loss (longer rows run in pieces)


def chunked_token_nll(model, hidden_BTD: jax.Array, targets_BT: jax.Array, chunk: int = LOSS_CHUNK) -> jax.Array:
    """token_nll(model.logits(hidden), targets) [B, T], the logits made `chunk` positions at a time and remade in
    the backward pass (jax.checkpoint): a row of T tokens holds [B, chunk, V] float32 logits and their gradient
    instead of [B, T, V] (K2 at 4K tokens: 2.5 GB each). T not a multiple of chunk: one piece."""
    B, T, D = hidden_BTD.shape
    if T <= chunk or T % chunk:
        return token_nll(model.logits(hidden_BTD), targets_BT)
    n = T // chunk
    pieces = (hidden_BTD.reshape(B, n, chunk, D).swapaxes(0, 1), targets_BT.reshape(B, n, chunk).swapaxes(0, 1))
    nll_nBC = jax.lax.map(jax.checkpoint(lambda p: token_nll(model.logits(p[0]), p[1])), pieces)
    return nll_nBC.swapaxes(0, 1).reshape(B, T)


def next_token_loss(model, batch) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """Summed cross-entropy of each token's successor within its segment, the number of such targets, aux.
    batch: tokens, segment_ids, positions [b, T + 1] int32."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    hidden, aux = model(tokens[:, :-1], segment_ids=seg[:, :-1], positions=pos[:, :-1], return_aux=True,
                        return_hidden=True)
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    nll = chunked_token_nll(model, hidden, tokens[:, 1:])
    return jnp.sum(nll * mask), (jnp.sum(mask), aux)


def _global_norm(tree) -> jax.Array:
    return optax.global_norm(jax.tree.leaves(tree))


def make_train_step(graphdef, tx: optax.GradientTransformationExtraArgs, *, grad_accum: int = 1,
                    router_bias_rate: float | None = None):
    def grads_of(params, rest, micro):
        def loss_fn(p):
            return next_token_loss(nnx.merge(graphdef, p, rest), micro)

        (loss_sum, (count, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss_sum, count, aux, grads

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rows = batch["tokens"].shape[0]
        if rows % grad_accum:
            raise ValueError(f"train step: {rows} rows per step do not split into grad_accum={grad_accum}")

        def one(mb):
            l, c, aux, g = grads_of(state.params, state.rest, mb)
            return l, c, aux["attn_max_logits"], aux["expert_load"], jnp.sum(aux["ep_dropped"]), g

        if grad_accum == 1:  # nothing to add up: no accumulator, no scan
            loss_sum, count, max_logits, load, dropped, grads = one(batch)
        else:
            micro = jax.tree.map(lambda a: a.reshape((grad_accum, rows // grad_accum) + a.shape[1:]), batch)

            def accumulate(carry, mb):
                l, c, m, ld, d, g = one(mb)
                loss_sum, count, max_logits, load, dropped, grads = carry
                return (loss_sum + l, count + c, jnp.maximum(max_logits, m), load + ld, dropped + d,
                        jax.tree.map(jnp.add, grads, g)), None

            shapes = jax.eval_shape(one, jax.tree.map(lambda a: a[0], micro))
            zeros = (jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.full(shapes[2].shape, -jnp.inf),
                     jnp.zeros(shapes[3].shape, jnp.int32), jnp.zeros((), jnp.int32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, count, max_logits, load, dropped, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(state, grads):
            updates, opt_state = tx.update(grads, state.opt_state, state.params, attn_max_logits=max_logits)
            params = optax.apply_updates(state.params, updates)
            rest = state.rest
            model = nnx.merge(graphdef, params, rest)
            if model.moe_blocks is not None:
                rate = model.cfg.router_bias_update_rate if router_bias_rate is None else router_bias_rate
                bias = model.moe_blocks.mlp.gate.e_score_correction_bias
                bias[...] = router_bias_update(bias[...], load, rate)
                _, _, rest = nnx.split(model, nnx.Param, ...)
            new = TrainState(state.step + 1, params, rest, opt_state, graphdef)
            return new, _global_norm(updates), _global_norm(params)

        def keep(state, grads):
            return state, jnp.zeros(()), _global_norm(state.params)

        # a bad step changes nothing. A cond, not a select between the new and the old state: the update then
        # runs in place in the donated state instead of holding both (K2 on v5p-512: 30 GB per chip)
        new, update_norm, param_norm = jax.lax.cond(finite, apply, keep, state, grads)
        load_f = load.astype(jnp.float32)
        # the parallelism this step was traced with (the mesh set with jax.set_mesh decides it)
        explicit = parallelism(nnx.merge(graphdef, state.params, state.rest).cfg)
        metrics = {**explicit, "loss": loss, "grad_norm": grad_norm, "update_norm": update_norm,
                   "param_norm": param_norm, "tokens": count, "finite": finite,
                   "attn_max_logit": max_logits,  # [layers, heads]
                   "ep_dropped_rows": dropped,  # routed rows EP receive buffers dropped (cfg.ep_capacity_factor)
                   "expert_load_max_over_mean": jnp.max(load_f, -1) / jnp.maximum(jnp.mean(load_f, -1), 1e-9)}
        return new, metrics

    return step
