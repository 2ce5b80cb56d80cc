"""Train checkpoints with an Orbax CheckpointManager: the train state and each host's data-iterator state.

    ckpts = TrainCheckpoints(workdir, keep=3, every=100)
    ckpts.save(step, state, data_iterator)            # async; kept when step % every == 0 (or force=True)
    state = ckpts.restore(step, abstract_state, data_iterator)   # abstract_state carries the target shardings
    ckpts.latest_step()

A checkpoint is committed only when complete (Orbax writes a temporary directory and renames it), so a job
killed mid-save resumes from the previous one. The abstract state passed to `restore` decides where arrays land:
restoring onto a mesh different from the one that saved is a matter of passing other shardings. A checkpoint that
cannot be read back (a missing or damaged file, a different model) is a CheckpointError in one line naming the
checkpoint and the first array that failed.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from k2jax.checkpoint.orbax_checkpoint import CheckpointError
from k2jax.tools.commands import one_line
from k2jax.training.step import TrainState


def _tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "rest": state.rest, "opt_state": state.opt_state}


class TrainCheckpoints:
    def __init__(self, workdir: str, *, keep: int = 3, every: int = 100, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: TrainState, data_iterator, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_tree(state)), data=grain.checkpoint.CheckpointSave(data_iterator)),
            force=force)

    def restore(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_tree(abstract_state)),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:  # Orbax / tensorstore raise many types; every one means this checkpoint is unusable
            raise CheckpointError(
                f"{os.path.join(self.directory, str(step))}: cannot restore it: {_first_cause(e)}. The checkpoint is "
                f"damaged or was written for another model: move it out of {self.directory} to resume from the one "
                f"before it") from e
        tree = restored["state"]
        return TrainState(tree["step"], tree["params"], tree["rest"], tree["opt_state"], abstract_state.graphdef)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_cause(error: BaseException) -> str:
    """The innermost error's message (tensorstore names the array and chunk it could not read), on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return one_line(error)[:400]


def with_shardings(shapes: TrainState, shardings: TrainState) -> TrainState:
    """A restore target: each ShapeDtypeStruct of `shapes` (jax.eval_shape of the state) with its sharding."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
