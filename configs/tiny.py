"""The tiny K2 on CPU (or any single host): synthetic data, FSDP over every device.

    python train.py --config=configs/tiny.py --config.steps=100 --workdir=/tmp/k2jax-tiny
"""

from k2jax.job_config import base_config


def get_config():
    config = base_config()
    config.model.preset = "tiny"
    config.steps = 100
    config.seq_len = 64
    config.global_batch = 8
    config.checkpoint.every = 20
    config.metrics.every = 5
    return config
