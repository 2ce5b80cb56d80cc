"""Test setup: 8 fake CPU devices (so every sharding test runs here), before anything uses jax; and one
persistent compilation cache for the whole session, shared with the subprocesses the tests start (train.py runs,
the notebook kernel), so a computation compiled once (the tiny model's forward, a train step) is not compiled
again. The cache directory is fresh per session: nothing carries over between runs."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="k2jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
