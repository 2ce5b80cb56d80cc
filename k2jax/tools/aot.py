"""Ahead-of-time compile of a k2jax job for a TPU slice, on a machine without one: does it fit, and what it costs.

    k2jax-aot --config=configs/k2_v5p_256.py                       # the train step, for the slice the mesh needs
    k2jax-aot --config=configs/k2_infer_v5p.py --step=decode --report=decode.json
    k2jax-aot --config=configs/tiny.py --topology=v5p-8 --config.mesh.axes='{"fsdp": 4}'
    k2jax-aot --config=configs/k2_v5p_256.py --save_hlo=step.hlo     # also keep the compiled program
    k2jax-aot --hlo=train_step.hlo --topology=v5p-1024    # the step-time estimate of a program compiled elsewhere

    report = compile_report(config, step="train", topology="v5p-512")   # the same from Python: a dict

libtpu builds the slice's devices without the chips (`jax.experimental.topologies`, as MaxText's train_compile);
the config's mesh is laid over them, the state is abstract (ShapeDtypeStructs with their shardings: no memory
for weights anywhere), and the very functions train.py and the Generator jit are lowered and compiled by XLA:TPU
(Mosaic compiles the Pallas kernels, the memory planner runs). The report, per chip:

  memory      parameters, optimizer state, batch (or latent cache), temporaries (activations and workspace),
              outputs not aliased to inputs, generated code; their total against the chip's HBM, and `fits`
  flops       the compiled program's matrix FLOPs, every loop's trip count applied (k2jax/tools/hlo_cost.py; Pallas
              kernels count through their pl.CostEstimate), next to the useful FLOPs: the model's
              (cfg.flops_per_token x tokens per chip; x 4/3 under full remat, whose forward runs twice) and,
              for train, MuonClip's Newton-Schulz (newton_schulz_flops / chips). XLA's own cost analysis,
              which counts each loop body once, is kept for reference.
  hbm bytes   bytes the program reads and writes in HBM (hlo_cost, trip counts applied); for decode, the
              bound this puts on tokens/s at the chip's bandwidth
  collectives every all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute: executions per
              step (loop trip counts applied) and bytes moved per chip
  step time   the step predicted from the compiled schedule (k2jax/tools/step_time.py): compute, memory-bound ops,
              the communication and host transfers compute does not hide, the five costliest ops; on v5p also
              calibrated (compute-bound ops at the rate a measured run implies), each with its MFU; the kernels
              that declare no cost estimate (not counted) are named

--hlo=FILE (instead of --config) gives the FLOPs, HBM bytes, collectives and step time of a program compiled
elsewhere (its optimized HLO text) for --topology; --hlo_devices places its devices on the slice (a JSON list of
chip coordinates by device number), --hlo_useful_flops gives the model's FLOPs per chip for the MFU.

A program that does not fit (its arguments alone, found before compiling; the compiler's HBM check; or the total
above the chip's HBM) exits 1 with what to change; so does one with a Pallas kernel launch whose blocks need more
VMEM (on-chip memory) than a TensorCore has, which the report says is a kernel's launch limit, not HBM
(`vmem_exceeded`). `--report` writes the dict as JSON (keys in docs/aot.md, "The report").

TPU generations (name counts as in `gcloud`: TensorCores for v4 / v5p, chips for v5e / v6e) are in TPUS.
"""

from __future__ import annotations

from k2jax.tools import startup

startup.quiet()  # before jax is imported: no CUDA / libtpu start-up lines on a machine without those devices

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from k2jax.tools import commands  # noqa: E402
from k2jax.tools.hlo_cost import HloCost, memory_parts  # noqa: E402
from k2jax.tools.step_time import Machine, StepTime  # noqa: E402

