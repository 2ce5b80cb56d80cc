"""The training job: config -> mesh -> sharded state (fresh, resumed or initialised from a converted K2) -> steps.

    from k2jax.job_config import base_config
    from k2jax.training.loop import train
    config = base_config(); config.steps = 20
    result = train(config, workdir="/tmp/run")  # {"status": "done" | "already_done" | "preempted" | "interrupted",
                                                #  "step", "loss"}

The config is checked before anything is built (`check_config`: one line naming the field, TrainConfigError).
The step is compiled ahead of time ("compiling the train step ..."), and a step that would not fit in the
devices' memory stops there with a TrainConfigError naming the sizes to change. Every `checkpoint.every` steps the
state and the data iterators' positions are saved (async, keep-last-N); a restart with the same workdir resumes
from the latest checkpoint automatically and continues with exactly the batches an uninterrupted run would have
seen, and a workdir already at `steps` returns "already_done" without training. SIGTERM (a TPU preemption
notice) saves at the next step and returns "preempted" (train.py exits 75: run it again to resume), Ctrl-C
(SIGINT) once the steps run likewise returns "interrupted" (exit 130; before the first step, or a second Ctrl-C, it
raises Interrupted at once: nothing new to save). A workdir or init_from checkpoint of another model than the job's
is a TrainConfigError naming the fields that differ, before anything is built; a failed run leaves no empty workdir
or checkpoints/. A step whose loss or gradients are not finite leaves the state unchanged and stops the job with
NonFiniteError before anything after it is saved. Metrics every `metrics.every` steps go to metrics.jsonl and
TensorBoard (a resumed run first drops what the earlier run logged after its checkpoint); they are fetched one step
late so the host never waits on the device for them. Process 0 prints a banner, then a line per logged step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Callable

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.checkpoint.format import local_path, read_metadata
from k2jax.checkpoint.orbax_checkpoint import load_checkpoint
from k2jax.job_config import model_config
from k2jax.model.config import ConfigError, K2Config
from k2jax.model.placement import abstract_model, state_shardings
from k2jax.model.transformer import Transformer, describe_parallelism, parallelism, param_info, param_name
from k2jax.optim.muon_clip import muon_clip, param_rules
from k2jax.tools import startup
from k2jax.tools.commands import Heartbeat, Interrupted, UsageError, interruptible, one_line
from k2jax.tools.hlo_cost import memory_parts
from k2jax.training.chat_data import CONVERSATION_COUNTS
from k2jax.training.checkpoints import (
    MODEL_RECORD,
    TrainCheckpoints,
    model_differences,
    recorded_model,
    with_shardings,
)
from k2jax.training.data import batch_shapes, make_iterator, sample_text
from k2jax.training.metrics import (
    MetricWriter,
    RowSums,
    Throughput,
    describe_conversations,
    describe_rates,
    token_rates,
)
from k2jax.training.step import TrainState, make_train_step
from sharding.mesh import MeshError, make_mesh, resolve_axis_sizes
from sharding.rules import (
    STRATEGIES,
    ShardingRuleError,
    activation_spec,
    optimizer_state_specs,
    param_shardings,
    param_specs,
)


class EPOverflowError(RuntimeError):
    """config.ep_overflow="fail" and a step's expert-parallel receive buffers dropped routed rows."""


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient."""


class TrainConfigError(UsageError):
    """A config that cannot run here; the message names the field and what to change (train.py exits 2)."""


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
    batch_shapes: Callable[[int, int], dict]  # (rows, seq_len) -> {leaf: (shape, dtype)}: the data's batches

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: the first argument of step_fn.lower()."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.state_shapes,
                            self.shardings)

    def abstract_batch(self, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A batch as ShapeDtypeStructs: the second argument of step_fn.lower()."""
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_rows)
                for k, (shape, dtype) in self.batch_shapes(global_batch, seq_len).items()}


