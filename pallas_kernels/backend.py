"""The one dispatch rule every kernel in pallas_kernels/ follows, and what the Pallas launches share.

Every kernel entry point takes a concrete `backend` (one of BACKENDS, default "pallas") and `platform` (the
platform the program is compiled for: "tpu" | "gpu", or "cpu"; None when not named). There is no "auto" here, and
nothing reads a mesh or the host's devices: k2jax.model.target makes those choices and passes them down.

    backend="xla"        the XLA reference in the kernel's module (plain jax.numpy; runs anywhere)
    backend="pallas"     the Pallas kernel compiled for `platform`: Mosaic for "tpu", Triton for "gpu" (any other
                         platform is an error)
    backend="interpret"  the same Pallas kernel run by the Pallas interpreter (CPU tests), in the launch form of
                         `platform`: the "tpu" form when platform == "tpu", else the "gpu" form

`launch_form` is that rule; `check` refuses anything else in one line. A kernel's launch settings (block sizes,
Triton's warps and stages) live in a table beside it, per (launch form, compute dtype); `launch_settings` picks
them for an entry point whose setting arguments are left None.

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

BACKENDS = ("xla", "pallas", "interpret")
PLATFORMS = ("cpu", "tpu", "gpu")  # what a program is compiled for ("cpu": only with "xla" or "interpret")
_PAD = {"value": 0.0}


def cost(*, flops, bytes_accessed, transcendentals=0) -> pl.CostEstimate:
    """A launch's work for XLA's cost analysis (pallas_call(cost_estimate=...)): FLOPs of the blocks it visits
    (2 per multiply-add), exp / log count, and HBM bytes of its operands and results read or written once."""
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed))


def nbytes(*arrays) -> int:
    """Bytes of arrays or ShapeDtypeStructs (their sum)."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays)


def check(kernel: str, backend: str, platform: str | None) -> str:
    """`backend` after checking it and `platform` (see the module docstring); a one-line ValueError naming `kernel`
    otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"{kernel}: backend must be one of {BACKENDS}, got {backend!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"{kernel}: platform must be one of {PLATFORMS} (or None), got {platform!r}")
    if backend == "pallas" and platform not in ("tpu", "gpu"):
        raise ValueError(f"{kernel}: backend='pallas' needs platform='tpu' or 'gpu' (the platform the program is "
                         f"compiled for), got {platform!r}; use backend='interpret' or 'xla' on CPU")
    return backend


def launch_form(backend: str, platform: str | None) -> str:
    """"tpu" or "gpu": the form a Pallas kernel launches in. backend="pallas": the platform compiled for (checked:
    "tpu" or "gpu"); "interpret": the "tpu" form when platform == "tpu", else the "gpu" form."""
    if backend == "interpret":
        return "tpu" if platform == "tpu" else "gpu"
    if backend == "pallas" and platform in ("tpu", "gpu"):
        return platform
    raise ValueError(f"a Pallas launch needs backend='pallas' with platform 'tpu' or 'gpu', or backend='interpret'; "
                     f"got backend={backend!r}, platform={platform!r}")


def launch_settings(table: dict[tuple[str, str], dict], defaults: dict, backend: str, platform: str | None, dtype,
                    **given) -> dict:
    """A kernel's launch settings, one per key of `defaults`: the value given (not None), else the table's for
    (launch_form(backend, platform), dtype's name), else the kernel's generic default. `table` is the kernel's own
    (beside it); a key in `given` or the table that `defaults` lacks is an error."""
    row = table.get((launch_form(backend, platform), jnp.dtype(dtype).name), {})
    unknown = (set(given) | set(row)) - set(defaults)
    if unknown:
        raise ValueError(f"launch settings: unknown {sorted(unknown)}; expected {tuple(defaults)}")
    return {k: given[k] if given.get(k) is not None else row.get(k, v) for k, v in defaults.items()}


def launch_options(backend: str, platform: str | None, num_grid_dims: int, *, sequential: tuple[int, ...] = (),
                   num_warps: int = 4, num_stages: int = 2) -> dict:
    """The pallas_call keyword arguments for a backend: interpret=True, or the platform's compiler params. Grid
    dimensions are independent ("parallel" on TPU) except those listed in `sequential`, whose steps accumulate
    into the same output block ("arbitrary")."""
    if backend == "interpret":
        return {"interpret": True}
    if launch_form(backend, platform) == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        semantics = tuple("arbitrary" if d in sequential else "parallel" for d in range(num_grid_dims))
        return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}
    from jax.experimental.pallas import triton as pltriton
    return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def scalar_table_spec(backend: str, platform: str | None):
    """A small int table the kernel indexes with program ids, read as scalars: SMEM on TPU, a plain whole-array
    ref elsewhere."""
    if backend == "pallas" and launch_form(backend, platform) == "tpu":
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
