"""k2jax-train / train.py: flags -> k2jax.training.loop.train.

    k2jax-train --config=configs/tiny.py --config.steps=100 --workdir=DIR

Exit codes (k2jax/tools/commands.py): 0 the workdir is at --config.steps (trained there now, or already: "already at
step N"); 1 a step was not finite or the data / init_from checkpoint is bad (one line); 2 a bad flag or config
value, or a workdir / init_from checkpoint of another model (one line naming it; nothing trained or written); 75
preempted by SIGTERM after saving, 130 Ctrl-C after saving (or before the first step: nothing to save): run the same
command again to resume. --verbosity=0 shows library INFO logs, --verbosity=1 tracebacks too.

Compiled programs are kept in JAX's persistent compilation cache (--compilation_cache, default
~/.cache/k2jax/jax-compilation-cache; JAX_COMPILATION_CACHE_DIR, when set, is left to jax), so a rerun or a resume
of the same job does not compile its step again.
"""

from __future__ import annotations

from k2jax.tools import startup

startup.quiet()  # before jax is imported: no CUDA / libtpu start-up lines on a machine without those devices

import os  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402

from k2jax.checkpoint.format import local_path  # noqa: E402
from k2jax.checkpoint.orbax_checkpoint import CheckpointError  # noqa: E402
from k2jax.tools import commands  # noqa: E402
from k2jax.tools.host_memory import keep_freed_memory_on_cpu  # noqa: E402
from k2jax.training.data import DataError  # noqa: E402
from k2jax.training.loop import EPOverflowError, NonFiniteError, train  # noqa: E402

_FLAGS = ["config", "workdir", "compilation_cache"]


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/k2jax/jax-compilation-cache (XDG_CACHE_HOME: ~/.cache when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "k2jax", "jax-compilation-cache")


def _define_flags() -> None:
    """Flags exist only for the command line (defining them at import would clash with other entry points)."""
    commands.define_job_config()
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events; re-running with the "
                        "same workdir resumes from its latest checkpoint.")
    flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation cache (compiled "
                        "steps are reused by later runs of the same job); 'off': no cache. Default: "
                        "$JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/k2jax/jax-compilation-cache.")
    flags.mark_flags_as_required(["config", "workdir"])


def use_compilation_cache(value: str | None) -> str | None:
    """Turns JAX's persistent compilation cache on in `value`'s directory ('off': off; None: the default, where
    JAX_COMPILATION_CACHE_DIR, when set, stays jax's own choice). Returns the directory, or None when off."""
    import jax
    if value is not None and value.strip().lower() in ("off", "none", "no", "false", "0", ""):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if value is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    directory = os.path.abspath(local_path(value or default_cache_dir()))
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def main(argv):
    if len(argv) > 1:
        raise commands.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir = flags.FLAGS.config, local_path(flags.FLAGS.workdir)
    use_compilation_cache(flags.FLAGS.compilation_cache)
    keep_freed_memory_on_cpu()  # on CPU, a step reuses the host pages the last one freed (k2jax/tools/host_memory.py)
    result = train(config, workdir, config_source=commands.config_source())
    if result["status"] == "already_done":
        print(f"already at step {result['step']} (config.steps={config.steps}): nothing to train; raise "
              f"--config.steps to train further", flush=True)
    elif result["status"] in ("preempted", "interrupted"):
        why, code = (("preempted (SIGTERM)", commands.PREEMPTED) if result["status"] == "preempted" else
                     ("interrupted (Ctrl-C)", commands.INTERRUPTED))
        sys.stderr.write(f"{commands.command_name()}: {why} at step {result['step']}: saved in {workdir}; run the "
                         f"same command again to resume (exit {code})\n")
        sys.exit(code)
    else:
        print(f"finished at step {result['step']}: loss {result['loss']:.4f}", flush=True)


def cli():
    _define_flags()
    for name in _FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --help lists it
    commands.run(main, job_config=True, doc=__doc__,
                 errors={NonFiniteError: commands.FAILED, EPOverflowError: commands.FAILED,
                         DataError: commands.FAILED, CheckpointError: commands.FAILED})