def train_program(config, mesh) -> TrainProgram:
    """The model, MuonClip, the sharded state's shapes and the jitted step for `config` on `mesh`. Call under
    `jax.set_mesh(mesh)`."""
    cfg = model_config(config)
    abstract = abstract_model(cfg, seed=config.seed)
    o = config.optimizer
    schedule = _schedule(config)
    info = param_info(abstract)
    rules = param_rules(abstract, param_shardings(info, mesh, config.mesh.strategy))  # layer-sharded NS
    tx = muon_clip(schedule, rules=rules, cfg=cfg, weight_decay=o.weight_decay,
                   momentum=o.momentum, nesterov=o.nesterov, ns_steps=o.ns_steps, ns_dtype=o.ns_dtype,
                   adam_b1=o.adam_b1, adam_b2=o.adam_b2, qk_clip_tau=o.qk_clip_tau or None)

    def fresh_state():
        return TrainState.create(Transformer(cfg, rngs=nnx.Rngs(config.seed)), tx)

    shapes = jax.eval_shape(fresh_state)
    shardings = _state_shardings(shapes, info, mesh, config.mesh.strategy)
    step_fn = jax.jit(make_train_step(shapes.graphdef, tx, grad_accum=config.grad_accum), donate_argnums=0,
                      out_shardings=(shardings, None))
    rows = NamedSharding(mesh, activation_spec((config.global_batch,), ("batch",), mesh))
    return TrainProgram(cfg, tx, schedule, fresh_state, shapes, shardings, step_fn, rows,
                        functools.partial(batch_shapes, config.data))


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize for multi-process jobs: from config.distributed when num_processes > 1 (CPU
    or GPU clusters; CPU collectives then go over gloo), or with no arguments when the launcher says the job has
    several processes (TPU pod slices and SLURM/Open MPI launches report their own topology)."""
    d = config.distributed
    if jax.distributed.is_initialized():
        return
    if d.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)
    elif launched_processes(os.environ) > 1:
        jax.distributed.initialize()


def launched_processes(environ) -> int:
    """How many processes the launcher says this job has: the hosts of a TPU pod slice (TPU_WORKER_HOSTNAMES),
    a SLURM step's tasks, an Open MPI world; 1 when none says more (a single host needs no jax.distributed)."""
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    counts = [len(hosts)]
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            counts.append(int(environ.get(name, "1")))
        except ValueError:
            continue
    return max(counts)


def _schedule(config):
    o = config.optimizer
    warmup = max(o.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(config.steps, warmup + 1),
                                              end_value=o.lr * o.min_lr_ratio)


def _state_shardings(abstract: TrainState, info: dict, mesh, strategy: str):
    """Parameters per the strategy's rules, optimizer state per its parameter plus ZeRO-1, step replicated.
    info: param_info of the model."""
    by_name = param_shardings(info, mesh, strategy)

    specs = optimizer_state_specs(abstract.opt_state, info, dict(mesh.shape), strategy, param_name)
    opt = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return TrainState(NamedSharding(mesh, PartitionSpec()), state_shardings(abstract.params, by_name),
                      state_shardings(abstract.rest, by_name), opt, abstract.graphdef)


