"""Deviceless targets for compile tests: meshes of TPU v5p chips (libtpu) and H100 GPUs (the CUDA plugin and
pip's ptxas) on this CPU-only machine, so a test can `.lower(...).compile()` the real TPU / GPU program.

    mesh = tpu_mesh({"fsdp": 2, "expert": 2})          # 4 v5p chips (megacore: one jax device per chip)
    mesh = gpu_mesh({"expert": 8})                     # 8 H100s
    with jax.set_mesh(mesh):
        compiled = jax.jit(f).lower(*abstract_args(mesh, ...)).compile()

A compile runs Mosaic / Triton in full (layouts, VMEM and shared-memory limits), which a jax.export lowering
does not. libtpu's start-up warnings about worker hostnames are expected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import topologies

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# the test workers are separate processes, each loading libtpu for its deviceless topology
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

H100_TARGET_CONFIG = Path(__file__).with_name("h100_target_config.txtpb")
# v5p topologies by chip count: (topology, chips per host); a v5p host holds 4 chips
_V5P = {1: ("v5p:1x1x1", (1, 1, 1)), 2: ("v5p:1x2x1", (1, 2, 1)), 4: ("v5p:2x2x1", (2, 2, 1)),
        8: ("v5p:2x2x2", (2, 2, 1)), 16: ("v5p:2x2x4", (2, 2, 1))}


def _mesh(devices, axes: dict[str, int]) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(devices).reshape(tuple(axes.values())), tuple(axes))


def tpu_mesh(axes: dict[str, int]) -> jax.sharding.Mesh:
    """A mesh of math.prod(axes) deviceless TPU v5p chips (megacore) with the given axis names and sizes."""
    n = math.prod(axes.values())
    if n not in _V5P:
        raise ValueError(f"tpu_mesh: no v5p topology here for {n} chips (have {sorted(_V5P)})")
    name, per_host = _V5P[n]
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="megacore",
                                        chips_per_host_bounds=per_host, num_slices=1)
    return _mesh(topo.devices, axes)


def gpu_mesh(axes: dict[str, int]) -> jax.sharding.Mesh:
    """A mesh of math.prod(axes) deviceless H100 GPUs (one host) with the given axis names and sizes."""
    n = math.prod(axes.values())
    topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG.read_text(),
                                        topology=f"1x1x{n}")
    return _mesh(topo.devices, axes)


def abstract(shape, dtype, mesh, spec=None) -> jax.ShapeDtypeStruct:
    """An argument for .lower(): shape and dtype, sharded over `mesh` by `spec` (default replicated)."""
    spec = jax.sharding.PartitionSpec() if spec is None else spec
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=jax.sharding.NamedSharding(mesh, spec))


def reduced_k2(**overrides):
    """Kimi K2 cut down for compile tests on 2 cores: K2's head dims, MLA ranks, rope and router, with a small
    hidden size, 4 heads, 3 layers (1 dense + 2 MoE), 8 experts top-2 and a 1K vocabulary; bf16 compute."""
    from k2jax.model.config import kimi_k2
    return kimi_k2(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                   num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                   param_dtype="float32", dtype="bfloat16").replace(**overrides)


def kernel_calls(compiled_text: str, platform: str) -> int:
    """Pallas kernel launches in a compiled program's HLO text: Mosaic custom calls on TPU, Triton calls on GPU,
    made by a pallas_call (XLA's own Mosaic calls, e.g. TPU ragged-dot, are not counted)."""
    target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    target = f'custom_call_target="{target}"'
    return sum(1 for line in compiled_text.splitlines() if target in line and 'pallas_call"' in line)
