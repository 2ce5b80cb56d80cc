"""keep_freed_memory: a step's large buffers reuse the pages the previous step freed (counted as page faults, not
timed), it refuses to run once a backend is up, and cpu_only_run reads JAX_PLATFORMS."""

import os
import platform
import subprocess
import sys

import jax.numpy as jnp
import pytest

from k2jax.tools import host_memory

# Mallocs, fills and frees a 128 MB buffer three times (as XLA:CPU mallocs a step's buffers, 100s of MB on a real
# model); prints the page faults (in 4 KiB pages) of the last time.
_PROBE = """
import ctypes, resource, sys
from k2jax.tools import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 128 * 2 ** 20
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""
_PAGES = 128 * 2 ** 20 // 4096


def _faults_of_last_call(mode: str) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _faults_of_last_call("default"), _faults_of_last_call("keep")
    assert default > _PAGES // 2, default  # the premise: by default each call faults its buffer in anew
    assert kept < _PAGES // 20, kept


def test_refuses_once_a_backend_runs():
    jnp.ones(2).block_until_ready()
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
        host_memory.keep_freed_memory()


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,cpu", True), ("tpu,cpu", False),
                                                 ("cuda", False)])
def test_cpu_only_run_reads_jax_platforms(platforms, expected):
    assert host_memory.cpu_only_run(platforms) is expected
    assert host_memory.cpu_only_run() is True  # the suite runs with JAX_PLATFORMS=cpu
