"""What every kernel test needs: NaN-poisoned padding, relative error, and a CPU-only compile of a program for one
deviceless TPU v5p chip (Mosaic) or H100 (Triton + ptxas), which runs every check a device compile runs (layouts,
VMEM and shared-memory limits)."""

import contextlib
import functools

import jax
import numpy as np

from pallas_kernels import backend as kb
from tests import compile_targets
from tests.compile_targets import abstract, gpu_mesh, tpu_mesh


@contextlib.contextmanager
def nan_padding():
    """Kernels pad their row axes with NaN inside this block: any padding that reaches a result shows."""
    old = kb.set_pad_value(float("nan"))
    try:
        yield
    finally:
        kb.set_pad_value(old)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@functools.cache
def one_chip(platform: str) -> jax.sharding.Mesh:
    """A one-device mesh of a deviceless TPU v5p chip ("tpu") or H100 ("gpu")."""
    return tpu_mesh({"x": 1}) if platform == "tpu" else gpu_mesh({"x": 1})


def compile_for(platform: str, fn, *args: tuple[tuple[int, ...], object]) -> jax.stages.Compiled:
    """jit(fn) compiled for one chip of `platform` ("tpu" | "gpu") on this CPU machine; args are (shape, dtype)
    pairs, placed on a one-chip mesh of that platform. The kernels in fn are told the platform (platform=...): they
    never read it from the mesh."""
    mesh = one_chip(platform)
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*(abstract(shape, dtype, mesh) for shape, dtype in args)).compile()


def kernel_calls(compiled: jax.stages.Compiled, platform: str) -> int:
    """How many Pallas kernel launches the compiled program holds."""
    return compile_targets.kernel_calls(compiled.as_text(), platform)
