"""Rotary position embedding with YaRN scaling, as the K2 / DeepSeek-V3 release defines it.

Frequencies: for rope pair i of R/2, inv_freq_i = theta^(-2i/R); YaRN blends the interpolated 1/(factor·theta^(2i/R))
and the original frequency with a linear ramp between the correction dims of beta_fast and beta_slow rotations
over original_max_position_embeddings. cos/sin are multiplied by mscale(factor, mscale)/mscale(factor,
mscale_all_dim) and the softmax scale is qk_head_dim^-0.5 · mscale(factor, mscale_all_dim)^2.

Layout: with `rope_interleave` (the release's layout) a vector's rope dims are pairs (x0, x1), (x2, x3), ...;
otherwise halves (x_i, x_{i+R/2}). Either way the rotated vector comes out as [x1·cos − x2·sin, x2·cos + x1·sin]
(halves). q and k go through the same map, so q·k is what the release computes.

Letter legend: B batch, T tokens, R rope dim, Z = R/2 rope frequencies (pairs).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from k2jax.model.config import K2Config


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 · mscale · ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(cfg: K2Config) -> np.ndarray:
    """[R/2] float64 inverse frequencies, YaRN-corrected when cfg.rope_scaling is set."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1.0 / pos_freqs
    s = cfg.rope_scaling
    if s is None:
        return extrapolation
    interpolation = 1.0 / (s.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep_original = 1.0 - ramp
    return interpolation * (1.0 - keep_original) + extrapolation * keep_original


def cos_sin_scale(cfg: K2Config) -> float:
    """The factor YaRN multiplies cos and sin by (1.0 for K2, whose mscale equals mscale_all_dim)."""
    s = cfg.rope_scaling
    if s is None:
        return 1.0
    return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)


def softmax_scale(cfg: K2Config) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = cfg.qk_head_dim ** -0.5
    s = cfg.rope_scaling
    if s is not None and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def rope_tables(cfg: K2Config, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, T, R/2] in float32 for integer positions."""
    inv = jnp.asarray(inv_frequencies(cfg), jnp.float32)
    angles_BTZ = positions_BT.astype(jnp.float32)[..., None] * inv
    scale = cos_sin_scale(cfg)
    return jnp.cos(angles_BTZ) * scale, jnp.sin(angles_BTZ) * scale


def apply_rope(x_BTxR: jnp.ndarray, cos_BTZ: jnp.ndarray, sin_BTZ: jnp.ndarray, *, interleave: bool) -> jnp.ndarray:
    """Rotates the last axis of x [B, T, (heads,) R]; cos/sin [B, T, R/2] broadcast over any heads axis.
    Computed in float32, returned in x's dtype."""
    x = x_BTxR.astype(jnp.float32)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    extra = x.ndim - cos_BTZ.ndim
    cos = cos_BTZ.reshape(cos_BTZ.shape[:2] + (1,) * extra + cos_BTZ.shape[2:])
    sin = sin_BTZ.reshape(cos.shape)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTxR.dtype)
