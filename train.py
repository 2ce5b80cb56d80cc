"""Train Kimi K2 with MuonClip: python train.py --config=configs/tiny.py --config.steps=100 --workdir=DIR

The job lives in k2jax.training (see k2jax/training/loop.py); this script is its command line, also installed
as `k2jax-train`. Running it again with the same --workdir resumes from the latest checkpoint there.

Exit codes: 0 the workdir is at --config.steps (trained there now, or already: "already at step N"); 1 a step
was not finite, or the data or a checkpoint is bad (one line); 2 a bad flag or config value, or a workdir /
init_from checkpoint of another model (one line naming it; nothing trained); 75 preempted by SIGTERM, 130 Ctrl-C:
the state was saved, run the same command again to resume. --verbosity=0 shows library INFO logs, --verbosity=1
also the traceback of an error. --compilation_cache=DIR|off: where compiled steps are kept for the next run.
"""

from k2jax.training.cli import cli

if __name__ == "__main__":
    cli()
