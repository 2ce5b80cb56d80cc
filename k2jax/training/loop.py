"""The training job: config -> mesh -> sharded state (fresh, resumed or initialised from a converted K2) -> steps.

    from k2jax.training.loop import base_config, train
    config = base_config(); config.steps = 20
    result = train(config, workdir="/tmp/run")        # {"step": ..., "loss": ...}

Every `checkpoint.every` steps the state and the data iterators' positions are saved (async, keep-last-N); a
restart with the same workdir resumes from the latest checkpoint automatically and continues with exactly the
batches an uninterrupted run would have seen. SIGTERM (a TPU preemption notice) saves at the next step and
exits. A step whose loss or gradients are not finite leaves the state unchanged and stops the job with
NonFiniteError before anything after it is saved. Metrics every `metrics.every` steps go to metrics.jsonl and
TensorBoard; they are fetched one step late so the host never waits on the device for them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.checkpoint import load_checkpoint
from k2jax.config import K2Config, preset
from k2jax.model import Transformer, param_info, param_name
from k2jax.optim.muon_clip import muon_clip, param_rules
from k2jax.training.checkpoints import TrainCheckpoints, with_shardings
from k2jax.training.data import make_iterator
from k2jax.training.metrics import MetricWriter
from k2jax.training.step import TrainState, make_train_step
from sharding.mesh import make_mesh
from sharding.rules import activation_spec, optimizer_state_specs, param_shardings


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient."""


def base_config() -> ml_collections.ConfigDict:
    """Every option train() reads, with small CPU-friendly defaults (configs/ override them)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "tiny", "hf_config": "", "overrides": {}})
    c.seed = 0
    c.steps = 100
    c.seq_len = 128
    c.global_batch = 8             # rows of seq_len tokens per step, all hosts together
    c.grad_accum = 1               # microbatches per step (rows split evenly)
    c.init_from = ""               # a converted K2 checkpoint (k2jax-convert output): params only
    c.optimizer = ml_collections.ConfigDict({
        "lr": 3e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.1, "momentum": 0.95,
        "nesterov": True, "ns_steps": 5, "ns_dtype": "float32", "adam_b1": 0.9, "adam_b2": 0.95,
        "qk_clip_tau": 100.0})
    c.mesh = ml_collections.ConfigDict({"axes": {"fsdp": -1}, "strategy": "fsdp"})
    c.data = ml_collections.ConfigDict({"source": "synthetic", "tokenizer_dir": "", "text_field": "text",
                                        "eod_token_id": -1, "prefetch": 2})
    c.checkpoint = ml_collections.ConfigDict({"every": 50, "keep": 3, "async_save": True})
    c.metrics = ml_collections.ConfigDict({"every": 10, "tensorboard": True, "peak_tflops_per_device": 0.0})
    c.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 3})
    # inference shapes the Generator is compiled for ahead of time (k2jax-aot --step=prefill|decode): rows,
    # cache slots per row, prompt tokens per prefill
    c.infer = ml_collections.ConfigDict({"batch": 8, "max_len": 4096, "prompt_len": 1024})
    c.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 1, "process_id": 0})
    c.debug_nan_step = -1          # tests: poison the loss at this step
    return c


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What train() compiles and runs, built without touching a device (so it also compiles ahead of time for a
    deviceless TPU mesh). state_shapes: the TrainState as ShapeDtypeStructs; shardings: its layout on the mesh;
    step_fn: the jitted train step (state donated); batch_rows: the sharding of every batch leaf [rows, T + 1]."""
    cfg: K2Config
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    fresh_state: Callable[[], TrainState]
    state_shapes: TrainState
    shardings: TrainState
    step_fn: Callable
    batch_rows: NamedSharding

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: the first argument of step_fn.lower()."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.state_shapes,
                            self.shardings)

    def abstract_batch(self, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A batch as ShapeDtypeStructs: the second argument of step_fn.lower()."""
        rows = lambda dtype: jax.ShapeDtypeStruct((global_batch, seq_len + 1), dtype, sharding=self.batch_rows)  # noqa: E731
        return {"tokens": rows(jnp.int32), "segment_ids": rows(jnp.int32), "positions": rows(jnp.int32),
                "loss_scale": jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=self.batch_rows)}


def train_program(config, mesh) -> TrainProgram:
    """The model, MuonClip, the sharded state's shapes and the jitted step for `config` on `mesh`. Call under
    `jax.set_mesh(mesh)`."""
    cfg = model_config(config)
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(config.seed)))
    o = config.optimizer
    schedule = _schedule(config)
    tx = muon_clip(schedule, rules=param_rules(abstract_model), cfg=cfg, weight_decay=o.weight_decay,
                   momentum=o.momentum, nesterov=o.nesterov, ns_steps=o.ns_steps, ns_dtype=o.ns_dtype,
                   adam_b1=o.adam_b1, adam_b2=o.adam_b2, qk_clip_tau=o.qk_clip_tau or None)

    def fresh_state():
        return TrainState.create(Transformer(cfg, rngs=nnx.Rngs(config.seed)), tx)

    shapes = jax.eval_shape(fresh_state)
    shardings = _state_shardings(shapes, param_info(abstract_model), mesh, config.mesh.strategy)
    step_fn = jax.jit(make_train_step(shapes.graphdef, tx, grad_accum=config.grad_accum), donate_argnums=0,
                      out_shardings=(shardings, None))
    rows = NamedSharding(mesh, activation_spec((config.global_batch,), ("batch",), mesh))
    return TrainProgram(cfg, tx, schedule, fresh_state, shapes, shardings, step_fn, rows)


def model_config(config) -> K2Config:
    overrides = dict(config.model.overrides)
    if config.model.hf_config:
        return K2Config.from_hf(config.model.hf_config, **overrides)
    return preset(config.model.preset, **overrides)


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize for multi-process jobs: from config.distributed when num_processes > 1 (CPU
    or GPU clusters; CPU collectives then go over gloo), or with no arguments when the platform says so (TPU pod
    slices and SLURM/Open MPI launches report their own topology)."""
    d = config.distributed
    if jax.distributed.is_initialized():
        return
    if d.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID") or os.environ.get(
            "OMPI_COMM_WORLD_SIZE"):
        jax.distributed.initialize()


