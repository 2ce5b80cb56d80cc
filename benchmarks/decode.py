"""Decode step with the MLA latent cache vs a naive cache of full per-head keys and values, and with FP8-resident
routed experts; and Generator.generate's device loop against a host loop, one run.

    python benchmarks/decode.py [--batch=8 --context=4096 --iters=10 --new_tokens=32]

All three decode one token per row over `context` cached tokens of the same model (K2's attention shapes: kv_lora
512, rope 64, nope 128, v 128, with 16 heads and 2 layers so it fits a CPU; fp32). The latent path is
k2jax.Generator.decode (absorbed attention over C + R = 576 values per token per layer). The naive path caches
k = [k_nope | k_rope] and v per head, N (P + R + U) values per token per layer (U: the value head dim), and runs
standard attention; it is written here, next to its only use, and shares every other piece of the model. The FP8
path is the latent path on the same model with its routed experts FP8-resident (k2jax.model.experts.
quantize_experts: e4m3 weights and float32 128x128 block scales, the form load_checkpoint(weights="fp8") loads),
through Generator.decode. Prints step times, the latent / full ratio (goal <= 0.5), the FP8 / latent ratio, the
cache bytes per token of the two caches and the weight bytes of the two expert forms (a step reads every expert
its rows route to: all of them once batch x top-k covers the experts), also for the full Kimi K2 config.
The device-loop rows: `generate` of `new_tokens` greedy tokens per row after a short prompt, with the decode steps
run 16 per host call (`steps_per_call=16`, the default: sampling, stop tokens and finished rows on the device)
and one per host call (`steps_per_call=1`: a host round trip per token, the loop before the device loop); the
same tokens from both, their tokens/s and the ratio.
"""

from __future__ import annotations

import _repo_root  # noqa: F401  (the repo root first on sys.path: before any project import)
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import k2jax
from benchmarks.common import best_time
from k2jax.inference.generate import Generator, LatentCache
from k2jax.model.config import kimi_k2, tiny
from k2jax.model.experts import quantize_experts
from k2jax.model.layers import project
from k2jax.model.rope import rope_tables
from k2jax.tools.host_memory import keep_freed_memory_on_cpu

_BATCH = flags.DEFINE_integer("batch", 8, "Rows decoded per step.")
_CONTEXT = flags.DEFINE_integer("context", 4096, "Tokens already in the cache.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steps per path (best is reported).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens per row generate decodes in the device-loop rows.")

DECODE_CFG = tiny(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=16, n_routed_experts=16, num_experts_per_tok=4,
                  q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  max_position_embeddings=8192)


def full_values_per_token(cfg) -> int:
    return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def naive_decode(model, tokens_B, k_LBNSH, v_LBNSU, lengths_B):
    """One token per row with a full per-head K/V cache, head-major so both products are plain batched matmuls;
    returns (logits [B, V], k cache, v cache)."""
    cfg = model.cfg
    B = tokens_B.shape[0]
    P, N = cfg.qk_nope_head_dim, cfg.num_attention_heads
    positions_B1 = lengths_B[:, None]
    cos, sin = rope_tables(cfg, positions_B1)
    rows = jnp.arange(B)

    def layer(block, x_B1D, caches, at):
        index = at.index
        k_cache, v_cache = caches
        attn = block.self_attn
        h = block.input_layernorm(x_B1D)
        q_nope, q_rope = attn.queries(h, cos, sin)
        c, k_rope = attn.latent(h, cos, sin)
        kv_B1NH = project(c, attn._w(attn.kv_b_proj))
        k_new = jnp.concatenate([kv_B1NH[..., :P], jnp.broadcast_to(k_rope[:, :, None], (B, 1, N, k_rope.shape[-1]))],
                                axis=-1)
        heads = jnp.arange(N)[None, :]
        k_cache = k_cache.at[index, rows[:, None], heads, lengths_B[:, None]].set(k_new[:, 0])
        v_cache = v_cache.at[index, rows[:, None], heads, lengths_B[:, None]].set(kv_B1NH[:, 0, :, P:])
        k_BNSH, v_BNSU = k_cache[index], v_cache[index]
        q_BNH = jnp.concatenate([q_nope, q_rope], axis=-1)[:, 0]
        logits_BNS = jnp.einsum("bnh,bnsh->bns", q_BNH, k_BNSH) * attn.scale
        visible = jnp.arange(k_BNSH.shape[2])[None, None, :] <= lengths_B[:, None, None]
        probs = jax.nn.softmax(jnp.where(visible, logits_BNS, -jnp.inf), axis=-1)
        out_BNU = jnp.einsum("bns,bnsv->bnv", probs, v_BNSU)
        attn_B1D = project(out_BNU[:, None], attn._w(attn.o_proj), n_in=2)
        x_B1D, _ = block.ffn(x_B1D + attn_B1D, jnp.ones((B, 1), bool))
        return x_B1D, (k_cache, v_cache), None

    x, (k_LBNSH, v_LBNSU), _, _ = model.run_layers(model.embed(tokens_B[:, None]), layer, (k_LBNSH, v_LBNSU))
    return model.logits(x)[:, 0], k_LBNSH, v_LBNSU