class _Preemption:
    """SIGTERM, or Ctrl-C (SIGINT) once the steps run -> save at the next step and stop ("preempted" /
    "interrupted"). Ctrl-C before the first step (nothing new to save) or a second one stops at once
    (KeyboardInterrupt)."""

    def __init__(self):
        self.requested: str | None = None  # "SIGTERM" | "SIGINT"
        self.stepping = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and (not self.stepping or self.requested == "SIGINT"):
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    @property
    def status(self) -> str:
        return "interrupted" if self.requested == "SIGINT" else "preempted"

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def check_config(config, workdir: str) -> K2Config:
    """Everything about `config` and `workdir` that can be checked before anything is built, each problem one line
    naming the field to change (TrainConfigError): the model, steps, batch split, seq_len against the model's
    max_position_embeddings, the mesh against the devices and the model's dimensions (sharding rules), the
    workdir. Returns the model config."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TrainConfigError(message)

    for name, path in (("--workdir", workdir), ("config.init_from", config.init_from)):
        need("://" not in path, f"{name}={path}: k2jax reads and writes it with local file APIs; pass a local or "
                                f"mounted path (e.g. a gcsfuse mount of the bucket)")
    need(not os.path.exists(workdir) or os.path.isdir(workdir),
         f"--workdir={workdir} is a file, not a directory: pass a new directory or an earlier run's workdir")
    try:
        cfg = model_config(config)
    except (ConfigError, TypeError, ValueError, OSError) as e:
        raise TrainConfigError(f"config.model: {one_line(e)}") from None
    need(config.steps >= 1, f"config.steps={config.steps}: must be at least 1")
    need(config.seq_len >= 1, f"config.seq_len={config.seq_len}: must be at least 1")
    need(config.seq_len <= cfg.max_position_embeddings,
         f"config.seq_len={config.seq_len} is longer than the model's max_position_embeddings "
         f"({cfg.max_position_embeddings}): lower config.seq_len")
    need(config.grad_accum >= 1, f"config.grad_accum={config.grad_accum}: must be at least 1")
    n_proc = jax.process_count()
    need(config.global_batch >= 1 and config.global_batch % (n_proc * config.grad_accum) == 0,
         f"config.global_batch={config.global_batch} must be a positive multiple of processes x grad_accum "
         f"({n_proc} x {config.grad_accum})")
    need(config.mesh.strategy in STRATEGIES,
         f"config.mesh.strategy={config.mesh.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    try:
        mesh_shape = resolve_axis_sizes(dict(config.mesh.axes), jax.device_count())
    except MeshError as e:
        raise TrainConfigError(f"config.mesh.axes: {e}") from None
    context = mesh_shape.get("context", 1)
    need(config.seq_len % context == 0, f"config.seq_len={config.seq_len} does not split over the mesh's context "
                                        f"axis ({context}): make it a multiple of {context}")
    try:
        param_specs(param_info(abstract_model(cfg)), mesh_shape,
                    config.mesh.strategy)
    except ShardingRuleError as e:
        raise TrainConfigError(f"config.mesh.axes={mesh_shape}: {e}") from None
    need(config.checkpoint.every >= 1, f"config.checkpoint.every={config.checkpoint.every}: must be at least 1")
    need(config.metrics.every >= 1, f"config.metrics.every={config.metrics.every}: must be at least 1")
    need(config.ep_overflow in ("drop", "fail"), f"config.ep_overflow={config.ep_overflow!r}: 'drop' or 'fail'")
    kind = config.data.source.partition(":")[0]
    need(kind not in ("jsonl", "chat") or bool(config.data.tokenizer_dir),
         f"config.data.source={config.data.source}: {kind} data needs config.data.tokenizer_dir (a directory with "
         f"the release's tiktoken.model)")
    if config.init_from:  # a missing or damaged checkpoint: CheckpointError (exit 1)
        _same_model(read_metadata(local_path(config.init_from))["config"], cfg,
                    f"config.init_from={config.init_from} holds another model than the job's",
                    "describe it in config.model (preset, hf_config, overrides)")
    recorded = recorded_model(workdir)
    if recorded is not None:
        _same_model(recorded, cfg, f"--workdir={workdir} holds checkpoints of another model than the job's",
                    f"resume it with its own model (--config.model.hf_config={os.path.join(workdir, MODEL_RECORD)}) "
                    f"or pass a new --workdir")
    return cfg


def _same_model(saved: dict, cfg: K2Config, what: str, change: str) -> None:
    """A TrainConfigError naming the fields on which `saved` (a HF config dict) and the job's model differ."""
    try:
        differences = model_differences(saved, cfg)
    except (ConfigError, TypeError, ValueError) as e:
        raise TrainConfigError(f"{what}: its model config does not read: {one_line(e)}") from None
    if differences:
        raise TrainConfigError(f"{what}: {differences}; {change}")


