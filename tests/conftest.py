"""Test setup: 8 fake CPU devices (so every sharding test runs here), before anything uses jax; one persistent
compilation cache for the whole session, shared with the subprocesses the tests start (train.py runs, the
notebook kernel), so a computation compiled once (the tiny model's forward, a train step) is not compiled again
(the cache directory is fresh per session: nothing carries over between runs); CPU programs compiled with LLVM's
optimisation off (`--xla_backend_optimization_level=0`, also for the subprocesses: the suite is compile-bound,
measured 27 % faster on two compile-heavy tests; TPU programs compiled by libtpu come out the same, checked on
k2jax-aot's report); and pytest-xdist's defaults
(`-n auto --maxprocesses=4 --dist loadfile`: 2 workers on 2 cores, one test file per worker at a time) when
xdist is loaded and `-n` was not given, so `pytest -p no:xdist` and `-n 0` run in one process."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="k2jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Runs before xdist's own pytest_cmdline_main (a conftest's hook of the same priority is called first), which
    turns these options into workers."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None:  # no -n on the command line
        config.option.numprocesses = "auto"
        config.option.maxprocesses = config.option.maxprocesses or 4
        if config.option.dist == "no":
            config.option.dist = "loadfile"
