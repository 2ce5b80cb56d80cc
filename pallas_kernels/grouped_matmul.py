"""The routed experts' grouped matmul and SwiGLU FFN: one dispatch over the weight formats and the forms that run them.

    y_MD = grouped_ffn(x_MD, experts, group_sizes_G, impl="pallas", platform="tpu")
    y_MO = grouped_matmul(x_MI, w_GIO, group_sizes_G, impl="interpret")        # one matmul, plain weights

where rows [start_g, start_g + sizes[g]) belong to group g (`sharding.group_rows` puts routed rows in this layout
and back), experts is a `pallas_kernels.expert_weights.ExpertWeights` ("plain", "fp8" or "int4"), and

    grouped_ffn:     out[i] = (silu(x[i] @ gate[g]) * (x[i] @ up[g])) @ down[g]
    grouped_matmul:  out[i] = x[i] @ w[g]

Rows past sum(sizes) come out as zeros.

Forms (`impl`, one of IMPLS; the caller names it: k2jax.model.target chooses per platform, nothing here resolves
"auto" or looks at the host):
  "ragged_dot"  the XLA reference every other form is tested against: each projection dequantised (the FP8 and INT4
                kernels' own references), then `jax.lax.ragged_dot`. Its forward is native on TPU; its weight gradient
                compiles to a dense every-row-by-every-group product on TPU and GPU, and on CPU and GPU so does its
                forward (G x the work).
  "tiled"       `pallas_kernels.cpu_grouped_ffn`, the CPU form: a loop over each group's row tiles that does only the
                routed work, dequantising one expert at a time.
  "pallas"      the Pallas kernels compiled for `platform` ("tpu": Mosaic, "gpu": Triton): fp8_grouped_matmul for
                plain and FP8 weights (the plain weight gradient by grouped_weight_grad), int4_grouped_matmul for INT4.
  "interpret"   the same kernels run by the Pallas interpreter (`platform` picks the launch form; CPU tests).
FP8 and INT4 weights are frozen (gradients reach x only). `fp8_activations` (FP8 weights): the routed rows are
quantised to e4m3 per row x 128 columns for e4m3 x e4m3 dots (pallas_kernels.fp8_grouped_matmul).

Scanned layers: `stack=(experts of all scanned layers [L, G, ...], layer)` (gradient stopped) lets a form read the
layer's weights from the stacks in place, with no copy of the layer's slice (XLA materialises a dynamic slice that
feeds a loop or a custom call): "tiled", "pallas" and "interpret" do (the kernels take the layer index, on TPU
scalar-prefetched into their index maps); "ragged_dot" reads `experts`. The plain weights' gradient still goes to
`experts`, the layer's own arrays (which, unread, cost nothing when nothing is differentiated).

Letter legend: M rows, I / O a matmul's in (contraction) / out features, D the FFN's in and out width (hidden),
F ffn, G groups, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_grouped_ffn import cpu_grouped_ffn, cpu_grouped_matmul
from pallas_kernels.expert_weights import ExpertWeights
from pallas_kernels.fp8_grouped_matmul import fp8_grouped_matmul
from pallas_kernels.grouped_weight_grad import grouped_weight_grad
from pallas_kernels.int4_grouped_matmul import int4_grouped_matmul

IMPLS = ("ragged_dot", "tiled", "pallas", "interpret")


def check_impl(impl: str) -> str:
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
    """The XLA reference of one plain grouped matmul: jax.lax.ragged_dot."""
    return jax.lax.ragged_dot(x_MI, w_GIO.astype(x_MI.dtype), group_sizes_G.astype(jnp.int32))


def reference_ffn(x_MD, w_gate_GDF, w_up_GDF, w_down_GFD, group_sizes_G) -> jax.Array:
    """The XLA reference of the SwiGLU FFN with plain weights."""
    gate = reference(x_MD, w_gate_GDF, group_sizes_G)
    up = reference(x_MD, w_up_GDF, group_sizes_G)
    return reference(jax.nn.silu(gate) * up, w_down_GFD, group_sizes_G)


# ---- dispatch ------------------------------------------------------------------------------------------------
def _matmul(x_MI, w, scale, group_sizes_G, *, fmt, group_size, impl, platform, fp8_activations, rows_in_use,
            stacked=None):
    """One projection of `fmt` in the form `impl` (not "tiled"). stacked: (weight stack, scale stack, layer) for
    the Pallas forms to read in place (w / scale are then the layer's own arrays, the gradient's for plain weights)."""
    if fmt == "plain" and impl == "ragged_dot":
        return reference(x_MI, w, group_sizes_G)
    backend = "xla" if impl == "ragged_dot" else impl
    kernel = dict(backend=backend, platform=platform, rows_in_use=rows_in_use)
    if stacked is not None and backend != "xla":
        w_stack, s_stack, layer = stacked
        if fmt == "plain":
            return _plain_from_stack(x_MI, w, w_stack, layer, group_sizes_G, tuple(kernel.items()))
        w, scale, kernel["layer"] = w_stack, s_stack, layer
    if fmt == "int4":
        return int4_grouped_matmul(x_MI, w, group_sizes_G, scale, group_size=group_size, **kernel)
    if fmt == "plain":
        w = w.astype(x_MI.dtype)
    return fp8_grouped_matmul(x_MI, w, group_sizes_G, scale, fp8_activations=fp8_activations and fmt == "fp8",
                              **kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _plain_from_stack(x_MI, w_GIO, w_LGIO, layer, group_sizes_G, kernel):
    """x @ W[g] with the plain weights read in place from the stack w_LGIO at `layer` (no copy of the layer's
    slice); the weight gradient goes to w_GIO, the layer's own (unread) array."""
    return fp8_grouped_matmul(x_MI, w_LGIO, group_sizes_G, layer=layer, **dict(kernel))