def _schedule(config):
    o = config.optimizer
    warmup = max(o.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(config.steps, warmup + 1),
                                              end_value=o.lr * o.min_lr_ratio)


def _state_shardings(abstract: TrainState, info: dict, mesh, strategy: str):
    """Parameters per the strategy's rules, optimizer state per its parameter plus ZeRO-1, step replicated.
    info: param_info of the model."""
    by_name = param_shardings(info, mesh, strategy)

    def for_params(tree):
        return jax.tree_util.tree_map_with_path(lambda path, _: by_name[param_name(path)], tree)

    specs = optimizer_state_specs(abstract.opt_state, info, dict(mesh.shape), strategy, param_name)
    opt = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return TrainState(NamedSharding(mesh, PartitionSpec()), for_params(abstract.params), for_params(abstract.rest),
                      opt, abstract.graphdef)


class _Preemption:
    """SIGTERM -> save at the next step and exit."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str) -> dict:
    maybe_initialize_distributed(config)
    mesh = make_mesh(dict(config.mesh.axes))
    n_proc, proc = jax.process_count(), jax.process_index()
    if config.global_batch % (n_proc * config.grad_accum):
        raise ValueError(f"global_batch {config.global_batch} must divide by processes x grad_accum "
                         f"({n_proc} x {config.grad_accum})")
    os.makedirs(workdir, exist_ok=True)
    with jax.set_mesh(mesh):
        program = train_program(config, mesh)
        cfg, tx, schedule = program.cfg, program.tx, program.schedule
        shapes, shardings = program.state_shapes, program.shardings
        ckpts = TrainCheckpoints(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every,
                                 async_save=config.checkpoint.async_save)
        data = make_iterator(config.data, seq_len=config.seq_len, global_batch=config.global_batch,
                             vocab_size=cfg.vocab_size, seed=config.seed)
        latest = ckpts.latest_step()
        if latest is not None:
            state = ckpts.restore(latest, with_shardings(shapes, shardings), data)
            logging.info("resumed from %s at step %d", ckpts.directory, latest)
        else:
            state = jax.jit(program.fresh_state, out_shardings=shardings)()
            if config.init_from:
                loaded = load_checkpoint(config.init_from, mesh=mesh, shardings=config.mesh.strategy,
                                         param_dtype=cfg.param_dtype)
                _, params, rest = nnx.split(loaded, nnx.Param, ...)
                state = TrainState(state.step, params, rest, jax.jit(tx.init, out_shardings=shardings.opt_state)(
                    params), state.graphdef)
                logging.info("initialised parameters from %s", config.init_from)
        step_fn, rows = program.step_fn, program.batch_rows
        writer = MetricWriter(workdir, enabled=proc == 0, tensorboard=config.metrics.tensorboard)
        flops_per_step = cfg.flops_per_token(config.seq_len) * config.global_batch * config.seq_len
        preemption = _Preemption()
        start = int(state.step)
        pending, last = None, {"step": start}
        t0, t0_step = time.perf_counter(), start
        try:
            for step in range(start, config.steps):
                if step == config.profile.start_step:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                local = next(data)
                local["loss_scale"] = np.full((local["tokens"].shape[0],),
                                              np.nan if step == config.debug_nan_step else 1.0, np.float32)
                batch = {k: jax.make_array_from_process_local_data(rows, v) for k, v in local.items()}
                state, metrics = step_fn(state, batch)
                if config.profile.start_step >= 0 and step == config.profile.start_step + config.profile.num_steps - 1:
                    jax.profiler.stop_trace()
                if pending is not None:  # the previous step's metrics: ready by now, no stall
                    last = _report(pending, ckpts, writer, schedule, flops_per_step, config, t0, t0_step)
                    t0, t0_step = time.perf_counter(), pending[0] + 1
                pending = (step, metrics)
                done = step + 1
                if ckpts.should_save(done) or preemption.requested or done == config.steps:
                    # this step's metrics first (they also check it is finite): a checkpoint never gets ahead
                    # of the metrics log
                    last = _report(pending, ckpts, writer, schedule, flops_per_step, config, t0, t0_step,
                                   force=True)
                    pending, t0, t0_step = None, time.perf_counter(), done
                    ckpts.save(done, state, data, force=True)
                if preemption.requested:
                    logging.warning("SIGTERM: saved step %d, exiting", done)
                    break
            if pending is not None:
                last = _report(pending, ckpts, writer, schedule, flops_per_step, config, t0, t0_step, force=True)
        finally:
            preemption.restore()
            ckpts.close()
            writer.close()
    return last


def _check_finite(pending, ckpts) -> None:
    step, metrics = pending
    if not bool(metrics["finite"]):
        ckpts.wait()
        raise NonFiniteError(f"step {step}: loss {float(metrics['loss'])}, gradient norm "
                             f"{float(metrics['grad_norm'])}; the state was left as it was before this step. "
                             f"Last good checkpoint: step {ckpts.latest_step()} in {ckpts.directory}")


def _report(pending, ckpts, writer, schedule, flops_per_step, config, t0, t0_step, force=False) -> dict:
    step, metrics = pending
    metrics = jax.device_get(metrics)
    _check_finite((step, metrics), ckpts)
    out = {"step": step, "loss": float(metrics["loss"])}
    if force or step % config.metrics.every == 0:
        seconds = max(time.perf_counter() - t0, 1e-9)
        steps = max(step + 1 - t0_step, 1)
        tflops = flops_per_step * steps / seconds / jax.device_count() / 1e12
        peak = config.metrics.peak_tflops_per_device
        scalars = {k: v for k, v in metrics.items() if k != "finite"}
        scalars.update(lr=float(schedule(step)), tokens_per_s=float(metrics["tokens"]) * steps / seconds,
                       tflops_per_device=tflops, **({"mfu": tflops / peak} if peak else {}))
        writer.write(step, scalars)
        logging.info("step %d loss %.4f grad_norm %.3f %.0f tok/s", step, out["loss"], metrics["grad_norm"],
                     scalars["tokens_per_s"])
    return out
