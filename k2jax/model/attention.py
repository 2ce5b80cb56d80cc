"""Multi-head Latent Attention (MLA): the layer, its train / prefill attention and its absorbed decode.

    q  = q_b(norm(q_a(x)))            (or q_proj(x) without q_lora)      -> per head [nope | rope]
    kv_a(x) = [c | k_rope]            c: kv_lora latent, k_rope: one rope key shared by all heads
    kv_b(norm(c)) = per head [k_nope | v]
    logits = (q_nope·k_nope + rope(q_rope)·rope(k_rope)) · softmax_scale

`latent(x)` returns exactly what a decode cache stores (normed c and roped k_rope, C + R values per token).
Two ways to attend over it, same weights; the model owns no attention math, each is one kernel module's op:
  attend        expands c into per-head k_nope and v with kv_b, then causal self-attention within segments
                (`pallas_kernels.mla_attention`; training and prefill: T is large)
  attend_cache  folds kv_b into the query and the output instead (`pallas_kernels.mla_decode`; decode: q_nope.W_UK
                gives a query in latent space, attention runs over the C + R cached values shared by all heads,
                then W_UV)
`cached` is the generation path: it writes new tokens' latents into a cache [L, B, S, X] (a slot: C + R values,
padded on TPU) and attends.
The layer also reports each head's maximum pre-softmax logit over visible (query, key) pairs of real tokens, which
QK-Clip needs. Under context parallelism (a row's tokens split over the mesh's context axis, `attend(context=True)`)
the devices exchange the latent (C + R values a token), not per-head keys and values (sharding.context_parallel),
and each expands the whole row's latent for its queries: one group of heads at a time, as many as
cfg.run.attention_kv_bytes holds (K2 at 131,072 tokens: 8 heads, 0.5 GiB, where all 64 would take 4 GiB and as much
again for their gradients), each group recomputed in the backward pass.

Each op runs with the backend k2jax.model.target picks (cfg.run.attention_impl overrides it): "pallas" on TPU / GPU (the
kernel, under `sharding.per_shard`: per example and head / per row on every device of the mesh, with the
platform's block sizes), "xla" on CPU (the kernel module's XLA reference), or "interpret" (tests).

Letter legend: B batch, T query len, S key len, D hidden, N heads, H head dim (P nope, R rope, U value),
Q q_lora, C kv_lora, X = C + R (one cache slot), L layers, Z = R/2 rope frequencies.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.layers import RMSNorm, project, weight
from k2jax.model.rope import apply_rope, softmax_scale
from k2jax.model.target import Target
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_decode import merge_partials, mla_decode
from sharding.context_parallel import over_context
from sharding.per_shard import per_shard
from sharding.rules import ACTIVATION_BTD, ACTIVATION_RULES, CACHE_AXES_LBSX, constrain, spec_axes


PER_HEAD_BTNH = ("batch", None, "heads", None)  # a per-head activation [B, T, N, H]
LATENT_BTNC = ("batch", None, "heads", "latent")  # the absorbed query / output in latent space

# q_a_layernorm / kv_a_layernorm use eps 1e-6 in the release code whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class MLAttention(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        D, N, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.q_proj = weight(rngs, (D, N, cfg.qk_head_dim), ("embed", "heads", "qk_head_dim"), cfg)
        else:
            Q = cfg.q_lora_rank
            self.q_a_proj = weight(rngs, (D, Q), ("embed", "q_lora"), cfg)
            self.q_a_layernorm = RMSNorm(Q, cfg, eps=LATENT_NORM_EPS, axis_name="q_lora")
            self.q_b_proj = weight(rngs, (Q, N, cfg.qk_head_dim), ("q_lora", "heads", "qk_head_dim"), cfg)
        self.kv_a_proj_with_mqa = weight(rngs, (D, C + R), ("embed", "kv_lora_rope"), cfg)
        self.kv_a_layernorm = RMSNorm(C, cfg, eps=LATENT_NORM_EPS, axis_name="kv_lora")
        self.kv_b_proj = weight(rngs, (C, N, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                ("kv_lora", "heads", "kv_head_dim"), cfg)
        self.o_proj = weight(rngs, (N, cfg.v_head_dim, D), ("heads", "v_head_dim", "embed"), cfg,
                             fan_in=N * cfg.v_head_dim, n_in=2)
        self.dtype = jnp.dtype(cfg.run.dtype)
        self.scale = softmax_scale(cfg)

    def _w(self, p: nnx.Param) -> jnp.ndarray:
        return p[...].astype(self.dtype)

    def _project(self, x, p: nnx.Param, n_in: int = 1) -> jnp.ndarray:
        return project(x, self._w(p), n_in, impl=Target.of(self.cfg).matmul)

    def queries(self, x_BTD, cos_BTZ, sin_BTZ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """q_nope [B, T, N, P] and roped q_rope [B, T, N, R]."""
        x = x_BTD.astype(self.dtype)
        if self.cfg.q_lora_rank is None:
            q_BTNH = self._project(x, self.q_proj)
        else:
            q_BTQ = self.q_a_layernorm(self._project(x, self.q_a_proj))
            q_BTNH = self._project(q_BTQ, self.q_b_proj)
        P = self.cfg.qk_nope_head_dim
        q_rope = apply_rope(q_BTNH[..., P:], cos_BTZ, sin_BTZ, interleave=self.cfg.rope_interleave)
        return q_BTNH[..., :P], q_rope

    def latent(self, x_BTD, cos_BTZ, sin_BTZ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The per-token cacheable state: normed latent c [B, T, C] and roped shared key k_rope [B, T, R]."""
        C = self.cfg.kv_lora_rank
        kv_BTX = self._project(x_BTD.astype(self.dtype), self.kv_a_proj_with_mqa)
        c_BTC = self.kv_a_layernorm(kv_BTX[..., :C])
        k_rope_BTR = apply_rope(kv_BTX[..., C:], cos_BTZ, sin_BTZ, interleave=self.cfg.rope_interleave)
        return c_BTC, k_rope_BTR

    def attend(self, q_nope_BTNP, q_rope_BTNR, c_BTC, k_rope_BTR, segment_ids_BT, target: Target, *,
               context: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Causal self-attention within segments (`pallas_kernels.mla_attention`, the target's backend): expands
        the latent into per-head keys and values. -> (o_proj output [B, T, D], max pre-softmax logit per head [N]
        over visible pairs of real queries (segment > 0); -inf if there are none).
        context: the tokens are in context parallelism's striped order, T split over the mesh's context axis
        (sharding.context_parallel): each device gathers the latent and segment ids of the whole row (C + R values
        a token), expands them and attends its own queries to them; the max logit is the max over every shard."""
        w_kv_b = self._w(self.kv_b_proj)
        latent_BTX = jnp.concatenate([c_BTC, k_rope_BTR.astype(c_BTC.dtype)], axis=-1)  # what a token's keys need
        if context:
            attention = over_context(functools.partial(self._attention, target=target), queries=3, keys=2,
                                     out_axes=(2, 2))
            out_BNTU, rowmax_BNT = attention(q_nope_BTNP, q_rope_BTNR, segment_ids_BT, latent_BTX, segment_ids_BT,
                                             w_kv_b)
        else:
            out_BNTU, rowmax_BNT = self._attention(q_nope_BTNP, q_rope_BTNR, segment_ids_BT, latent_BTX,
                                                   segment_ids_BT, None, w_kv_b, target=target)
        max_logit_N = jnp.max(jnp.where((segment_ids_BT > 0)[:, None, :], rowmax_BNT, -jnp.inf), axis=(0, 2))
        return self._output(out_BNTU.transpose(0, 2, 1, 3)), max_logit_N

    def _attention(self, q_nope_BTNP, q_rope_BTNR, seg_q_BT, latent_BSX, seg_k_BS, query_index_BT, w_kv_b_CNH,
                   *, target: Target) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The T queries over the S keys' latent [c | k_rope] (S = T, or the whole row under context parallelism,
        whose queries' indices among the keys query_index gives) -> (out [B, N, T, U], rowmax [B, N, T])."""
        groups = 1 if query_index_BT is None else self._head_groups(latent_BSX.shape[0] * latent_BSX.shape[1])
        heads = functools.partial(self._attention_heads, seg_q_BT=seg_q_BT, latent_BSX=latent_BSX, seg_k_BS=seg_k_BS,
                                  query_index_BT=query_index_BT, target=target)
        if groups == 1:
            return heads(q_nope_BTNP, q_rope_BTNR, w_kv_b_CNH)
        # one group of heads at a time, each recomputed in the backward pass: the row's expanded keys and values
        # (and their gradients) exist for one group only, not for every head (cfg.run.attention_kv_bytes)
        def split(a, axis):
            return jnp.moveaxis(a.reshape(a.shape[:axis] + (groups, -1) + a.shape[axis + 1:]), axis, 0)
        out_GBnTU, rowmax_GBnT = jax.lax.map(jax.checkpoint(lambda a: heads(*a)),
                                             (split(q_nope_BTNP, 2), split(q_rope_BTNR, 2), split(w_kv_b_CNH, 1)))
        merge = lambda a: jnp.moveaxis(a, 0, 1).reshape((a.shape[1], -1) + a.shape[3:])  # noqa: E731
        return merge(out_GBnTU), merge(rowmax_GBnT)

    def _head_groups(self, keys: int) -> int:
        """Under context parallelism: into how many groups attention splits the heads so that one group's expanded
        keys and values of `keys` (rows x S) key positions fit cfg.run.attention_kv_bytes: the fewest groups of equal
        size (each a multiple of the devices the heads are split over), at most one group per head."""
        N, cfg = self.cfg.num_attention_heads, self.cfg
        # (context parallelism splits training rows: the default layout)
        split = math.prod(dict(jax.sharding.get_abstract_mesh().shape).get(a, 1)
                          for a in ACTIVATION_RULES["default"]["heads"])
        per_head = keys * (cfg.qk_nope_head_dim + cfg.v_head_dim) * self.dtype.itemsize
        sizes = [d for d in range(split, N + 1, split) if N % d == 0] or [N]
        fitting = [d for d in sizes if d * per_head <= cfg.run.attention_kv_bytes] or sizes[:1]
        return N // max(fitting)

    def _attention_heads(self, q_nope_BTNP, q_rope_BTNR, w_kv_b_CNH, *, seg_q_BT, latent_BSX, seg_k_BS,
                         query_index_BT, target: Target) -> tuple[jnp.ndarray, jnp.ndarray]:
        """_attention for the heads of q and w_kv_b (all of them, or one group)."""
        C = self.cfg.kv_lora_rank
        k_rope_BSR = latent_BSX[..., C:]
        k_nope_BNSP, v_BNSU = self._keys_values(latent_BSX[..., :C], w_kv_b_CNH)
        index = () if query_index_BT is None else (query_index_BT,)

        def kernel(q_nope, q_rope, k_nope, k_rope, v, seg_q, seg_k, *index):
            return mla_attention(q_nope, q_rope, k_nope, k_rope, v, seg_q, key_segment_ids_BS=seg_k,
                                 query_index_BT=index[0] if index else None, scale=self.scale,
                                 backend=target.attention, platform=target.platform)

        if target.attention != "xla":  # a kernel runs per device: each device's examples and heads
            per_head, shared, rows = ("batch", "heads", None, None), ("batch", None, None), ("batch", None)
            kernel = per_shard(kernel, in_axes=(per_head,) * 3 + (shared, per_head) + (rows,) * (2 + len(index)),
                               out_axes=(per_head, ("batch", "heads", None)))
        heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
        return kernel(heads_first(q_nope_BTNP), heads_first(q_rope_BTNR), k_nope_BNSP, k_rope_BSR, v_BNSU, seg_q_BT,
                      seg_k_BS, *index)

    def attend_cache(self, q_nope_BTNP, q_rope_BTNR, cache_LBSX, layer, positions_BT, target: Target,
                     layout: str = "default") -> jnp.ndarray:
        """Absorbed attention over layer `layer` of a latent cache (`pallas_kernels.mla_decode`, the target's
        backend; the kernels read the stacked cache in place at the layer): the query goes to latent space
        (q_nope . W_UK), attends over the C + R cached values per slot shared by all heads (slots <= each token's
        position), and comes back through W_UV and o_proj -> [B, T, D]. Per new token it reads C + R values per
        cached token instead of N (P + U).

        Under a mesh each device attends over the part of the cache it holds (sharding.rules: rows, then slots,
        CACHE_AXES_LBSX): where the slots are split, each device's partial softmax over its slots is merged with the
        others' by log-sum-exp (`mla_decode.merge_partials` across the slots' mesh axes). layout: the step's
        activation layout (sharding.rules)."""
        q_lat_BTNC = self._absorb_query(q_nope_BTNP, layout)
        mesh = jax.sharding.get_abstract_mesh()
        slot_axes = spec_axes(cache_LBSX.shape, CACHE_AXES_LBSX, mesh, "cache_slots", layout)
        in_place = target.attention != "xla" and cache_LBSX.dtype == self.dtype
        S = cache_LBSX.shape[2] // math.prod(dict(mesh.shape)[a] for a in slot_axes)  # slots per device

        def kernel(q_lat, q_rope, cache, positions, at):
            if not in_place:
                cache = jax.lax.dynamic_index_in_dim(cache, at, 0, False).astype(self.dtype)
            if not slot_axes:
                return mla_decode(q_lat, q_rope, cache, positions, scale=self.scale, layer=at if in_place else None,
                                  backend=target.attention, platform=target.platform)
            first = jax.lax.axis_index(slot_axes) * S  # this device's first slot
            o, lse = mla_decode(q_lat, q_rope, cache, positions - first, scale=self.scale, return_lse=True,
                                layer=at if in_place else None, backend=target.attention, platform=target.platform)
            return merge_partials(o, lse, axis_name=slot_axes)

        rows = ("cache_rows", None, "heads", None)  # per device: its rows (and heads), its slots
        kernel = per_shard(kernel, in_axes=(rows, rows, CACHE_AXES_LBSX, ("cache_rows", None), ()), out_axes=rows,
                           layout=layout)
        o_lat_BTNC = kernel(q_lat_BTNC, q_rope_BTNR, cache_LBSX, positions_BT, jnp.asarray(layer, jnp.int32))
        return self._expand_output(o_lat_BTNC, layout)

    def _keys_values(self, c_BSC, w_kv_b_CNH) -> tuple[jnp.ndarray, jnp.ndarray]:
        """kv_b expansion of the latent, head-major: k_nope [B, N, S, P] and v [B, N, S, U]."""
        kv_BNSH = project(c_BSC, w_kv_b_CNH, 1, impl=Target.of(self.cfg).matmul).transpose(0, 2, 1, 3)
        P = self.cfg.qk_nope_head_dim
        return kv_BNSH[..., :P], kv_BNSH[..., P:]

    def _output(self, out_BTNU) -> jnp.ndarray:
        """Per-head attention outputs through o_proj -> [B, T, D]."""
        return self._project(out_BTNU, self.o_proj, n_in=2)

    def _absorb_query(self, q_nope_BTNP, layout: str) -> jnp.ndarray:
        """q_nope . W_UK: the query in latent space [B, T, N, C] (compute dtype; in the step's layout for latents)."""
        w_CNH = self._w(self.kv_b_proj)
        q_lat = jnp.einsum("btnp,cnp->btnc", q_nope_BTNP, w_CNH[..., :self.cfg.qk_nope_head_dim],
                           preferred_element_type=jnp.float32).astype(self.dtype)
        return constrain(q_lat, LATENT_BTNC, layout)

    def _expand_output(self, o_lat_BTNC, layout: str) -> jnp.ndarray:
        """(attention-weighted latent) . W_UV, then o_proj -> [B, T, D]."""
        w_CNH = self._w(self.kv_b_proj)
        o_lat_BTNC = constrain(o_lat_BTNC.astype(self.dtype), LATENT_BTNC, layout)
        return self._output(jnp.einsum("btnc,cnv->btnv", o_lat_BTNC, w_CNH[..., self.cfg.qk_nope_head_dim:]))

    @jax.named_scope("attention")
    def __call__(self, x_BTD, cos_BTZ, sin_BTZ, segment_ids_BT, *, context: bool = False
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Causal self-attention within segments (segment_ids > 0 real tokens, 0 padding) -> (out [B, T, D], max
        pre-softmax logit per head [N] over visible pairs of real queries). context: see `attend`."""
        q_nope, q_rope = self.queries(x_BTD, cos_BTZ, sin_BTZ)
        c, k_rope = self.latent(x_BTD, cos_BTZ, sin_BTZ)
        return self.attend(q_nope, q_rope, c, k_rope, segment_ids_BT, Target.of(self.cfg), context=context)

    @jax.named_scope("attention")
    def cached(self, x_BTD, cos_BTZ, sin_BTZ, positions_BT, cache_LBSX, layer, *, prefill: bool,
               layout: str = "default") -> tuple[jnp.ndarray, jnp.ndarray]:
        """The generation path: T new tokens per row at `positions` (= their cache slots) -> (out [B, T, D], cache).

        Writes the tokens' latents into slots cache[layer, b, positions[b, t]] (slots past S are dropped).
        prefill (the cache is empty, positions are 0 .. T-1): the tokens attend causally to each other in the
        expanded form, as in training (compute-bound). Otherwise each token attends in the absorbed form to the
        slots s <= its position (decode, or extending a filled cache), so a row's stale slots beyond its length
        never leak. layout: the step's activation layout (sharding.rules; "decode": the rows whole on every device).
        """
        B, T = positions_BT.shape
        x_BTD = constrain(x_BTD, ACTIVATION_BTD, layout)
        q_nope, q_rope = (constrain(q, PER_HEAD_BTNH, layout) for q in self.queries(x_BTD, cos_BTZ, sin_BTZ))
        c_BTC, k_rope_BTR = self.latent(x_BTD, cos_BTZ, sin_BTZ)
        new_BTX = constrain(jnp.concatenate([c_BTC, k_rope_BTR], axis=-1).astype(cache_LBSX.dtype), ACTIVATION_BTD,
                            layout)
        new_BTX = jnp.pad(new_BTX, ((0, 0), (0, 0), (0, cache_LBSX.shape[-1] - new_BTX.shape[-1])))  # slot width
        cache_LBSX = write_cache(cache_LBSX, new_BTX, positions_BT, layer, layout)
        target = Target.of(self.cfg)
        if prefill:
            out_BTD, _ = self.attend(q_nope, q_rope, c_BTC, k_rope_BTR, jnp.ones((B, T), jnp.int32), target)
            return out_BTD, cache_LBSX
        out_BTD = self.attend_cache(q_nope, q_rope, cache_LBSX, layer, positions_BT, target, layout)
        return constrain(out_BTD, ACTIVATION_BTD, layout), cache_LBSX


def write_cache(cache_LBSX, new_BTX, positions_BT, layer, layout: str = "default") -> jnp.ndarray:
    """cache[layer, b, positions[b, t]] = new[b, t] (positions past the cache are dropped), on each device into the
    part of the cache it holds (rows, then slots: sharding.rules.CACHE_AXES_LBSX, in activation layout `layout`), in
    place."""
    mesh = jax.sharding.get_abstract_mesh()
    slot_axes = spec_axes(cache_LBSX.shape, CACHE_AXES_LBSX, mesh, "cache_slots", layout)

    def write(cache, new, positions, at):
        B, S = cache.shape[1:3]
        if slot_axes:  # this device's slots start at its index times S
            positions = positions - jax.lax.axis_index(slot_axes) * S
        slots = jnp.where((positions >= 0) & (positions < S), positions, S)  # elsewhere: dropped
        return cache.at[at, jnp.arange(B)[:, None], slots].set(new, mode="drop")

    rows = ("cache_rows", None)
    return per_shard(write, in_axes=(CACHE_AXES_LBSX, rows + (None,), rows, ()), out_axes=CACHE_AXES_LBSX,
                     layout=layout)(cache_LBSX, new_BTX, positions_BT, jnp.asarray(layer, jnp.int32))
