"""A dense 2-D matmul in the form chosen for the platform compiled for (k2jax.model.target's `matmul`):

    y_MO = matmul(x_MI, w_IO, impl="xla" | "cpu", preferred_element_type=None)

"xla" is jnp.dot with XLA's own gradient (TPU / GPU). "cpu" is the same product whose weight gradient multiplies an
explicitly transposed x: XLA:CPU runs a matmul with a transposed left operand at half speed (a [1024, 512]ᵀ x
[1024, 8192] lm_head gradient: 94 ms vs 50 ms with the 2 MB transpose done first; the optimization barrier keeps
XLA from folding the transpose back into the dot).

Letter legend: M rows, I in (contraction) features, O out features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_matmul(x_MI, w_IO, out_dtype=None):
    """jnp.dot(x, w, preferred_element_type=out_dtype) with the CPU-friendly weight gradient."""
    return jnp.dot(x_MI, w_IO, preferred_element_type=out_dtype)


def _fwd(x_MI, w_IO, out_dtype):
    return cpu_matmul(x_MI, w_IO, out_dtype), (x_MI, w_IO)


def _bwd(out_dtype, res, g_MO):
    x_MI, w_IO = res
    g_MO = g_MO.astype(jnp.promote_types(x_MI.dtype, w_IO.dtype))
    f32 = jnp.float32
    dx = jax.lax.dot_general(g_MO, w_IO, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    dw = jnp.dot(jax.lax.optimization_barrier(x_MI.T), g_MO, preferred_element_type=f32)
    return dx.astype(x_MI.dtype), dw.astype(w_IO.dtype)


cpu_matmul.defvjp(_fwd, _bwd)


IMPLS = ("xla", "cpu")


def matmul(x_MI: jax.Array, w_IO: jax.Array, *, impl: str, preferred_element_type=None) -> jax.Array:
    """x @ w in the form `impl` (module docstring)."""
    if impl == "cpu":
        return cpu_matmul(x_MI, w_IO, preferred_element_type)
    if impl != "xla":
        raise ValueError(f"matmul: impl must be one of {IMPLS}, got {impl!r}")
    return jnp.dot(x_MI, w_IO, preferred_element_type=preferred_element_type)