GiB = 2 ** 30
# XLA:TPU's words for a kernel whose VMEM (on-chip scratch) does not suffice: "CompileTimeScopedVmemOom", "Ran out
# of memory in memory space vmem"
_VMEM = re.compile(r"vmem", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """A TPU generation as libtpu names it, and what one chip has."""
    libtpu_name: str        # topology prefix for get_topology_desc ("v5p:4x8x8")
    hbm_bytes: float        # HBM per chip the compiler may use
    peak_bf16_flops: float  # per chip
    hbm_bandwidth: float    # bytes/s per chip
    cores_per_chip: int     # TensorCores per chip: what the slice name counts for v4 / v5p (megacore)
    dims: int               # torus dimensions (3: v4 / v5p, 2: v5e / v6e)
    ici_link_bandwidth: float  # bytes/s of one ICI link in one direction
    wrap_from: int          # a slice dimension of at least this many chips has its wraparound links (a ring)
    host_bandwidth: float   # bytes/s between a chip and its host's memory (PCIe), one direction
    calibrated_efficiency: float | None = None  # the fraction of peak a measured run's compute ran at (docs/aot.md)

    @property
    def chip_config(self) -> str:
        return "megacore" if self.cores_per_chip == 2 else "default"


# Public per-chip figures (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e); v5p's HBM is what libtpu's memory
# planner reports as available (95.74 GiB of the 96). ICI: the pages' "interchip interconnect bandwidth" per chip
# (v4 2,400 Gbps, v5p 4,800, v5e 1,600, v6e 3,584; v5p's page also gives 1,200 GB/s bidirectional, so the figure
# is one direction) over the chip's links (6 on a 3D torus, 4 on a 2D one: v5e / v6e's "ICI ports per chip"):
# 50, 100, 50 and 112 GB/s per link and direction. Wraparound: v4 / v5p slices close a dimension into a ring from
# 4 chips (a full cube face), v5e / v6e only across the whole 16-chip pod dimension. Host link (what host
# offloading's transfers to and from host memory run at): the Cloud TPU pages give no per-chip PCIe figure; "How to
# Scale Your Model" (jax-ml.github.io/scaling-book, chapter 2) works its host-transfer problem with 1.5e10 bytes/s
# (PCIe 4.0 x16 is 3.2e10 raw, per direction), an assumption used for every generation here.
# Calibration (v5p only): MaxText's published DeepSeek-V3 run on v5p-1024 (tpu-recipes
# training/v5p/DeepSeek3-671B-MaxText: 90.67 s per step) compiled by MaxText's train_compile and estimated here with its
# splash attention costed from its shapes: 58.4 s with every compute-bound op at peak; the measured step time is met
# with those ops at 0.58 of peak (docs/aot.md, "Calibration").
_PCIE = 1.5e10
TPUS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 32 * GiB, 275e12, 1.2e12, 2, 3, 2400e9 / 8 / 6, 4, _PCIE),
    "v5p": TpuGeneration("v5p", 95.74 * GiB, 459e12, 2.765e12, 2, 3, 4800e9 / 8 / 6, 4, _PCIE, 0.58),
    "v5e": TpuGeneration("v5e", 16 * GiB, 197e12, 0.819e12, 1, 2, 1600e9 / 8 / 4, 16, _PCIE),
    "v6e": TpuGeneration("v6e", 32 * GiB, 918e12, 1.64e12, 1, 2, 3584e9 / 8 / 4, 16, _PCIE),
}
_ALIASES = {"v5litepod": "v5e", "v5": "v5p"}
STEPS = ("train", "prefill", "decode")
_libtpu_started: list[tuple[bool, bool]] = []  # this process's compiles' (overlap, offload) settings


class AotError(ValueError):
    """A topology, config or step that cannot be compiled as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str
    shape: tuple[int, ...]  # chips along each torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def spec(self) -> TpuGeneration:
        return TPUS[self.generation]

    @property
    def name(self) -> str:
        """The slice's usual name (v5p-512: 512 TensorCores = 256 chips)."""
        return f"{self.generation}-{self.chips * self.spec.cores_per_chip}"

    def machine(self, coords: list[tuple[int, ...]]) -> Machine:
        """What the step-time estimate needs of the slice; coords: each of the program's devices' chip."""
        spec = self.spec
        return Machine(spec.peak_bf16_flops, spec.hbm_bandwidth, spec.ici_link_bandwidth, self.shape,
                       tuple(d >= spec.wrap_from for d in self.shape), tuple(coords), spec.host_bandwidth)

    def devices(self) -> list:
        """The slice's chips as deviceless jax devices (one per chip: megacore on v4 / v5p)."""
        libtpu_env = {"TPU_SKIP_MDS_QUERY": "1",  # no metadata server off a TPU VM
                      "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # deviceless: no chip to hold exclusively
        if not startup.tpu_present():  # what libtpu would ask the metadata server, or print two lines about
            libtpu_env |= {"TPU_ACCELERATOR_TYPE": self.name, "TPU_WORKER_HOSTNAMES": "localhost"}
        from jax.experimental import topologies
        libtpu_name = f"{self.spec.libtpu_name}:{'x'.join(map(str, self.shape))}"
        per_host = tuple(min(2, s) for s in self.shape[:2]) + (1,)
        try:
            with _environ_defaults(libtpu_env):  # for libtpu alone: a child process must not see a TPU host
                topo = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name,
                                                    chip_config_name=self.spec.chip_config,
                                                    chips_per_host_bounds=per_host, num_slices=1)
        except RuntimeError as e:
            if "TPU support not installed" not in str(e):
                raise
            raise AotError(f"compiling for TPU needs libtpu: pip install 'jax[tpu]=={jax.__version__}' (or "
                           f"pip install -e '.[test]')") from None
        return list(topo.devices)


