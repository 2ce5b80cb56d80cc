"""The release's weight formats: 128x128 block FP8 (the July 2025 releases) and compressed-tensors INT4 groups
(K2-Thinking, K2.5 and later): parsing config.json's quantization_config into a scheme, validation,
dequantisation, quantisation and packing. The one place that knows them (no second copy elsewhere).

FP8 (`quantization_config` {"quant_method": "fp8", "weight_block_size": [128, 128]}): a [out, in] weight is stored
as `weight` (float8_e4m3fn, same shape) plus `weight_scale_inv` (float32, [ceil(out/128), ceil(in/128)]). Despite
its name the scale is a multiplier:

    W[i, j] = float32(weight[i, j]) * weight_scale_inv[i // 128, j // 128]

The last row / column of blocks is ragged when a dimension is not a multiple of 128 (kv_a_proj_with_mqa has
kv_lora + rope = 576 rows): its scale covers only the rows and columns that exist. `quantize` follows the rule the
release was made with: scale = amax(|block|) / 448 (the e4m3 maximum), values divided by it and rounded to
nearest-even in e4m3. An all-zero block gets scale 1. `check_scale` makes sure every dequantised weight is finite:
each scale is finite, > 0 and at most max_scale(dtype) = the largest value of the target dtype / 448 (7.6e35 for
float32 and bfloat16), and `dequantize` rejects the e4m3 NaN bit patterns.

INT4 (`quantization_config` {"quant_method": "compressed-tensors", "format": "pack-quantized", one config group
targeting Linear with weights {num_bits 4, type int, symmetric, strategy group, group_size G}, no activation
quantisation, an `ignore` list}: W4A16): each quantised [out, in] Linear is three tensors, `weight_packed` int32
[out, ceil(in/8)] (eight 4-bit values per int32 along `in`, the first in the low nibble, each stored as value + 8),
`weight_scale` (bfloat16 in the releases) [out, ceil(in/G)] and `weight_shape` (int64, or int32 in K2.5) = [out, in]:

    W[i, j] = (nibble(weight_packed[i, j // 8], j % 8) - 8) * weight_scale[i, j // G]

`parse_quantization_config` turns the config into an `Int4Scheme` (group size, the `ignore` list with its `re:`
patterns matched as compressed-tensors matches them: re.match from the start of the module name, otherwise the
exact name) and refuses, in one line naming the field, anything else (other bit widths, asymmetric / zero points,
activation or dynamic quantisation, act-order indices, other formats). `check_int4_scale` bounds the scales like the
FP8 ones: finite, > 0 and at most max_int4_scale(dtype) = max(dtype) / 8, so |W| <= 8 x scale fits. `quantize_int4`
is compressed-tensors' rule for this scheme (its calculate_qparams + quantize with float32 weights and bfloat16
scales): scale = bfloat16(amax(|group|) / 7.5) (0 -> bfloat16's eps), value = clamp(round_half_even(w / scale), -8,
7); `pack_int4` is its pack_to_int32, bit for bit.

These run on the host (NumPy, ml_dtypes) because the converter streams tensors through them; the dequantising
arithmetic is the project's one block / group dequantisation (pallas_kernels.fp8_grouped_matmul.dequantize,
pallas_kernels.int4_grouped_matmul.dequantize / unpack: traceable, so the devices run them at load), jitted here.

Letter legend: O out rows, I in columns, Ob / Ib the FP8 scale grid's rows / columns (O and I in blocks), P packed
int32 columns (ceil(I / 8)), S group scales per row (ceil(I / G)).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from pallas_kernels.fp8_grouped_matmul import BLOCK
from pallas_kernels.fp8_grouped_matmul import dequantize as dequantize_blocks
from pallas_kernels.int4_grouped_matmul import OFFSET as INT4_OFFSET
from pallas_kernels.int4_grouped_matmul import PACK as INT4_PACK
from pallas_kernels.int4_grouped_matmul import dequantize as dequantize_groups

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


class QuantError(ValueError):
    """A quantization_config, or a quantised weight or scale, that does not follow the release's format."""


