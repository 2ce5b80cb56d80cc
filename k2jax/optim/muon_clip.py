"""MuonClip (Kimi K2): Muon on hidden matrices, AdamW on the rest, then per-head QK-Clip.

    rules = param_rules(model)                    # which rule each parameter gets (print(rules_table(rules)))
    tx = muon_clip(3e-4, rules=rules, cfg=model.cfg)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    logits, aux = model(tokens, return_aux=True)  # inside the loss; aux["attn_max_logits"] [num_layers, N]
    opt.update(model, grads, attn_max_logits=aux["attn_max_logits"])

Muon (Moonlight / K2 form), per matrix, with stacked-layer and expert axes as batch axes:
    M_t = mu M_{t-1} + G_t                        (no bias correction)
    O_t = NS5(G_t + mu M_t)  (nesterov) or NS5(M_t)
    W_t = W_{t-1} - lr (0.2 sqrt(max(fan_in, fan_out)) O_t + wd W_{t-1})
NS5 is Newton-Schulz with the coefficients (3.4445, -4.7750, 2.0315) after Frobenius normalisation (optax's
`orthogonalize_via_newton_schulz` on one matrix, vmapped over each batch axis: optax's own batching flattens the
batch axes into one, which a sharded expert axis next to an unsharded layer axis cannot keep, so XLA would gather
every expert of every layer onto each device, 25 GB per K2 MoE layer); fan-in / fan-out and the batch axes come
from each weight's `matrix_axes` metadata, not from its shape.

AdamW (b1, b2, decoupled weight decay) for embeddings, lm_head, norms and every other parameter.

QK-Clip, after the update, as an update (it composes with whatever came before): for layer l, head h with
S = attn_max_logits[l, h] > tau, gamma = tau / S; q_nope columns of q_b_proj (or q_proj) x sqrt(gamma), q_rope
columns x gamma, k_nope columns of kv_b_proj x sqrt(gamma). kv_a (the shared rope key), values and heads at or
under tau are untouched. Every logit of the head is then scaled by exactly gamma.

Letter legend: L layers, N heads, P nope dim, R rope dim, U value dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz, scale_by_shape

from k2jax.model.config import K2Config
from k2jax.model.transformer import param_name
from sharding.rules import mesh_axes

K2_NS_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_RMS = 0.2  # update scaled to 0.2 sqrt(max(fan_in, fan_out)): AdamW's typical update RMS


class ParamRule(NamedTuple):
    rule: str  # "muon" | "adamw"
    dims: MuonDimensionNumbers | None  # matrix axes for muon; the other axes are batch axes
    fan_in: int
    fan_out: int
    layers_axis: int | None = None  # the stacked-layers axis: Newton-Schulz runs one layer at a time along it
    sharding: NamedSharding | None = None  # the parameter's, when known: Newton-Schulz then spreads its layers


def param_rules(model: nnx.Module, shardings: Mapping[str, NamedSharding] | None = None
                ) -> dict[str, ParamRule]:
    """The one place that decides each parameter's rule: Muon for every weight whose metadata names a matrix
    (`matrix_axes`) unless it touches the vocabulary (embeddings, lm_head); AdamW for everything else.
    `shardings` ({name: NamedSharding}, sharding.rules.param_shardings): the parameters' layout on the training
    mesh; with it, Newton-Schulz runs layer-sharded (see `newton_schulz`)."""
    rules = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = param_name(path)
        meta = var.get_metadata()
        matrix, axes = meta.get("matrix_axes"), tuple(meta.get("logical_axes", ()))
        if matrix is None or "vocab" in axes:
            rules[name] = ParamRule("adamw", None, 0, 0)
            continue
        n_in, n_out = matrix
        ndim = len(var.shape)
        ins = tuple(range(ndim - n_in - n_out, ndim - n_out))
        outs = tuple(range(ndim - n_out, ndim))
        fan_in = math.prod(var.shape[i] for i in ins)  # host arithmetic: no device (the mesh may be deviceless)
        fan_out = math.prod(var.shape[i] for i in outs)
        layers = axes.index("layers") if "layers" in axes else None
        rules[name] = ParamRule("muon", MuonDimensionNumbers(ins, outs), fan_in, fan_out, layers,
                                (shardings or {}).get(name))
    return rules


def newton_schulz_flops(model: nnx.Module, ns_steps: int) -> float:
    """Matrix FLOPs of one MuonClip update's Newton-Schulz over every Muon weight of `model` (abstract is
    fine): per m x n matrix (m <= n) and iteration, X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n)."""
    rules = param_rules(model)
    total = 0.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        r = rules[param_name(path)]
        if r.rule != "muon":
            continue
        m, n = sorted((r.fan_in, r.fan_out))
        matrices = math.prod(var.shape) // (m * n)
        total += matrices * ns_steps * (4 * m * m * n + 2 * m ** 3)
    return total


def rules_table(rules: dict[str, ParamRule]) -> str:
    """A printable table: parameter, rule, matrix axes, fan-in, fan-out, update scale."""
    rows = [f"{'parameter':48s} {'rule':6s} {'in axes':10s} {'out axes':10s} {'fan_in':>7s} {'fan_out':>7s} scale"]
    for name, r in rules.items():
        if r.rule == "muon":
            scale = MUON_RMS * max(r.fan_in, r.fan_out) ** 0.5
            rows.append(f"{name:48s} muon   {str(r.dims.reduction_axis):10s} {str(r.dims.output_axis):10s} "
                        f"{r.fan_in:7d} {r.fan_out:7d} {scale:.2f}")
        else:
            rows.append(f"{name:48s} adamw")
    return "\n".join(rows)


def _by_name(tree: Any, fn) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(param_name(path), x), tree)


class MomentumState(NamedTuple):
    mu: Any


def _axes(axis, ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def newton_schulz(x: jax.Array, coeffs: jax.Array, ns_steps: int, dims: MuonDimensionNumbers,
                  layers_axis: int | None = None, sharding: NamedSharding | None = None) -> jax.Array:
    """NS5 of every matrix of x: reduction and output axes from `dims`, every other axis a batch axis kept as its
    own vmapped axis (so each keeps its sharding). `layers_axis` (a batch axis) runs as a loop instead, one layer
    at a time: the iteration's [matrix x matrix] temporaries then exist for one layer, not all 60 (K2 on v5p-512:
    ~6 GB per expert or attention weight otherwise).

    `sharding` (x's parameter's NamedSharding) with `layers_axis`: layer sharding. A matrix split over fsdp
    would have every chip of its fsdp group (and every data replica) run the same m^3 products, its Gram
    products all-reduced; instead the layers are split over the mesh axes no other batch axis uses (those that
    split the matrices, then the data replicas: `_layer_split`), each chip orthogonalises its own layers' whole
    matrices with no collective, and all-to-alls move them there and back (the layers padded with zero
    matrices, which stay zero). The result is constrained to `sharding`."""
    red, out = _axes(dims.reduction_axis, x.ndim), _axes(dims.output_axis, x.ndim)
    batch = tuple(a for a in range(x.ndim) if a not in red + out)
    if layers_axis is not None:
        layers_axis %= x.ndim
        if layers_axis not in batch:
            raise ValueError(f"newton_schulz: layers_axis {layers_axis} is a matrix axis of {dims}")
        batch = (layers_axis,) + tuple(a for a in batch if a != layers_axis)
    order = batch + red + out
    moved = jnp.transpose(x, order)
    batch_shape = moved.shape[:len(batch)]
    matrix_shape = (math.prod(moved.shape[len(batch):len(batch) + len(red)]),
                    math.prod(moved.shape[len(batch) + len(red):]))

    def one(m):
        return orthogonalize_via_newton_schulz(m, coeffs, ns_steps)

    for _ in batch[1:] if layers_axis is not None else batch:
        one = jax.vmap(one)
    flat = moved.reshape(batch_shape + matrix_shape)
    if layers_axis is None:
        y = one(flat)
    elif sharding is not None and _layer_split(sharding, batch, flat.shape[0])[0]:
        y = _layer_sharded(one, flat, sharding, batch)
    else:
        y = jax.lax.map(one, flat)
    y = jnp.transpose(y.reshape(moved.shape), tuple(sorted(range(x.ndim), key=lambda i: order[i])))
    return y if sharding is None else jax.lax.with_sharding_constraint(y, sharding)


def _padded_spec(sharding: NamedSharding, ndim: int) -> tuple:
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def _layer_split(sharding: NamedSharding, batch: tuple[int, ...], num_layers: int
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes the layers (batch[0]) are split over for Newton-Schulz, in two levels. First: the layer
    axis's own, the axes that split the matrices (whose Gram products would otherwise be all-reduced and whose
    m^3 products every chip of the group would repeat), and the other free axes (data replicas) that divide the
    layers. Second: the remaining free axes, over each first-level chip's own layers (padded locally), when it
    has more than one: padding the layers once they are split over data as well makes XLA gather every layer's
    matrices onto each chip (measured on v5p-2048: 39 GiB). Free: of size > 1 and unused by other batch axes."""
    spec = _padded_spec(sharding, max(batch) + 1)
    mesh = sharding.mesh
    own = mesh_axes(spec[batch[0]])
    kept = {a for i in batch[1:] for a in mesh_axes(spec[i])}
    matrix = {a for i, entry in enumerate(spec) if i not in batch for a in mesh_axes(entry)}
    first = list(own) + [a for a in mesh.axis_names if a in matrix and a not in own]
    free = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in first and a not in kept]
    size = math.prod(mesh.shape[a] for a in first)
    for a in list(free):
        if num_layers % (size * mesh.shape[a]) == 0:
            first.append(a)
            free.remove(a)
            size *= mesh.shape[a]
    return tuple(first), (tuple(free) if -(-num_layers // size) > 1 else ())


def _split_layers(x: jax.Array, axis: int, mesh, axes: tuple[str, ...], spec_of) -> jax.Array:
    """x's `axis` (unsplit) padded with zero matrices to a multiple of S (the size of `axes`), reshaped to
    [S, L/S] and S split over `axes`; spec_of(ndim, {dim: axes}) -> the constraint's PartitionSpec."""
    S = math.prod(mesh.shape[a] for a in axes)
    L = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -(-L // S) * S - L)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (S, x.shape[axis] // S) + x.shape[axis + 1:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_of(x.ndim, {axis: axes})))


def _layer_sharded(one, flat: jax.Array, sharding: NamedSharding, batch: tuple[int, ...]) -> jax.Array:
    """`one` (Newton-Schulz vmapped over the non-layer batch axes) over flat [L, ..., m, n] with the layers split
    over `_layer_split`'s axes: [S1, (S2,) L/S, ...] with S1 (S2) split, a loop over L/S on each chip."""
    L = flat.shape[0]
    first, second = _layer_split(sharding, batch, L)
    spec = _padded_spec(sharding, max(batch) + 1)
    rest = tuple(spec[i] for i in batch[1:])
    mesh = sharding.mesh

    def spec_of(ndim, split):  # the layer dims first (split or not), then the other batch axes, then m, n
        lead = ndim - len(rest) - 2
        return PartitionSpec(*(split.get(d) for d in range(lead)), *rest, None, None)

    def pin(x, split):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_of(x.ndim, split)))

    x = _split_layers(flat, 0, mesh, first, spec_of)  # [S1, L1, ...]
    L1 = x.shape[1]
    run = functools.partial(jax.lax.map, one)
    if second:
        x = _split_layers(x, 1, mesh, second, lambda n, s: spec_of(n, {0: first, **s}))  # [S1, S2, L2, ...]
        y = pin(jax.vmap(jax.vmap(run))(x), {0: first, 1: second})
        y = pin(y, {0: first})  # every data replica gets the update back (it was going to anyway)
        y = pin(y.reshape((y.shape[0], -1) + y.shape[3:])[:, :L1], {0: first})
    else:
        y = pin(jax.vmap(run)(x), {0: first})
    return y.reshape((-1,) + y.shape[2:])[:L]


def scale_by_muon_k2(rules: dict[str, ParamRule], *, momentum: float = 0.95, nesterov: bool = True,
                     ns_steps: int = 5, ns_dtype: str = "float32") -> optax.GradientTransformation:
    """Momentum (no bias correction) then batched Newton-Schulz orthogonalisation, for the muon leaves."""
    def init(params):
        return MomentumState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: momentum * m + g.astype(jnp.float32), state.mu, updates)
        direction = jax.tree.map(lambda m, g: g.astype(jnp.float32) + momentum * m, mu, updates) if nesterov else mu

        def orthogonalise(name, d):
            coeffs = jnp.asarray(K2_NS_COEFFS, ns_dtype)  # made while tracing: no device (it may be deviceless)
            rule = rules[name]
            return newton_schulz(d.astype(ns_dtype), coeffs, ns_steps, rule.dims, rule.layers_axis,
                                 rule.sharding).astype(jnp.float32)

        return _by_name(direction, orthogonalise), MomentumState(mu)

    return optax.GradientTransformation(init, update)


