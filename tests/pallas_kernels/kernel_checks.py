"""What every kernel test needs: NaN-poisoned padding, relative error, and a CPU-only check that a kernel lowers
for TPU (Mosaic) and GPU (Triton)."""

import contextlib

import jax
import numpy as np
from jax import export

from pallas_kernels import backend as kb

# jax.export refuses custom calls without a stability guarantee; a lowering check serialises nothing.
_UNCHECKED = [export.DisabledSafetyCheck.custom_call(name) for name in ("tpu_custom_call", "__gpu$xla.gpu.triton")]
PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}


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


def lowered_kernels(fn, platform: str, *arg_shapes) -> str:
    """Lowers jit(fn) for `platform` ("tpu" | "gpu") on this CPU machine; returns the StableHLO text. Mosaic /
    Triton lowering runs in full (block shapes, layouts, unsupported ops raise); device compilation does not."""
    exported = export.export(jax.jit(fn), platforms=[PLATFORMS[platform]], disabled_checks=_UNCHECKED)(*arg_shapes)
    return exported.mlir_module()


def kernel_call_count(hlo: str, platform: str) -> int:
    return hlo.count("tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton")
