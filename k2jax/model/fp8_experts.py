"""FP8-resident routed experts: the release's e4m3 expert weights and 128x128 block scales stay FP8 on the devices
and run through the FP8 grouped matmul (half the bytes of bf16 weights, in memory and per decode step).

    model = quantize_experts(model)    # a loaded (dequantised) model's routed experts -> FP8 (k2jax.formats.quant's
                                       # block quantiser), in place; the rest of the model is untouched
    logits = model(tokens_BT)          # the same API: prefill, decode, Generator and Chat work unchanged
    model = abstract_fp8_experts(model)   # the same form for an abstract model (ShapeDtypeStructs): AOT compiles

Representation: `FP8RoutedExperts`, a RoutedExperts (same routing, expert parallelism and per-device layout) whose
gate_proj / up_proj / down_proj are `FP8Weight`s (float8_e4m3fn, the plain weights' shapes and logical axes: [in,
out] like every k2jax weight, with leading expert / layer axes) next to `FP8Scale`s named `<proj>_scale_inv`
(float32 [..., ceil(in/128), ceil(out/128)]: the release's weight_scale_inv transposed with its weight, a
multiplier: W = float32(w) x scale per 128x128 block, ragged edge blocks included). A scale's logical axes are its
weight's with the two matrix axes named SCALE_AXIS, which no strategy in sharding/rules.py splits: the scales
follow their weight on the expert (and layer) axes and are whole along the blocks (1/16384 of the weight's
elements). Neither is an nnx.Param: optimizers and `nnx.state(model, nnx.Param)` leave them out. Inference only:
gradients reach the FFN's input (so the rest of a model can still be differentiated), never the FP8 weights.

The FFN by target (k2jax.model.target; the compile target, never the host's backend):
  TPU / GPU   pallas_kernels.fp8_grouped_matmul's Pallas kernels, three grouped matmuls with SwiGLU between (each
              e4m3 block dequantised in VMEM / registers, its scale applied to the f32 block product; on GPU, by
              default, the rows quantised to e4m3 per row x 128 columns too, for the FP8 tensor cores:
              cfg.fp8_activations);
  CPU         k2jax.model.cpu_grouped_ffn with the scales: the tile loop dequantises one expert when it reaches
              it, so no whole-layer dequantised copy exists, and it does only the routed work;
  cfg.moe_impl "ragged_dot": fp8_grouped_matmul's XLA reference (dequantises the whole layer: the oracle form);
  "interpret": the Pallas kernels in the interpreter.
With an `expert` mesh axis the FFN runs inside expert parallelism's shard_map, the scales split with their
weights; otherwise per device under per_shard (sharding.per_shard), as the plain experts do.

Letter legend: L layers, E experts, D hidden, F expert ffn, I / O a weight's in / out features, Ib / Ob their
128-blocks, M routed rows.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.formats import quant
from k2jax.model.config import ConfigError
from k2jax.model.cpu_grouped_ffn import cpu_grouped_ffn
from k2jax.model.layers import swiglu
from k2jax.model.moe import RoutedExperts
from k2jax.model.target import Target
from k2jax.model.transformer import Transformer
from pallas_kernels.fp8_grouped_matmul import FP8, check_scales, fp8_grouped_matmul

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = tuple(f"moe_blocks.mlp.experts.{p}" for p in PROJECTIONS)  # their names in checkpoints
SCALE_SUFFIX = "_scale_inv"
SCALE_AXIS = "scale_blocks"  # a block-scale grid's matrix axes (sharding.LOGICAL_AXES; never split)


class FP8Weight(nnx.Variable):
    """A float8_e4m3fn expert weight stack, frozen (not an nnx.Param)."""


class FP8Scale(nnx.Variable):
    """The float32 128x128 block scales of an FP8Weight (multipliers: W = float32(w) x scale)."""


def scale_axes(weight_axes: tuple[str, ...]) -> tuple[str, ...]:
    """A block scale's logical axes: its weight's leading (expert, layer) axes, then SCALE_AXIS twice."""
    return tuple(weight_axes[:-2]) + (SCALE_AXIS, SCALE_AXIS)


class FP8RoutedExperts(RoutedExperts):
    """The FP8-resident routed experts (module docstring). quantized: {projection: (e4m3 weight [..., I, O],
    scales [..., Ib, Ob], the weight's logical axes)} for gate_proj, up_proj and down_proj, as quantize_experts
    makes them (concrete arrays, or ShapeDtypeStructs for an abstract model)."""

    def __init__(self, cfg, *, quantized: dict[str, tuple]):
        if sorted(quantized) != sorted(PROJECTIONS):
            raise ValueError(f"FP8RoutedExperts: quantized must hold {PROJECTIONS}, got {sorted(quantized)}")
        for name in PROJECTIONS:
            w, s, axes = quantized[name]
            check_scales(w, s, f"FP8RoutedExperts.{name}")
            setattr(self, name, FP8Weight(w, logical_axes=tuple(axes)))
            setattr(self, name + SCALE_SUFFIX, FP8Scale(s, logical_axes=scale_axes(axes)))
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)

    def weight_stacks(self) -> tuple:
        """(e4m3, scales) per projection, as stored."""
        return tuple((getattr(self, n)[...], getattr(self, n + SCALE_SUFFIX)[...]) for n in PROJECTIONS)

    def expert_arrays(self) -> tuple[jax.Array, ...]:
        """(w_gate, w_up, w_down, s_gate, s_up, s_down): e4m3 weights and float32 scales, expert axis first."""
        pairs = self.weight_stacks()
        return tuple(w for w, _ in pairs) + tuple(s for _, s in pairs)

    def grouped_ffn(self, target: Target, stacked: tuple | None) -> Callable:
        """ffn(rows, *expert_arrays, group_sizes, rows_in_use=None) -> [M, D] in the target's form (module
        docstring)."""
        if target.moe_impl == "tiled":
            if target.fp8_activations:
                raise ConfigError("fp8_activations='on' needs moe_impl 'ragged_dot', 'pallas' or 'interpret': the "
                                  "tiled CPU form (k2jax.model.cpu_grouped_ffn) multiplies dequantised weights")

            def cpu_ffn(x_MD, w_gate, w_up, w_down, s_gate, s_up, s_down, group_sizes_E, rows_in_use=None):
                return cpu_grouped_ffn(x_MD, w_gate, w_up, w_down, group_sizes_E, scales=(s_gate, s_up, s_down),
                                       stacked=stacked, rows_in_use=rows_in_use)
            return cpu_ffn
        backend = "xla" if target.moe_impl == "ragged_dot" else target.moe_impl
        launch = target.launch("fp8_grouped_matmul", self.dtype)

        def kernel_ffn(x_MD, w_gate, w_up, w_down, s_gate, s_up, s_down, group_sizes_E, rows_in_use=None):
            mm = functools.partial(fp8_grouped_matmul, group_sizes_G=group_sizes_E, backend=backend,
                                   fp8_activations=target.fp8_activations, rows_in_use=rows_in_use, **launch)
            return mm(swiglu(mm(x_MD, w_gate, scales_GIbOb=s_gate), mm(x_MD, w_up, scales_GIbOb=s_up)), w_down,
                      scales_GIbOb=s_down)
        return kernel_ffn


def scale_sharding(sharding, ndim: int):
    """The sharding of the block scales of a weight of `ndim` dims placed with `sharding`: a NamedSharding's split
    of the leading (expert, layer) axes with the last two axes whole (as sharding/rules.py lays out SCALE_AXIS);
    any other sharding (or None) as it is."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], None, None))


def _shardings(w) -> tuple:
    """(weight, scales) shardings for the FP8 form of w: w's own, and scale_sharding's for the scales; None, None
    when w has none."""
    sharding = getattr(w, "sharding", None)
    return sharding, scale_sharding(sharding, w.ndim)


def _quantized(w, name: str) -> tuple[jax.Array, jax.Array]:
    """k2jax.formats.quant's block quantiser over every [I, O] matrix of w [..., I, O] on the host, one matrix in
    float32 at a time -> (e4m3, scales) on w's devices (_shardings)."""
    lead, (I, O) = w.shape[:-2], w.shape[-2:]
    q = np.empty(w.shape, quant.E4M3)
    s = np.empty(lead + quant.scale_shape((I, O)), np.float32)
    for idx in np.ndindex(*lead):
        q[idx], s[idx] = quant.quantize(np.asarray(w[idx], np.float32), name=f"{name}{list(idx)}")
    w_sharding, s_sharding = _shardings(w)
    return jax.device_put(q, w_sharding), jax.device_put(s, s_sharding)


def _abstract(w, name: str) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The FP8 form of an abstract weight: ShapeDtypeStructs with _shardings(w)."""
    del name
    w_sharding, s_sharding = _shardings(w)
    return (jax.ShapeDtypeStruct(w.shape, FP8, sharding=w_sharding),
            jax.ShapeDtypeStruct(w.shape[:-2] + quant.scale_shape(w.shape[-2:]), jnp.float32, sharding=s_sharding))


def _replace_experts(model: Transformer, convert: Callable) -> Transformer:
    """model with its routed experts (stacked over the MoE layers) replaced, in place, by the FP8RoutedExperts of
    convert(weight, name) -> (e4m3, scales) per projection."""
    if model.moe_blocks is None:
        return model
    experts = model.moe_blocks.mlp.experts
    if isinstance(experts, FP8RoutedExperts):
        raise ValueError("quantize_experts: the routed experts are FP8 already")
    quantized = {}
    for name in PROJECTIONS:
        var = getattr(experts, name)
        quantized[name] = (*convert(var.get_value(), f"moe_blocks.mlp.experts.{name}"),
                           tuple(var.get_metadata("logical_axes")))
    model.moe_blocks.mlp.experts = FP8RoutedExperts(experts.cfg, quantized=quantized)
    return model


def resident_experts(model: Transformer, arrays: dict[str, tuple]) -> Transformer:
    """model (its routed experts' Param slots holding anything, e.g. the e4m3 weights themselves) with its routed
    experts replaced, in place, by FP8RoutedExperts of arrays {"moe_blocks.mlp.experts.<proj>": (e4m3 [..., I, O],
    scales [..., Ib, Ob])}, already on their devices: what load_checkpoint(weights="fp8") builds."""
    return _replace_experts(model, lambda w, name: arrays[name])


def quantize_experts(model: Transformer) -> Transformer:
    """The FP8-resident form of a loaded (dequantised) model, in place (returned too): every routed expert weight
    quantised per 128x128 block by k2jax.formats.quant.quantize (scale = block amax / 448, the release's rule) on the
    host, one matrix at a time (host memory: the e4m3 stacks and one float32 matrix), and placed with its
    weight's sharding (its scales: whole along the blocks). For models whose FP8 experts fit the host; the release
    itself is FP8 already (load it FP8-resident rather than dequantising and quantising again)."""
    return _replace_experts(model, _quantized)


def abstract_fp8_experts(model: Transformer) -> Transformer:
    """quantize_experts for an abstract model (k2jax.model.placement.abstract_model: ShapeDtypeStructs with
    shardings), in place: what an ahead-of-time compile of the FP8-resident programs lowers."""
    return _replace_experts(model, _abstract)
