"""The Pallas kernels next to their XLA references on the same inputs, in one run, on the accelerator present.

    python benchmarks/kernels.py [--iters=10] [--only=attention,decode,gmm]
    python benchmarks/kernels.py --smoke     # tiny shapes, Pallas interpreter: checks this script on a CPU

Prints, per kernel: time, achieved TFLOP/s and GB/s, and their share of the device's peak (when the device is in
PEAKS), for the Pallas kernel and the XLA reference, and the reference / kernel time ratio. Shapes are K2's:
  attention  MLA flash attention, causal, 1 x 16 heads x 4096 tokens, nope 128 + rope 64, v 128, bf16: forward,
             and forward + backward; the kernel alone at 32,768 tokens too (the reference's logits would not fit)
  decode     absorbed MLA decode, 64 heads, batch 8 x 32768 cached slots of kv_lora 512 + rope 64 (bf16):
             bandwidth-bound, goal >= 60 % of HBM bandwidth
  gmm        grouped matmul, 16384 routed rows over 32 experts, hidden 7168 -> expert FFN 2048, FP8 e4m3 weights
             with 128x128 block scales, bf16 activations: goal >= 50 % of FP8 peak on H100. The XLA reference
             dequantises the weights and runs ragged_dot; a bf16 ragged_dot on pre-dequantised weights is shown too.
On a CPU it says so and exits: there is nothing to measure (the interpreter is a correctness tool).
"""

from __future__ import annotations

import _repo_root  # noqa: F401  (the repo root first on sys.path: before any project import)
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import best_time
from pallas_kernels.fp8_grouped_matmul import FP8, dequantize, fp8_grouped_matmul
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_decode import mla_decode

FLAGS = flags.DEFINE_integer("iters", 10, "timed calls per measurement (best is reported)")
ONLY = flags.DEFINE_list("only", ["attention", "decode", "gmm"], "which kernels")
SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes in the Pallas interpreter (checks the script on CPU)")

# Dense peaks per chip: (bf16 TFLOP/s, fp8 TFLOP/s or None, HBM TB/s). Vendor figures.
PEAKS = {
    "H100": (989.0, 1979.0, 3.35), "H200": (989.0, 1979.0, 4.8), "A100": (312.0, None, 2.0),
    "TPU v5p": (459.0, None, 2.76), "TPU v5 lite": (197.0, None, 0.82), "TPU v4": (275.0, None, 1.2),
    "TPU v6 lite": (918.0, None, 1.64),
}


def device_peaks(kind: str):
    for name, peaks in PEAKS.items():
        if name.lower() in kind.lower():
            return peaks
    return None


def report(label, seconds, flops, bytes_, peaks, fp8=False):
    tflops, gbs = flops / seconds / 1e12, bytes_ / seconds / 1e9
    line = f"  {label:<34} {seconds * 1e3:9.3f} ms  {tflops:8.2f} TFLOP/s  {gbs:8.1f} GB/s"
    if peaks:
        compute_peak = peaks[1] if fp8 and peaks[1] else peaks[0]
        line += f"  ({100 * tflops / compute_peak:5.1f} % of {'fp8' if fp8 and peaks[1] else 'bf16'} peak, " \
                f"{100 * gbs / (peaks[2] * 1e3):5.1f} % of HBM)"
    print(line)


def timed(fn, *args):
    f = jax.jit(fn)
    return best_time(lambda: jax.block_until_ready(f(*args)), FLAGS.value)


def bench_attention(backend, platform, peaks, small):
    """At 4K tokens the kernel next to the XLA reference; at 32K the kernel alone (the reference's logits would not
    fit; not in --smoke)."""
    for T, with_reference in ((64, True),) if small else ((4096, True), (32768, False)):
        _bench_attention_at(T, with_reference, backend, platform, peaks, small)


def _bench_attention_at(T, with_reference, backend, platform, peaks, small):
    B, N, P, R, V = (1, 2, 16, 8, 16) if small else (1, 16, 128, 64, 128)
    ks = jax.random.split(jax.random.key(0), 5)
    shapes = ((B, N, T, P), (B, N, T, R), (B, N, T, P), (B, T, R), (B, N, T, V))
    args = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(ks, shapes)]
    seg = jnp.ones((B, T), jnp.int32)
    blocks = dict(block_q=16, block_k=16) if small else {}
    flops = 2 * B * N * (T * T / 2) * (P + R + V)  # causal: half the pairs, QK^T and PV
    bytes_ = sum(a.size * a.dtype.itemsize for a in args) + B * N * T * V * 2
    print(f"attention  B={B} N={N} T={T} (nope {P}, rope {R}, v {V}), causal, bf16")
    results = {}
    for name, be in (("pallas", backend), ("xla", "xla"))[:2 if with_reference else 1]:
        kw = dict(scale=0.1, backend=be, platform=platform, **blocks)
        fwd = lambda *a, kw=kw: mla_attention(*a, seg, **kw)[0]  # noqa: E731
        step = jax.grad(lambda *a, kw=kw: jnp.sum(  # noqa: E731
            mla_attention(*a, seg, **kw)[0].astype(jnp.float32)), argnums=range(5))
        results[name] = (timed(fwd, *args), timed(step, *args))
        report(f"{name} forward", results[name][0], flops, bytes_, peaks)
        report(f"{name} forward+backward", results[name][1], 3.5 * flops, 3 * bytes_, peaks)
    if with_reference:
        print(f"  xla / pallas: forward {results['xla'][0] / results['pallas'][0]:.2f}x, "
              f"forward+backward {results['xla'][1] / results['pallas'][1]:.2f}x")


