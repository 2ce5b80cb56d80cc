"""The train step: next-token loss on packed rows, gradient accumulation, MuonClip, router-bias update, NaN guard.

    state = TrainState.create(model, tx)
    step_fn = make_train_step(state.graphdef, tx, grad_accum=2)
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)   # batch leaves [b, T + 1]

The loss is the weighted mean of the next-token losses over the step's targets, across all devices: a target
counts within its segment (not across a packed boundary, not on padding) with the batch's `loss_weights` of the
target token when the batch has them (chat data: 1 on what the assistant produces, 0 elsewhere;
k2jax.training.chat_data), else 1. The batch's rows are split into `grad_accum` microbatches run one after another
(a scan), weighted losses and gradients summed and divided by the step's total weight, so the update equals one
big batch's. The metrics count `tokens` (targets within segments) and `trained_tokens` (those with a weight > 0),
and sum the batch's chat-data counts (chat_data.CONVERSATION_COUNTS: sequences longer than a row truncated / dropped,
conversations split into several sequences and how many those are). The QK-Clip
statistics are the max over microbatches; expert loads and the routed rows dropped by expert parallelism's bounded
receive buffers (`ep_dropped_rows`, 0 when dropless) are summed. A step whose loss or gradients are not finite
changes nothing (`metrics["finite"]` is False): the caller stops before saving it. The metrics also say which
explicit parallelism the step was traced with (`expert_parallel`, `pipeline_stages`, `pipeline_microbatches`:
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
from k2jax.training.chat_data import CONVERSATION_COUNTS
from sharding.context_parallel import context_parallel_size
from sharding.rules import constrain


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
    instead of [B, T, V] (K2 at 4K tokens: 2.5 GB each). T not a multiple of chunk: one piece. Under context
    parallelism (the mesh's context axis splits each row in s contiguous parts) every part runs its own pieces, s at
    a time: piece i is the i-th chunk of every part (in one sequence of chunks over the whole row, a piece would lie
    in one part, and each device would gather the whole row's hidden states and make the logits of every chunk)."""
    B, T, D = hidden_BTD.shape
    if T <= chunk or T % chunk:
        return token_nll(model.logits(hidden_BTD), targets_BT)
    s = context_parallel_size()
    s = s if T % (s * chunk) == 0 else 1
    split = lambda a: jnp.moveaxis(a.reshape((B, s, T // (s * chunk), chunk) + a.shape[2:]), 2, 0)  # noqa: E731
    pieces = (constrain(split(hidden_BTD), (None, "batch", "sequence", None, None)),
              constrain(split(targets_BT), (None, "batch", "sequence", None)))
    nll_mBsC = jax.lax.map(jax.checkpoint(lambda p: token_nll(model.logits(p[0]), p[1])), pieces)
    return jnp.moveaxis(nll_mBsC, 0, 2).reshape(B, T)


def target_weights(batch) -> tuple[jax.Array, jax.Array]:
    """(weight [b, T] float32, within [b, T] bool) of each next-token target of a batch of rows [b, T + 1]: within
    is True where the target continues its token's segment (not across a packed boundary, not padding); weight is
    the target token's `loss_weights` there (1 when the batch has none), 0 elsewhere."""
    seg = batch["segment_ids"]
    within = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    weights = batch.get("loss_weights")
    if weights is None:
        return within.astype(jnp.float32), within
    return jnp.where(within, weights[:, 1:].astype(jnp.float32), 0.0), within


def weighted_nll_sum(model, hidden_BTD: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """sum(weight * cross-entropy) over the positions of weight > 0: a position of weight 0 adds exactly 0 (a
    select, not a product: an infinite loss there does not turn the sum into NaN) and its logits get exactly 0
    gradient."""
    nll = chunked_token_nll(model, hidden_BTD, targets_BT)
    return jnp.sum(jnp.where(weights_BT > 0, nll * weights_BT, 0.0))


def next_token_loss(model, batch) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """Weighted sum of the cross-entropy of each token's successor within its segment (target_weights), the sum
    of the weights, aux (the model's, plus the step's `tokens` and `trained_tokens` counts).
    batch: tokens, segment_ids, positions [b, T + 1] int32, optional loss_weights [b, T + 1] float32."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    hidden, aux = model(tokens[:, :-1], segment_ids=seg[:, :-1], positions=pos[:, :-1], return_aux=True,
                        return_hidden=True)
    weights, within = target_weights(batch)
    counts = {"tokens": jnp.sum(within, dtype=jnp.int32), "trained_tokens": jnp.sum(weights > 0, dtype=jnp.int32)}
    return weighted_nll_sum(model, hidden, tokens[:, 1:], weights), (jnp.sum(weights), {**aux, **counts})


def _global_norm(tree) -> jax.Array:
    return optax.global_norm(jax.tree.leaves(tree))


def make_train_step(graphdef, tx: optax.GradientTransformationExtraArgs, *, grad_accum: int = 1,
                    router_bias_rate: float | None = None):
    def grads_of(params, rest, micro):
        def loss_fn(p):
            return next_token_loss(nnx.merge(graphdef, p, rest), micro)

        (loss_sum, (weight, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss_sum, weight, aux, grads

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        rows = batch["tokens"].shape[0]
        if rows % grad_accum:
            raise ValueError(f"train step: {rows} rows per step do not split into grad_accum={grad_accum}")
        counts = {k: jnp.sum(batch[k]) for k in CONVERSATION_COUNTS if k in batch}
        batch = {k: v for k, v in batch.items() if k not in CONVERSATION_COUNTS}

        def one(mb):
            """(what adds up over microbatches, what is their max, gradients) of one microbatch."""
            loss_sum, weight, aux, g = grads_of(state.params, state.rest, mb)
            sums = {"loss_sum": loss_sum, "weight": weight, "tokens": aux["tokens"],
                    "trained_tokens": aux["trained_tokens"], "expert_load": aux["expert_load"],
                    "ep_dropped": jnp.sum(aux["ep_dropped"])}
            return sums, aux["attn_max_logits"], g

        if grad_accum == 1:  # nothing to add up: no accumulator, no scan
            sums, max_logits, grads = one(batch)
        else:
            micro = jax.tree.map(lambda a: a.reshape((grad_accum, rows // grad_accum) + a.shape[1:]), batch)

            def accumulate(carry, mb):
                sums, max_logits, grads = one(mb)
                return (jax.tree.map(jnp.add, carry[0], sums), jnp.maximum(carry[1], max_logits),
                        jax.tree.map(jnp.add, carry[2], grads)), None

            shapes = jax.eval_shape(one, jax.tree.map(lambda a: a[0], micro))
            zeros = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0]),
                     jnp.full(shapes[1].shape, -jnp.inf), jax.tree.map(jnp.zeros_like, state.params))
            (sums, max_logits, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        load, dropped = sums["expert_load"], sums["ep_dropped"]
        denom = jnp.maximum(sums["weight"], 1e-9)  # no trained target at all: loss and gradients 0
        loss = sums["loss_sum"] / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(state, grads):
            updates, opt_state = tx.update(grads, state.opt_state, state.params, attn_max_logits=max_logits)
            params = optax.apply_updates(state.params, updates)
            rest = state.rest
            model = nnx.merge(graphdef, params, rest)
            if model.moe_blocks is not None:
                rate = model.cfg.run.router_bias_update_rate if router_bias_rate is None else router_bias_rate
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
                   "param_norm": param_norm, "tokens": sums["tokens"], "trained_tokens": sums["trained_tokens"],
                   **counts, "finite": finite,
                   "attn_max_logit": max_logits,  # [layers, heads]
                   "ep_dropped_rows": dropped,  # routed rows EP receive buffers dropped (cfg.run.ep_capacity_factor)
                   "expert_load_max_over_mean": jnp.max(load_f, -1) / jnp.maximum(jnp.mean(load_f, -1), 1e-9)}
        return new, metrics

    return step