def qk_clip(cfg: K2Config, tau: float) -> optax.GradientTransformationExtraArgs:
    """Rescales q_b / q_proj and kv_b_proj per head after the update so no head's max logit exceeds tau."""
    P = cfg.qk_nope_head_dim
    k = cfg.num_dense_layers

    def factors(name: str, shape, gamma_LN):
        """The per-element multiplier for parameter `name` (None if QK-Clip leaves it alone)."""
        kind = name.rsplit(".", 1)[-1]
        if kind not in ("q_b_proj", "q_proj", "kv_b_proj"):
            return None
        if name.startswith("dense_blocks."):
            gamma_N = gamma_LN[int(name.split(".")[1])]
        else:
            gamma_N = gamma_LN[k:]
        sqrt_g = jnp.sqrt(gamma_N)
        H = shape[-1]
        if kind == "kv_b_proj":
            rest = jnp.ones(gamma_N.shape + (H - P,), jnp.float32)  # values untouched
        else:
            rest = jnp.broadcast_to(gamma_N[..., None], gamma_N.shape + (H - P,))  # q_rope x gamma
        nope = jnp.broadcast_to(sqrt_g[..., None], sqrt_g.shape + (P,))
        f_NH = jnp.concatenate([nope, rest], axis=-1)  # [(L,) N, H]
        if gamma_N.ndim == 2:  # stacked MoE blocks: [L, in, N, H]
            return f_NH[:, None]
        return f_NH[None]

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, attn_max_logits=None, **extra):
        del extra
        if attn_max_logits is None:
            raise ValueError("qk_clip: update(...) needs attn_max_logits=aux['attn_max_logits'] [num_layers, heads]")
        if params is None:
            raise ValueError("qk_clip: update(...) needs params")
        S = jnp.asarray(attn_max_logits, jnp.float32)
        if S.shape != (cfg.num_hidden_layers, cfg.num_attention_heads):
            raise ValueError(f"qk_clip: attn_max_logits must be [{cfg.num_hidden_layers}, "
                             f"{cfg.num_attention_heads}], got {S.shape}")
        gamma_LN = jnp.where(S > tau, tau / S, 1.0)

        def clip(path, u, p):
            f = factors(param_name(path), p.shape, gamma_LN)
            if f is None:
                return u
            new = p.astype(jnp.float32) + u.astype(jnp.float32)
            return (new * f - p.astype(jnp.float32)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(clip, updates, params), state

    return optax.GradientTransformationExtraArgs(init, update)


def muon_clip(learning_rate: optax.ScalarOrSchedule, *, rules: dict[str, ParamRule], cfg: K2Config | None = None,
              weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
              ns_dtype: str = "float32", adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
              qk_clip_tau: float | None = 100.0) -> optax.GradientTransformationExtraArgs:
    """MuonClip as one optax transformation (see the module docstring). `rules` from `param_rules(model)`;
    `cfg` is needed for QK-Clip (qk_clip_tau=None turns it off)."""
    if qk_clip_tau is not None and cfg is None:
        raise ValueError("muon_clip: QK-Clip needs cfg= (the model's K2Config); pass qk_clip_tau=None to disable it")

    def labels(params):
        return _by_name(params, lambda name, _: rules[name].rule if name in rules else _missing(name))

    def dims(params):
        return _by_name(params, lambda name, _: rules[name].dims)

    muon = optax.chain(
        scale_by_muon_k2(rules, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype),
        scale_by_shape(weight_dimension_numbers=dims, consistent_rms=MUON_RMS),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate))
    adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay)
    parts = [optax.partition({"muon": muon, "adamw": adamw}, labels)]
    if qk_clip_tau is not None:
        parts.append(qk_clip(cfg, qk_clip_tau))
    return optax.chain(*parts)


def _missing(name: str):
    raise ValueError(f"muon_clip: parameter {name} has no rule; build rules with param_rules(model)")
