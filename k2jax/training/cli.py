"""k2jax-train / train.py: flags -> k2jax.training.loop.train.

    k2jax-train --config=configs/tiny.py --config.steps=100 --workdir=DIR

Exit codes (k2jax/tools/commands.py): 0 the workdir is at --config.steps (trained there now, or already: "already at
step N"); 1 a step was not finite or the data / init_from checkpoint is bad (one line); 2 a bad flag or config
value (one line naming it; nothing trained); 75 preempted by SIGTERM after saving: run the same command again to
resume. --verbosity=0 shows library INFO logs, --verbosity=1 tracebacks too.
"""

from __future__ import annotations

import re
import sys

from absl import flags
from ml_collections import config_flags

from k2jax.checkpoint.orbax_checkpoint import CheckpointError
from k2jax.tools import commands
from k2jax.tools.host_memory import keep_freed_memory_on_cpu
from k2jax.training.data import DataError
from k2jax.training.loop import EPOverflowError, NonFiniteError, train


def _define_flags() -> None:
    """Flags exist only for the command line (defining them at import would clash with other entry points)."""
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file (its get_config()); override any field "
                                    "with --config.FIELD=VALUE (all fields: k2jax.training.loop.base_config()).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events; re-running with the "
                        "same workdir resumes from its latest checkpoint.")
    flags.mark_flags_as_required(["config", "workdir"])


def _describe_flag_error(error: BaseException, argv: list[str]) -> str | None:
    """ml_collections reports an unknown --config.FIELD as a chained KeyError / AttributeError whose text is a
    quoted key and a suggestion on a second line; name the flag instead."""
    cause = error
    while cause is not None and not isinstance(cause, KeyError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or not cause.args:
        return None
    key, _, hint = str(cause.args[0]).partition("\n")
    key = key.strip("'\"")
    arg = next((a for a in argv if re.match(rf"--config(\.\w+)*\.{re.escape(key)}(=|$)", a)), f"--config...{key}")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    return f"{arg}: the config has no field {key!r}{hint}; every field: k2jax.training.loop.base_config()"


def main(argv):
    if len(argv) > 1:
        raise commands.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = flags.FLAGS.config
        config.keys()  # a config file that failed to load raises here
    except Exception as e:  # ml_collections defers a config file's load errors to here
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise commands.UsageError(f"--config={flags.FLAGS['config'].config_filename}: cannot load it: "
                                  f"{lines[-1] if lines else type(e).__name__}") from None
    source = " ".join([flags.FLAGS["config"].config_filename] + [a for a in sys.argv[1:] if a.startswith("--config.")])
    keep_freed_memory_on_cpu()  # on CPU, a step reuses the host pages the last one freed (k2jax/tools/host_memory.py)
    result = train(config, flags.FLAGS.workdir, config_source=source)
    if result["status"] == "already_done":
        print(f"already at step {result['step']} (config.steps={config.steps}): nothing to train; raise "
              f"--config.steps to train further", flush=True)
    elif result["status"] == "preempted":
        sys.stderr.write(f"{commands.command_name()}: preempted (SIGTERM) at step {result['step']}: saved in "
                         f"{flags.FLAGS.workdir}; run the same command again to resume (exit {commands.PREEMPTED})\n")
        sys.exit(commands.PREEMPTED)
    else:
        print(f"finished at step {result['step']}: loss {result['loss']:.4f}", flush=True)


def cli():
    _define_flags()
    for name in ["config", "workdir"]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --help lists it
    commands.run(main, describe_flag_error=_describe_flag_error,
                 errors={NonFiniteError: commands.FAILED, EPOverflowError: commands.FAILED,
                         DataError: commands.FAILED, CheckpointError: commands.FAILED})
