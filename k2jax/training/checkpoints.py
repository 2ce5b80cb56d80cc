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

The workdir records the model its checkpoints hold (`model_config.json`: the architecture as a HF config.json dict,
K2Config.to_hf(), written with the first checkpoint), so a job resuming it with another model is told which fields
differ before anything is compiled (`recorded_model`, `model_differences`); `model_differences` also compares an
init_from checkpoint's model (its k2jax.json) with the job's.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Mapping

import grain
import jax
import orbax.checkpoint as ocp

from k2jax.checkpoint.format import local_path
from k2jax.checkpoint.orbax_checkpoint import CheckpointError
from k2jax.model.config import K2Config
from k2jax.tools.commands import one_line
from k2jax.training.step import TrainState

MODEL_RECORD = "model_config.json"
# architecture fields that neither shape nor change the computation a checkpoint's parameters go into
_NOT_COMPARED = ("initializer_range", "bos_token_id", "eos_token_id", "num_nextn_predict_layers")


def _tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "rest": state.rest, "opt_state": state.opt_state}


class TrainCheckpoints:
    def __init__(self, workdir: str, *, keep: int = 3, every: int = 100, async_save: bool = True,
                 model: K2Config | None = None):
        """model: recorded in the workdir with the first checkpoint (process 0), unless already there."""
        self.workdir = os.path.abspath(local_path(workdir))
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.model = model
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: TrainState, data_iterator, *, force: bool = False) -> bool:
        if self.model is not None and jax.process_index() == 0:
            record_model(self.workdir, self.model)
            self.model = None
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


def record_model(workdir: str, cfg: K2Config) -> None:
    """Writes the workdir's model_config.json (atomically) when it is not there yet."""
    path = os.path.join(workdir, MODEL_RECORD)
    if os.path.exists(path):
        return
    with open(path + ".tmp", "w") as f:
        json.dump(cfg.to_hf(), f, indent=1)
    os.replace(path + ".tmp", path)


def recorded_model(workdir: str) -> dict | None:
    """The model (HF config dict) the workdir's checkpoints hold: its model_config.json when it has a committed
    checkpoint, else None (a new workdir, or one from before the record)."""
    workdir = local_path(workdir)
    path = os.path.join(workdir, MODEL_RECORD)
    committed = [p for p in glob.glob(os.path.join(workdir, "checkpoints", "*")) if os.path.basename(p).isdigit()]
    if not committed or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def model_differences(saved: Mapping, job: K2Config, *, most: int = 6) -> str:
    """"" when `saved` (a HF config dict: a model_config.json, a checkpoint's k2jax.json config) describes the job's
    model; else the fields that differ, "FIELD SAVED there, JOB here", the first `most` of them."""
    there, here = K2Config.from_hf(dict(saved)).to_hf(), job.to_hf()
    fields = [k for k in sorted(set(there) | set(here)) if k not in _NOT_COMPARED and there.get(k) != here.get(k)]
    text = "; ".join(f"{k} {there.get(k)} there, {here.get(k)} here" for k in fields[:most])
    return text + (f"; and {len(fields) - most} more" if len(fields) > most else "")


def _first_cause(error: BaseException) -> str:
    """The innermost error's message (tensorstore names the array and chunk it could not read), on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return one_line(error)[:400]


def with_shardings(shapes: TrainState, shardings: TrainState) -> TrainState:
    """A restore target: each ShapeDtypeStruct of `shapes` (jax.eval_shape of the state) with its sharding."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