def scale_shape(weight_shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    out, in_ = weight_shape
    return -(-out // block), -(-in_ // block)


# W = e4m3 x scale per block on the host's jax device (~5x NumPy's speed; bit-identical)
_dequantize_jit = jax.jit(dequantize_blocks, static_argnums=2)


def _expand(scale_ObIb: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    """The per-element view of a block scale grid, cropped to the weight's (possibly ragged) shape."""
    return np.repeat(np.repeat(scale_ObIb, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def dequantize(weight_OI: np.ndarray, scale_inv_ObIb: np.ndarray, dtype=np.float32, *, name: str = "weight",
               checked: bool = False) -> np.ndarray:
    """float32(weight) * weight_scale_inv per block, computed in float32 and cast to `dtype` (every value finite:
    see check_scale). checked: the caller already ran check_scale and check_no_nan (HFCheckpoint.read_fp8)."""
    weight_OI, scale_inv_ObIb = np.asarray(weight_OI), np.asarray(scale_inv_ObIb)
    if weight_OI.dtype != E4M3 or weight_OI.ndim != 2:
        raise QuantError(f"{name}: expected a 2-D float8_e4m3fn weight, got {weight_OI.dtype}{list(weight_OI.shape)}")
    if not checked:
        scale_inv_ObIb = check_scale(scale_inv_ObIb, weight_OI.shape, name=name, dtype=dtype)
        check_no_nan(weight_OI, name=name)
    return np.asarray(_dequantize_jit(weight_OI, scale_inv_ObIb.astype(np.float32), np.dtype(dtype)))


def max_scale(dtype=np.float32) -> float:
    """The largest scale whose block still dequantises to finite values of `dtype`: max(dtype) / 448."""
    return float(ml_dtypes.finfo(dtype).max) / E4M3_MAX  # as _check_bounded bounds it


def check_scale(scale_inv_ObIb: np.ndarray, weight_shape: tuple[int, int], *, name: str = "weight",
                block: int = BLOCK, dtype=np.float32) -> np.ndarray:
    """The scale as float32, after checking its grid shape and that every block is finite, > 0 and at most
    max_scale(dtype) (so every weight it dequantises to `dtype` is finite)."""
    scale_inv_ObIb = np.asarray(scale_inv_ObIb)
    want = scale_shape(weight_shape, block)
    if scale_inv_ObIb.shape != want:
        raise QuantError(f"{name}_scale_inv: expected shape {list(want)} for weight {list(weight_shape)}, "
                         f"got {list(scale_inv_ObIb.shape)}")
    if not np.issubdtype(scale_inv_ObIb.dtype, np.floating):
        raise QuantError(f"{name}_scale_inv: expected a float scale, got {scale_inv_ObIb.dtype}")
    return _check_bounded(scale_inv_ObIb, f"{name}_scale_inv: block", E4M3_MAX, dtype)


def _check_bounded(scale: np.ndarray, where: str, largest: float, dtype) -> np.ndarray:
    """scale as float32, after checking that every entry is finite, > 0 and at most max(dtype) / largest (the largest
    |value| a scale multiplies): otherwise a QuantError "<where> [i, j] is ...: scales must be ..."."""
    scale32 = scale.astype(np.float32)
    bound = float(ml_dtypes.finfo(dtype).max) / largest
    bad = ~(np.isfinite(scale32) & (scale32 > 0) & (scale32 <= bound))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise QuantError(f"{where} [{i}, {j}] is {float(scale32[i, j]):.7g}; scales must be finite, > 0 and at most "
                         f"{bound:.3g} ({largest:g} x scale must fit in {np.dtype(dtype).name})")
    return scale32


_LOW7, _ONES, _HIGH = (np.uint64(0x7F7F7F7F7F7F7F7F), np.uint64(0x0101010101010101),
                       np.uint64(0x8080808080808080))


def check_no_nan(weight: np.ndarray, *, name: str = "weight") -> None:
    """No e4m3 NaN bit pattern (S.1111.111) in an FP8 weight: it would dequantise to NaN. Eight bytes at a time
    (a byte's low 7 bits + 1 reach bit 7 only when they are all ones), ~3 GB/s: the converter runs it on every
    FP8 tensor."""
    weight = np.ascontiguousarray(weight)
    flat = weight.reshape(-1).view(np.uint8)
    whole = flat.size // 8 * 8
    words = flat[:whole].view(np.uint64) & _LOW7
    words += _ONES
    words &= _HIGH
    if words.any() or np.any((flat[whole:] & 0x7F) == 0x7F):
        where = np.unravel_index(int(np.argmax((flat & 0x7F) == 0x7F)), weight.shape)
        raise QuantError(f"{name}: element {list(map(int, where))} is an e4m3 NaN; an FP8 weight must be finite")


def quantize(weight_OI: np.ndarray, *, name: str = "weight", block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """-> (float8_e4m3fn weight [O, I], float32 weight_scale_inv [ceil(O/128), ceil(I/128)])."""
    w = np.asarray(weight_OI, dtype=np.float32)
    if w.ndim != 2:
        raise QuantError(f"{name}: expected a 2-D weight, got shape {list(w.shape)}")
    if not np.all(np.isfinite(w)):
        raise QuantError(f"{name}: has non-finite values; cannot quantise")
    Ob, Ib = scale_shape(w.shape, block)
    padded = np.zeros((Ob * block, Ib * block), np.float32)
    padded[: w.shape[0], : w.shape[1]] = np.abs(w)
    amax_ObIb = padded.reshape(Ob, block, Ib, block).max(axis=(1, 3))
    scale_ObIb = np.where(amax_ObIb > 0, amax_ObIb / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    scaled = np.clip(w / _expand(scale_ObIb, w.shape, block), -E4M3_MAX, E4M3_MAX)
    return scaled.astype(E4M3), scale_ObIb


# ---- the release's quantization_config ------------------------------------------------------------------------
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [BLOCK, BLOCK]}
INT4_GROUP_SIZE = 32
# K2-Thinking's (and K2.5's text model's) quantization_config: only the routed experts are INT4
K2_INT4_QUANTIZATION_CONFIG = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": INT4_GROUP_SIZE,
                    "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                    "symmetric": True, "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """128x128 block FP8 (e4m3 weights, float32 weight_scale_inv): every matmul but the router and lm_head."""

    config_json: str = json.dumps(FP8_QUANTIZATION_CONFIG, sort_keys=True)
    format = "fp8"

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    def to_json(self) -> dict:
        return {"format": self.format, "quantization_config": self.config}


@dataclasses.dataclass(frozen=True)
class Int4Scheme:
    """compressed-tensors pack-quantized W4A16 groups. A Linear (every matmul but the MoE router, which is not an
    nn.Linear in the release's modeling code) is INT4 unless a name of it matches the `ignore` list: its text
    model's name or the release's (text_prefixes: the release's prefixes of `model.` and `lm_head`, K2.5's
    "language_model.model." and "language_model."). scale_dtype / weight_shape_dtype: how the release stores
    weight_scale / weight_shape. HFCheckpoint fills in these three from the files; the writer stores them so."""

    group_size: int
    ignore: tuple[str, ...]
    config_json: str  # the release's quantization_config, as JSON (sorted keys)
    scale_dtype: str = "bfloat16"
    weight_shape_dtype: str = "int64"
    text_prefixes: tuple[str, str] = ("model.", "")
    format = "int4"

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    def ignores(self, *module_names: str) -> bool:
        """Whether an ignore entry matches one of the names (compressed-tensors' match_name: `re:` entries by
        re.match from the start, others by equality)."""
        return any(_matches(name, entry) for entry in self.ignore for name in module_names)

    def to_json(self) -> dict:
        return {"format": self.format, "quantization_config": self.config, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "weight_shape_dtype": self.weight_shape_dtype,
                "text_prefixes": list(self.text_prefixes)}


Scheme = Fp8Scheme | Int4Scheme


def _matches(name: str, entry: str) -> bool:
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else entry == name


def scheme_from_json(meta: Mapping[str, Any] | None) -> Scheme | None:
    """The inverse of a scheme's to_json (k2jax.json's "quantization"); None for None."""
    if meta is None:
        return None
    scheme = parse_quantization_config(meta.get("quantization_config"))
    if scheme is None or scheme.format != meta.get("format"):
        raise QuantError(f"quantization {meta!r}: format and quantization_config disagree")
    if isinstance(scheme, Int4Scheme):
        scheme = dataclasses.replace(scheme, scale_dtype=meta.get("scale_dtype", scheme.scale_dtype),
                                     weight_shape_dtype=meta.get("weight_shape_dtype", scheme.weight_shape_dtype),
                                     text_prefixes=tuple(meta.get("text_prefixes", scheme.text_prefixes)))
    return scheme


_INT4_GROUP_SIZES = (8, 16, 32, 64, 128)  # divide 128 and hold whole int32 words
_CT_FIELDS = {"config_groups", "quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme",
              "global_compression_ratio", "sparsity_config", "transform_config", "moe_sparsity_config", "version"}
_GROUP_FIELDS = {"targets", "weights", "input_activations", "output_activations", "format"}
_WEIGHT_FIELDS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
                  "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
_FLOAT_DTYPES = {"bfloat16", "float16", "float32"}


def parse_quantization_config(qc: Mapping[str, Any] | None) -> Scheme | None:
    """config.json's quantization_config -> None (unquantised), Fp8Scheme or Int4Scheme; anything k2jax cannot read
    exactly is a QuantError naming the field ("quantization_config.<path>: ...")."""
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise QuantError(f"quantization_config: expected an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "fp8":
        if list(qc.get("weight_block_size", [BLOCK, BLOCK])) != [BLOCK, BLOCK]:
            raise QuantError(f"quantization_config.weight_block_size {qc['weight_block_size']} is not supported "
                             f"(k2jax reads fp8 with 128x128 blocks)")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise QuantError(f"quantization_config.fmt {qc['fmt']!r} is not supported (expected 'e4m3')")
        return Fp8Scheme(json.dumps(dict(qc), sort_keys=True))
    if method != "compressed-tensors":
        raise QuantError(f"quantization_config.quant_method {method!r} is not supported (expected 'fp8' with "
                         f"128x128 blocks or 'compressed-tensors' pack-quantized INT4 groups)")
    return _parse_compressed_tensors(qc)


def _parse_compressed_tensors(qc: Mapping[str, Any]) -> Int4Scheme:
    def fail(field: str, msg: str):
        raise QuantError(f"quantization_config.{field}: {msg}")

    def known(d: Mapping, fields: set, at: str):
        unknown = sorted(set(d) - fields)
        if unknown:
            fail(f"{at}{unknown[0]}", "unknown field: k2jax does not know what it changes")

    known(qc, _CT_FIELDS, "")
    if qc.get("quantization_status", "compressed") != "compressed":
        fail("quantization_status", f"{qc['quantization_status']!r}: only 'compressed' (packed) weights are read")
    for field in ("kv_cache_scheme", "transform_config", "moe_sparsity_config"):
        if qc.get(field):
            fail(field, f"{qc[field]!r} is not supported (expected null)")
    if qc.get("sparsity_config"):
        fail("sparsity_config", f"{qc['sparsity_config']!r}: sparse weights are not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or len(groups) != 1:
        fail("config_groups", f"expected one group (W4A16 on the Linear layers), got {groups!r}")
    (group_name, group), = groups.items()
    at = f"config_groups.{group_name}."
    if not isinstance(group, Mapping):
        fail(at[:-1], f"expected a scheme object, got {group!r}")
    known(group, _GROUP_FIELDS, at)
    fmt = group.get("format") or qc.get("format")
    if fmt != "pack-quantized" or qc.get("format") not in ("pack-quantized", "mixed-precision", None):
        fail("format", f"{qc.get('format')!r} is not supported (expected 'pack-quantized' INT4)")
    if list(group.get("targets") or []) != ["Linear"]:
        fail(at + "targets", f"{group.get('targets')!r} is not supported (expected ['Linear'])")
    for side in ("input_activations", "output_activations"):
        if group.get(side) is not None:
            fail(at + side, f"{group[side]!r}: activation quantisation is not supported (W4A16 only)")
    w = group.get("weights")
    if not isinstance(w, Mapping):
        fail(at + "weights", f"expected the weights' quantisation arguments, got {w!r}")
    at += "weights."
    known(w, _WEIGHT_FIELDS, at)
    expect = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for field, want in expect.items():
        if w.get(field) != want:
            fail(at + field, f"{w.get(field)!r} is not supported (k2jax reads num_bits 4, type int, symmetric, "
                             f"strategy group)")
    if w.get("dynamic", False) is not False:
        fail(at + "dynamic", f"{w['dynamic']!r}: dynamic weight quantisation is not supported (expected false)")
    for field in ("block_structure", "zp_dtype"):
        if w.get(field) is not None:
            fail(at + field, f"{w[field]!r} is not supported (expected null)")
    if w.get("actorder") not in (None, False, "weight", "static"):
        fail(at + "actorder", f"{w['actorder']!r}: act-order group indices (weight_g_idx) are not supported")
    group_size = w.get("group_size")
    if group_size not in _INT4_GROUP_SIZES or isinstance(group_size, bool):
        fail(at + "group_size", f"{group_size!r} is not supported (expected one of {_INT4_GROUP_SIZES})")
    scale_dtype = str(w.get("scale_dtype") or "bfloat16").removeprefix("torch.")
    if scale_dtype not in _FLOAT_DTYPES:
        fail(at + "scale_dtype", f"{w['scale_dtype']!r} is not supported (expected one of {sorted(_FLOAT_DTYPES)})")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
        fail("ignore", f"expected a list of module names and 're:' patterns, got {ignore!r}")
    for entry in ignore:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                fail("ignore", f"{entry!r} is not a valid regular expression ({e})")
    return Int4Scheme(group_size, tuple(ignore), json.dumps(dict(qc), sort_keys=True), scale_dtype)


# ---- INT4 groups ----------------------------------------------------------------------------------------------
INT4_MAX = 8  # |value| <= 8: the largest dequantised magnitude is 8 x scale


def int4_shapes(weight_shape: tuple[int, int], group_size: int = INT4_GROUP_SIZE
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(weight_packed shape [O, ceil(I/8)], weight_scale shape [O, ceil(I/G)]) of an [O, I] weight."""
    out, in_ = weight_shape
    return (out, -(-in_ // INT4_PACK)), (out, -(-in_ // group_size))


def max_int4_scale(dtype=np.float32) -> float:
    """The largest group scale that still dequantises to finite values of `dtype`: max(dtype) / 8."""
    return float(ml_dtypes.finfo(dtype).max) / INT4_MAX


def check_int4_scale(scale_OS: np.ndarray, weight_shape: tuple[int, int], *, name: str = "weight",
                     group_size: int = INT4_GROUP_SIZE, dtype=np.float32, values: bool = True) -> np.ndarray:
    """The scale as stored, after checking its shape [O, ceil(I/G)], that it is a float, and (values) that every
    scale is finite, > 0 and at most max_int4_scale(dtype) (so every weight it dequantises to `dtype` is finite).
    values=False checks the layout alone (a header: np.broadcast_to(np.zeros((), dtype), shape))."""
    scale_OS = np.asarray(scale_OS)
    want = int4_shapes(weight_shape, group_size)[1]
    if scale_OS.shape != want:
        raise QuantError(f"{name}_scale: expected shape {list(want)} for weight_shape {list(weight_shape)} and group "
                         f"size {group_size}, got {list(scale_OS.shape)}")
    if scale_OS.dtype.name not in _FLOAT_DTYPES:
        raise QuantError(f"{name}_scale: expected a float scale, got {scale_OS.dtype}")
    if values:
        _check_bounded(scale_OS, f"{name}_scale: group", INT4_MAX, dtype)
    return scale_OS


def check_int4_packed(packed_OP: np.ndarray, weight_shape: tuple[int, int], *, name: str = "weight") -> np.ndarray:
    """weight_packed after checking it is int32 [O, ceil(I/8)]."""
    packed_OP = np.asarray(packed_OP)
    want = int4_shapes(weight_shape)[0]
    if packed_OP.dtype != np.int32 or packed_OP.shape != want:
        raise QuantError(f"{name}_packed: expected int32{list(want)} for weight_shape {list(weight_shape)}, got "
                         f"{packed_OP.dtype}{list(packed_OP.shape)}")
    return packed_OP


def check_weight_shape(stored: np.ndarray, weight_shape: tuple[int, int], *, name: str = "weight") -> None:
    """weight_shape is an integer [2] equal to the weight's [O, I]."""
    stored = np.asarray(stored)
    if stored.shape != (2,) or not np.issubdtype(stored.dtype, np.integer):
        raise QuantError(f"{name}_shape: expected an integer [2] ([out, in]), got {stored.dtype}{list(stored.shape)}")
    if tuple(map(int, stored)) != tuple(weight_shape):
        raise QuantError(f"{name}_shape: is {list(map(int, stored))}, the config implies {list(weight_shape)}")


# W = (nibble - 8) x scale per group on the host's jax device: the one INT4 dequantisation (pallas_kernels)
_dequantize_int4_jit = jax.jit(dequantize_groups, static_argnames=("axis", "size", "group_size", "dtype"))


def dequantize_int4(packed_OP: np.ndarray, scale_OS: np.ndarray, weight_shape: tuple[int, int], dtype=np.float32, *,
                    name: str = "weight", group_size: int = INT4_GROUP_SIZE, checked: bool = False) -> np.ndarray:
    """(nibble - 8) x scale per group, computed in float32 and cast to `dtype` (every value finite: see
    check_int4_scale). checked: the caller already ran check_int4_packed and check_int4_scale
    (HFCheckpoint.read_int4)."""
    if not checked:
        packed_OP = check_int4_packed(packed_OP, weight_shape, name=name)
        scale_OS = check_int4_scale(scale_OS, weight_shape, name=name, group_size=group_size, dtype=dtype)
    return np.asarray(_dequantize_int4_jit(packed_OP, scale_OS, axis=-1, size=int(weight_shape[1]),
                                           group_size=group_size, dtype=np.dtype(dtype)))


def pack_int4(values_OI: np.ndarray) -> np.ndarray:
    """int values in [-8, 7] [..., I] -> int32 [..., ceil(I/8)]: each stored as value + 8, eight per int32 along the
    last axis, the first in the low nibble, a ragged end padded with nibble 0 (compressed-tensors' pack_to_int32
    for 4 bits, bit for bit; the inverse of pallas_kernels.int4_grouped_matmul.unpack)."""
    values_OI = np.asarray(values_OI)
    if values_OI.size and (values_OI.min() < -INT4_OFFSET or values_OI.max() > INT4_OFFSET - 1):
        raise QuantError(f"pack_int4: values must be in [-8, 7], got [{values_OI.min()}, {values_OI.max()}]")
    nibbles = (values_OI.astype(np.int64) + INT4_OFFSET).astype(np.uint32)
    pad = -nibbles.shape[-1] % INT4_PACK
    nibbles = np.pad(nibbles, [(0, 0)] * (nibbles.ndim - 1) + [(0, pad)])
    nibbles = nibbles.reshape(nibbles.shape[:-1] + (-1, INT4_PACK))
    shifts = (4 * np.arange(INT4_PACK)).astype(np.uint32)
    return np.bitwise_or.reduce(nibbles << shifts, axis=-1).astype(np.uint32).view(np.int32)


_INT4_RANGE = np.float32(7.5)  # (q_max - q_min) / 2 for [-8, 7]: compressed-tensors' symmetric scale divisor


def quantize_int4(weight_OI: np.ndarray, *, name: str = "weight", group_size: int = INT4_GROUP_SIZE,
                  scale_dtype="bfloat16") -> tuple[np.ndarray, np.ndarray]:
    """-> (int32 weight_packed [O, ceil(I/8)], weight_scale [O, ceil(I/G)] in scale_dtype): compressed-tensors'
    symmetric group rule with float32 weights and scale_dtype scales (module docstring)."""
    w = np.asarray(weight_OI, dtype=np.float32)
    if w.ndim != 2:
        raise QuantError(f"{name}: expected a 2-D weight, got shape {list(w.shape)}")
    if not np.all(np.isfinite(w)):
        raise QuantError(f"{name}: has non-finite values; cannot quantise")
    (n_out, n_in), S = w.shape, -(-w.shape[1] // group_size)
    padded = np.zeros((n_out, S * group_size), np.float32)
    padded[:, :n_in] = w
    amax_OS = np.abs(padded).reshape(n_out, S, group_size).max(axis=-1)
    scale = (amax_OS / _INT4_RANGE).astype(scale_dtype)
    scale = np.where(scale == 0, ml_dtypes.finfo(scale_dtype).eps, scale).astype(scale_dtype)
    scaled = padded.reshape(n_out, S, group_size) / scale.astype(np.float32)[..., None]
    values = np.rint(np.clip(scaled, -INT4_OFFSET, INT4_OFFSET - 1)).astype(np.int8).reshape(n_out, -1)[:, :n_in]
    return pack_int4(values), scale
