"""Expert and pipeline parallelism on the 8 fake CPU devices: train-step time relative to the unsharded step,
and the bytes each collective moves per step, read from the compiled HLO (what would cross ICI/DCN on a pod).

    python benchmarks/parallel.py [--batch=8 --seq_len=128 --iters=3]

The fake devices share this machine's cores, so the time ratios show overhead (exchanges, bubbles, padding),
not speed-up; the collective bytes are what a real pod would move for this model and batch.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import _repo_root  # noqa: E402, F401  (the repo root first on sys.path: before any project import)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import k2jax  # noqa: E402
from benchmarks.common import best_time  # noqa: E402
from k2jax.model.config import tiny  # noqa: E402
from k2jax.model.placement import shard_model  # noqa: E402
from k2jax.tools.host_memory import keep_freed_memory_on_cpu  # noqa: E402
from k2jax.training.step import token_nll  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.pipeline import bubble_fraction  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed steps per setup (best is reported).")

PARALLEL_CFG = tiny(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                    num_hidden_layers=5, num_attention_heads=8, n_routed_experts=32, num_experts_per_tok=4,
                    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    max_position_embeddings=1024)
SETUPS = [  # name, mesh axes, strategy, microbatches
    ("unsharded", None, None, 0),
    ("EP 8 (shard_map all-to-all)", {"expert": 8}, "ep_fsdp", 0),
    ("EP 4 x FSDP 2", {"expert": 4, "fsdp": 2}, "ep_fsdp", 0),
    ("PP 4 stages x 8 microbatches, FSDP 2", {"stage": 4, "fsdp": 2}, "ep_pp", 8),
    ("EP 2 x PP 2 x data 2, 4 microbatches", {"data": 2, "expert": 2, "stage": 2}, "ep_pp", 4),
]
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1,
                "s64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> Counter:
    """Bytes of each collective's result per device, summed by kind (loop bodies counted once per trip is not
    knowable from the text: collectives inside loops are counted once, so multiply by the trip count)."""
    out: Counter = Counter()
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        for dtype, dims in _ARRAY.findall(m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            out[m.group(2)] += n * _DTYPE_BYTES.get(dtype, 4)
    return out


def _train_step(model, tokens):
    def loss_fn(m):
        return jnp.mean(token_nll(m(tokens[:, :-1]), tokens[:, 1:]))

    return nnx.value_and_grad(loss_fn)(model)


def main(argv):
    del argv
    keep_freed_memory_on_cpu()  # both sides of the comparison run with it (k2jax/tools/host_memory.py)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, PARALLEL_CFG.vocab_size, (_BATCH.value,
                                                                                         _SEQ_LEN.value + 1)))
    base = k2jax.Transformer(PARALLEL_CFG, rngs=nnx.Rngs(0))
    results, ref_loss = [], None
    for name, axes, strategy, micro in SETUPS:
        model = base
        if axes is not None:
            mesh = make_mesh(axes)
            model = shard_model(base, mesh, strategy)
            model.cfg = model.cfg.replace(pipeline_microbatches=micro)
        ctx = jax.set_mesh(mesh) if axes is not None else contextlib.nullcontext()
        with ctx:
            step = jax.jit(_train_step)
            hlo = step.lower(model, tokens).compile().as_text()
            loss, _ = step(model, tokens)
            seconds = best_time(lambda: jax.block_until_ready(step(model, tokens)), _ITERS.value)
        ref_loss = float(loss) if ref_loss is None else ref_loss
        results.append((name, seconds, float(loss), collective_bytes(hlo), axes, micro))
    t0 = results[0][1]
    print(f"train step (fwd + bwd), batch {_BATCH.value} x {_SEQ_LEN.value}, {PARALLEL_CFG.num_hidden_layers} layers, "
          f"{PARALLEL_CFG.n_routed_experts} experts top-{PARALLEL_CFG.num_experts_per_tok}, fp32, 8 fake CPU devices")
    for name, seconds, loss, coll, axes, micro in results:
        extra = ""
        if axes and "stage" in axes:
            extra = f", bubble {bubble_fraction(axes['stage'], micro):.0%}"
        kinds = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(coll.items())) or "none"
        print(f"  {name:40s} {seconds * 1e3:8.1f} ms  x{seconds / t0:5.2f}  loss {loss:.6f}{extra}")
        print(f"  {'':40s} collectives per device (HLO, loop bodies once): {kinds}")
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (name, loss, ref_loss)


if __name__ == "__main__":
    app.run(main)
