"""Host memory for XLA:CPU runs: keep freed buffers in the process instead of handing them back to the kernel.

XLA:CPU allocates every large temporary and output buffer of a step with malloc, afresh each step. glibc serves
allocations over 32 MB (and, in a worker thread's own arena, any that do not fit its 64 MB heap) with mmap and
returns them with munmap when freed, so each step writes to fresh pages and the kernel zero-fills them on first
touch. On the small K2 of `benchmarks/forward_vs_torch.py` that is ~950 MB of page faults and 0.6-0.8 s of kernel
time per training step (the step takes ~1.65 s of wall time on 2 cores); with `keep_freed_memory()` it is none,
and the step takes ~1.4 s. PyTorch's CPU allocator gains from it too.

`keep_freed_memory()` sets glibc's malloc to serve every allocation from the one main heap (no mmap, one arena)
and not to trim that heap (unless more than 2 GB at its top are free): a step reuses the pages the previous step
freed. The cost: the process keeps its
peak host memory until it exits (what TPU / GPU runtimes do with device memory anyway), and threads share one
malloc arena. It has to run before JAX starts its CPU backend: XLA's worker threads pick their arena on their
first allocation. `train.py` and the CPU benchmarks call `keep_freed_memory_on_cpu()` first thing: it applies
keep_freed_memory() when this is a CPU-only run (`cpu_only_run()`).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import platform

import jax

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int: free heap top above 2 GB is still given back


def keep_freed_memory() -> bool:
    """Sets glibc malloc to keep freed memory for reuse (see the module docstring). Returns True if applied,
    False where the C library is not glibc. Raises RuntimeError once a JAX backend has started (too late: its
    threads already have their arenas)."""
    from jax._src import xla_bridge  # no public way to ask whether a backend has started

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("keep_freed_memory() must run before the first JAX computation: the CPU backend's "
                           "threads have already picked their malloc arenas")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def cpu_only_run(platforms: str | None = None) -> bool:
    """Whether JAX will run on CPU only, decided without starting a backend: `platforms` (default
    jax.config.jax_platforms, i.e. JAX_PLATFORMS) names only cpu, or none is set and no TPU / GPU plugin is
    installed."""
    platforms = jax.config.jax_platforms if platforms is None else platforms
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def keep_freed_memory_on_cpu() -> bool:
    """keep_freed_memory() if this is a CPU-only run (host memory is then the devices' memory); else nothing.
    Returns whether it was applied."""
    return cpu_only_run() and keep_freed_memory()