@contextlib.contextmanager
def _environ_defaults(values: dict[str, str]):
    """Sets each of `values` not already in os.environ for the block, and removes them again after it."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape for a power-of-two chip count (as gcloud lays them out): up to one host's 2x2 chips,
    then the last of the smallest dimensions doubled in turn (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..., 4x8x8
    for v5p-512; v5e: 2x2, 2x4, 4x4, 4x8, ..., 16x16)."""
    if chips < 1 or chips & (chips - 1):
        raise AotError(f"no standard TPU slice has {chips} chips (a power of two); name the shape, e.g. v5p:4x4x12")
    small = {1: (1, 1), 2: (1, 2), 4: (2, 2)}
    if chips in small:
        return small[chips] + (1,) * (dims - 2)
    shape = [2] * dims
    while math.prod(shape) < chips:
        i = max(d for d in range(dims) if shape[d] == min(shape))
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """"v5p-512" (gcloud's name: TensorCores on v4 / v5p, chips on v5e / v6e), or "v5p:4x8x8" (chips per
    dimension, libtpu's form). Generations: TPUS."""
    m = re.fullmatch(r"(v\w+?)(?:litepod)?([-:])([\dx]+)", name.strip())
    if not m:
        raise AotError(f"topology {name!r}: expected e.g. v5p-512 or v5p:4x8x8")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if "litepod" in name:
        gen = "v5e"
    if gen not in TPUS:
        raise AotError(f"topology {name!r}: unknown TPU generation {gen!r} (have {sorted(TPUS)})")
    spec = TPUS[gen]
    if m.group(2) == ":":
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != spec.dims or min(shape) < 1:
            raise AotError(f"topology {name!r}: a {gen} slice has {spec.dims} dimensions")
        return Topology(gen, shape)
    cores = int(m.group(3))
    if cores % spec.cores_per_chip:
        raise AotError(f"topology {name!r}: {gen} slices count {spec.cores_per_chip} cores per chip")
    return Topology(gen, _torus(cores // spec.cores_per_chip, spec.dims))


def default_topology(axes: dict, generation: str = "v5p") -> Topology:
    """The smallest standard slice the mesh axes need (their product; no -1 axis)."""
    if any(int(s) < 1 for s in axes.values()):
        raise AotError(f"mesh axes {dict(axes)} have a -1: give --topology (the slice fills it in)")
    return Topology(generation, _torus(math.prod(int(s) for s in axes.values()), TPUS[generation].dims))


# ---- compiling a job ------------------------------------------------------------------------------------------

def _per_chip_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _lower(config, step: str, mesh):
    """(lowered program, {memory part: per-chip bytes of the arguments}, {"model": FLOPs of the model's forward
    (and backward) in one run, "optimizer": MuonClip's Newton-Schulz}, tokens per run, the model config, the
    prefill's tokens per row per pass (None for the other steps))."""
    from flax import nnx

    from k2jax.model.placement import abstract_model
    from k2jax.optim.muon_clip import newton_schulz_flops
    from k2jax.job_config import model_config
    from k2jax.training.loop import train_program
    if step == "train":
        program = train_program(config, mesh)
        state, batch = program.abstract_state(), program.abstract_batch(config.global_batch, config.seq_len)
        tokens = config.global_batch * config.seq_len
        model_flops = program.cfg.flops_per_token(config.seq_len) * tokens
        if program.cfg.run.remat == "full":
            model_flops *= 4 / 3
        useful = {"model": model_flops,
                  "optimizer": newton_schulz_flops(abstract_model(program.cfg), config.optimizer.ns_steps)}
        parts = {"parameters": _per_chip_bytes(state.params) + _per_chip_bytes(state.rest),
                 "optimizer_state": _per_chip_bytes(state.opt_state), "batch": _per_chip_bytes(batch)}
        return program.step_fn.lower(state, batch), parts, useful, tokens, program.cfg, None
    from k2jax.inference.generate import Generator
    from k2jax.model.experts import expert_format_of
    from k2jax.model.target import Target
    cfg = model_config(config)
    infer = config.infer
    if infer.max_len > cfg.max_position_embeddings:
        raise AotError(f"infer.max_len {infer.max_len} exceeds the model's max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    try:
        expert_format = expert_format_of(infer.weights, "infer.weights")
    except ValueError as e:
        raise AotError(str(e)) from None
    if infer.weights != "dequantized" and not cfg.num_moe_layers:
        raise AotError(f"infer.weights={infer.weights!r} keeps the routed experts quantised, and this model has no "
                       f"MoE layers")
    if not (isinstance(infer.prefill_chunk, int) and infer.prefill_chunk >= 0):
        raise AotError(f"infer.prefill_chunk must be an int >= 0 (0: the Generator's default), got "
                       f"{infer.prefill_chunk!r}")
    model = abstract_model(cfg, mesh, config.mesh.strategy, expert_format=expert_format)
    weights = _per_chip_bytes(nnx.state(model))
    generator = Generator(model, prefill_chunk=infer.prefill_chunk or None)
    lowered = generator.lower(step, batch=infer.batch, max_len=infer.max_len, prompt_len=infer.prompt_len)
    # the prefill as the Generator runs it: one pass (chunk = the prompt), or chunks of this many tokens per row
    chunk = min(generator.chunk_len(infer.batch), infer.prompt_len) if step == "prefill" else None
    cache_shape = (cfg.num_hidden_layers, infer.batch, infer.max_len, Target.of(cfg).latent_slot)  # slot padded on TPU
    cache_bytes = math.prod(cache_shape) * np.dtype(cfg.run.dtype).itemsize
    if step == "prefill":
        tokens = infer.batch * infer.prompt_len
        useful = {"model": cfg.flops_per_token(infer.prompt_len, training=False) * tokens}
    else:
        tokens = infer.batch
        useful = {"model": cfg.flops_per_token(infer.max_len, training=False, causal=False) * tokens}
    return lowered, {"parameters": weights, "cache": cache_bytes // _cache_shards(cache_shape, mesh)}, useful, \
        tokens, cfg, chunk


def _decode_minimum(config, cfg) -> float:
    """The fewest HBM bytes a decode step of config.infer's rows and cache can move over all chips
    (k2jax.inference.generate.decode_bytes_minimum), the routed experts in infer.weights' form."""
    from k2jax.inference.generate import decode_bytes_minimum
    from k2jax.model.experts import expert_format_of
    from k2jax.model.placement import abstract_model
    model = abstract_model(cfg, expert_format=expert_format_of(config.infer.weights, "infer.weights"))
    return decode_bytes_minimum(model, config.infer.batch, config.infer.max_len)


def _cache_shards(shape: tuple[int, ...], mesh) -> int:
    """Devices a latent cache of `shape` is split over (its rows, then its slots: sharding.rules.CACHE_AXES_LBSX)."""
    from sharding.rules import CACHE_AXES_LBSX, activation_spec, mesh_axes
    return math.prod(dict(mesh.shape)[a] for entry in activation_spec(shape, CACHE_AXES_LBSX, mesh)
                     for a in mesh_axes(entry))


# what a job whose weights do not fit could hold its routed experts as instead (infer.weights)
_QUANTISED_ADVICE = {"dequantized": ", or quantised routed experts as the releases ship them (infer.weights='fp8' or "
                                    "'int4')",
                     "fp8": ", or INT4-resident routed experts (infer.weights='int4': K2-Thinking and later)",
                     "int4": ""}


def _advice(report: dict) -> str:
    m = report["memory"]
    big = max(("parameters", "optimizer_state", "temporaries", "cache"), key=lambda k: m.get(k, 0))
    train = report["step"] == "train"
    tips = {
        "parameters": "more chips on the fsdp / expert axes"
                      + (", or bfloat16 parameters (model.overrides.param_dtype)"
                         if report["model"]["param_dtype"] == "float32" else "")
                      + ("" if train else _QUANTISED_ADVICE[report["model"].get("weights", "dequantized")]),
        "optimizer_state": "a data axis (ZeRO-1 splits optimizer state over it) or more fsdp / expert chips",
        "temporaries": ((("" if report["model"].get("remat") == "full" else "--config.model.overrides.remat=full, ")
                         + "more grad_accum microbatches, fewer tokens per chip, or a smaller expert-parallel buffer "
                           "(model.overrides.ep_capacity_factor)") if train else
                        "a smaller infer.batch or infer.prompt_len, or more chips on the batch axes"),
        "cache": "a smaller infer.batch or infer.max_len, or more chips on the batch axes",
    }
    return f"the largest part is {big.replace('_', ' ')} ({m.get(big, 0) / GiB:.1f} GiB): try {tips[big]}"


def compile_report(config, *, step: str = "train", topology: str | None = None, save_hlo: str | None = None,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Compiles `step` of the job `config` (base_config() + a configs/ file) for a deviceless TPU slice and
    returns the report (module docstring). topology: a name for parse_topology; default: the smallest v5p
    slice the config's mesh needs. save_hlo: a file for the compiled program's text. Never raises for a program
    that does not fit: report["fits"] is False."""
    from sharding.mesh import MeshError, make_mesh
    from sharding.rules import ShardingRuleError
    if step not in STEPS:
        raise AotError(f"step must be one of {STEPS}, got {step!r}")
    jax.config.update("jax_platforms", "cpu")  # the host runs nothing; the TPU devices are deviceless
    topo = parse_topology(topology) if topology else default_topology(dict(config.mesh.axes))
    overlap, offload = bool(config.mesh.overlap_collectives), bool(config.mesh.offload_collectives)
    if _libtpu_started and _libtpu_started[0] != (overlap, offload):
        raise AotError(f"mesh.overlap_collectives={overlap} / offload_collectives={offload} differ from what libtpu "
                       f"started with in this process; compile it in a new process (k2jax-aot runs one compile "
                       f"per process)")
    try:
        startup.collective_flags(config.mesh)
    except ValueError as e:
        raise AotError(str(e)) from None
    if save_hlo:
        try:
            open(save_hlo, "w").close()  # a path that cannot be written fails now, not after the compile
        except OSError as e:
            raise AotError(f"--save_hlo {save_hlo}: {e.strerror}") from None
    devices = topo.devices()
    _libtpu_started.append((overlap, offload))
    try:
        mesh = make_mesh(dict(config.mesh.axes), devices)
    except MeshError as e:
        raise AotError(f"the config's mesh does not fit {topo.name} ({topo.chips} chips): {e}") from None
    hbm = topo.spec.hbm_bytes
    report = {"step": step, "topology": topo.name, "chips": topo.chips, "mesh": dict(mesh.shape),
              "strategy": config.mesh.strategy, "overlap_collectives": overlap, "offload_collectives": offload,
              "hbm_per_chip": hbm,
              "libtpu": _libtpu_version(),
              "jax": jax.__version__}
    log(f"k2jax-aot: {step} step on {topo.name} ({topo.chips} chips, mesh {dict(mesh.shape)}, "
        f"strategy {config.mesh.strategy})")
    with jax.set_mesh(mesh):
        with commands.Heartbeat("tracing and lowering", log) as hb:
            try:
                lowered, parts, useful, tokens, cfg, chunk = _lower(config, step, mesh)
            except ShardingRuleError as e:
                raise AotError(f"the mesh {dict(mesh.shape)} cannot split the model: {e}") from None
        report["lower_seconds"] = round(hb.seconds, 1)
        report["model"] = {"layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts,
                           "params": cfg.num_params(), "param_dtype": cfg.run.param_dtype, "dtype": cfg.run.dtype,
                           "remat": cfg.run.remat}
        if step != "train":
            report["model"]["weights"] = config.infer.weights
        if chunk is not None:
            report["prefill_chunk"] = chunk
        arguments = sum(parts.values())
        if arguments > hbm:  # no compile needs to say so (it would take minutes for a large model)
            report.update(fits=False, memory=dict(parts), error=f"the step's arguments alone take "
                          f"{arguments / GiB:.2f} GiB per chip, more than its {hbm / GiB:.2f} GiB of HBM")
            report["advice"] = _advice(report)
            return report
        try:
            with commands.Heartbeat("compiling for TPU (minutes for a large model on 2 cores)", log) as hb:
                compiled = commands.interruptible(lowered.compile)  # Ctrl-C does not wait for the compile
        except Exception as e:  # XLA's HBM check raises at compile time (RESOURCE_EXHAUSTED)
            message = str(e)
            if "memory" not in message.lower() and "RESOURCE_EXHAUSTED" not in message:
                raise
            if _VMEM.search(message):  # a kernel's on-chip scratch, not HBM: more chips would not help
                kernel = re.search(r'op_name="([^"]+)"', message)
                report.update(fits=False, vmem_exceeded=True, memory=dict(parts),
                              compile_seconds=round(time.perf_counter() - hb.start, 1),
                              error=message.strip().splitlines()[0][:500])
                report["advice"] = (f"a Pallas kernel launch{f' ({kernel.group(1)})' if kernel else ''} needs more "
                                    f"VMEM (a TensorCore's on-chip memory) than the chip has: a limit of the "
                                    f"kernel's launch, not of HBM, so more chips do not help; try smaller blocks in "
                                    f"the kernel's launch settings (LAUNCH beside it in pallas_kernels/) or fewer "
                                    f"tokens per pass (infer.prefill_chunk)")
                return report
            required = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
            memory = dict(parts)
            if required:  # the compiler's figure, in its units (powers of 1024): arguments + temporaries, as
                # measured against programs that fit (2026-12-02, libtpu 0.0.42.1: the figure of a reduced K2
                # decode that overflowed by its cache was its arguments plus the temporaries its half-size fit had)
                total = int(float(required.group(1)) * 1024 ** "KMGT".index(required.group(2)) * 1024)
                memory.update(temporaries=max(total - sum(parts.values()), 0), total=total)
                report["hbm_margin"] = (hbm - total) / hbm
            report.update(fits=False, compile_seconds=round(time.perf_counter() - hb.start, 1),
                          error=message.strip().splitlines()[0][:500], memory=memory)
            report["advice"] = _advice(report)
            return report
    report["compile_seconds"] = round(hb.seconds, 1)
    memory = {**parts, **memory_parts(compiled.memory_analysis())}
    total = memory["total"]
    report["memory"] = memory
    report["fits"] = total <= hbm
    report["hbm_margin"] = (hbm - total) / hbm
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    text = compiled.as_text()
    if save_hlo:
        with open(save_hlo, "w") as f:
            f.write(text)
    cost = HloCost(text)
    per_chip = {f"{k}_per_chip": v / topo.chips for k, v in useful.items()}
    useful_per_chip = sum(per_chip.values())
    report.update(_program_costs(cost, topo, [tuple(d.coords) for d in mesh.devices.flat], useful_per_chip))
    hbm_bytes = cost.hbm_bytes
    report["flops"].update(per_chip, xla_cost_analysis_per_chip=float(xla.get("flops", 0.0)))
    report["xla_bytes_accessed_per_chip"] = float(xla.get("bytes accessed", 0.0))
    seconds_bound = report["step_seconds_lower_bound"]
    report["tokens_per_step"] = tokens
    report["tokens_per_second_bound"] = tokens / seconds_bound if seconds_bound else None
    if step == "decode":
        report["hbm_bytes_per_generated_token"] = hbm_bytes * topo.chips / tokens
        report["hbm_bytes_minimum_per_step"] = _decode_minimum(config, cfg)
        report["hbm_bytes_over_minimum"] = hbm_bytes * topo.chips / report["hbm_bytes_minimum_per_step"]
    if not report["fits"]:
        report["advice"] = _advice(report)
    return report


def hlo_report(path: str, topology: str, *, devices: str | None = None,
               useful_flops_per_chip: float | None = None) -> dict:
    """The step-time estimate of a program already compiled for a TPU slice (its optimized, scheduled HLO text,
    e.g. another trainer's `compiled.as_text()`): FLOPs, HBM bytes, collectives and `step_seconds_estimate` as
    compile_report gives them, with no memory figures. devices: a JSON file listing each program device's chip
    coordinates ([[x, y, z], ...], by device number); default: the slice's devices in libtpu's order.
    useful_flops_per_chip: the model's FLOPs per chip per step, for `mfu_estimate`."""
    topo = parse_topology(topology)
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AotError(f"--hlo {path}: {getattr(e, 'strerror', None) or 'not a text file'}") from None
    if "ENTRY" not in text:
        raise AotError(f"--hlo {path}: not an HLO module's text (no ENTRY computation)")
    partitions = re.search(r"num_partitions=(\d+)", text.split("\n", 1)[0])
    if partitions and int(partitions.group(1)) != topo.chips:
        raise AotError(f"--hlo {path}: the program runs on {partitions.group(1)} devices, {topo.name} has "
                       f"{topo.chips} chips")
    coords = _device_coords(devices, topo)
    try:
        cost = HloCost(text)
        report = {"step": "hlo", "hlo": path, "topology": topo.name, "chips": topo.chips,
                  "libtpu": _libtpu_version(), "jax": jax.__version__}
        report.update(_program_costs(cost, topo, coords, useful_flops_per_chip))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError, ZeroDivisionError) as e:
        raise AotError(f"--hlo {path}: cannot read the program ({type(e).__name__}: {e})") from None
    return report


def _device_coords(devices: str | None, topo: Topology) -> list[tuple[int, ...]]:
    """Each program device's chip: from the JSON file `devices`, checked against the slice, or libtpu's order."""
    if not devices:
        jax.config.update("jax_platforms", "cpu")
        return [tuple(d.coords) for d in topo.devices()]
    try:
        with open(devices) as f:
            coords = [tuple(int(v) for v in c) for c in json.load(f)]
    except (OSError, ValueError, TypeError) as e:
        raise AotError(f"--hlo_devices {devices}: expected a JSON list of chip coordinates ({e})") from None
    inside = all(len(c) == topo.spec.dims and all(0 <= v < n for v, n in zip(c, topo.shape)) for c in coords)
    if len(coords) != topo.chips or len(set(coords)) != len(coords) or not inside:
        raise AotError(f"--hlo_devices {devices}: expected {topo.chips} distinct chips of {topo.name} "
                       f"(shape {'x'.join(map(str, topo.shape))}), got {len(coords)} coordinates")
    return coords


def _program_costs(cost: HloCost, topo: Topology, coords: list[tuple[int, ...]],
                   useful_per_chip: float | None) -> dict:
    """The report's entries read from the compiled program: FLOPs, HBM bytes, their roofline bound, collectives,
    kernels, and the step-time estimate at the roofline (every compute-bound op at peak) and, where the generation
    has a calibration, at the compute rate a measured run implies; each with its MFU."""
    flops, hbm_bytes = cost.flops, cost.hbm_bytes
    machine = topo.machine(coords)
    estimate = StepTime(cost, machine)
    out = {"flops": {"compiled_per_chip": flops, "useful_per_chip": useful_per_chip,
                     "compiled_over_useful": flops / useful_per_chip if useful_per_chip else None},
           "hbm_bytes_accessed_per_chip": hbm_bytes,
           "step_seconds_lower_bound": max(flops / topo.spec.peak_bf16_flops, hbm_bytes / topo.spec.hbm_bandwidth),
           "collectives": cost.collectives(), "pallas_kernels": cost.pallas_kernels(),
           "kernels_without_cost_estimate": cost.uncosted_kernels(),
           "step_seconds_estimate": estimate.seconds, "mfu_estimate": _mfu(useful_per_chip, estimate.seconds, topo),
           "step_time": estimate.summary()}
    efficiency = topo.spec.calibrated_efficiency
    if efficiency:
        calibrated = StepTime(cost, dataclasses.replace(machine, compute_efficiency=efficiency))
        out |= {"compute_efficiency_calibrated": efficiency, "step_seconds_calibrated": calibrated.seconds,
                "mfu_calibrated": _mfu(useful_per_chip, calibrated.seconds, topo)}
    return out


def _mfu(useful_per_chip: float | None, seconds: float, topo: Topology) -> float | None:
    return useful_per_chip / (seconds * topo.spec.peak_bf16_flops) if useful_per_chip and seconds else None


def _libtpu_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("libtpu")
    except Exception:
        return None


def count(n: float) -> str:
    """A count with the unit its size calls for: 1.03T, 32.9B, 16.4M, 12K."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_report(r: dict) -> str:
    """The report as the table the CLI prints (compile_report's or hlo_report's)."""
    if r["step"] == "hlo":
        lines = [f"compiled program {r['hlo']}, {r['topology']} ({r['chips']} chips)"
                 f"  [libtpu {r['libtpu']}, jax {r['jax']}]"]
        return "\n".join(lines + _cost_lines(r))
    lines = [f"{r['step']} step, {r['topology']} ({r['chips']} chips), mesh {r['mesh']}, strategy {r['strategy']}"
             f"  [libtpu {r['libtpu']}, jax {r['jax']}]"]
    if "model" in r:
        m = r["model"]
        lines.append(f"model: {m['layers']} layers, {m['experts']} experts, {count(m['params'])} params, "
                     f"{m['param_dtype']} params / {m['dtype']} compute, remat {m['remat']}"
                     + (f", routed experts {m['weights'].upper()}-resident" if m.get("weights") in ("fp8", "int4")
                        else ""))
    lines.append("memory per chip (GiB):")
    for k, v in r["memory"].items():
        lines.append(f"  {k.replace('_', ' '):<22}{v / GiB:>9.2f}")
    hbm = r["hbm_per_chip"] / GiB
    if "total" in r["memory"]:
        lines.append(f"  {'of HBM':<22}{hbm:>9.2f}   {'fits' if r['fits'] else 'DOES NOT FIT'}"
                     f" (margin {100 * r['hbm_margin']:.1f} %)")
    elif r.get("vmem_exceeded"):
        lines.append(f"  does not compile: a kernel launch exceeds its VMEM (not HBM): {r['error']}")
    else:
        lines.append(f"  does not fit {hbm:.2f} GiB: {r['error']}")
    if "prefill_chunk" in r:
        lines.append(f"prefill: {r['prefill_chunk']} tokens per row per pass")
    if "compile_seconds" in r:
        lines.append(f"compile: {r['compile_seconds']:.0f} s (lowering {r['lower_seconds']:.0f} s)")
    if "flops" in r:
        lines += _cost_lines(r)
    if "advice" in r:
        lines.append(f"to fit: {r['advice']}")
    return "\n".join(lines)


def _cost_lines(r: dict) -> list[str]:
    """FLOPs, HBM bytes, the step-time estimate and the collectives of a report."""
    f, lines = r["flops"], []
    ratio = f.get("compiled_over_useful")
    parts = ", ".join(f"{k.removesuffix('_per_chip')} {v:.3e}" for k, v in f.items()
                      if k.endswith("_per_chip") and k not in ("compiled_per_chip", "useful_per_chip",
                                                               "xla_cost_analysis_per_chip"))
    useful = f", useful {f['useful_per_chip']:.3e}" if f.get("useful_per_chip") else ""
    lines.append(f"FLOPs per chip: compiled {f['compiled_per_chip']:.3e}" + useful + (f" ({parts})" if parts else "")
                 + (f"; compiled / useful {ratio:.2f}" if ratio else ""))
    tokens = f", <= {r['tokens_per_second_bound']:.0f} tokens/s" if r.get("tokens_per_second_bound") else ""
    lines.append(f"HBM bytes accessed per chip: {r['hbm_bytes_accessed_per_chip']:.3e}; step >= "
                 f"{r['step_seconds_lower_bound'] * 1e3:.2f} ms" + tokens)
    if "hbm_bytes_per_generated_token" in r:
        lines.append(f"HBM bytes per generated token (all chips): {r['hbm_bytes_per_generated_token']:.3e}")
        least, over = r["hbm_bytes_minimum_per_step"], r["hbm_bytes_over_minimum"]
        lines.append(f"HBM bytes per step (all chips): {least * over:.3e}, {over:.2f} x the minimum {least:.3e}")
    lines.append(f"Pallas kernels in the program: {r['pallas_kernels']}")
    if r.get("kernels_without_cost_estimate"):
        lines.append("kernels without a cost estimate (their FLOPs not counted, their time only as HBM bytes): "
                     + ", ".join(f"{k} x{n}" for k, n in r["kernels_without_cost_estimate"].items()))
    if r.get("step_seconds_estimate"):
        lines += _step_time_lines(r)
    lines.append("collectives per step (count, bytes per chip):")
    for c in r["collectives"]:
        lines.append(f"  {c['op']:<20}{c['count']:>8}  {c['bytes'] / GiB:>9.3f} GiB")
    return lines


def _step_time_lines(r: dict) -> list[str]:
    est, st = r["step_seconds_estimate"], r["step_time"]
    lines = [f"step time estimate: {est * 1e3:.2f} ms" + (f", MFU {100 * r['mfu_estimate']:.1f} %"
                                                           if r.get("mfu_estimate") else "")
             + f" (compute {st['compute_seconds'] * 1e3:.2f} ms, memory-bound ops "
               f"{st['memory_bound_seconds'] * 1e3:.2f} ms, exposed communication and transfers "
               f"{sum(st['exposed_seconds'].values()) * 1e3:.2f} ms)"]
    if r.get("step_seconds_calibrated"):
        lines.append(f"  calibrated (compute-bound ops at {r['compute_efficiency_calibrated']:.2f}"
                     f" of peak, as a measured run): {r['step_seconds_calibrated'] * 1e3:.2f} ms"
                     + (f", MFU {100 * r['mfu_calibrated']:.1f} %" if r.get("mfu_calibrated") else ""))
    for kind, busy in st["collective_busy_seconds"].items():
        lines.append(f"  {kind:<20} {busy * 1e3:>10.2f} ms on the interconnect, "
                     f"{st['exposed_seconds'].get(kind, 0.0) * 1e3:.2f} ms exposed")
    for kind, busy in st.get("offload_busy_seconds", {}).items():
        where = {"host transfer": "on the host link", "sparsecore": "on the SparseCores"}.get(kind, "beside compute")
        lines.append(f"  {kind:<20} {busy * 1e3:>10.2f} ms {where}, "
                     f"{st['exposed_seconds'].get(kind, 0.0) * 1e3:.2f} ms exposed")
    if st["exposed_seconds"].get("copy"):
        lines.append(f"  {'DMA copies':<20} {st['exposed_seconds']['copy'] * 1e3:>10.2f} ms exposed")
    lines.append("  costliest ops:")
    lines += [f"    {o['seconds'] * 1e3:>9.2f} ms  {o['op'][:110]}" for o in st["top_ops"]]
    return lines


# ---- command line ---------------------------------------------------------------------------------------------

def _define_flags() -> None:
    from absl import flags
    commands.define_job_config()
    flags.DEFINE_string("topology", None, "TPU slice to compile for: v5p-512 (gcloud's name) or v5p:4x8x8; "
                        f"generations {', '.join(TPUS)}. Default: the smallest v5p slice the config's mesh needs "
                        "(with --hlo: the slice the program was compiled for, required).")
    flags.DEFINE_enum("step", "train", list(STEPS), "train: the train step as train.py runs it; prefill / "
                      "decode: the Generator's, at config.infer's batch, max_len and prompt_len.")
    flags.DEFINE_string("report", None, "Also write the report as JSON to this file.")
    flags.DEFINE_string("save_hlo", None, "Also write the compiled program's optimized HLO text to this file (to "
                        "estimate it again later with --hlo).")
    flags.DEFINE_string("hlo", None, "Instead of compiling a config: estimate the step time of a program already "
                        "compiled for --topology, from its optimized HLO text (e.g. another trainer's "
                        "compiled.as_text()).")
    flags.DEFINE_string("hlo_devices", None, "With --hlo: a JSON file of each program device's chip coordinates "
                        "([[x, y, z], ...]); default: the slice's devices in libtpu's order.")
    flags.DEFINE_float("hlo_useful_flops", None, "With --hlo: the model's FLOPs per chip per step (for the MFU).")


def main(argv) -> int:
    from absl import flags
    if len(argv) > 1:
        raise commands.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    if (FLAGS.config is None) == (FLAGS.hlo is None):
        raise AotError("give one of --config (a job to compile) and --hlo (a program compiled already)")
    if FLAGS.hlo and (FLAGS["step"].present or FLAGS.save_hlo):
        raise AotError("--step and --save_hlo are for compiling a --config; --hlo reads a program compiled already")
    if not FLAGS.hlo and (FLAGS.hlo_devices or FLAGS.hlo_useful_flops is not None):
        raise AotError("--hlo_devices and --hlo_useful_flops go with --hlo")
    if FLAGS.hlo:
        if not FLAGS.topology:
            raise AotError("--hlo needs --topology: the slice the program was compiled for")
        report = hlo_report(FLAGS.hlo, FLAGS.topology, devices=FLAGS.hlo_devices,
                            useful_flops_per_chip=FLAGS.hlo_useful_flops)
    else:
        try:
            report = compile_report(FLAGS.config, step=FLAGS.step, topology=FLAGS.topology, save_hlo=FLAGS.save_hlo)
        except KeyboardInterrupt:
            raise commands.Interrupted("interrupted (Ctrl-C): nothing was compiled or written") from None
    print(format_report(report))
    if FLAGS.report:
        with open(FLAGS.report, "w") as f:
            json.dump(report, f, indent=1)
    if not report.get("fits", True):
        what = "does not compile for" if report.get("vmem_exceeded") else "does not fit"
        print(f"k2jax-aot: error: the {report['step']} step {what} {report['topology']}: {report['advice']}",
              file=sys.stderr)
        return commands.FAILED
    return commands.OK


def cli():
    """k2jax-aot: exit 0 it fits, 1 it does not fit (the report says by how much and what to change), 2 a bad flag,
    config, topology or mesh (one line: `k2jax-aot: error: ...`), 130 Ctrl-C (k2jax/tools/commands.py)."""
    from absl import flags

    from k2jax.model.config import ConfigError
    _define_flags()
    for name in ("config", "topology", "step", "report", "save_hlo", "hlo", "hlo_devices",
                 "hlo_useful_flops"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    commands.run(main, prog="k2jax-aot", job_config=True, doc=__doc__,
                 errors={AotError: commands.USAGE, ConfigError: commands.USAGE})


if __name__ == "__main__":
    cli()
