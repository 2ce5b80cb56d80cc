"""The routed experts' SwiGLU weights in one of the three formats every grouped-FFN form takes.

    experts = ExpertWeights("plain", gate_GDF, up_GDF, down_GFD)
    experts = ExpertWeights("fp8", gate_e4m3, up_e4m3, down_e4m3, gate_scale, up_scale, down_scale)
    experts = ExpertWeights("int4", gate_packed, up_packed, down_packed, gate_scale, up_scale, down_scale,
                            group_size=32)
    experts.check(caller)                  # shapes and dtypes agree, or one line says how they do not
    gate, up, down = experts.dense(g)      # expert g's weights, dequantised (the CPU form's per-expert step)

Formats (FORMATS), each projection a weight [G, I, O] in k2jax's [in, out] orientation (any leading axes: a
stack of layers is [L, G, ...]):
  "plain"  bf16 / f32 weights
  "fp8"    float8_e4m3fn weights with float32 128x128 block scales [G, ceil(I/128), ceil(O/128)], a multiplier
           (the K2 release's weight_scale_inv; pallas_kernels.fp8_grouped_matmul)
  "int4"   compressed-tensors pack-quantized int32 [G, ceil(I/8), O] (eight 4-bit values per int32 along I) with
           group scales [G, ceil(I/group_size), O] (K2-Thinking and later; pallas_kernels.int4_grouped_matmul)
gate and up are [G, D, F], down [G, F, D] (D hidden, F expert FFN): D is down's last dim, F gate's.

A pytree (the arrays are its leaves; fmt and group_size ride along as static data), so it passes through jit,
shard_map (sharding.expert_parallel splits every leaf on its expert axis) and scans.

Letter legend: G groups (experts), L layers, D hidden, F expert ffn, I / O a weight's in / out features.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import fp8_grouped_matmul as fp8
from pallas_kernels import int4_grouped_matmul as int4

FORMATS = ("plain", "fp8", "int4")
PROJECTIONS = ("gate", "up", "down")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["gate", "up", "down", "gate_scale", "up_scale", "down_scale"],
                   meta_fields=["fmt", "group_size"])
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    fmt: str
    gate: Any
    up: Any
    down: Any
    gate_scale: Any = None
    up_scale: Any = None
    down_scale: Any = None
    group_size: int = 0  # "int4": inputs per scale

    @property
    def hidden(self) -> int:
        return self.down.shape[-1]

    @property
    def ffn(self) -> int:
        return self.gate.shape[-1]

    def projections(self) -> tuple[tuple[Any, Any, int], ...]:
        """(weight, scale or None, in features) for gate, up and down."""
        return ((self.gate, self.gate_scale, self.hidden), (self.up, self.up_scale, self.hidden),
                (self.down, self.down_scale, self.ffn))

    def at(self, index) -> "ExpertWeights":
        """Every array indexed by `index` along its leading axes (e.g. a layer of [L, G, ...] stacks)."""
        return jax.tree.map(lambda a: a[index], self)

    def check(self, caller: str) -> None:
        """One ValueError line, prefixed with `caller`, unless the weights and scales form `fmt`."""
        if self.fmt not in FORMATS:
            raise ValueError(f"{caller}: expert weight format must be one of {FORMATS}, got {self.fmt!r}")
        D, F = self.hidden, self.ffn
        lead = self.gate.shape[:-2]
        for name, (w, s, n_in) in zip(PROJECTIONS, self.projections()):
            n_out = F if name != "down" else D
            rows = -(-n_in // int4.PACK) if self.fmt == "int4" else n_in
            if w.shape != lead + (rows, n_out):
                raise ValueError(f"{caller}: {self.fmt} {name} weights must be {lead + (rows, n_out)} for hidden {D} "
                                 f"and ffn {F}, got {w.shape}")
            if self.fmt == "plain":
                if s is not None or not jnp.issubdtype(w.dtype, jnp.floating) or w.dtype == fp8.FP8:
                    raise ValueError(f"{caller}: plain {name} weights are bf16 / f32 without scales, got {w.dtype}"
                                     f"{' with scales' if s is not None else ''}")
            elif self.fmt == "fp8":
                fp8.check_scales(w, s, f"{caller}: fp8 {name}")
            else:
                _check_int4(w, s, n_in, self.group_size, f"{caller}: int4 {name}")

    def dense(self, index, dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gate, up, down) at `index` (an expert, or (layer, expert) of stacks) as plain [I, O] arrays in dtype."""
        def one(w, s, n_in):
            if self.fmt == "plain":
                return w[index].astype(dtype)
            if self.fmt == "fp8":
                return fp8.dequantize(w[index], s[index], dtype)
            return int4.dequantize(w[index], s[index], size=n_in, group_size=self.group_size, dtype=dtype)
        return tuple(one(*p) for p in self.projections())

    def dequantized(self, dtype=jnp.float32) -> "ExpertWeights":
        """The same weights as a whole "plain" ExpertWeights (the XLA reference's form: every layer dequantised)."""
        if self.fmt == "plain":
            return ExpertWeights("plain", *(w.astype(dtype) for w, _, _ in self.projections()))
        return ExpertWeights("plain", *self.dense(slice(None), dtype))


def _check_int4(packed, scales, n_in: int, group_size: int, caller: str) -> None:
    if packed.dtype != jnp.int32:
        raise ValueError(f"{caller}: packed weights must be int32, got {packed.dtype}")
    if group_size <= 0 or group_size % int4.PACK:
        raise ValueError(f"{caller}: group_size must be a positive multiple of {int4.PACK}, got {group_size}")
    want = packed.shape[:-2] + (-(-n_in // group_size), packed.shape[-1])
    if scales is None or scales.shape != want or not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"{caller}: scales must be float {want} (one per {group_size} inputs), got "
                         f"{None if scales is None else (scales.dtype, scales.shape)}")
