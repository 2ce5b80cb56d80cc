"""The platform a program is compiled for, and every choice k2jax makes by platform, in one place.

The platform is that of the devices the program is compiled for, never the host's: `K2Config.platform` when it
names one ("cpu" | "tpu" | "gpu"), else the platform of the mesh set with `jax.set_mesh` (read from the abstract
mesh while tracing), else that of the default device (`pallas_kernels.backend.target_platform`). So a CPU-only
machine builds the TPU program by tracing under a mesh of (deviceless) TPU devices, and a TPU host builds it
without being told.

    t = Target.of(cfg)          # call while tracing: inside jit / under the mesh the program is built for
    t.platform                  # "cpu" | "tpu" | "gpu"
    t.attention                 # kernel backend of training / prefill attention and absorbed decode
    t.moe_impl                  # grouped matmul of the routed experts
    t.ep_exchange               # expert-parallel row exchange
    t.scan_unroll               # MoE blocks per iteration of their scan
    t.cpu_matmul                # dense projections use the CPU matmul form (k2jax.model.cpu_matmul)
    t.fp8_activations           # FP8-resident experts run e4m3 x e4m3 dots (routed rows quantised)
    t.launch("mla_attention", dtype)   # the kernel's block sizes and launch settings on this platform

What each platform gets, and why:
  attention       TPU / GPU: the Pallas flash-attention and absorbed-decode kernels (head dims that are powers of
                  two >= 16); CPU: the kernels' XLA references.
  routed experts  TPU / GPU: the Pallas grouped matmul, forward, dx and the grouped weight gradient
                  (`jax.lax.ragged_dot`'s weight gradient compiles to a dense every-row-by-every-expert product on
                  TPU v5p and H100, E x the work; on H100 its forward too); CPU: `k2jax.model.cpu_grouped_ffn`, a
                  tiled loop over the routed rows only (ragged_dot has no CPU kernel either).
  EP exchange     TPU / GPU: native `ragged_all_to_all`; CPU: fixed-size `all_to_all` chunks (no CPU kernel).
  MoE scan        TPU / GPU: rolled (compile time grows with every unrolled block; K2 has 60); CPU: unrolled
                  (forward + backward 7 % faster).
  dense matmul    TPU / GPU: `jnp.dot`; CPU: `k2jax.model.cpu_matmul`, whose weight gradient transposes x first (XLA:CPU
                  runs a transposed lhs at half speed).
  FP8 experts     GPU: e4m3 x e4m3 dots on the FP8 tensor cores, the routed rows quantised per row x 128 columns
                  (the release's dynamic activation scheme); TPU v5p (no FP8 MXU) and CPU: each e4m3 weight block
                  dequantised and multiplied in the compute dtype.

The cfg fields `attention_impl`, `moe_impl`, `scan_unroll` and `fp8_activations` override the "auto" choice.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from k2jax.model.config import K2Config
from pallas_kernels import backend as kernel_backend

# Kernel launch settings by (kernel, platform, compute dtype): block sizes and, on GPU, Triton's warps and
# pipeline stages. A kernel's block sizes must keep its tiles inside VMEM (TPU) or shared memory (GPU, H100:
# 227 KiB per block); tests/pallas_kernels/test_compile.py compiles each kernel with these for TPU v5p and H100.
KERNEL_LAUNCH: dict[tuple[str, str, str], dict] = {
    # TPU (compiled, v5p; VMEM at 4K tokens / per block): attention 128x128 blocks, forward ~4.8 MiB bf16 / 8.9 MiB
    # f32 of the 16 MiB scoped limit (whole K/V rows of a head stay in VMEM: up to 8K tokens bf16, 4K f32);
    # decode one 1024-slot (bf16) / 512-slot (f32) cache block per grid step, ~1.2 MB per copy.
    ("mla_attention", "tpu", "bfloat16"): dict(block_q=128, block_k=128),
    ("mla_attention", "tpu", "float32"): dict(block_q=128, block_k=128),
    ("mla_decode", "tpu", "bfloat16"): dict(block_s=1024),
    ("mla_decode", "tpu", "float32"): dict(block_s=512),
    # H100 (compiled; shared memory of 227 KiB per block, ptxas: no register spills unless noted). Attention
    # forward bf16 128x64 tiles, 8 warps, 3 stages (168 KiB); backward (dq, dk/dv) 64x64, 8 warps, 2 stages
    # (120 / 136 KiB, dk/dv spills 8 bytes); float32 tiles hold twice the bytes: forward 128x32 (192 KiB),
    # backward 32x32 unpipelined (60 KiB, dk/dv spills 20 bytes). Decode: 16 of the T·N query rows per program
    # (the [rows, 512] float32 accumulator in registers), 64-slot blocks (218 KiB bf16; float32 32-slot blocks,
    # 174 KiB, spills 668 bytes).
    ("mla_attention", "gpu", "bfloat16"): dict(block_q=128, block_k=64, num_warps=8, num_stages=3, bwd_block_q=64,
                                               bwd_block_k=64, bwd_num_warps=8, bwd_num_stages=2),
    ("mla_attention", "gpu", "float32"): dict(block_q=128, block_k=32, num_warps=8, num_stages=3, bwd_block_q=32,
                                              bwd_block_k=32, bwd_num_warps=8, bwd_num_stages=1),
    ("mla_decode", "gpu", "bfloat16"): dict(block_m=16, block_s=64, num_warps=8, num_stages=2),
    ("mla_decode", "gpu", "float32"): dict(block_m=16, block_s=32, num_warps=8, num_stages=2),
    # grouped matmul, gpu form (128x128 f32 tiles): 8 warps (4 spill ~2 KB), 112-128 KiB bf16 / 64 KiB f32
    ("fp8_grouped_matmul", "gpu", "bfloat16"): dict(num_warps=8, num_stages=2),
    ("fp8_grouped_matmul", "gpu", "float32"): dict(num_warps=8, num_stages=1),
}


_MOE_IMPL = {"cpu": "tiled", "tpu": "pallas", "gpu": "pallas"}


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str
    attention: str
    moe_impl: str
    ep_exchange: str
    scan_unroll: int
    cpu_matmul: bool
    fp8_activations: bool

    @classmethod
    def of(cls, cfg: K2Config) -> "Target":
        """The choices for the program being traced now (see the module docstring)."""
        platform = kernel_backend.target_platform(cfg.platform)
        on_cpu = platform == "cpu"
        dims = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
        moe_impl = cfg.moe_impl if cfg.moe_impl != "auto" else _MOE_IMPL[platform]
        scan_unroll = cfg.scan_unroll or (max(1, cfg.num_moe_layers) if on_cpu else 1)
        fp8_activations = platform == "gpu" if cfg.fp8_activations == "auto" else cfg.fp8_activations == "on"
        return cls(platform=platform, attention=kernel_backend.resolve(cfg.attention_impl, dims, platform),
                   moe_impl=moe_impl, ep_exchange="all_to_all" if on_cpu else "native", scan_unroll=scan_unroll,
                   cpu_matmul=on_cpu, fp8_activations=fp8_activations)

    def launch(self, kernel: str, dtype) -> dict:
        """Keyword arguments for `kernel`'s entry point on this platform and compute dtype: its block sizes and
        launch settings (KERNEL_LAUNCH), plus the platform itself. Empty on CPU (XLA references, or the
        interpreter with the kernels' defaults)."""
        if self.platform == "cpu":
            return {}
        return {"platform": self.platform, **KERNEL_LAUNCH.get((kernel, self.platform, jnp.dtype(dtype).name), {})}
