"""Small building blocks: parameters with logical axes, RMSNorm, the dense SwiGLU MLP.

Every weight is an `nnx.Param` stored input-axes-first ([in, ...out]) and carries `logical_axes` metadata, the
names `sharding/` maps to mesh axes. HF stores linear weights [out, in]; `k2jax/formats/weight_layout.py` transposes.

Letter legend: B batch, T tokens, D hidden, F ffn, M matmul rows, I / O a matmul's in / out features.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.target import Target
from pallas_kernels.matmul import matmul


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], cfg: K2Config, *, fan_in: int | None = None,
           n_batch: int = 0, n_in: int = 1) -> nnx.Param:
    """A matmul weight, N(0, initializer_range) truncated at 2 sigma (scaled down for fan_in > hidden when
    given), in cfg.run.param_dtype, tagged with its logical axes and `matrix_axes` = (n_in, n_out): its last
    n_in + n_out axes are the matrix [in..., out...] (leading axes, like experts or stacked layers, are batch
    axes). The optimizer reads fan-in / fan-out from this."""
    if len(shape) != len(axes):
        raise ValueError(f"weight shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
    n_out = len(shape) - n_batch - n_in
    if n_in < 1 or n_out < 1:
        raise ValueError(f"weight {tuple(axes)}: n_batch={n_batch}, n_in={n_in} leave no output axis")
    std = cfg.initializer_range
    if fan_in is not None and fan_in > cfg.hidden_size:
        std *= math.sqrt(cfg.hidden_size / fan_in)
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(cfg.run.param_dtype)), logical_axes=tuple(axes),
                     matrix_axes=(n_in, n_out))


def ones(shape: Sequence[int], axes: Sequence[str], cfg: K2Config) -> nnx.Param:
    return nnx.Param(jnp.ones(tuple(shape), jnp.dtype(cfg.run.param_dtype)), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """x / rms(x) · weight, computed in float32 and returned in `out_dtype` (the compute dtype)."""

    def __init__(self, dim: int, cfg: K2Config, *, eps: float, axis_name: str):
        self.weight = ones((dim,), (axis_name,), cfg)
        self.eps = eps
        self.out_dtype = jnp.dtype(cfg.run.dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(self.out_dtype)


def swiglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.silu(gate) * up


def project(x: jnp.ndarray, w: jnp.ndarray, n_in: int = 1, *, impl: str = "xla",
            preferred_element_type=None) -> jnp.ndarray:
    """Contracts the last `n_in` axes of x with the first `n_in` of w: [..., *in] x [*in, *out] -> [..., *out].

    Done as one 2-D matmul over all leading (token) axes (XLA's CPU backward of a 2-D matmul is about 1.5x faster
    than that of the equivalent multi-axis einsum; on TPU/GPU it is the same op) in the form `impl`
    (pallas_kernels.matmul; k2jax.model.target's `matmul` for the platform compiled for)."""
    lead, inner = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    y = matmul(x.reshape(-1, inner), w.reshape(inner, -1), impl=impl, preferred_element_type=preferred_element_type)
    return y.reshape(lead + w.shape[n_in:])


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x·gate) ⊙ x·up). Used for the dense blocks and the shared experts."""

    def __init__(self, cfg: K2Config, ffn_dim: int, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.gate_proj = weight(rngs, (D, ffn_dim), ("embed", "mlp"), cfg)
        self.up_proj = weight(rngs, (D, ffn_dim), ("embed", "mlp"), cfg)
        self.down_proj = weight(rngs, (ffn_dim, D), ("mlp", "embed"), cfg, fan_in=ffn_dim)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.run.dtype)

    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        x = x_BTD.astype(self.dtype)
        mm = functools.partial(project, impl=Target.of(self.cfg).matmul)
        h_BTF = swiglu(mm(x, self.gate_proj[...].astype(self.dtype)), mm(x, self.up_proj[...].astype(self.dtype)))
        return mm(h_BTF, self.down_proj[...].astype(self.dtype))
