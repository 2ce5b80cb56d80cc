"""Conversion throughput and memory on a synthetic checkpoint with one full-width Kimi K2 MoE layer.

    python benchmarks/convert.py [--experts=16] [--dtype=bfloat16] [--workdir=/tmp/k2bench] [--keep]

Writes a release-layout FP8 checkpoint (hidden 7168, 64 heads, q_lora 1536, kv_lora 512, expert FFN 2048, one
MoE layer with --experts routed experts + 1 shared; 384 experts is the full layer, about 17 GB), then in the
same run measures:
  - raw read speed of its files (`cat FILES > /dev/null`), from disk (the files evicted from the page cache with
    posix_fadvise first, as a ~1 TB release always is) and from the page cache,
  - durable write speed of the disk (as many bytes as the converter writes, then fsync),
  - the converter (convert_checkpoint.py, a separate process, reading the evicted files) end to end, its
    streaming rate (read, convert, write and sync every tensor: the output is on disk when it ends), and its
    peak RSS.
Prints conversion GB/s / raw read GB/s (goal >= 0.5), against the disk read and against the page cache, and peak
RSS / the layer's size on disk (goal <= 2).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import _repo_root  # noqa: F401  (the repo root first on sys.path: before any project import)
import numpy as np
from absl import app, flags

from k2jax.checkpoint.hf_checkpoint import HFCheckpoint, write_hf_checkpoint
from k2jax.model.config import kimi_k2

_EXPERTS = flags.DEFINE_integer("experts", 16, "Routed experts in the MoE layer (384 = a full K2 layer, ~17 GB).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "fp8"], "Converter output dtype.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to put the files (default: a temporary directory).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the generated files.")


def bench_config(experts: int):
    return kimi_k2(vocab_size=2048, num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=experts,
                   num_experts_per_tok=min(8, experts))


def main(argv):
    del argv
    cfg = bench_config(_EXPERTS.value)
    work = _WORKDIR.value or tempfile.mkdtemp(prefix="k2bench-")
    hf, out = os.path.join(work, "hf"), os.path.join(work, "k2")
    for path in (hf, out, out + ".partial"):
        shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)

    def random_tensor(spec):
        if len(spec.shape) == 1:
            return np.ones(spec.shape, np.float32)
        return rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(spec.shape[1] ** -0.5)

    start = time.perf_counter()
    write_hf_checkpoint(hf, cfg, random_tensor, dtype="fp8", num_shards=4)
    generate_s = time.perf_counter() - start
    files = [os.path.join(hf, f) for f in sorted(os.listdir(hf))]
    size = sum(os.path.getsize(f) for f in files)
    ckpt = HFCheckpoint(hf)
    layer = sum(ckpt.stored_nbytes(n) for n in ckpt.specs if n.startswith("model.layers.0."))

    def cat_seconds():
        start = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    evict_from_page_cache(files)
    disk_read_gbs = size / cat_seconds() / 1e9
    cache_read_gbs = size / min(cat_seconds(), cat_seconds()) / 1e9
    evicted = evict_from_page_cache(files)

    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "convert_checkpoint.py"), f"--hf_dir={hf}", f"--out_dir={out}",
           f"--dtype={_DTYPE.value}"]
    start = time.perf_counter()
    log = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    convert_s = time.perf_counter() - start
    streamed = re.search(r"streamed ([\d.]+) GB in ([\d.]+) s.*the last ([\d.]+) s waiting", log.stderr)
    stream_gb, stream_s, final_sync_s = map(float, streamed.groups())
    stream_gbs = stream_gb / stream_s
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: the converter
    out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    write_gbs = out_bytes / durable_write_seconds(os.path.join(work, "write-test"), out_bytes) / 1e9

    print(f"synthetic K2 MoE layer: hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts x FFN "
          f"{cfg.moe_intermediate_size} + shared, FP8 files {size / 1e9:.2f} GB (layer {layer / 1e9:.2f} GB), "
          f"generated in {generate_s:.0f} s")
    print(f"raw read (cat): from disk {disk_read_gbs:.2f} GB/s{'' if evicted else ' (eviction unsupported here)'}, "
          f"from the page cache {cache_read_gbs:.2f} GB/s; durable write {write_gbs:.2f} GB/s")
    print(f"convert to {_DTYPE.value}: {convert_s:.1f} s end to end ({size / convert_s / 1e9:.3f} GB/s, start-up and "
          f"validation included); streaming {stream_gbs:.3f} GB/s of input, {out_bytes / 1e9:.2f} GB written and "
          f"synced ({stream_gb / max(stream_s - final_sync_s, 1e-9):.3f} GB/s before the final "
          f"{final_sync_s:.1f} s wait for the disk)")
    print(f"  / raw read from disk: {stream_gbs / disk_read_gbs:.2f} (goal >= 0.5); / from the page cache: "
          f"{stream_gbs / cache_read_gbs:.3f}; the disk's write speed alone allows "
          f"{write_gbs * size / out_bytes / disk_read_gbs:.2f} of the disk read")
    print(f"converter peak RSS {peak_rss / 1e9:.2f} GB -> {peak_rss / layer:.2f} x the layer (goal <= 2; includes "
          f"~1 GB of fixed Python/JAX runtime, which a full 17 GB layer makes negligible)")
    if not _KEEP.value and not _WORKDIR.value:
        shutil.rmtree(work, ignore_errors=True)


def evict_from_page_cache(files) -> bool:
    """Drops the files' (clean) pages from the page cache, so the next read comes from the disk. False where the
    platform has no posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def durable_write_seconds(path: str, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file and fsync it (the file is removed)."""
    block = np.random.default_rng(0).integers(0, 255, 64 * 2 ** 20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, nbytes, len(block)):
            f.write(block[:nbytes - offset])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


if __name__ == "__main__":
    app.run(main)
