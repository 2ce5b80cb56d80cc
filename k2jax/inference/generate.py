"""Generation with an MLA latent cache: jitted prefill and decode, sampling, stop tokens.

    gen = k2jax.Generator(model)
    outs = gen.generate([[1, 5, 9], [1, 7]], max_new_tokens=32,
                        sampling=k2jax.Sampling(temperature=0.7, top_p=0.9), stop_tokens=[eos], seed=0)
    outs[0].tokens, outs[0].finish_reason                          # new ids (stop token excluded), "stop" | "length"
    for step_B in gen.stream(prompts, max_new_tokens=32): ...      # one new id per row per step (-1 once a row ended)

The cache stores only what MLA needs per token per layer: the normed kv latent c and the roped shared key, C + R values
(576 for K2; a cache of full per-head keys and values would hold N (P + R + V) = 28,672), in `cache.kv_LBSX` [L, B, S,
X] (X = C + R, on TPU padded to 640). A row's token at position p lives in slot p. Prompts are right-padded; the pad
slots are overwritten by the row's next tokens and are never visible (a token sees slots <= its position).

  prefill   the prompt, attention in the expanded (training) form over its own slots only (compute-bound)
  decode    one token per row, attention in the absorbed form over the latent (bandwidth-bound); the same
            function also extends a cache by several tokens (a chat's next turn)
  chunks    a prompt (or an extend) longer than the Generator's prefill_chunk tokens per row: `extend_in_chunks`,
            a device-side loop of extends of a chunk each, every chunk attending to the cache written so far and
            to itself in the absorbed form, so a pass holds rows x chunk tokens however long the prompt (K2's
            128K / 256K contexts); the default chunk is the platform's token budget per pass over the rows

All are jitted once per shape (prompt lengths are padded to a power of two, then to whole chunks) with the cache
donated, so decode updates it in place. `stream` / `generate` decode on the device: one host call runs up to
`steps_per_call` steps (a lax.while_loop that samples, marks the rows that stopped and decodes the sampled tokens,
ending early once every row has stopped), so the host syncs once per chunk of tokens, not once per token. Weights
may be sharded (e.g. `load_checkpoint(..., shardings=...)` with the ep_fsdp rules); jit follows their shardings.
Under a mesh a decode step runs in sharding.rules' "decode" activation layout (its rows whole on every device: the
weights are used where they lie, the experts need no exchange) and the cache is split over its rows, then its slots
(CACHE_AXES_LBSX).

Letter legend: B batch, T new tokens, S cache slots, L layers, V vocab, X = C + R cached values per token (a slot),
Z = R/2 rope frequencies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.rope import rope_tables
from k2jax.model.target import Target
from k2jax.model.transformer import Transformer, param_info
from sharding.rules import ACTIVATION_BTD, CACHE_AXES_LBSX, activation_spec, constrain

FINISHED = -1  # what stream() yields for a row that has already stopped


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature) restricted to the top_k most
    likely tokens (0: no limit) and then to the smallest set whose probability reaches top_p (1.0: no limit)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"Sampling: temperature must be a finite number >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"Sampling: top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p}")


def sample(logits_BV: jnp.ndarray, key: jax.Array, sampling: Sampling) -> jnp.ndarray:
    """Next token per row [B] int32 from float32 logits [B, V]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p < 1:
        sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        # the smallest prefix reaching top_p: keep a token while the mass before it is still short of top_p
        threshold_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf), axis=-1,
                               keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    """kv_LBSX: [num_hidden_layers, B, S, X]: per slot kv_lora_rank + qk_rope_head_dim values, padded with zeros to
    the platform's slot width (k2jax.model.target's latent_slot: a multiple of 128 on TPU); lengths_B: tokens
    stored per row."""
    kv_LBSX: jax.Array
    lengths_B: jax.Array

    @classmethod
    def empty(cls, cfg: K2Config, batch: int, max_len: int, dtype=None) -> "LatentCache":
        """An empty cache for the platform compiled for (the mesh set with jax.set_mesh, else the default
        device's: its slot width)."""
        kv = jnp.zeros((cfg.num_hidden_layers, batch, max_len, Target.of(cfg).latent_slot), dtype or cfg.run.dtype)
        return cls(kv, jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.kv_LBSX.shape[2]

    @staticmethod
    def values_per_token(cfg: K2Config) -> int:
        """Cached values per token over all layers."""
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def decode_bytes_minimum(model: Transformer, batch: int, max_len: int, cache_dtype=None) -> float:
    """The fewest HBM bytes one decode step of `batch` rows over a cache of max_len slots can move, over all
    devices: the routed experts the rows reach, in the form the model holds them (weights and scales; under
    uniform routing a layer's batch x top-K choices reach E (1 - (1 - K / E)^batch) of its E experts), every other
    weight once (the embedding table: only the batch's rows), and the whole latent cache once. `model` may be
    abstract (k2jax.model.placement.abstract_model). k2jax-aot divides a compiled step's bytes by this."""
    cfg = model.cfg
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    experts = others = 0.0
    for name, (shape, dtype, _) in param_info(model).items():
        nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
        if name.startswith("moe_blocks.mlp.experts."):
            experts += nbytes
        elif name == "embed_tokens":
            others += batch * shape[1] * jnp.dtype(dtype).itemsize
        else:
            others += nbytes
    reached = 1 - (1 - K / E) ** batch  # the share of a layer's experts the batch reaches
    cache = LatentCache.values_per_token(cfg) * batch * max_len * jnp.dtype(cache_dtype or cfg.run.dtype).itemsize
    return experts * reached + others + cache


def step_layout(new_tokens: int, *, prefill: bool) -> str:
    """The activation layout (sharding.rules.ACTIVATION_RULES) of a step adding new_tokens tokens per row."""
    return "decode" if new_tokens == 1 and not prefill else "default"


def extend(model: Transformer, tokens_BT: jnp.ndarray, n_new_B: jnp.ndarray, cache: LatentCache, *,
           prefill: bool, all_logits: bool = False) -> tuple[jnp.ndarray, LatentCache]:
    """Runs row b's first n_new_B[b] tokens of tokens_BT at positions lengths_B[b], lengths_B[b] + 1, ...,
    writing their latents into the cache. Returns the logits of each row's last new token [B, V] (all_logits:
    of every token [B, T, V]; entries past n_new_B are junk) and the cache with lengths_B + n_new_B.
    prefill: the cache is empty (attention in the expanded form over the new tokens only); otherwise absorbed
    attention over the whole cache. One token per row (a decode step) runs in the "decode" activation layout
    (sharding.rules: the rows whole on every device, the weights used where they lie)."""
    B, T = tokens_BT.shape
    layout = step_layout(T, prefill=prefill)
    positions_BT = cache.lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    valid_BT = jnp.arange(T)[None, :] < n_new_B[:, None]
    cos_BTZ, sin_BTZ = rope_tables(model.cfg, positions_BT)

    def layer_fn(block, x_BTD, kv_LBSX, layer):
        x_BTD, kv_LBSX = block.cached(x_BTD, cos_BTZ, sin_BTZ, positions_BT, valid_BT, kv_LBSX, layer,
                                      prefill=prefill, layout=layout)
        return constrain(x_BTD, ACTIVATION_BTD, layout), kv_LBSX, None

    x_BTD, kv_LBSX, _, _ = model.run_layers(model.embed(tokens_BT, layout), layer_fn, cache.kv_LBSX)
    if not all_logits:
        x_BTD = x_BTD[jnp.arange(B), jnp.maximum(n_new_B - 1, 0)][:, None]
    logits = model.logits(x_BTD)
    return (logits if all_logits else logits[:, 0]), LatentCache(
        constrain(kv_LBSX, CACHE_AXES_LBSX), constrain(cache.lengths_B + n_new_B, CACHE_AXES_LBSX[1:2]))


def extend_in_chunks(model: Transformer, tokens_BT: jnp.ndarray, n_new_B: jnp.ndarray, cache: LatentCache, *,
                     chunk: int, all_logits: bool = False) -> tuple[jnp.ndarray, LatentCache]:
    """`extend` (absorbed attention over the cache) chunk tokens per row at a time, in a device-side loop over
    the T / chunk chunks (T a multiple of chunk): chunk i runs row b's tokens [i chunk, (i + 1) chunk) that are
    among its first n_new_B[b], attending to the cache written so far and to itself causally, so the pass holds
    rows x chunk tokens whatever T is. A chunk no row has tokens in is skipped; a row whose tokens ended runs its
    padding (never visible: it lands in slots past the row's length, which later tokens overwrite). -> (logits of
    each row's last new token [B, V] (all_logits: of every token [B, T, V], junk past n_new_B), the cache with
    lengths_B + n_new_B)."""
    B, T = tokens_BT.shape
    if T % chunk:
        raise ValueError(f"extend_in_chunks: {T} tokens per row are not a whole number of chunks of {chunk}")
    V = model.cfg.vocab_size
    logits = jnp.zeros((B, T, V) if all_logits else (B, V), jnp.float32)

    def run(i, logits, cache):
        start = i * chunk
        n_B = jnp.clip(n_new_B - start, 0, chunk)
        chunk_logits, cache = extend(model, jax.lax.dynamic_slice_in_dim(tokens_BT, start, chunk, axis=1), n_B,
                                     cache, prefill=False, all_logits=all_logits)
        if all_logits:
            return jax.lax.dynamic_update_slice_in_dim(logits, chunk_logits, start, axis=1), cache
        return jnp.where((n_B > 0)[:, None], chunk_logits, logits), cache  # the chunk holding each row's last

    def body(i, carry):
        logits, cache = carry
        has_tokens = jnp.any(n_new_B > i * chunk)
        return jax.lax.cond(has_tokens, run, lambda i, lg, c: (lg, c), i, logits, cache)

    return jax.lax.fori_loop(0, T // chunk, body, (logits, cache))


@dataclasses.dataclass
class Completion:
    tokens: list[int]     # generated ids, without the stop token
    finish_reason: str    # "stop" (a stop token came) or "length" (max_new_tokens reached)


def _bucket(n: int) -> int:
    """Padded length for n new tokens: a power of two >= 8, so the jitted functions compile a few times only."""
    return max(8, 1 << (n - 1).bit_length())


class Generator:
    """Jitted prefill / decode / sampling for one model. The model is split once; each call passes its state.

    prefill_chunk: prompt tokens per row that one pass of the model takes. A prompt longer than that (and a longer
    `extend`) runs in chunks of it, in one jitted device-side loop: each chunk attends to the cache written so far
    and to itself, causally, so what a pass holds (activations, attention's queries, the expert-parallel
    exchange's buffers) is bounded by rows x chunk, not by the prompt. None: the platform's budget of tokens per
    pass over all rows (k2jax.model.target's prefill_tokens) / rows, rounded down to a power of two
    (`chunk_len`)."""

    def __init__(self, model: Transformer, *, prefill_chunk: int | None = None):
        if prefill_chunk is not None and not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise ValueError(f"prefill_chunk must be an int >= 1 (tokens per row per pass) or None, got "
                             f"{prefill_chunk!r}")
        self.cfg = model.cfg
        self.prefill_chunk = prefill_chunk
        self._graphdef, self._state = nnx.split(model)
        self._extend = jax.jit(self._extend_fn, static_argnames=("prefill", "all_logits"),
                               donate_argnames=("cache",))
        self._chunked = jax.jit(self._chunked_fn, static_argnames=("chunk", "all_logits"),
                                donate_argnames=("cache",))
        self._sample = jax.jit(sample, static_argnames=("sampling",))
        self._loop = jax.jit(self._loop_fn, static_argnames=("sampling", "steps_per_call"), donate_argnames=("cache",))

    def _extend_fn(self, state, tokens_BT, n_new_B, cache, *, prefill, all_logits):
        return extend(nnx.merge(self._graphdef, state), tokens_BT, n_new_B, cache, prefill=prefill,
                      all_logits=all_logits)

    def _chunked_fn(self, state, tokens_BT, n_new_B, cache, *, chunk, all_logits):
        return extend_in_chunks(nnx.merge(self._graphdef, state), tokens_BT, n_new_B, cache, chunk=chunk,
                                all_logits=all_logits)

    def chunk_len(self, rows: int) -> int:
        """Tokens per row in one prefill pass for `rows` rows: prefill_chunk, else the target's prefill_tokens
        budget / rows rounded down to a power of two (at least 8). Call under the mesh compiled for."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        per_row = max(8, Target.of(self.cfg).prefill_tokens // max(1, rows))
        return 1 << (per_row.bit_length() - 1)

    def _run(self, tokens: np.ndarray, lengths: np.ndarray, cache: LatentCache, *, prefill: bool, all_logits: bool
             ) -> tuple[jnp.ndarray, LatentCache]:
        """One pass when the padded tokens fit a chunk (prefill: the expanded form over the prompt alone), else
        the chunked loop (tokens padded to whole chunks)."""
        chunk = self.chunk_len(tokens.shape[0])
        if tokens.shape[1] <= chunk:
            return self._extend(self._state, jnp.asarray(tokens), jnp.asarray(lengths), cache, prefill=prefill,
                                all_logits=all_logits)
        tokens = np.pad(tokens, ((0, 0), (0, -tokens.shape[1] % chunk)))
        out = self._chunked(self._state, jnp.asarray(tokens), jnp.asarray(lengths), cache, chunk=chunk,
                            all_logits=all_logits)
        return (out[0][:, :int(lengths.max())] if all_logits else out[0]), out[1]

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        return LatentCache.empty(self.cfg, batch, max_len)

    def _pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("every row needs at least one token")
        V = self.cfg.vocab_size
        for i, r in enumerate(rows):
            bad = [t for t in r if not 0 <= int(t) < V]
            if bad:
                raise ValueError(f"row {i}: token ids {bad[:3]} are outside the vocabulary [0, {V})")
        lengths = np.array([len(r) for r in rows], np.int32)
        tokens = np.zeros((len(rows), _bucket(int(lengths.max()))), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        return tokens, lengths

    def prefill(self, prompts: Sequence[Sequence[int]], cache: LatentCache, *, all_logits: bool = False
                ) -> tuple[jnp.ndarray, LatentCache]:
        """Prompts (lists of ids) into an empty cache with one row per prompt -> (last-token logits [B, V], cache).
        A prompt longer than `chunk_len` runs in chunks (the class docstring). The cache is donated: use the
        returned one."""
        tokens, lengths = self._pad(prompts)
        if len(prompts) != cache.kv_LBSX.shape[1]:
            raise ValueError(f"prefill: {len(prompts)} prompts for a cache of batch {cache.kv_LBSX.shape[1]}")
        if np.any(np.asarray(cache.lengths_B)):
            raise ValueError("prefill needs an empty cache; use extend() to add tokens to a filled one")
        if tokens.shape[1] > cache.max_len:
            if lengths.max() > cache.max_len:
                raise ValueError(f"prompt of {lengths.max()} tokens does not fit a cache of {cache.max_len}")
            tokens = tokens[:, :cache.max_len]
        return self._run(tokens, lengths, cache, prefill=True, all_logits=all_logits)

    def extend(self, rows: Sequence[Sequence[int]], cache: LatentCache, *, all_logits: bool = False
               ) -> tuple[jnp.ndarray, LatentCache]:
        """Appends row b's tokens after what its cache row holds (absorbed attention over the whole cache; more
        than `chunk_len` tokens per row in chunks)."""
        tokens, lengths = self._pad(rows)
        free = cache.max_len - int(np.asarray(cache.lengths_B).max())
        if lengths.max() > free:
            raise ValueError(f"extend: {lengths.max()} new tokens do not fit: the cache has {free} free slots")
        return self._run(tokens, lengths, cache, prefill=False, all_logits=all_logits)

    def decode(self, tokens_B: jnp.ndarray, cache: LatentCache) -> tuple[jnp.ndarray, LatentCache]:
        """One token per row -> (logits [B, V], cache). No host sync: the caller makes sure slots are left."""
        tokens_B = jnp.asarray(tokens_B, jnp.int32)
        return self._extend(self._state, tokens_B[:, None], jnp.ones_like(tokens_B), cache, prefill=False,
                            all_logits=False)

    def sample(self, logits_BV: jnp.ndarray, sampling: Sampling, key: jax.Array) -> jnp.ndarray:
        return self._sample(logits_BV, key, sampling)

    def lower(self, step: str, *, batch: int, max_len: int, prompt_len: int = 0) -> jax.stages.Lowered:
        """The jitted step for abstract inputs, ready to .compile() ahead of time: "prefill" (prompts of
        prompt_len tokens into an empty cache of max_len slots, as `prefill` runs them: one pass, or chunks of
        `chunk_len(batch)` tokens in a loop) or "decode" (one token per row, as `decode`). The model may be abstract
        (`k2jax.model.placement.abstract_model`: no memory for weights); its shardings are kept. Under
        `jax.set_mesh(mesh)` the tokens are laid out as the step's activations and the cache as
        sharding.rules.CACHE_AXES_LBSX says (sharding.rules.activation_spec)."""
        if step not in ("prefill", "decode"):
            raise ValueError(f"Generator.lower: step must be 'prefill' or 'decode', got {step!r}")
        if step == "prefill" and not 0 < prompt_len <= max_len:
            raise ValueError(f"Generator.lower: prompt_len must be in [1, max_len={max_len}], got {prompt_len}")
        T = min(_bucket(prompt_len), max_len) if step == "prefill" else 1
        chunk = self.chunk_len(batch)
        chunked = step == "prefill" and T > chunk
        T = T + (-T % chunk if chunked else 0)
        mesh = jax.sharding.get_mesh()

        def arg(shape, dtype, axes, layout="default"):
            sharding = (None if mesh.empty else
                        jax.sharding.NamedSharding(mesh, activation_spec(shape, axes, mesh, layout)))
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        X = Target.of(self.cfg).latent_slot
        cache = LatentCache(arg((self.cfg.num_hidden_layers, batch, max_len, X), jnp.dtype(self.cfg.run.dtype),
                                CACHE_AXES_LBSX), arg((batch,), jnp.int32, CACHE_AXES_LBSX[1:2]))
        layout = step_layout(T, prefill=step == "prefill")
        tokens = arg((batch, T), jnp.int32, ("batch", None), layout)
        n_new = arg((batch,), jnp.int32, ("batch",), layout)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                             self._state)
        if chunked:
            return self._chunked.lower(state, tokens, n_new, cache, chunk=chunk, all_logits=False)
        return self._extend.lower(state, tokens, n_new, cache, prefill=step == "prefill", all_logits=False)

    def _loop_fn(self, state, logits_BV, cache, done_B, key, first_step, steps_left, stops, *, sampling,
                 steps_per_call):
        """Up to steps_per_call decode steps on the device: each samples a token per row (key folded with its
        step), records it (FINISHED for rows already stopped), marks rows whose token is a stop token, and, unless
        every row has stopped or this was the last of steps_left, decodes the tokens for the next step's logits.
        -> (tokens [steps_per_call, B], steps run, logits, cache, done, stopped)."""
        model = nnx.merge(self._graphdef, state)

        def decode(token_B, cache):
            return extend(model, token_B[:, None], jnp.ones_like(token_B), cache, prefill=False)

        def body(carry):
            i, logits_BV, cache, done_B, out_NB, _ = carry
            token_B = sample(logits_BV, jax.random.fold_in(key, first_step + i), sampling)
            out_NB = out_NB.at[i].set(jnp.where(done_B, FINISHED, token_B))
            done_B = done_B | jnp.isin(token_B, stops)
            stopped = jnp.all(done_B) | (i + 1 >= steps_left)
            logits_BV, cache = jax.lax.cond(stopped, lambda t, c: (logits_BV, c), decode, token_B, cache)
            return i + 1, logits_BV, cache, done_B, out_NB, stopped

        out_NB = jnp.full((steps_per_call, logits_BV.shape[0]), FINISHED, jnp.int32)
        carry = (jnp.int32(0), logits_BV, cache, done_B, out_NB, jnp.bool_(False))
        i, logits_BV, cache, done_B, out_NB, stopped = jax.lax.while_loop(
            lambda c: (c[0] < steps_per_call) & ~c[5], body, carry)
        return out_NB, i, logits_BV, cache, done_B, stopped

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_tokens: Sequence[int] = (), seed: int = 0, max_len: int | None = None,
               cache: LatentCache | None = None, steps_per_call: int = 16) -> Iterator[np.ndarray]:
        """Yields the next token of every row [B] (int32, FINISHED for rows that stopped) until every row has
        stopped or max_new_tokens steps ran. A stop token is yielded, then the row reads FINISHED. Tokens are
        decoded on the device steps_per_call at a time (one host sync each) and yielded as each chunk arrives;
        token t of row b is the one a step-by-step loop of `sample` (key fold_in(key(seed), t)) and `decode` gives.

        cache: continue rows already in this cache (a chat's next turn) instead of starting from empty ones.
        The final cache (holding every token but the last one sampled) is `self.last_cache` when the generator
        ends."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (isinstance(steps_per_call, int) and steps_per_call >= 1):
            raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
        key = jax.random.key(seed)
        stops = jnp.asarray(sorted(set(int(t) for t in stop_tokens)) or [FINISHED], jnp.int32)
        if cache is None:
            need = max(len(p) for p in prompts) + max_new_tokens
            cache = self.new_cache(len(prompts), max_len or min(_bucket(need), self.cfg.max_position_embeddings))
            if need > cache.max_len:
                raise ValueError(f"the longest prompt ({need - max_new_tokens} tokens) + max_new_tokens "
                                 f"({max_new_tokens}) exceeds the cache's {cache.max_len} slots")
            logits_BV, cache = self.prefill(prompts, cache)
        else:
            used = int(np.asarray(cache.lengths_B).max()) + max(len(p) for p in prompts)
            if used + max_new_tokens > cache.max_len:
                raise ValueError(f"{used} tokens in the cache + max_new_tokens ({max_new_tokens}) exceed its "
                                 f"{cache.max_len} slots")
            logits_BV, cache = self.extend(prompts, cache)
        done_B = jnp.zeros((len(prompts),), bool)
        step = 0
        while True:
            out_NB, ran, logits_BV, cache, done_B, stopped = self._loop(
                self._state, logits_BV, cache, done_B, key, jnp.int32(step), jnp.int32(max_new_tokens - step),
                stops, sampling=sampling, steps_per_call=min(steps_per_call, max_new_tokens))
            ran = int(ran)
            yield from np.asarray(out_NB)[:ran]
            step += ran
            if bool(stopped):
                break
        self.last_cache = cache

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_tokens: Sequence[int] = (), seed: int = 0, max_len: int | None = None,
                 steps_per_call: int = 16) -> list[Completion]:
        stops = set(int(t) for t in stop_tokens)
        outs = [Completion([], "length") for _ in prompts]
        for step_B in self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                  stop_tokens=stop_tokens, seed=seed, max_len=max_len,
                                  steps_per_call=steps_per_call):
            for out, t in zip(outs, step_B.tolist()):
                if t == FINISHED or out.finish_reason == "stop":
                    continue
                if t in stops:
                    out.finish_reason = "stop"
                else:
                    out.tokens.append(t)
        return outs


def generate(model: Transformer, prompts: Sequence[Sequence[int]], **kwargs) -> list[Completion]:
    """One-off `Generator(model).generate(prompts, **kwargs)` (compiles each time; keep a Generator to reuse)."""
    return Generator(model).generate(prompts, **kwargs)
