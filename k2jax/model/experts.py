"""The routed experts: their stacked SwiGLU weights in one of three formats, and the dropless grouped FFN over them.

    experts = RoutedExperts(cfg, rngs=rngs)                          # plain (trained) weights
    experts = RoutedExperts(cfg, rngs=rngs, fmt="int4")              # or "fp8": the format is a constructor option
    y_TD, dropped = experts(x_TD, weights_TK, ids_TK)                # the same call in every format
    model = k2jax.Transformer(cfg, rngs=rngs, expert_format="fp8")   # a whole model's experts in one format
    model = quantize_experts(model, "int4")   # a loaded plain model's experts quantised on the host, in place

Formats (`fmt`, pallas_kernels.expert_weights.FORMATS); every weight is [in, out] like every k2jax weight, with
leading expert (and, stacked over the scanned MoE blocks, layer) axes:
  "plain"  nnx.Param gate_proj / up_proj [E, D, F], down_proj [E, F, D] in cfg.run.param_dtype: the trained form.
  "fp8"    FP8Weight float8_e4m3fn (the same shapes) and FP8Scale `<proj>_scale_inv` float32 [E, ceil(I/128),
           ceil(O/128)]: the K2 / K2-0905 release's weights and weight_scale_inv transposed, W = float32(w) x scale
           per 128x128 block. A scale's logical axes are its weight's leading ones, then SCALE_AXIS twice, which no
           sharding strategy splits: the scales follow their weight on the expert / layer axes and are whole along
           the blocks (1/16384 of the weight's elements).
  "int4"   Int4Weight int32 [E, ceil(I/8), O], eight 4-bit values per int32 along I (compressed-tensors
           pack-quantized: the K2-Thinking / K2.5+ release's weight_packed transposed, not repacked) and Int4Scale
           `<proj>_scale` [E, ceil(I/group_size), O] (the release's weight_scale transposed, bf16), W = (nibble - 8)
           x scale. The scales carry their weight's logical axes: they split with it (1/8 of its bytes).
FP8 and INT4 weights are frozen (not nnx.Param: optimizers and `nnx.state(model, nnx.Param)` leave them out):
inference only; gradients reach the FFN's input, so the rest of a model can still be differentiated. A random init
in those formats draws e4m3 / 4-bit values directly (a random model of the plain init's scale); the loaders
(`k2jax.load_checkpoint` / `load_hf_checkpoint(weights=...)`) fill them from a checkpoint.

The FFN: the T·K (token, expert) rows are sorted by expert and run through `pallas_kernels.grouped_matmul.grouped_ffn`
in the form k2jax.model.target picks (Pallas kernels on TPU / GPU, the tiled loop on CPU), then unsorted and
combined with the router weights. Under a mesh (`with jax.set_mesh(mesh):`) each device routes its own tokens
(`sharding.per_shard`); with an `expert` axis the experts run expert-parallel (`sharding.expert_parallel`: a ragged
all-to-all takes each row to the device owning its expert, the weights and scales split on the expert axis).

Letter legend: L layers, E experts, T tokens, K top-k, D hidden, F expert ffn, I / O a weight's in / out features,
M routed rows.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.formats import quant
from k2jax.model.config import K2Config
from k2jax.model.layers import weight
from k2jax.model.target import Target
from pallas_kernels.expert_weights import FORMATS, ExpertWeights
from pallas_kernels.fp8_grouped_matmul import BLOCK, FP8
from pallas_kernels.grouped_matmul import grouped_ffn
from pallas_kernels.int4_grouped_matmul import GROUP_SIZE, PACK
from sharding.expert_parallel import EXPERT_AXIS, expert_parallel_enabled, expert_parallel_ffn
from sharding.group_rows import combine_sorted, sort_by_group
from sharding.per_shard import per_shard

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = tuple(f"moe_blocks.mlp.experts.{p}" for p in PROJECTIONS)  # their names in checkpoints
SCALE_SUFFIX = {"fp8": "_scale_inv", "int4": "_scale"}  # a projection's scales: `<proj><suffix>` (release names)
SCALE_AXIS = "scale_blocks"  # an FP8 block-scale grid's matrix axes (sharding.LOGICAL_AXES; never split)
INT4_SCALE_DTYPE = jnp.bfloat16  # the releases' weight_scale dtype
# what a loader's weights= option holds the routed experts as (k2jax.load_checkpoint, load_hf_checkpoint, k2jax-aot's
# infer.weights): "dequantized" to param_dtype, or resident in the release's own quantised format
EXPERT_FORMAT_OF_WEIGHTS = {"dequantized": "plain", "fp8": "fp8", "int4": "int4"}
WEIGHTS = tuple(EXPERT_FORMAT_OF_WEIGHTS)


def expert_format_of(weights: str, option: str) -> str:
    """The routed experts' form ("plain" | "fp8" | "int4") for a weights= option; for any other value a ValueError
    naming `option` (e.g. "load_checkpoint: weights") and the choices. The one check of weights= (the loaders,
    k2jax-aot's infer.weights)."""
    if weights not in EXPERT_FORMAT_OF_WEIGHTS:
        raise ValueError(f"{option} must be one of {WEIGHTS}, got {weights!r}")
    return EXPERT_FORMAT_OF_WEIGHTS[weights]


class FP8Weight(nnx.Variable):
    """A float8_e4m3fn expert weight stack, frozen (not an nnx.Param)."""


class FP8Scale(nnx.Variable):
    """The float32 128x128 block scales of an FP8Weight (multipliers: W = float32(w) x scale)."""


class Int4Weight(nnx.Variable):
    """An INT4 expert weight stack, eight 4-bit values per int32 along the input axis, frozen."""


class Int4Scale(nnx.Variable):
    """The group scales of an Int4Weight (W = (nibble - 8) x scale, one scale per group_size inputs)."""


def scale_axes(weight_axes: tuple[str, ...], fmt: str) -> tuple[str, ...]:
    """A scale's logical axes: FP8's are its weight's leading (expert, layer) axes, then SCALE_AXIS twice; INT4's
    are its weight's."""
    return tuple(weight_axes) if fmt == "int4" else tuple(weight_axes[:-2]) + (SCALE_AXIS, SCALE_AXIS)


def stored_shapes(fmt: str, shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> tuple[tuple, tuple | None]:
    """(weight shape, scale shape or None) of a plain [..., I, O] weight held in `fmt`."""
    *lead, I, O = shape
    lead = tuple(lead)
    if fmt == "plain":
        return tuple(shape), None
    if fmt == "fp8":
        return tuple(shape), lead + (-(-I // BLOCK), -(-O // BLOCK))
    return lead + (-(-I // PACK), O), lead + (-(-I // group_size), O)


class RoutedExperts(nnx.Module):
    """The routed experts' stacked SwiGLU weights in `fmt` and their dropless grouped FFN (module docstring).
    arrays: {projection: (weight, scale or None)} already in `fmt`'s stored form (with the logical axes `axes`:
    {projection: axes}) instead of a random init, e.g. quantize_experts' output; rngs is then unused."""

    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs | None = None, fmt: str = "plain",
                 group_size: int = GROUP_SIZE, arrays: dict | None = None, axes: dict | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"RoutedExperts: fmt must be one of {FORMATS}, got {fmt!r}")
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        shapes = {"gate_proj": (E, D, F), "up_proj": (E, D, F), "down_proj": (E, F, D)}
        default_axes = {"gate_proj": ("expert", "embed", "moe_mlp"), "up_proj": ("expert", "embed", "moe_mlp"),
                        "down_proj": ("expert", "moe_mlp", "embed")}
        self.cfg, self.fmt, self.group_size = cfg, fmt, group_size
        self.dtype = jnp.dtype(cfg.run.dtype)
        for name in PROJECTIONS:
            ax = tuple(axes[name]) if axes else default_axes[name]
            if arrays is not None:
                w, s = arrays[name]
            elif fmt == "plain":
                setattr(self, name, weight(rngs, shapes[name], ax, cfg, fan_in=D if name != "down_proj" else F,
                                           n_batch=1))
                continue
            else:
                w, s = _random(fmt, shapes[name], rngs.params(), _init_std(cfg, name), group_size)
            self._set(name, w, s, ax)

    def _set(self, name: str, w, s, axes: tuple[str, ...]) -> None:
        if self.fmt == "plain":
            setattr(self, name, nnx.Param(w, logical_axes=axes, matrix_axes=(1, 1)))
            return
        weight_cls, scale_cls = (FP8Weight, FP8Scale) if self.fmt == "fp8" else (Int4Weight, Int4Scale)
        setattr(self, name, weight_cls(w, logical_axes=axes))
        setattr(self, name + SCALE_SUFFIX[self.fmt], scale_cls(s, logical_axes=scale_axes(axes, self.fmt)))

    def weights(self, dtype=None) -> ExpertWeights:
        """The stored arrays as an ExpertWeights (plain weights cast to `dtype` when given)."""
        ws = [getattr(self, n)[...] for n in PROJECTIONS]
        if self.fmt == "plain":
            return ExpertWeights("plain", *(w if dtype is None else w.astype(dtype) for w in ws))
        scales = [getattr(self, n + SCALE_SUFFIX[self.fmt])[...] for n in PROJECTIONS]
        return ExpertWeights(self.fmt, *ws, *scales, group_size=self.group_size if self.fmt == "int4" else 0)

    @jax.named_scope("experts")
    def __call__(self, x_TD: jnp.ndarray, weights_TK: jnp.ndarray, ids_TK: jnp.ndarray, *,
                 stack: tuple[ExpertWeights, jax.Array] | None = None, layout: str = "default"
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """-> (sum of each token's routed experts' outputs [T, D], routed rows dropped by expert parallelism's
        receive buffer (cfg.run.ep_capacity_factor; always 0 without EP or when dropless)). stack: the experts of all
        scanned MoE blocks ([L, E, ...], gradient stopped) and this block's index among them, which the forms read
        in place (pallas_kernels.grouped_matmul): unsharded, and under expert parallelism when the mesh splits the
        weights over `expert` only (inference meshes). layout: the step's activation layout (sharding.rules)."""
        E = self.cfg.n_routed_experts
        target = Target.of(self.cfg)
        mesh = jax.sharding.get_abstract_mesh()
        ffn = functools.partial(grouped_ffn, impl=target.moe_impl, platform=target.platform,
                                fp8_activations=target.fp8_activations and self.fmt == "fp8")
        experts = self.weights(self.dtype)
        x_TD = x_TD.astype(self.dtype)
        if expert_parallel_enabled(mesh, E):
            # the stacks are read in place only where the mesh splits them over `expert` alone: a split over
            # fsdp would gather every layer's weights to each expert group, per layer
            whole = all(n == 1 for a, n in dict(mesh.shape).items() if a not in (EXPERT_AXIS, "data"))
            # a decode step's tokens are whole on every device (sharding.rules): no exchange, the outputs summed
            every_row = layout == "decode"
            y_TD, dropped = expert_parallel_ffn(x_TD, weights_TK, ids_TK, experts, ffn=ffn, impl=target.ep_exchange,
                                                capacity_factor=self.cfg.run.ep_capacity_factor,
                                                stack=stack if whole else None, every_row=every_row)
            return y_TD.astype(self.dtype), dropped
        stack = stack if mesh.empty else None  # per_shard would gather the stacks' fsdp splits whole, per layer

        leaves, treedef = jax.tree.flatten(experts)

        def route_and_run(x_TD, weights_TK, ids_TK, *leaves):
            order_M, group_sizes_E = sort_by_group(ids_TK, E)
            y_MD = ffn(x_TD[order_M // ids_TK.shape[1]], jax.tree.unflatten(treedef, leaves), group_sizes_E,
                       stack=stack)
            return combine_sorted(y_MD, order_M, weights_TK)

        tokens, whole = ("tokens", None), tuple((None,) * a.ndim for a in leaves)
        y_TD = per_shard(route_and_run, in_axes=(tokens,) * 3 + whole, out_axes=tokens, layout=layout)(
            x_TD, weights_TK, ids_TK, *leaves).astype(self.dtype)
        return y_TD, jnp.zeros((), jnp.int32)


# ---- random init in the frozen formats ---------------------------------------------------------------------------
def _init_std(cfg: K2Config, name: str) -> float:
    """The plain init's std (k2jax.model.layers.weight: scaled down for fan-in > hidden)."""
    fan_in = cfg.moe_intermediate_size if name == "down_proj" else cfg.hidden_size
    return cfg.initializer_range * math.sqrt(min(1.0, cfg.hidden_size / fan_in))


_INT4_STD = math.sqrt((16 ** 2 - 1) / 12)  # std of a value uniform over the 16 levels -8 .. 7


def _random(fmt: str, shape, key, std: float, group_size: int):
    """A random weight in `fmt`'s stored form whose values have about `std`: FP8 truncated-normal e4m3 values with
    every block scale std; INT4 uniformly random nibbles (random bits) with every group scale std / 4.6."""
    w_shape, s_shape = stored_shapes(fmt, shape, group_size)
    if fmt == "fp8":
        w = jax.random.truncated_normal(key, -2.0, 2.0, w_shape, jnp.float32).astype(FP8)
        return w, jnp.full(s_shape, std, jnp.float32)
    w = jax.lax.bitcast_convert_type(jax.random.bits(key, w_shape, jnp.uint32), jnp.int32)
    return w, jnp.full(s_shape, std / _INT4_STD, INT4_SCALE_DTYPE)


# ---- a model's experts in another format -------------------------------------------------------------------------
def scale_sharding(sharding, ndim: int, fmt: str = "fp8"):
    """The sharding of the scales of a weight of `ndim` dims placed with `sharding`: FP8: a NamedSharding's split of
    the leading (expert, layer) axes with the last two axes whole (as sharding/rules.py lays out SCALE_AXIS); INT4:
    the weight's own. Any other sharding (or None) as it is."""
    if fmt == "int4" or not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], None, None))


def _quantized(fmt: str, group_size: int):
    """convert(w [..., I, O], name) -> (weight, scale) in `fmt` on w's devices: k2jax.formats.quant's quantiser
    over every [I, O] matrix on the host, one matrix in float32 at a time."""
    def convert(w, name):
        w_shape, s_shape = stored_shapes(fmt, w.shape, group_size)
        q = np.empty(w_shape, quant.E4M3 if fmt == "fp8" else np.int32)
        s = np.empty(s_shape, np.float32 if fmt == "fp8" else INT4_SCALE_DTYPE)
        for idx in np.ndindex(*w.shape[:-2]):
            matrix = np.asarray(w[idx], np.float32)
            if fmt == "fp8":
                q[idx], s[idx] = quant.quantize(matrix, name=f"{name}{list(idx)}")
            else:  # the release's groups run along its [out, in] rows: quantise the transpose
                packed, scale = quant.quantize_int4(matrix.T, group_size=group_size, name=f"{name}{list(idx)}")
                q[idx], s[idx] = packed.T, scale.T
        sharding = getattr(w, "sharding", None)
        return jax.device_put(q, sharding), jax.device_put(s, scale_sharding(sharding, w.ndim, fmt))
    return convert


def _abstract(fmt: str, group_size: int):
    """convert for an abstract weight (a ShapeDtypeStruct with a sharding): the stored form's ShapeDtypeStructs."""
    def convert(w, name):
        del name
        w_shape, s_shape = stored_shapes(fmt, w.shape, group_size)
        sharding = getattr(w, "sharding", None)
        return (jax.ShapeDtypeStruct(w_shape, FP8 if fmt == "fp8" else jnp.int32, sharding=sharding),
                jax.ShapeDtypeStruct(s_shape, jnp.float32 if fmt == "fp8" else INT4_SCALE_DTYPE,
                                     sharding=scale_sharding(sharding, w.ndim, fmt)))
    return convert


def _replace_experts(model, fmt: str, convert: Callable, group_size: int = GROUP_SIZE):
    """model (a k2jax.Transformer) with its plain routed experts replaced, in place, by RoutedExperts in `fmt` whose
    arrays are convert(plain weight, name) -> (weight, scale) per projection."""
    if model.moe_blocks is None:
        return model
    experts = model.moe_blocks.mlp.experts
    if experts.fmt != "plain":
        raise ValueError(f"quantize_experts: the routed experts are {experts.fmt} already")
    arrays, axes = {}, {}
    for name in PROJECTIONS:
        var = getattr(experts, name)
        arrays[name] = convert(var.get_value(), f"moe_blocks.mlp.experts.{name}")
        axes[name] = tuple(var.get_metadata("logical_axes"))
    model.moe_blocks.mlp.experts = RoutedExperts(experts.cfg, fmt=fmt, group_size=group_size, arrays=arrays,
                                                 axes=axes)
    return model


def quantize_experts(model, fmt: str = "fp8", *, group_size: int = GROUP_SIZE):
    """The FP8- or INT4-resident form of a loaded plain model, in place (returned too): every routed expert weight
    quantised by k2jax.formats.quant on the host (FP8: per 128x128 block, scale = block amax / 448, the release's
    rule; INT4: per group of `group_size` inputs, symmetric, as compressed-tensors does), one matrix at a time
    (host memory: the quantised stacks and one float32 matrix), and placed with its weight's sharding. For models
    whose quantised experts fit the host; a release is quantised already (load it resident rather than
    dequantising and quantising again)."""
    if fmt not in ("fp8", "int4"):
        raise ValueError(f"quantize_experts: fmt must be 'fp8' or 'int4', got {fmt!r}")
    return _replace_experts(model, fmt, _quantized(fmt, group_size), group_size)


def abstract_quantized_experts(model, fmt: str, *, group_size: int = GROUP_SIZE):
    """quantize_experts for an abstract model (ShapeDtypeStructs with shardings), in place: what an ahead-of-time
    compile of the FP8 / INT4-resident programs lowers."""
    return _replace_experts(model, fmt, _abstract(fmt, group_size), group_size)
