"""k2jax vs transformers' DeepseekV3ForCausalLM on the same small K2, same weights, same machine, one run.

    python benchmarks/forward_vs_torch.py [--batch=4 --seq_len=256 --iters=5]

Prints tokens/s of forward and of forward+backward (next-token cross-entropy) for k2jax (jit) and transformers
(PyTorch CPU), each as a ratio to transformers and as a fraction of the matmul roofline: useful model FLOPs
(K2Config.flops_per_token) divided by the fp32 peak measured here with jnp.dot of 2048² matrices.
Needs the test extras (torch, transformers).
"""

from __future__ import annotations

import os
import sys

# the repo root replaces this script's directory on the path (which would let benchmarks/kernels.py shadow
# the `kernels` package that transformers probes for)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import k2jax  # noqa: E402
from benchmarks.common import BENCH_CFG, best_time  # noqa: E402
from k2jax.host_memory import keep_freed_memory_on_cpu  # noqa: E402
from k2jax.training.step import token_nll  # noqa: E402
from tests.oracle import oracle_model, random_release_tensors  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per measurement (after one warm-up).")

def matmul_peak_flops(iters: int) -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * 2048 ** 3 / best_time(lambda: dot(a, a).block_until_ready(), iters)


def main(argv):
    del argv
    kept = keep_freed_memory_on_cpu()  # both sides of the comparison run with it (k2jax/host_memory.py)
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

    n_tok = B * T
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts "
          f"top-{cfg.num_experts_per_tok}, batch {B} x {T} tokens, fp32; {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), torch threads {torch.get_num_threads()}; host malloc keeps freed memory: {kept}")
    print(f"fp32 matmul peak (jnp.dot 2048²): {peak / 1e9:.1f} GFLOP/s")
    for label, training, ours, theirs in (("forward", False, jax_fwd, hf_fwd), ("forward+backward", True, jax_train, hf_train)):
        useful = cfg.flops_per_token(T, training=training) * n_tok
        print(f"{label:17s} k2jax {n_tok / ours:9.0f} tok/s ({useful / ours / peak:5.1%} of roofline)   "
              f"transformers {n_tok / theirs:9.0f} tok/s ({useful / theirs / peak:5.1%})   "
              f"k2jax / transformers = {theirs / ours:.2f}x")


if __name__ == "__main__":
    app.run(main)
