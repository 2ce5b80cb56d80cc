"""Multi-head Latent Attention (MLA), the train / prefill path.

    q  = q_b(norm(q_a(x)))            (or q_proj(x) without q_lora)      -> per head [nope | rope]
    kv_a(x) = [c | k_rope]            c: kv_lora latent, k_rope: one rope key shared by all heads
    kv_b(norm(c)) = per head [k_nope | v]
    logits = (q_nope·k_nope + rope(q_rope)·rope(k_rope)) · softmax_scale

`latent(x)` returns exactly what a decode cache stores (normed c and roped k_rope, C + R values per token).
Two ways to attend over it, same weights:
  attend_latent    expands c into per-head k_nope and v with kv_b (training and prefill: T is large)
  attend_absorbed  folds kv_b into the query and the output instead (decode: q_nope.W_UK gives a query in latent
                   space, attention runs over the C + R cached values shared by all heads, then W_UV)
`cached` is the generation path: it writes new tokens' latents into a cache [L, B, S, C + R] and attends over it.
The layer also reports each head's maximum pre-softmax logit over visible (query, key) pairs of real tokens, which
QK-Clip needs.

cfg.attention_impl picks how: "xla" runs the materialised-logits forms below; "pallas" / "interpret" run the
train / prefill attention as `pallas_kernels.mla_attention` (flash attention, max logits from its running max) and
absorbed decode as `pallas_kernels.mla_decode` (split-K over the latent cache); "auto" is pallas on TPU / GPU when
the head dims suit the kernels' tiles (powers of two >= 16, as K2's are), xla otherwise.

Letter legend: B batch, T query len, S key len, D hidden, N heads, H head dim (P nope, R rope, V value),
Q q_lora, C kv_lora, X = C + R (one cache slot), L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import K2Config
from k2jax.layers import RMSNorm, project, weight
from k2jax.rope import apply_rope, softmax_scale
from pallas_kernels import backend as kernel_backend
from pallas_kernels.mla_attention import mla_attention, visibility
from pallas_kernels.mla_decode import mla_decode

# q_a_layernorm / kv_a_layernorm use eps 1e-6 in the release code whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6
# attend_latent(causal=True): query blocks of at least this many rows, at most this many blocks (smaller blocks'
# matmuls run slower on CPU than the skipped work saves; more blocks only add compile time)
CAUSAL_BLOCK = 128
MAX_CAUSAL_BLOCKS = 8


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
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = softmax_scale(cfg)
        self.impl = cfg.attention_impl
        self.kernel_dims = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)

    def _w(self, p: nnx.Param) -> jnp.ndarray:
        return p[...].astype(self.dtype)

    def queries(self, x_BTD, cos_BTK, sin_BTK) -> tuple[jnp.ndarray, jnp.ndarray]:
        """q_nope [B, T, N, P] and roped q_rope [B, T, N, R]."""
        x = x_BTD.astype(self.dtype)
        if self.cfg.q_lora_rank is None:
            q_BTNH = project(x, self._w(self.q_proj))
        else:
            q_BTQ = self.q_a_layernorm(project(x, self._w(self.q_a_proj)))
            q_BTNH = project(q_BTQ, self._w(self.q_b_proj))
        P = self.cfg.qk_nope_head_dim
        q_rope = apply_rope(q_BTNH[..., P:], cos_BTK, sin_BTK, interleave=self.cfg.rope_interleave)
        return q_BTNH[..., :P], q_rope

    def latent(self, x_BTD, cos_BTK, sin_BTK) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The per-token cacheable state: normed latent c [B, T, C] and roped shared key k_rope [B, T, R]."""
        C = self.cfg.kv_lora_rank
        kv_BTX = project(x_BTD.astype(self.dtype), self._w(self.kv_a_proj_with_mqa))
        c_BTC = self.kv_a_layernorm(kv_BTX[..., :C])
        k_rope_BTR = apply_rope(kv_BTX[..., C:], cos_BTK, sin_BTK, interleave=self.cfg.rope_interleave)
        return c_BTC, k_rope_BTR

    def attend_latent(self, q_nope_BTNP, q_rope_BTNR, c_BSC, k_rope_BSR, mask_BTS, query_valid_BT, *,
                      causal: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Expands the latent into per-head keys and values and attends. Returns (o_proj output [B, T, D],
        max pre-softmax logit per head [N] over visible pairs of valid queries; -inf if there are none).

        causal: the mask hides every key s > query t (self-attention, S == T). The queries then go in blocks of at
        least CAUSAL_BLOCK rows (at most MAX_CAUSAL_BLOCKS), each against the keys up to its own end: the
        upper triangle's blocks are never multiplied (T = 256: 2 blocks, 3/4 of the work, forward 33 % faster)."""
        k_nope_BNSP, v_BNSV = self._keys_values(c_BSC)
        T, S = q_nope_BTNP.shape[1], k_nope_BNSP.shape[2]
        n_blocks = max(1, min(MAX_CAUSAL_BLOCKS, T // CAUSAL_BLOCK)) if causal else 1
        edges = [T * i // n_blocks for i in range(n_blocks + 1)]
        outs, maxes = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            keys = hi if causal else S
            out_BTNV, max_logit_N = self._attend_heads(
                q_nope_BTNP[:, lo:hi], q_rope_BTNR[:, lo:hi], k_nope_BNSP[:, :, :keys], k_rope_BSR[:, :keys],
                v_BNSV[:, :, :keys], mask_BTS[:, lo:hi, :keys], query_valid_BT[:, lo:hi])
            outs.append(out_BTNV)
            maxes.append(max_logit_N)
        out_BTNV = outs[0] if n_blocks == 1 else jnp.concatenate(outs, axis=1)
        return self._output(out_BTNV), jnp.max(jnp.stack(maxes), axis=0)

    def _attend_heads(self, q_nope_BTNP, q_rope_BTNR, k_nope_BNSP, k_rope_BSR, v_BNSV, mask_BTS, query_valid_BT
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Materialised attention of T queries over S keys: (per-head outputs [B, T, N, V], max logit per head
        [N] over visible pairs of valid queries)."""
        B, T, N, _ = q_nope_BTNP.shape
        # Head-major layouts so both products are plain batched matmuls (2x faster than the einsums on CPU).
        f32 = jnp.float32
        nope_BNTS = jnp.matmul(q_nope_BTNP.transpose(0, 2, 1, 3), k_nope_BNSP.swapaxes(-1, -2),
                               preferred_element_type=f32)
        q_rope_BXR = q_rope_BTNR.transpose(0, 2, 1, 3).reshape(B, N * T, -1)  # the rope key is shared by heads
        rope_BNTS = jnp.matmul(q_rope_BXR, k_rope_BSR.swapaxes(-1, -2), preferred_element_type=f32).reshape(
            nope_BNTS.shape)
        logits_BNTS = (nope_BNTS + rope_BNTS) * self.scale
        visible_B1TS = mask_BTS[:, None]
        logits_BNTS = jnp.where(visible_B1TS, logits_BNTS, -jnp.inf)
        # each query's max over its visible keys, then over valid queries: a [B, N, T] reduction the softmax's own
        # row max shares (masking a second [B, N, T, S] copy by query validity cost as much as the softmax)
        rowmax_BNT = jnp.max(logits_BNTS, axis=-1)
        max_logit_N = jnp.max(jnp.where(query_valid_BT[:, None, :], rowmax_BNT, -jnp.inf), axis=(0, 2))
        probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(self.dtype)
        return jnp.matmul(probs_BNTS, v_BNSV).transpose(0, 2, 1, 3), max_logit_N

    def attend_flash(self, q_nope_BTNP, q_rope_BTNR, c_BTC, k_rope_BTR, segment_ids_BT, backend: str
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """attend_latent's result (causal, same-segment self-attention) by the flash attention kernel."""
        k_nope_BNTP, v_BNTV = self._keys_values(c_BTC)
        heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
        out_BNTV, rowmax_BNT = mla_attention(heads_first(q_nope_BTNP), heads_first(q_rope_BTNR), k_nope_BNTP,
                                             k_rope_BTR, v_BNTV, segment_ids_BT, scale=self.scale, backend=backend)
        max_logit_N = jnp.max(jnp.where((segment_ids_BT > 0)[:, None, :], rowmax_BNT, -jnp.inf), axis=(0, 2))
        return self._output(heads_first(out_BNTV)), max_logit_N

    def _keys_values(self, c_BSC) -> tuple[jnp.ndarray, jnp.ndarray]:
        """kv_b expansion of the latent, head-major: k_nope [B, N, S, P] and v [B, N, S, V]."""
        kv_BNSH = project(c_BSC, self._w(self.kv_b_proj)).transpose(0, 2, 1, 3)
        P = self.cfg.qk_nope_head_dim
        return kv_BNSH[..., :P], kv_BNSH[..., P:]

    def _output(self, out_BTNV) -> jnp.ndarray:
        """Per-head attention outputs through o_proj -> [B, T, D]."""
        return project(out_BTNV, self._w(self.o_proj), n_in=2)

    def _absorb_query(self, q_nope_BTNP) -> jnp.ndarray:
        """q_nope . W_UK: the query in latent space [B, T, N, C] (compute dtype)."""
        w_CNH = self._w(self.kv_b_proj)
        return jnp.einsum("btnp,cnp->btnc", q_nope_BTNP, w_CNH[..., :self.cfg.qk_nope_head_dim],
                          preferred_element_type=jnp.float32).astype(self.dtype)

    def _expand_output(self, o_lat_BTNC) -> jnp.ndarray:
        """(attention-weighted latent) . W_UV, then o_proj -> [B, T, D]."""
        w_CNH = self._w(self.kv_b_proj)
        return self._output(jnp.einsum("btnc,cnv->btnv", o_lat_BTNC.astype(self.dtype),
                                       w_CNH[..., self.cfg.qk_nope_head_dim:]))

    def attend_absorbed(self, q_nope_BTNP, q_rope_BTNR, c_BSC, k_rope_BSR, mask_BTS) -> jnp.ndarray:
        """attend_latent's result computed without expanding the latent: logits = (q_nope.W_UK).c + q_rope.k_rope,
        out = (probs.c).W_UV. Per new token it reads C + R values per cached token instead of N (P + V)."""
        f32 = jnp.float32
        q_lat_BTNC = self._absorb_query(q_nope_BTNP)
        logits_BNTS = (jnp.einsum("btnc,bsc->bnts", q_lat_BTNC, c_BSC, preferred_element_type=f32)
                       + jnp.einsum("btnr,bsr->bnts", q_rope_BTNR, k_rope_BSR, preferred_element_type=f32))
        logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS * self.scale, -jnp.inf)
        probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(self.dtype)
        return self._expand_output(jnp.einsum("bnts,bsc->btnc", probs_BNTS, c_BSC, preferred_element_type=f32))

    def __call__(self, x_BTD, cos_BTK, sin_BTK, segment_ids_BT) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Causal self-attention within segments (segment_ids > 0 real tokens, 0 padding) -> (out [B, T, D], max
        pre-softmax logit per head [N] over visible pairs of real queries)."""
        q_nope, q_rope = self.queries(x_BTD, cos_BTK, sin_BTK)
        c, k_rope = self.latent(x_BTD, cos_BTK, sin_BTK)
        backend = kernel_backend.resolve(self.impl, self.kernel_dims)
        if backend != "xla":
            return self.attend_flash(q_nope, q_rope, c, k_rope, segment_ids_BT, backend)
        return self.attend_latent(q_nope, q_rope, c, k_rope, visibility(segment_ids_BT), segment_ids_BT > 0,
                                  causal=True)

    def cached(self, x_BTD, cos_BTK, sin_BTK, positions_BT, cache_LBSX, layer, *, absorbed: bool,
               window: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """T new tokens per row at `positions` (= their cache slots) attending over cache_LBSX[layer].

        Writes the tokens' latents into slots cache[layer, b, positions[b, t]] (slots past S are dropped), then
        each token attends to slots s <= its position, so a row's stale slots beyond its length never leak.
        absorbed picks attend_absorbed (decode) over attend_latent (prefill); window (static) limits the keys to
        the first `window` slots (a prefill from an empty cache needs only its own T). -> (out [B, T, D], cache)"""
        C = self.cfg.kv_lora_rank
        B, T = positions_BT.shape
        q_nope, q_rope = self.queries(x_BTD, cos_BTK, sin_BTK)
        c_BTC, k_rope_BTR = self.latent(x_BTD, cos_BTK, sin_BTK)
        new_BTX = jnp.concatenate([c_BTC, k_rope_BTR], axis=-1).astype(cache_LBSX.dtype)
        cache_LBSX = cache_LBSX.at[layer, jnp.arange(B)[:, None], positions_BT].set(new_BTX, mode="drop")
        S = cache_LBSX.shape[2] if window is None else window
        keys_BSX = jax.lax.dynamic_index_in_dim(cache_LBSX, layer, axis=0, keepdims=False)[:, :S].astype(self.dtype)
        backend = kernel_backend.resolve(self.impl, self.kernel_dims)
        if absorbed and backend != "xla":
            o_lat_BTNC = mla_decode(self._absorb_query(q_nope), q_rope, keys_BSX, positions_BT, scale=self.scale,
                                    backend=backend)
            return self._expand_output(o_lat_BTNC), cache_LBSX
        c_BSC, k_rope_BSR = keys_BSX[..., :C], keys_BSX[..., C:]
        mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
        if absorbed:
            return self.attend_absorbed(q_nope, q_rope, c_BSC, k_rope_BSR, mask_BTS), cache_LBSX
        out_BTD, _ = self.attend_latent(q_nope, q_rope, c_BSC, k_rope_BSR, mask_BTS, jnp.ones((B, T), bool))
        return out_BTD, cache_LBSX
