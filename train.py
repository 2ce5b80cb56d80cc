"""Train Kimi K2 with MuonClip: python train.py --config=configs/tiny.py --config.steps=100 --workdir=DIR

The job lives in k2jax.training (see k2jax/training/loop.py); this script is its command line, also installed
as `k2jax-train`.
"""

from k2jax.training.cli import cli

if __name__ == "__main__":
    cli()
