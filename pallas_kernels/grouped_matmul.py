"""Grouped matmuls for routed experts: rows sorted by group, each group's rows multiplied by its own weights.

    grouped_matmul(x, w, sizes)            out[i] = x[i] @ w[g(i)]
    grouped_ffn(x, w_gate, w_up, w_down, sizes)
                                           out[i] = (silu(x[i] @ w_gate[g]) * (x[i] @ w_up[g])) @ w_down[g]

where rows [start_g, start_g + sizes[g]) belong to group g (`sharding.group_rows` puts routed rows in this
layout and back); rows past sum(sizes) come out as zeros.

One dispatch point, `impl=`:
  - "ragged_dot": `jax.lax.ragged_dot`, the XLA reference every other form is tested against. Its forward is native
    on TPU; its weight gradient compiles to a dense form that multiplies every row by every group's matrix (G x the
    work) on TPU and GPU, and on CPU and GPU so does its forward.
  - "pallas" / "interpret": the Pallas kernel of `pallas_kernels.fp8_grouped_matmul` (plain-weight mode; its weight
    gradient by `pallas_kernels.grouped_weight_grad`), compiled or run by the Pallas interpreter.
  - "auto": "pallas" when compiling for TPU / GPU, "ragged_dot" for CPU (`backend.target_platform`).
The CPU form that does only the routed work is `k2jax.model.cpu_grouped_ffn` (the model picks it through
k2jax.model.target).

Letter legend: M rows, I / O a matmul's in (contraction) / out features, D the FFN's in and out width (hidden),
F ffn, G groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import target_platform
from pallas_kernels.fp8_grouped_matmul import fp8_grouped_matmul

IMPLS = ("auto", "ragged_dot", "pallas", "interpret")


def _resolve(impl: str) -> str:
    if impl == "auto":
        return "ragged_dot" if target_platform() == "cpu" else "pallas"
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul: impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_shapes(x_MI, ws, group_sizes_G):
    """x [M, I], weights [G, I, .] and group_sizes [G] agree, or one line says how they do not."""
    if x_MI.ndim != 2 or group_sizes_G.ndim != 1 or any(w.ndim != 3 for w in ws):
        raise ValueError(f"grouped matmul: expected x [M, I], weights [G, ., .], group_sizes [G]; got "
                         f"{x_MI.shape}, {[w.shape for w in ws]}, {group_sizes_G.shape}")
    if x_MI.shape[1] != ws[0].shape[1] or any(w.shape[0] != group_sizes_G.shape[0] for w in ws):
        raise ValueError(f"grouped matmul: x {x_MI.shape}, weights {[w.shape for w in ws]} and group_sizes "
                         f"{group_sizes_G.shape} do not agree")


# ---- references (XLA) ---------------------------------------------------------------------------------------
def reference(x_MI: jax.Array, w_GIO: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """The XLA reference: jax.lax.ragged_dot."""
    return jax.lax.ragged_dot(x_MI, w_GIO.astype(x_MI.dtype), group_sizes_G.astype(jnp.int32))


def reference_ffn(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, group_sizes_G) -> jax.Array:
    gate = reference(x_MD, w_gate_GDF, group_sizes_G)
    up = reference(x_MD, w_up_GDF, group_sizes_G)
    return reference(jax.nn.silu(gate) * up, w_down_GFD, group_sizes_G)


# ---- dispatch ------------------------------------------------------------------------------------------------
def grouped_matmul(x_MI: jax.Array, w_GIO: jax.Array, group_sizes_G: jax.Array, *, impl: str = "auto",
                   launch: dict | None = None, rows_in_use: int | None = None) -> jax.Array:
    """[M, I] rows sorted by group, [G, I, O] weights, [G] sizes -> [M, O] in x's dtype. launch: keyword
    arguments of the Pallas kernel (platform, Triton settings: k2jax.model.target.Target.launch) for impl "pallas".
    rows_in_use: the rows expected to hold data, for the kernels' cost estimates (fp8_grouped_matmul)."""
    check_shapes(x_MI, (w_GIO,), group_sizes_G)
    impl = _resolve(impl)
    if impl == "ragged_dot":
        return reference(x_MI, w_GIO, group_sizes_G)
    return fp8_grouped_matmul(x_MI, w_GIO.astype(x_MI.dtype), group_sizes_G, backend=impl, rows_in_use=rows_in_use,
                              **(launch or {}))


def grouped_ffn(x_MD: jax.Array, w_gate_GDF: jax.Array, w_up_GDF: jax.Array, w_down_GFD: jax.Array,
                group_sizes_G: jax.Array, *, impl: str = "auto", launch: dict | None = None,
                rows_in_use: int | None = None) -> jax.Array:
    """SwiGLU expert FFN over rows sorted by group -> [M, D] in x's dtype. launch, rows_in_use: see
    grouped_matmul."""
    check_shapes(x_MD, (w_gate_GDF, w_up_GDF), group_sizes_G)
    if w_down_GFD.shape != w_gate_GDF.shape[:1] + w_gate_GDF.shape[2:] + x_MD.shape[1:]:
        raise ValueError(f"grouped_ffn: w_down {w_down_GFD.shape} does not fit w_gate {w_gate_GDF.shape}")
    impl = _resolve(impl)
    if impl == "ragged_dot":
        return reference_ffn(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, group_sizes_G)
    mm = functools.partial(grouped_matmul, group_sizes_G=group_sizes_G, impl=impl, launch=launch,
                           rows_in_use=rows_in_use)
    return mm(jax.nn.silu(mm(x_MD, w_gate_GDF)) * mm(x_MD, w_up_GDF), w_down_GFD)