def _plain_from_stack_fwd(x_MI, w_GIO, w_LGIO, layer, group_sizes_G, kernel):
    return _plain_from_stack(x_MI, w_GIO, w_LGIO, layer, group_sizes_G, kernel), (x_MI, w_GIO, w_LGIO, layer,
                                                                                  group_sizes_G)


def _plain_from_stack_bwd(kernel, res, dy_MO):
    x_MI, w_GIO, w_LGIO, layer, group_sizes_G = res
    kernel = dict(kernel)
    dy_MO = dy_MO.astype(x_MI.dtype)
    _, dx_of = jax.vjp(lambda x: fp8_grouped_matmul(x, w_LGIO, group_sizes_G, layer=layer, **kernel), x_MI)
    dw = grouped_weight_grad(x_MI, dy_MO, group_sizes_G, out_dtype=w_GIO.dtype, backend=kernel["backend"],
                             platform=kernel["platform"], rows_in_use=kernel["rows_in_use"])
    return dx_of(dy_MO)[0], dw, None, None, None


_plain_from_stack.defvjp(_plain_from_stack_fwd, _plain_from_stack_bwd)


def grouped_matmul(x_MI: jax.Array, w_GIO: jax.Array, group_sizes_G: jax.Array, *, impl: str,
                   platform: str | None = None, rows_in_use: float | None = None) -> jax.Array:
    """[M, I] rows sorted by group, [G, I, O] plain weights, [G] sizes -> [M, O] in x's dtype. platform: what a
    "pallas" launch compiles for ("tpu" | "gpu"; an "interpret" run's launch form). rows_in_use: the rows expected
    to hold data, for the kernels' cost estimates (fp8_grouped_matmul)."""
    check_shapes(x_MI, (w_GIO,), group_sizes_G)
    if check_impl(impl) == "tiled":
        return cpu_grouped_matmul(x_MI, w_GIO, group_sizes_G)
    return _matmul(x_MI, w_GIO, None, group_sizes_G, fmt="plain", group_size=0, impl=impl, platform=platform,
                   fp8_activations=False, rows_in_use=rows_in_use)


def grouped_ffn(x_MD: jax.Array, experts: ExpertWeights, group_sizes_G: jax.Array, *, impl: str,
                platform: str | None = None, fp8_activations: bool = False,
                stack: tuple[ExpertWeights, jax.Array] | None = None, rows_in_use: float | None = None) -> jax.Array:
    """SwiGLU expert FFN over rows sorted by group -> [M, D] in x's dtype (module docstring). platform,
    rows_in_use: see grouped_matmul."""
    experts.check("grouped_ffn")
    if (x_MD.ndim != 2 or group_sizes_G.ndim != 1 or experts.gate.ndim != 3 or x_MD.shape[1] != experts.hidden
            or experts.gate.shape[0] != group_sizes_G.shape[0]):
        raise ValueError(f"grouped_ffn: expected x [M, D], group_sizes [G] for experts of hidden D = "
                         f"{experts.hidden} in G = {experts.gate.shape[0]} groups; got x {x_MD.shape}, group_sizes "
                         f"{group_sizes_G.shape}, experts {experts.gate.shape[:-2]}")
    if check_impl(impl) == "tiled":
        if fp8_activations:
            raise ValueError("grouped_ffn: fp8_activations needs impl 'ragged_dot', 'pallas' or 'interpret': the "
                             "tiled CPU form multiplies dequantised weights")
        return cpu_grouped_ffn(x_MD, experts, group_sizes_G, stack=stack)
    mm = functools.partial(_matmul, group_sizes_G=group_sizes_G, fmt=experts.fmt, group_size=experts.group_size,
                           impl=impl, platform=platform, fp8_activations=fp8_activations, rows_in_use=rows_in_use)
    projections = experts.projections()
    stacked = (None,) * 3 if stack is None else tuple((w, s, stack[1]) for w, s, _ in stack[0].projections())
    (gate, s_gate, _), (up, s_up, _), (down, s_down, _) = projections
    h_MF = jax.nn.silu(mm(x_MD, gate, s_gate, stacked=stacked[0])) * mm(x_MD, up, s_up, stacked=stacked[1])
    return mm(h_MF, down, s_down, stacked=stacked[2])
