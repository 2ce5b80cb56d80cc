"""k2jax vs transformers' DeepseekV3ForCausalLM on the same small K2, same weights, same machine, one run.

    python benchmarks/forward_vs_torch.py [--batch=4 --seq_len=256 --iters=5]

Prints tokens/s of forward and of forward+backward (next-token cross-entropy) for k2jax (jit) and transformers
(PyTorch CPU), each as a ratio to transformers and as a fraction of the matmul roofline: useful model FLOPs
(K2Config.flops_per_token) divided by the fp32 peak measured here with jnp.dot of 2048² matrices.
Needs the test extras (torch, transformers).
"""

from __future__ import annotations

import functools

import _repo_root  # noqa: F401  (the repo root first on sys.path: before any project import)
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx

import k2jax
from benchmarks.common import BENCH_CFG, best_time
from k2jax.tools.host_memory import keep_freed_memory_on_cpu
from k2jax.training.step import token_nll
from tests.oracle import oracle_model, random_release_tensors

_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per measurement (after one warm-up).")

def matmul_peak_flops(iters: int) -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * 2048 ** 3 / best_time(lambda: dot(a, a).block_until_ready(), iters)


def model_matmuls(cfg: k2jax.K2Config, B: int, T: int) -> list[tuple[float, int, int, int, int]]:
    """The useful matmuls of one forward pass as (count, batch, rows, contraction, cols): what
    cfg.flops_per_token counts, no more (attention over the causal half, the routed rows split evenly between
    the experts)."""
    M, N, D = B * T, cfg.num_attention_heads, cfg.hidden_size
    P, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    causal = (T + 1) / (2 * T)
    q = ([(M, D, cfg.q_lora_rank), (M, cfg.q_lora_rank, N * (P + R))] if cfg.q_lora_rank else [(M, D, N * (P + R))])
    attention = [(1, 1, *s) for s in q + [(M, D, C + R), (M, C, N * (P + V)), (M, N * V, D)]]
    attention += [(causal, B * N, T, P + R, T), (causal, B * N, T, T, V)]
    swiglu = lambda f: [(2, 1, M, D, f), (1, 1, M, f, D)]  # noqa: E731
    E, routed = cfg.n_routed_experts, M * cfg.num_experts_per_tok
    rows = max(1, round(routed / E))  # per expert; the count makes up for the rounding
    moe = [(1, 1, M, D, E)] + [(n * routed / rows, b, rows, k, c)
                               for n, b, _, k, c in swiglu(cfg.moe_intermediate_size)]
    if cfg.n_shared_experts:
        moe += swiglu(cfg.shared_intermediate_size)
    per_layer = ([(n * cfg.num_hidden_layers, *s) for n, *s in attention]
                 + [(n * cfg.num_dense_layers, *s) for n, *s in swiglu(cfg.intermediate_size)]
                 + [(n * cfg.num_moe_layers, *s) for n, *s in moe])
    return per_layer + [(1, 1, M, D, cfg.vocab_size)]


def matmul_ceiling(cfg: k2jax.K2Config, B: int, T: int, iters: int) -> tuple[float, float, float]:
    """Seconds the model's useful matmuls (model_matmuls) take on their own, each timed at its shape with
    jnp.einsum: forward (x·w), and forward + backward (+ g·wᵀ and xᵀ·g). A matmul that occurs several times is
    also timed as 8 back to back in one call (lax.map), which hides the per-call overhead; the faster counts.
    Returns (forward s, forward+backward s, their forward FLOPs)."""
    rng = np.random.default_rng(0)
    # xᵀ·g also from an x transposed beforehand (what k2jax.model.layers.project's CPU gradient does)
    specs = {"fwd": "bmk,bkn->bmn", "dx": "bmn,bkn->bmk", "dw": "bmk,bmn->bkn", "dw_t": "bkm,bmn->bkn"}
    fwd_s = train_s = flops = 0.0
    for count, batch, m, k, n in model_matmuls(cfg, B, T):
        reps = 8 if count > 1 else 1
        lead = (batch,) if batch > 1 else ()  # plain 2-D matmuls as such
        x, w, g = (jnp.asarray(rng.standard_normal((reps,) + lead + s), jnp.float32)
                   for s in ((m, k), (k, n), (m, n)))
        seconds = {}
        for name, (a, b) in zip(specs, ((x, w), (g, w), (x, g), (jnp.swapaxes(x, -1, -2), g))):
            one = jax.jit(functools.partial(jnp.einsum, specs[name] if lead else specs[name].replace("b", "")))
            mapped = jax.jit(lambda a, b, one=one: jax.lax.map(lambda ab: one(*ab), (a, b)))
            seconds[name] = min(best_time(lambda: one(a[0], b[0]).block_until_ready(), iters),
                                best_time(lambda: mapped(a, b).block_until_ready(), iters) / reps)
        fwd_s += count * seconds["fwd"]
        train_s += count * (seconds["fwd"] + seconds["dx"] + min(seconds["dw"], seconds["dw_t"]))
        flops += count * 2 * batch * m * k * n
    return fwd_s, train_s, flops


