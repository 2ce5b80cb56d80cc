"""The one dispatch rule every kernel in pallas_kernels/ follows, and what the Pallas launches share.

    backend="xla"        the XLA reference in the kernel's module (plain jax.numpy; runs anywhere)
    backend="pallas"     the Pallas kernel, compiled for the platform it runs on: Mosaic on TPU, Triton on GPU
    backend="interpret"  the same Pallas kernel run by the Pallas interpreter (CPU tests)
    backend="auto"       "pallas" on TPU and GPU when the kernel's feature dims are powers of two >= 16 (what
                         Triton's tiles need; K2's are), else "xla"; "xla" on CPU

The platform is the one the program is compiled for (`target_platform`): named explicitly ("cpu" | "tpu" |
"gpu"), else that of the mesh in context (`jax.set_mesh`; inside jit and shard_map its abstract mesh carries the
devices' platform), else that of the default device (a program with no mesh runs there). It is never guessed from
the host: a CPU-only machine compiles the TPU or GPU program by setting a mesh of deviceless TPU / GPU devices
(see tests/compile_targets.py). `platform` also picks the compiler parameters of a "pallas" launch.

Kernels pad their row axes up to a whole number of blocks. The padded rows are filled with `pad_value()`
(0); the tests set it to NaN to prove that padding never reaches a result.

Every launch declares its work with `cost(...)` (a pl.CostEstimate): XLA's cost analysis counts a kernel as 0
FLOPs and 0 bytes otherwise, so a compiled program's totals (k2jax.tools.aot) would leave out attention and experts.

Also shared by the kernel bodies: 2-D dots with float32 accumulation in the three orientations they need, the
online-softmax step of the attention kernels, and the spec of a scalar table (SMEM on TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BACKENDS = ("auto", "xla", "pallas", "interpret")
_PAD = {"value": 0.0}


PLATFORMS = ("cpu", "tpu", "gpu")


def cost(*, flops, bytes_accessed, transcendentals=0) -> pl.CostEstimate:
    """A launch's work for XLA's cost analysis (pallas_call(cost_estimate=...)): FLOPs of the blocks it visits
    (2 per multiply-add), exp / log count, and HBM bytes of its operands and results read or written once."""
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed))


def nbytes(*arrays) -> int:
    """Bytes of arrays or ShapeDtypeStructs (their sum)."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays)


def target_platform(platform: str | None = None) -> str:
    """"cpu" | "tpu" | "gpu": the platform a program being traced now is compiled for. `platform` when given
    ("auto" counts as not given; "cuda" / "rocm" as "gpu"); else the platform of the mesh set with jax.set_mesh
    (inside jit / shard_map: of its abstract mesh); else of the default device."""
    if platform not in (None, "auto"):
        p = "gpu" if platform in ("cuda", "rocm") else platform
        if p not in PLATFORMS:
            raise ValueError(f"platform must be one of {('auto',) + PLATFORMS}, got {platform!r}")
        return p
    mesh = jax.sharding.get_abstract_mesh()
    p = mesh.abstract_device.platform if not mesh.empty and mesh.abstract_device is not None else None
    p = p or jax.devices()[0].platform
    return "gpu" if p in ("cuda", "rocm") else p


def resolve(backend: str, dims: tuple[int, ...] = (), platform: str | None = None) -> str:
    """"auto" -> "pallas" when compiling for TPU/GPU (target_platform(platform)) if every one of `dims` is a power
    of two >= 16, else "xla"; anything else is checked and returned as it is."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fits = all(d >= 16 and d & (d - 1) == 0 for d in dims)
        return "pallas" if target_platform(platform) != "cpu" and fits else "xla"
    return backend


def platform_of(platform: str | None) -> str:
    """"tpu" or "gpu" for a Pallas launch (target_platform(platform); an error on CPU)."""
    p = target_platform(platform)
    if p not in ("tpu", "gpu"):
        raise ValueError(f"backend='pallas' needs a TPU or GPU (platform {p!r}); use backend='interpret' or 'xla'")
    return p


def launch_options(backend: str, platform: str | None, num_grid_dims: int, *, sequential: tuple[int, ...] = (),
                   num_warps: int = 4, num_stages: int = 2) -> dict:
    """The pallas_call keyword arguments for a backend: interpret=True, or the platform's compiler params. Grid
    dimensions are independent ("parallel" on TPU) except those listed in `sequential`, whose steps accumulate
    into the same output block ("arbitrary")."""
    if backend == "interpret":
        return {"interpret": True}
    if platform_of(platform) == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        semantics = tuple("arbitrary" if d in sequential else "parallel" for d in range(num_grid_dims))
        return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}
    from jax.experimental.pallas import triton as pltriton
    return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def scalar_table_spec(backend: str, platform: str | None):
    """A small int table the kernel indexes with program ids, read as scalars: SMEM on TPU, a plain whole-array
    ref elsewhere."""
    if backend == "pallas" and platform_of(platform) == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def pad_value() -> float:
    return _PAD["value"]


def set_pad_value(value: float) -> float:
    """Sets what padded rows are filled with; returns the previous value (a test hook)."""
    old, _PAD["value"] = _PAD["value"], value
    return old


def pad_axis(x: jax.Array, axis: int, multiple: int, value=None) -> jax.Array:
    """x padded at the end of `axis` to a multiple of `multiple` (with `value`, default pad_value())."""
    n = x.shape[axis]
    extra = -n % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    fill = pad_value() if value is None else value
    if not jnp.issubdtype(x.dtype, jnp.floating):
        fill = 0 if value is None else value
    return jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))


def rows_below(x: jax.Array, first_row, limit) -> jax.Array:
    """x [P, ...] (rows first_row .. first_row + P - 1 of an array) with rows >= limit set to 0."""
    rows = first_row + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows < limit, x, jnp.zeros_like(x))


# ---- inside kernels ------------------------------------------------------------------------------------------
_F32 = jnp.float32


def dot_nn(a, b):
    """a @ b, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def dot_nt(a, b):
    """a @ b.T without materialising the transpose, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def dot_tn(a, b):
    """a.T @ b, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def online_softmax_step(s, values, acc, m_prev, l_prev):
    """One key block of an online softmax: masked logits s [rows, keys] (-inf where not visible), values
    [keys, d] (zeroed where they may hold garbage), the running (acc [rows, d], max [rows, 1], sum [rows, 1]) ->
    the updated three. A row that has seen nothing yet keeps max -inf, sum 0."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m_prev - m_safe)
    return corr * acc + dot_nn(p.astype(values.dtype), values), m_new, corr * l_prev + jnp.sum(p, axis=1, keepdims=True)
