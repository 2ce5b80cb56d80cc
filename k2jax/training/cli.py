"""k2jax-train / train.py: flags -> k2jax.training.loop.train.

    k2jax-train --config=configs/tiny.py --config.steps=100 --workdir=DIR
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from k2jax.host_memory import keep_freed_memory_on_cpu
from k2jax.training.loop import train


def _define_flags() -> None:
    """Flags exist only for the command line (defining them at import would clash with other entry points)."""
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file (its get_config()); override any field "
                                    "with --config.FIELD=VALUE.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events; re-running with the "
                        "same workdir resumes from its latest checkpoint.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    keep_freed_memory_on_cpu()  # on CPU, a step reuses the host pages the last one freed (k2jax/host_memory.py)
    result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    print(f"finished at step {result['step'] + 1}: loss {result.get('loss', float('nan')):.4f}")


def cli():
    _define_flags()
    for name in ["config", "workdir"]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --help lists it
    app.run(main)