def main(argv):
    del argv
    kept = keep_freed_memory_on_cpu()  # both sides of the comparison run with it (k2jax/tools/host_memory.py)
    cfg, B, T, iters = BENCH_CFG, _BATCH.value, _SEQ_LEN.value, _ITERS.value
    tensors = random_release_tensors(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))

    model = k2jax.from_hf_tensors(cfg, tensors)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens_j = jnp.asarray(tokens)

    def loss_fn(p, t):
        logits = nnx.merge(graphdef, p, rest)(t)
        return jnp.mean(token_nll(logits[:, :-1], t[:, 1:]))

    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t))
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    jax_fwd = best_time(lambda: fwd(params, tokens_j).block_until_ready(), iters)
    jax_train = best_time(lambda: jax.block_until_ready(fwd_bwd(params, tokens_j)), iters)

    hf = oracle_model(cfg, tensors)
    tokens_t = torch.from_numpy(tokens)

    def torch_fwd():
        with torch.no_grad():
            hf(tokens_t)

    def torch_train():
        hf.zero_grad(set_to_none=True)
        logits = hf(tokens_t).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size),
                                                 tokens_t[:, 1:].reshape(-1))
        loss.backward()

    hf_fwd = best_time(torch_fwd, iters)
    hf_train = best_time(torch_train, iters)
    peak = matmul_peak_flops(iters)
    ceiling_fwd, ceiling_train, ceiling_flops = matmul_ceiling(cfg, B, T, iters)

    n_tok = B * T
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts "
          f"top-{cfg.num_experts_per_tok}, batch {B} x {T} tokens, fp32; "
          f"{jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), torch threads {torch.get_num_threads()}; host malloc keeps freed memory: {kept}")
    print(f"fp32 matmul peak (jnp.dot 2048²): {peak / 1e9:.1f} GFLOP/s")
    if abs(ceiling_flops - cfg.flops_per_token(T, training=False) * n_tok) > 1e-6 * ceiling_flops:
        raise AssertionError(f"model_matmuls counts {ceiling_flops:.6g} FLOPs, flops_per_token "
                             f"{cfg.flops_per_token(T, training=False) * n_tok:.6g}")
    for label, training, ours, theirs, ceiling in (("forward", False, jax_fwd, hf_fwd, ceiling_fwd),
                                                   ("forward+backward", True, jax_train, hf_train, ceiling_train)):
        useful = cfg.flops_per_token(T, training=training) * n_tok
        print(f"{label:17s} k2jax {n_tok / ours:9.0f} tok/s ({useful / ours / peak:5.1%} of roofline)   "
              f"transformers {n_tok / theirs:9.0f} tok/s ({useful / theirs / peak:5.1%})   "
              f"k2jax / transformers = {theirs / ours:.2f}x   "
              f"[matmuls alone: {useful / ceiling / peak:5.1%} of roofline]")
    print("matmuls alone: the model's useful matmuls (attention's causal half, routed rows split evenly over the "
          "experts), each timed on its own at its shape with jnp.einsum: about what any XLA:CPU implementation "
          "could reach")


if __name__ == "__main__":
    app.run(main)
