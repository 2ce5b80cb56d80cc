"""The platform a program is compiled for, and every choice k2jax makes by platform, in one place.

The platform is that of the devices the program is compiled for, never the host's: `cfg.run.platform` when it
names one ("cpu" | "tpu" | "gpu"), else the platform of the mesh set with `jax.set_mesh` (read from the abstract
mesh while tracing), else that of the default device (`target_platform`). So a CPU-only machine builds the TPU
program by tracing under a mesh of (deviceless) TPU devices, and a TPU host builds it without being told.

This is the one place an `auto` becomes a choice: the layers below (pallas_kernels, sharding) take concrete values
and never look at the host.

    t = Target.of(cfg)          # call while tracing: inside jit / under the mesh the program is built for
    t.platform                  # "cpu" | "tpu" | "gpu"
    t.attention                 # kernel backend of training / prefill attention and absorbed decode
    t.moe_impl                  # form of the routed experts' grouped FFN (pallas_kernels.grouped_matmul.IMPLS)
    t.ep_exchange               # expert-parallel row exchange (sharding.expert_parallel.IMPLS)
    t.scan_unroll               # MoE blocks per iteration of their scan
    t.matmul                    # form of the dense projections (pallas_kernels.matmul.IMPLS)
    t.fp8_activations           # FP8-resident experts run e4m3 x e4m3 dots (routed rows quantised)
    t.latent_slot               # values a latent-cache slot holds: kv_lora + rope, padded on TPU (below)
    t.prefill_tokens            # tokens (over all rows) one prefill pass takes; longer prompts run in chunks

What each platform gets, and why:
  attention       TPU / GPU: the Pallas flash-attention and absorbed-decode kernels (head dims that are powers of
                  two >= 16), which pick their own launch settings for the platform (tables beside them); CPU: the
                  kernels' XLA references.
  routed experts  TPU / GPU: the Pallas grouped matmuls (plain / FP8 / INT4 weights), forward, dx and the grouped
                  weight gradient (`jax.lax.ragged_dot`'s weight gradient compiles to a dense every-row-by-every-expert
                  product on TPU v5p and H100, E x the work; on H100 its forward too); CPU: "tiled"
                  (`pallas_kernels.cpu_grouped_ffn`), a loop over the routed rows only (ragged_dot has no CPU kernel
                  either).
  EP exchange     TPU / GPU: native `ragged_all_to_all`; CPU: fixed-size `all_to_all` chunks (no CPU kernel).
  MoE scan        TPU / GPU: rolled (compile time grows with every unrolled block; K2 has 60); CPU: unrolled
                  (forward + backward 7 % faster).
  dense matmul    TPU / GPU: "xla" (`jnp.dot`); CPU: "cpu" (`pallas_kernels.matmul`), whose weight gradient transposes
                  x first (XLA:CPU runs a transposed lhs at half speed).
  latent cache    TPU: a slot padded to a multiple of 128 values (K2: 576 -> 640), so the cache's layout is the one the
                  decode kernel reads and the step's scatter writes; with 576 XLA:TPU keeps the jitted step's cache
                  slot-minor (no padding) and re-lays the whole cache out twice per step (37 GB per v5p chip for
                  the FP8 config). CPU / GPU: kv_lora + rope exactly.
  prefill chunks  TPU / GPU: 8192 tokens per pass over all rows (k2jax.inference.generate.Generator splits a longer
                  prompt into chunks of 8192 / rows tokens per row): a pass's activations, the absorbed attention's
                  queries and partial outputs (a few GB for one row of K2) and the dropless expert-parallel
                  exchange's buffers (n_expert x a balanced load: under 1 GB per chip for K2 on 16 chips) stay
                  bounded whatever the prompt, while a pass's matmuls stay long enough to be compute-bound (K2 on
                  v5p-32 re-reads its ~60 GiB of weights per chip each pass, ~22 ms, against ~75 ms of matmuls);
                  CPU: 2048 (tests and small models; memory, not the MXU, is what a CPU pass fills).
  FP8 experts     GPU: e4m3 x e4m3 dots on the FP8 tensor cores, the routed rows quantised per row x 128 columns
                  (the release's dynamic activation scheme); TPU v5p (no FP8 MXU) and CPU: each e4m3 weight block
                  dequantised and multiplied in the compute dtype.

The run options (cfg.run) `platform`, `attention_impl`, `moe_impl`, `scan_unroll` and `fp8_activations` override
the "auto" choice (their values are the enums of the modules that run them: pallas_kernels.backend.BACKENDS,
pallas_kernels.grouped_matmul.IMPLS).
"""

from __future__ import annotations

import dataclasses

import jax

from k2jax.model.config import PLATFORMS, K2Config

_MOE_IMPL = {"cpu": "tiled", "tpu": "pallas", "gpu": "pallas"}


def target_platform(platform: str = "auto") -> str:
    """"cpu" | "tpu" | "gpu": the platform the program being traced now is compiled for. `platform` when it names
    one ("cuda" / "rocm" count as "gpu"); "auto": the platform of the mesh set with jax.set_mesh (inside jit /
    shard_map: of its abstract mesh), else of the default device."""
    if platform != "auto":
        p = "gpu" if platform in ("cuda", "rocm") else platform
        if p not in PLATFORMS:
            raise ValueError(f"platform must be one of {('auto',) + PLATFORMS}, got {platform!r}")
        return p
    mesh = jax.sharding.get_abstract_mesh()
    p = mesh.abstract_device.platform if not mesh.empty and mesh.abstract_device is not None else None
    p = p or jax.devices()[0].platform
    return "gpu" if p in ("cuda", "rocm") else p


def _kernel_dims_fit(dims) -> bool:
    """The attention kernels' feature dims suit Triton's and Mosaic's tiles: powers of two >= 16 (K2's are)."""
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str
    attention: str
    moe_impl: str
    ep_exchange: str
    scan_unroll: int
    matmul: str
    fp8_activations: bool
    latent_slot: int
    prefill_tokens: int

    @classmethod
    def of(cls, cfg: K2Config) -> "Target":
        """The choices for the program being traced now (see the module docstring)."""
        platform = target_platform(cfg.run.platform)
        on_cpu = platform == "cpu"
        dims = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
        attention = cfg.run.attention_impl
        if attention == "auto":
            attention = "pallas" if not on_cpu and _kernel_dims_fit(dims) else "xla"
        moe_impl = cfg.run.moe_impl if cfg.run.moe_impl != "auto" else _MOE_IMPL[platform]
        scan_unroll = cfg.run.scan_unroll or (max(1, cfg.num_moe_layers) if on_cpu else 1)
        fp8_activations = platform == "gpu" if cfg.run.fp8_activations == "auto" else cfg.run.fp8_activations == "on"
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return cls(platform=platform, attention=attention, moe_impl=moe_impl,
                   ep_exchange="all_to_all" if on_cpu else "native", scan_unroll=scan_unroll,
                   matmul="cpu" if on_cpu else "xla", fp8_activations=fp8_activations,
                   latent_slot=-(-latent // 128) * 128 if platform == "tpu" else latent,
                   prefill_tokens=2048 if on_cpu else 8192)
