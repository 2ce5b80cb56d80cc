"""128x128 block FP8 (e4m3) weights as the Kimi K2 / DeepSeek-V3 release stores them.

A [out, in] weight is stored as `weight` (float8_e4m3fn, same shape) plus `weight_scale_inv` (float32,
[ceil(out/128), ceil(in/128)]). Despite its name the scale is a multiplier:

    W[i, j] = float32(weight[i, j]) * weight_scale_inv[i // 128, j // 128]

The last row / column of blocks is ragged when a dimension is not a multiple of 128 (kv_a_proj_with_mqa has
kv_lora + rope = 576 rows): its scale covers only the rows and columns that exist.

`quantize` follows the rule the release was made with: scale = amax(|block|) / 448 (the e4m3 maximum), values
divided by it and rounded to nearest-even in e4m3. An all-zero block gets scale 1.

`check_scale` (run by `dequantize`, the checkpoint reader and the converter's validation) makes sure every
dequantised weight is finite: each scale is finite, > 0 and at most max_scale(dtype) = the largest value of the
target dtype / 448 (so 448 x scale, the largest |W| a block can hold, still fits: 7.6e35 for float32 and
bfloat16), and `dequantize` rejects the e4m3 NaN bit patterns.

These run on the host (NumPy, ml_dtypes) because the converter streams tensors through them; `dequantize`'s
arithmetic is the one block dequantisation of the project (`dequantize_blocks`,
pallas_kernels.fp8_grouped_matmul.dequantize: traceable, so the devices run it at load), jitted on the host.

Letter legend: O out rows, I in columns, Ob / Ib the scale grid's rows / columns (O and I in blocks).
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

from pallas_kernels.fp8_grouped_matmul import BLOCK
from pallas_kernels.fp8_grouped_matmul import dequantize as dequantize_blocks

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


class QuantError(ValueError):
    """An FP8 weight or scale that does not follow the release's format."""


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
    return float(ml_dtypes.finfo(dtype).max) / E4M3_MAX


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
    scale32 = scale_inv_ObIb.astype(np.float32)
    bound = max_scale(dtype)
    bad = ~(np.isfinite(scale32) & (scale32 > 0) & (scale32 <= bound))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise QuantError(f"{name}_scale_inv: block [{i}, {j}] is {float(scale32[i, j]):.7g}; scales must be finite, > 0 "
                         f"and at most {bound:.3g} (448 x scale must fit in {np.dtype(dtype).name})")
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