def bench_decode(backend, platform, peaks, small):
    B, N, S, C, R = (2, 4, 256, 16, 8) if small else (8, 64, 32768, 512, 64)
    ks = jax.random.split(jax.random.key(1), 3)
    q_lat = jax.random.normal(ks[0], (B, 1, N, C), jnp.bfloat16)
    q_rope = jax.random.normal(ks[1], (B, 1, N, R), jnp.bfloat16)
    cache = jax.random.normal(ks[2], (B, S, C + R), jnp.bfloat16)
    positions = jnp.full((B, 1), S - 1, jnp.int32)
    blocks = dict(block_s=16, num_splits=2) if small else {}
    bytes_ = cache.size * 2 + (q_lat.size + q_rope.size) * 2 + B * N * C * 4
    flops = 2 * B * N * S * (C + R + C)
    print(f"decode     B={B} N={N} S={S} slots of {C}+{R}, bf16 cache ({cache.size * 2 / 1e9:.2f} GB)")
    t = {}
    for name, be in (("pallas", backend), ("xla", "xla")):
        t[name] = timed(lambda a, b, c, d, be=be: mla_decode(a, b, c, d, scale=0.1, backend=be, platform=platform,
                                                             **blocks),
                        q_lat, q_rope, cache, positions)
        report(name, t[name], flops, bytes_, peaks)
    print(f"  xla / pallas: {t['xla'] / t['pallas']:.2f}x")


def bench_gmm(backend, platform, peaks, small):
    M, G, K, N = (256, 4, 256, 128) if small else (16384, 32, 7168, 2048)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((G, K, N)) * 30, FP8)
    scales = jnp.asarray(rng.uniform(0.001, 0.01, (G, K // 128, N // 128)), jnp.float32)
    sizes = jnp.asarray(np.full(G, M // G), jnp.int32)
    w_bf16 = dequantize(w, scales, jnp.bfloat16)
    flops = 2 * M * K * N
    bytes_ = x.size * 2 + w.size + M * N * 2
    print(f"gmm        M={M} rows, G={G} experts, {K} -> {N}, fp8 weights, bf16 activations")
    t = {}
    for name, fn, args in (
            ("pallas fp8", lambda a, b, c, s: fp8_grouped_matmul(a, b, c, s, backend=backend, platform=platform),
             (x, w, sizes, scales)),
            ("xla dequantise + ragged_dot", lambda a, b, c, s: fp8_grouped_matmul(a, b, c, s, backend="xla"),
             (x, w, sizes, scales)),
            ("xla ragged_dot on bf16 weights", lambda a, b, c: jax.lax.ragged_dot(a, b, c), (x, w_bf16, sizes))):
        t[name] = timed(fn, *args)
        report(name, t[name], flops, bytes_ if "bf16" not in name else bytes_ + w.size, peaks, fp8="fp8" in name)
    print(f"  xla dequantise+ragged_dot / pallas: {t['xla dequantise + ragged_dot'] / t['pallas fp8']:.2f}x, "
          f"bf16 ragged_dot / pallas: {t['xla ragged_dot on bf16 weights'] / t['pallas fp8']:.2f}x")


def main(_):
    platform = jax.devices()[0].platform  # the device this runs on: the kernels are compiled for it
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform == "cpu" and not SMOKE.value:
        print("benchmarks/kernels.py: no accelerator (platform cpu); nothing to measure. "
              "Run it on a TPU or GPU, or with --smoke to check the script in the Pallas interpreter.")
        return
    kind = jax.devices()[0].device_kind
    peaks = None if SMOKE.value else device_peaks(kind)
    backend = "interpret" if SMOKE.value else "pallas"
    print(f"device: {kind} ({platform}), jax {jax.__version__}, peaks {peaks or 'unknown'}; best of {FLAGS.value}")
    for name in ONLY.value:
        {"attention": bench_attention, "decode": bench_decode, "gmm": bench_gmm}[name](backend, platform, peaks,
                                                                                       SMOKE.value)


if __name__ == "__main__":
    app.run(main)