def _mem_available() -> int | None:
    """The host's available memory in bytes, or None where /proc/meminfo does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def device_memory() -> tuple[int, str] | None:
    """(bytes one device can hold, what that is), or None when unknown: the accelerator's own limit, or on CPU
    the host's available memory shared by its CPU devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    available = _mem_available() if device.platform == "cpu" else None
    if available:
        n = jax.local_device_count()
        return available // n, f"available host memory / {n} CPU device{'s' if n > 1 else ''}"
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(compiled, config) -> int:
    """Bytes per device the compiled step needs (k2jax.tools.hlo_cost.memory_parts' total: its arguments, outputs not
    aliased to them, temporaries, code); a TrainConfigError naming what to change when that is more than a device
    holds."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    need = memory_parts(m)["total"]
    limit = device_memory()
    if limit is not None and need > limit[0]:
        raise TrainConfigError(
            f"the train step needs {_gib(need)} per device, more than the {_gib(limit[0])} of {limit[1]} "
            f"(config.seq_len={config.seq_len}, config.global_batch={config.global_batch}): lower seq_len or "
            f"global_batch, raise grad_accum, use more devices, or recompute activations: "
            f"--config.model.overrides.remat=full")
    return need


def _say(message: str) -> None:
    """A line of the job's own output (process 0; library logs stay at WARNING unless --verbosity asks)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _banner(config, cfg: K2Config, mesh, workdir: str, start: int, origin: str, config_source: str) -> None:
    tokens = config.global_batch * config.seq_len
    if config_source:
        _say(f"config: {config_source}")
    axes = " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
    device = mesh.devices.flat[0]
    _say(f"model: {config.model.hf_config or 'preset ' + config.model.preset}, {cfg.num_hidden_layers} layers, "
         f"{cfg.num_params():,} parameters ({cfg.num_active_params():,} active per token), {cfg.run.param_dtype}")
    _say(f"mesh: {axes} over {mesh.size} {device.platform} devices in {jax.process_count()} "
         f"process{'es' if jax.process_count() > 1 else ''}; parameters sharded by {config.mesh.strategy!r}")
    _say(f"parallelism: {describe_parallelism(parallelism(cfg, mesh))}")
    _say(f"batch: {config.global_batch} rows x {config.seq_len} tokens = {tokens:,} tokens per step"
         f"{f' in {config.grad_accum} microbatches' if config.grad_accum > 1 else ''}; data {config.data.source}")
    _say(f"run: steps {start} -> {config.steps} ({origin}), checkpoints every {config.checkpoint.every} steps in "
         f"{os.path.join(os.path.abspath(workdir), 'checkpoints')}")


