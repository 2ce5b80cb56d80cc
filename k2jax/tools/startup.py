"""A quiet start for k2jax's commands: no start-up lines from accelerator runtimes the machine does not have.

    from k2jax.tools import startup
    startup.quiet()      # first thing in a command's module, before jax is imported

With the test extra installed (libtpu and the CUDA plugin, which the README's two commands share in one .venv),
`import jax` and jax's first use print about ten lines on a machine with neither a TPU nor an NVIDIA GPU: the CUDA
plugin's "Could not find cuda drivers on your machine, GPU will not be used." (each after absl's "WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR"), its "Unable to load CUDA" traceback, and
libtpu's "could not determine TPU accelerator type" and "E0000 ... unexpected worker hostname" lines. No environment
variable silences the first kind (TF_CPP_MIN_LOG_LEVEL does not reach them); the others come from starting the TPU
and CUDA runtimes at all. So `quiet()`, unless jax is already imported or --verbosity was given:

- sets JAX_PLATFORMS=cpu when the user has not set it and the machine has no accelerator, found the way jax itself
  looks for one (`accelerator_present`: a Google TPU PCI device, /dev/nvidia0, /dev/nvidiactl, /dev/dxg, AMD's
  /dev/kfd): jax then never starts the TPU or CUDA runtime (it would have fallen back to the CPU anyway);
- imports jax (and, on such a machine, registers its plugins, which load the CUDA libraries) with stderr passing
  through a filter that drops exactly the CUDA plugin's "Could not find cuda drivers" lines and the absl preamble
  printed before each, and passes every other line on unchanged once the import is done: a real error still shows.

k2jax-aot's deviceless TPU compile tells libtpu the slice it compiles for and a worker host itself, where the
machine has no TPU (k2jax/tools/aot.py: libtpu's accelerator-type and worker-hostname lines).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import re
import sys
import tempfile

# what jax's own accelerator checks look at (jax/_src/hardware_utils.py)
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")

_NOISE = re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine")
_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


# libtpu's async collective fusion: all-gathers and all-reduces start early and advance inside compute fusions, so a
# step waits only for what compute does not cover (the flags MaxText sets in LIBTPU_INIT_ARGS for its MoE runs).
OVERLAP_FLAGS = ("--xla_tpu_enable_async_collective_fusion=true "
                 "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
                 "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                 "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
                 "--xla_enable_async_all_reduce=true")
# libtpu's SparseCore collective offload (v5p and later): all-gathers, reduce-scatters and all-reduces run on the
# chip's SparseCores, beside the TensorCores' compute (the flags of MaxText's v5p DeepSeek-V3 recipe,
# ENABLE_SPARSECORE_OFFLOADING_FOR_RS_AG_AR in its benchmarks/xla_flags_library.py).
OFFLOAD_FLAGS = ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather=false "
                 "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=false "
                 "--xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter=false "
                 "--xla_tpu_enable_sparse_core_collective_offload_all_gather=true "
                 "--xla_tpu_enable_sparse_core_collective_offload_reduce_scatter=true "
                 "--xla_tpu_enable_sparse_core_collective_offload_all_reduce=true "
                 "--xla_tpu_enable_all_gather_offload_tracing=true "
                 "--xla_tpu_enable_reduce_scatter_offload_tracing=true "
                 "--xla_tpu_enable_all_reduce_offload_tracing=true --xla_tpu_use_tc_device_shape_on_sc=true "
                 "--xla_sc_enable_instruction_fusion=false --xla_sc_disjoint_spmem=false "
                 "--xla_sc_disable_megacore_partitioning=true")
# the job config's mesh settings that are libtpu flags; libtpu reads LIBTPU_INIT_ARGS once, when it starts
COLLECTIVE_FLAGS = {"overlap_collectives": OVERLAP_FLAGS, "offload_collectives": OFFLOAD_FLAGS}


def collective_flags(mesh) -> bool:
    """Puts each of COLLECTIVE_FLAGS that the job config's `mesh` turns on in LIBTPU_INIT_ARGS and takes out the
    others, for libtpu to read when it starts. Returns whether the environment changed. overlap and offload set
    the same flags differently: asking for both is a ValueError."""
    wanted = {name: bool(mesh.get(name, False)) for name in COLLECTIVE_FLAGS}
    if all(wanted.values()):
        raise ValueError("mesh.overlap_collectives and mesh.offload_collectives exclude each other (the offload "
                         "runs the collectives on the SparseCores, not fused into compute): set one")
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    if all((flags in args) == wanted[name] for name, flags in COLLECTIVE_FLAGS.items()):
        return False
    for name, flags in COLLECTIVE_FLAGS.items():
        args = args.replace(flags, "")
        if wanted[name]:
            args = f"{args} {flags}"
    args = " ".join(args.split())
    if args:
        os.environ["LIBTPU_INIT_ARGS"] = args
    else:
        os.environ.pop("LIBTPU_INIT_ARGS", None)
    return True


def jax_backends_started() -> bool:
    """Whether jax has started its backends in this process (libtpu has read its flags then)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a jax without it: assume started, so a late change is reported
        return True


def accelerator_present() -> bool:
    """A TPU or a GPU device file (NVIDIA, WSL, AMD) on this machine."""
    return tpu_present() or any(os.path.exists(path) for path in _GPU_DEVICE_FILES)


def tpu_present() -> bool:
    """A Google TPU device on the PCI bus."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            device = pathlib.Path(vendor).with_name("device").read_text().strip()
            if pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES:
                return True
        except OSError:
            continue
    return False


def drop_noise(lines: list[str]) -> list[str]:
    """`lines` without the CUDA plugin's "Could not find cuda drivers" lines and the absl preamble just before
    each (a preamble before anything else is kept)."""
    kept: list[str] = []
    for line in lines:
        if _NOISE.search(line):
            if kept and kept[-1].rstrip("\n") == _PREAMBLE:
                kept.pop()
            continue
        kept.append(line)
    return kept


@contextlib.contextmanager
def filtered_stderr():
    """File descriptor 2 (C++ libraries' logs, Python's stderr) goes to a temporary file in the block; afterwards
    everything but `drop_noise`'s lines is written on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = drop_noise(captured.read().decode(errors="replace").splitlines(keepends=True))
            if kept:
                os.write(2, "".join(kept).encode())


def _verbose(argv: list[str]) -> bool:
    return any(a.split("=")[0] in ("--verbosity", "-v", "--v") for a in argv[1:])


def quiet() -> None:
    """Before jax is imported (a no-op after): JAX_PLATFORMS=cpu on a machine without accelerators unless the user
    set it, and jax imported with the CUDA plugin's driver lines filtered out (module docstring)."""
    if "jax" in sys.modules or _verbose(sys.argv):
        return
    no_accelerator = not accelerator_present()
    if no_accelerator:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with filtered_stderr():
        import jax  # noqa: F401
        if no_accelerator:  # the plugins load their libraries when registered: here, inside the filter
            try:
                from jax._src import xla_bridge
                xla_bridge._discover_and_register_pjrt_plugins()
            except (ImportError, AttributeError):  # another jax: its lines are only cosmetic
                pass
