"""A NaN planted in the train step's loss from outside it (the production step carries no test hook).

    plant_nan(at_step)    # train steps built after this give a NaN loss (and gradients) at state.step == at_step
    K2JAX_NAN_STEP=6 python tests/k2jax/training/planted_nan.py --config=... --workdir=...   # train.py, planted
"""

import os
import sys

import jax.numpy as jnp

from k2jax.training import loop, step


def plant_nan(at_step: int) -> None:
    """Wraps k2jax.training.step.next_token_loss to multiply the summed loss by NaN when the step being traced has
    state.step == at_step, and loop.make_train_step to hand the step number to it (a value traced in the same jit)."""
    real_loss, real_make = step.next_token_loss, loop.make_train_step
    traced = {}

    def next_token_loss(model, batch):
        loss_sum, rest = real_loss(model, batch)
        return loss_sum * jnp.where(traced["step"] == at_step, jnp.nan, 1.0), rest

    def make_train_step(graphdef, tx, **kwargs):
        inner = real_make(graphdef, tx, **kwargs)

        def train_step(state, batch):
            traced["step"] = state.step
            return inner(state, batch)

        return train_step

    step.next_token_loss, loop.make_train_step = next_token_loss, make_train_step


if __name__ == "__main__":
    plant_nan(int(os.environ["K2JAX_NAN_STEP"]))
    from k2jax.training.cli import cli
    sys.argv[0] = "train.py"  # errors read "train.py: error: ..." as the real command's
    cli()