def train(config, workdir: str, *, config_source: str = "") -> dict:
    """Runs (or resumes) the job. Returns {"status": "done" | "already_done" | "preempted" | "interrupted", "step":
    steps completed, "loss": the last step's loss (None when no step ran)}. config_source: how the config was made
    (e.g. its file and overrides), for the banner."""
    workdir = local_path(workdir)
    try:
        changed = startup.collective_flags(config.mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if changed and startup.jax_backends_started():
        raise UsageError(f"mesh.overlap_collectives={config.mesh.overlap_collectives} / offload_collectives="
                         f"{config.mesh.offload_collectives} comes too late: jax has started its "
                         f"backends in this process (train.py sets them before; in a notebook, call train() first)")
    maybe_initialize_distributed(config)
    cfg = check_config(config, workdir)
    mesh = make_mesh(dict(config.mesh.axes))
    proc = jax.process_index()
    preemption = _Preemption()  # from here on SIGTERM and Ctrl-C stop the job cleanly (saving what it has)
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        with jax.set_mesh(mesh):
            ckpts = TrainCheckpoints(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every,
                                     async_save=config.checkpoint.async_save, model=cfg)
            try:
                return _train(config, workdir, cfg, mesh, proc, ckpts, preemption, config_source)
            except KeyboardInterrupt:
                ckpts.wait()
                when = ("before the first step: nothing new to save" if not preemption.stepping else
                        "again: stopped without waiting for the next step")
                raise Interrupted(f"interrupted (Ctrl-C) {when}; {_latest(ckpts)}") from None
            finally:
                ckpts.close()
    except BaseException:
        _remove_if_empty(os.path.join(workdir, "checkpoints"), *([workdir] if created else []))  # none left empty
        raise
    finally:
        preemption.restore()


def _latest(ckpts: TrainCheckpoints) -> str:
    step = ckpts.latest_step()
    return f"the latest checkpoint is step {step} in {ckpts.directory}" if step is not None else "no checkpoint yet"


def _remove_if_empty(*directories: str) -> None:
    """Each directory, in order, if it is there and empty (process 0 of a multi-process job only)."""
    if jax.process_index() != 0:
        return
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:  # not there, or not empty
            pass


def _train(config, workdir, cfg, mesh, proc, ckpts, preemption, config_source) -> dict:
    latest = ckpts.latest_step()
    if latest is not None and latest >= config.steps:
        return {"status": "already_done", "step": latest, "loss": None}
    program = train_program(config, mesh)
    tx, schedule, shardings = program.tx, program.schedule, program.shardings
    origin = (f"resumed from the checkpoint of step {latest}" if latest is not None else
              f"parameters from {config.init_from}" if config.init_from else "fresh")
    _banner(config, cfg, mesh, workdir, latest or 0, origin, config_source)
    data = make_iterator(config.data, seq_len=config.seq_len, global_batch=config.global_batch,
                         vocab_size=cfg.vocab_size, seed=config.seed)  # a missing data file fails before compiling
    if proc == 0 and config.data.print_sample:  # chat data: what the loss is computed on, before paying for it
        sample = sample_text(config.data, seq_len=config.seq_len)
        if sample is not None:
            _say(sample)
    step_fn, seconds, cached = _compile(program, config)
    need = check_fits(step_fn, config)
    _say(f"compiled in {seconds:.1f} s" + (" (from the compilation cache)" if cached else "")
         + (f"; it needs {_gib(need)} per device" if need else ""))
    if latest is not None:
        state = ckpts.restore(latest, with_shardings(program.state_shapes, shardings), data)
    else:
        state = jax.jit(program.fresh_state, out_shardings=shardings)()
        if config.init_from:
            loaded = load_checkpoint(config.init_from, mesh=mesh, shardings=config.mesh.strategy,
                                     param_dtype=cfg.run.param_dtype)
            _, params, rest = nnx.split(loaded, nnx.Param, ...)
            state = TrainState(state.step, params, rest, jax.jit(tx.init, out_shardings=shardings.opt_state)(
                params), state.graphdef)
    state = jax.device_put(state, shardings)  # exactly the compiled step's input layout (a no-op when it is)
    rows = program.batch_rows
    start = int(state.step)
    writer = MetricWriter(workdir, enabled=proc == 0, tensorboard=config.metrics.tensorboard, start_step=start)
    flops_per_step = cfg.flops_per_token(config.seq_len) * config.global_batch * config.seq_len
    report = _Reporter(config, ckpts, writer, schedule, flops_per_step)
    pending, result = None, {"status": "done", "step": start, "loss": None}
    preemption.stepping = True  # Ctrl-C now saves at the next step
    try:
        for step in range(start, config.steps):
            if step == start and preemption.requested:  # SIGTERM before the first step: nothing new to save
                result["status"] = preemption.status
                break
            if step == config.profile.start_step:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            batch = {k: jax.make_array_from_process_local_data(rows, v) for k, v in next(data).items()}
            state, metrics = step_fn(state, batch)
            if config.profile.start_step >= 0 and step == config.profile.start_step + config.profile.num_steps - 1:
                jax.profiler.stop_trace()
            if pending is not None:  # the previous step's metrics: ready by now, no stall
                result["loss"] = report(*pending, next_metrics=metrics)
            pending = (step, metrics)
            done = step + 1
            stop = preemption.requested and done < config.steps  # read once (a later SIGTERM: the next step)
            if ckpts.should_save(done) or stop or done == config.steps:
                # this step's metrics first (they also check it is finite): a checkpoint never gets ahead of the
                # metrics log
                result["loss"] = report(*pending, force=True)
                pending = None
                writer.flush()  # everything logged so far survives a kill once this checkpoint exists
                ckpts.save(done, state, data, force=True)
                report.speed.mark_after_pause(time.perf_counter(), done)  # a save is not a step
            result["step"] = done
            if stop:
                result["status"] = preemption.status
                break
        if pending is not None:
            result["loss"] = report(*pending, force=True)
    finally:
        writer.close()
    return result


_CACHE_HITS: list[int] = []  # one entry per persistent compilation cache hit (jax.monitoring) while _compile runs


def _count_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS.append(1)


def _compile(program: TrainProgram, config):
    """(the compiled step, seconds, whether it came from the persistent compilation cache). A line every 30 s while
    it compiles; Ctrl-C stops the job at once (the compile runs in a worker thread)."""
    _CACHE_HITS.clear()
    jax.monitoring.register_event_listener(_count_cache_hit)
    try:
        with Heartbeat("compiling the train step", _say) as compiling:
            lowered = program.step_fn.lower(program.abstract_state(),
                                            program.abstract_batch(config.global_batch, config.seq_len))
            step_fn = interruptible(lowered.compile)
    finally:
        jax.monitoring.unregister_event_listener(_count_cache_hit)
    return step_fn, compiling.seconds, bool(_CACHE_HITS)


def _check_ep_overflow(step, metrics, ckpts, policy: str) -> int:
    """The routed rows the step's EP buffers dropped; with policy "fail", any is an EPOverflowError."""
    dropped = int(metrics.get("ep_dropped_rows", 0))
    if dropped and policy == "fail":
        ckpts.wait()
        raise EPOverflowError(f"step {step}: expert parallelism's receive buffers dropped {dropped} routed rows "
                              f"(config.ep_overflow='fail'); raise model.overrides.ep_capacity_factor (0: dropless) "
                              f"or set config.ep_overflow='drop'. Last checkpoint: step {ckpts.latest_step()} in "
                              f"{ckpts.directory}")
    return dropped


def _check_finite(step, metrics, ckpts) -> None:
    if not bool(metrics["finite"]):
        ckpts.wait()
        raise NonFiniteError(f"step {step}: loss {float(metrics['loss'])}, gradient norm "
                             f"{float(metrics['grad_norm'])}; the state was left as it was before this step. "
                             f"Last good checkpoint: step {ckpts.latest_step()} in {ckpts.directory}")


class _Reporter:
    """Fetches a step's metrics, checks the step was finite, and every `metrics.every` steps (or when forced)
    writes a row and prints a line. Throughput counts only finished steps between two rows (`Throughput`):
    never compilation, a checkpoint save or the first step's warm-up (the first row has none)."""

    def __init__(self, config, ckpts, writer, schedule, flops_per_step):
        self.config, self.ckpts, self.writer, self.schedule = config, ckpts, writer, schedule
        self.flops_per_step = flops_per_step
        self.speed = Throughput()
        self.conversations = RowSums(CONVERSATION_COUNTS)  # chat data cut to a row or left out, between rows
        self.started = False

    def __call__(self, step: int, metrics, *, next_metrics=None, force: bool = False) -> float:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        _check_finite(step, metrics, self.ckpts)
        dropped = _check_ep_overflow(step, metrics, self.ckpts, self.config.ep_overflow)
        loss = float(metrics["loss"])
        self.conversations.add(metrics)
        if dropped:
            _say(f"step {step}: expert parallelism dropped {dropped} routed rows (buffers of "
                 f"ep_capacity_factor x the balanced load are full)")
        row = force or step % self.config.metrics.every == 0
        window = None
        if self.started and row:
            window = self.speed.mark(now, self._done(step, next_metrics))
        if row:
            self._write(step, metrics, loss, window)
        if not self.started:  # the clock starts after the first step and its row (one-time costs: warm-up)
            self.speed.mark(time.perf_counter(), self._done(step, next_metrics))
            self.started = True
        return loss

    @staticmethod
    def _done(step: int, next_metrics) -> int:
        """Steps known finished: this one, and the next if it already ran (CPU dispatch often runs it inline)."""
        return step + 1 + int(next_metrics is not None and next_metrics["loss"].is_ready())

    def _write(self, step: int, metrics: dict, loss: float, window: tuple[int, float] | None) -> None:
        scalars = {k: v for k, v in metrics.items() if k != "finite"}
        scalars["lr"] = float(self.schedule(step))
        counts = self.conversations.take()  # since the previous row
        scalars.update(counts)
        line = f"step {step}/{self.config.steps}: loss {loss:.4f}, grad_norm {float(metrics['grad_norm']):.3f}"
        if window is not None:
            steps, seconds = window
            tflops = self.flops_per_step * steps / seconds / jax.device_count() / 1e12
            peak = self.config.metrics.peak_tflops_per_device
            scalars.update(token_rates(metrics, steps, seconds), tflops_per_device=tflops,
                           **({"mfu": tflops / peak} if peak else {}))
            line += describe_rates(scalars, trained=bool(counts))
            line += f", {tflops:.3g} TFLOP/s per device"
            if peak:
                line += f", MFU {scalars['mfu']:.1%}"
        line += describe_conversations(counts)
        self.writer.write(step, scalars)
        _say(line)