def expand_latent_cache(model, kv_LBSX):
    """The full per-head K/V cache holding the same keys and values as a latent cache."""
    C, P, N = model.cfg.kv_lora_rank, model.cfg.qk_nope_head_dim, model.cfg.num_attention_heads
    R = model.cfg.qk_rope_head_dim
    L, B, S, _ = kv_LBSX.shape

    def layer(block, x, caches, at):
        index = at.index
        attn = block.self_attn
        latent_BSX = kv_LBSX[index]
        kv_BSNH = project(latent_BSX[..., :C], attn._w(attn.kv_b_proj))
        k_rope = jnp.broadcast_to(latent_BSX[:, :, None, C:C + R], (B, S, N, R))
        k_cache, v_cache = caches
        k_BNSH = jnp.concatenate([kv_BSNH[..., :P], k_rope], axis=-1).transpose(0, 2, 1, 3)
        k_cache = k_cache.at[index].set(k_BNSH)
        return x, (k_cache, v_cache.at[index].set(kv_BSNH[..., P:].transpose(0, 2, 1, 3))), None

    empty = (jnp.zeros((L, B, N, S, model.cfg.qk_head_dim), kv_LBSX.dtype),
             jnp.zeros((L, B, N, S, model.cfg.v_head_dim), kv_LBSX.dtype))
    return model.run_layers(jnp.zeros((B, 1, model.cfg.hidden_size)), layer, empty)[1]


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the routed experts' arrays, weights and any scales; bytes of every other weight)."""
    experts = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model.moe_blocks.mlp.experts)))
    return experts, sum(a.nbytes for a in jax.tree.leaves(nnx.state(model))) - experts


def device_loop_rows(gen: Generator, rows: int, new_tokens: int, iters: int) -> None:
    """generate's decode steps 16 per host call (the device loop) against 1 per host call, side by side."""
    prompts = [[1 + (7 * r + i) % 97 for i in range(8)] for r in range(rows)]

    def run(steps_per_call):
        return gen.generate(prompts, max_new_tokens=new_tokens, steps_per_call=steps_per_call)

    on_device, per_token = run(16), run(1)
    same = all(a.tokens == b.tokens for a, b in zip(on_device, per_token))
    print(f"generate, {rows} rows x {new_tokens} greedy tokens: the same tokens from the device loop and the host "
          f"loop: {same}")
    assert same, "the device loop and the host loop gave different tokens"
    t_device, t_host = [], []
    for _ in range(3):  # interleaved rounds
        t_device.append(best_time(lambda: run(16), iters))
        t_host.append(best_time(lambda: run(1), iters))
    device_s, host_s = min(t_device), min(t_host)
    tokens = rows * new_tokens
    print(f"  device loop (16 steps per host call)  {tokens / device_s:9.1f} tokens/s (prefill included)")
    print(f"  host loop (1 step per host call)      {tokens / host_s:9.1f} tokens/s")
    print(f"  ratio device loop / host loop tokens/s: {host_s / device_s:.3f}")


def main(argv):
    del argv
    keep_freed_memory_on_cpu()  # every path of the comparison runs with it (k2jax/tools/host_memory.py)
    cfg, B, S = DECODE_CFG, _BATCH.value, _CONTEXT.value
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens_B = jnp.asarray(rng.integers(0, cfg.vocab_size, B), jnp.int32)
    L, N, X = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim

    # a cache filled with `context` tokens (random latents: the timing does not depend on the values), and the
    # full per-head K/V cache holding the same keys and values
    gen = Generator(model)
    latent = jnp.asarray(rng.standard_normal((L, B, S + 8, X)), jnp.float32)
    graphdef, params = nnx.split(model)
    k, v = jax.jit(lambda p, c: expand_latent_cache(nnx.merge(graphdef, p), c))(params, latent)
    state = {"cache": LatentCache(latent, jnp.full((B,), S, jnp.int32)), "k": k, "v": v,
             "fp8_cache": LatentCache(jnp.array(latent, copy=True), jnp.full((B,), S, jnp.int32))}
    naive = jax.jit(lambda p, t, k, v, n: naive_decode(nnx.merge(graphdef, p), t, k, v, n), donate_argnums=(2, 3))
    lengths = jnp.full((B,), S, jnp.int32)

    def latent_step():
        logits, state["cache"] = gen.decode(tokens_B, state["cache"])
        state["cache"].lengths_B = jnp.full((B,), S, jnp.int32)  # stay at `context`
        return logits.block_until_ready()

    # the same weights with the routed experts FP8-resident, decoding over a copy of the same cache
    fp8_model = quantize_experts(k2jax.Transformer(cfg, rngs=nnx.Rngs(0)))
    fp8_gen = Generator(fp8_model)

    def naive_step():
        logits, state["k"], state["v"] = naive(params, tokens_B, state["k"], state["v"], lengths)
        return logits.block_until_ready()

    def fp8_step():
        logits, state["fp8_cache"] = fp8_gen.decode(tokens_B, state["fp8_cache"])
        state["fp8_cache"].lengths_B = jnp.full((B,), S, jnp.int32)
        return logits.block_until_ready()

    a, b, c = np.asarray(latent_step()), np.asarray(naive_step()), np.asarray(fp8_step())
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    print(f"same logits from the latent and full K/V paths: max |diff| / max |logit| = {err:.1e}")
    assert err < 1e-4, err
    fp8_err = np.max(np.abs(c - a)) / np.max(np.abs(a))
    print(f"FP8-resident experts vs fp32 experts (the weights' e4m3 rounding): max |diff| / max |logit| = "
          f"{fp8_err:.1e}")
    assert np.all(np.isfinite(c)), "FP8 path: non-finite logits"
    t_latent, t_naive, t_fp8 = [], [], []
    for _ in range(3):  # interleaved rounds: all paths see the same machine state
        t_latent.append(best_time(latent_step, _ITERS.value))
        t_naive.append(best_time(naive_step, _ITERS.value))
        t_fp8.append(best_time(fp8_step, _ITERS.value))
    latent_s, naive_s, fp8_s = min(t_latent), min(t_naive), min(t_fp8)
    f32 = 4
    experts_f32, rest = weight_bytes(model)
    experts_fp8, _ = weight_bytes(fp8_model)
    print(f"decode step, batch {B}, context {S}, {L} layers, {N} heads, fp32 on {jax.devices()[0].platform}:")
    print(f"  latent cache (absorbed MLA)   {latent_s * 1e3:8.2f} ms   {L * X * f32:>9,} cache bytes/token   "
          f"expert weights {experts_f32:>11,} bytes (fp32)")
    print(f"  full per-head K/V cache       {naive_s * 1e3:8.2f} ms   {full_values_per_token(cfg) * f32:>9,} "
          f"cache bytes/token")
    print(f"  latent cache, FP8 experts     {fp8_s * 1e3:8.2f} ms   {L * X * f32:>9,} cache bytes/token   "
          f"expert weights {experts_fp8:>11,} bytes (e4m3 + f32 scales)")
    print(f"  ratio latent / full: {latent_s / naive_s:.3f} (goal <= 0.5)")
    print(f"  ratio FP8 experts / fp32 experts (latent cache): step {fp8_s / latent_s:.3f}, expert weight bytes "
          f"{experts_fp8 / experts_f32:.3f}; every other weight {rest:,} bytes (fp32) in both")
    device_loop_rows(gen, B, _NEW_TOKENS.value, max(1, _ITERS.value // 3))
    k2 = kimi_k2()
    print(f"Kimi K2 (61 layers, 64 heads), bf16 cache bytes per token: latent "
          f"{LatentCache.values_per_token(k2) * 2:,}, full K/V {full_values_per_token(k2) * 2:,} "
          f"({full_values_per_token(k2) / LatentCache.values_per_token(k2):.1f}x)")
    experts = k2.num_moe_layers * k2.num_experts_per_tok  # the experts one token runs through
    weights = 3 * k2.hidden_size * k2.moe_intermediate_size  # per expert: gate, up, down
    scales = 3 * -(-k2.hidden_size // 128) * -(-k2.moe_intermediate_size // 128)
    print(f"Kimi K2 routed expert bytes read per decoded token at batch 1 ({k2.num_experts_per_tok} of "
          f"{k2.n_routed_experts} experts x {k2.num_moe_layers} layers): FP8 "
          f"{experts * (weights + 4 * scales) / 1e9:.1f} GB (scales included), "
          f"bf16 {experts * weights * 2 / 1e9:.1f} GB")


if __name__ == "__main__":
    app.run(main)
