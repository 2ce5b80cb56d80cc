"""Every Pallas kernel compiles for one TPU v5p chip (Mosaic) and one H100 (Triton, ptxas) at Kimi K2's shapes with
the launch settings of k2jax.model.target.KERNEL_LAUNCH, forward and backward, bf16 and float32: deviceless, on this CPU
machine (tests/compile_targets.py). A compile runs Mosaic's layout inference and VMEM check and Triton's
shared-memory check, which a lowering does not.

Sizes the kernels' programs do not depend on are cut for time: batch 1, 2 attention heads (heads are a grid axis
of mla_attention), 1K tokens (the sequence is a loop bound and a whole-array block), 8 experts (a grid / schedule
length). mla_decode's program does depend on its heads (T·N query rows per block): 64 heads here. The 4K-token,
64-head attention and the 128K-slot decode run with -m slow."""

import inspect

import jax
import jax.numpy as jnp
import pytest

from k2jax.model.target import KERNEL_LAUNCH
from pallas_kernels.fp8_grouped_matmul import FP8, fp8_grouped_matmul
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_decode import mla_decode
from tests.pallas_kernels.kernel_checks import compile_for, kernel_calls

PLATFORMS = ("tpu", "gpu")
DTYPES = (jnp.bfloat16, jnp.float32)
KERNELS = {"mla_attention": mla_attention, "mla_decode": mla_decode, "fp8_grouped_matmul": fp8_grouped_matmul}
P, R, V, C = 128, 64, 128, 512  # K2: nope / rope / value head dims, kv_lora
D, F = 7168, 2048  # K2: hidden size, routed expert width


def _launch(kernel: str, platform: str, dtype) -> dict:
    return {"platform": platform, **KERNEL_LAUNCH.get((kernel, platform, jnp.dtype(dtype).name), {})}


def test_launch_table_covers_every_kernel_and_names_its_arguments():
    for kernel, platform, dtype in KERNEL_LAUNCH:
        assert kernel in KERNELS and platform in PLATFORMS and dtype in ("bfloat16", "float32")
    for kernel in ("mla_attention", "mla_decode"):
        for platform in PLATFORMS:
            for dtype in DTYPES:
                assert (kernel, platform, jnp.dtype(dtype).name) in KERNEL_LAUNCH
    for (kernel, _, _), settings in KERNEL_LAUNCH.items():
        params = inspect.signature(KERNELS[kernel]).parameters
        assert all(params.get(k) is not None and params[k].kind is inspect.Parameter.KEYWORD_ONLY
                   for k in settings), (kernel, settings)


def _attention_train_step(platform, dtype):
    launch = _launch("mla_attention", platform, dtype)

    def step(qn, qr, kn, kr, v, seg):
        def loss(*a):
            out, rowmax = mla_attention(*a, seg, scale=0.1, backend="pallas", **launch)
            return jnp.sum(out.astype(jnp.float32)), rowmax
        return jax.grad(loss, argnums=range(5), has_aux=True)(qn, qr, kn, kr, v)
    return step


def _compile_attention(platform, dtype, B, N, T):
    shapes = ((B, N, T, P), (B, N, T, R), (B, N, T, P), (B, T, R), (B, N, T, V))
    return compile_for(platform, _attention_train_step(platform, dtype), *((s, dtype) for s in shapes),
                       ((B, T), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_mla_attention_forward_and_backward_compile(platform, dtype):
    """The forward, dq and dk/dv kernels of a training step."""
    assert kernel_calls(_compile_attention(platform, dtype, 1, 2, 1024), platform) == 3


def _compile_decode(platform, dtype, S, Ts, N=64):
    """One program decoding T new tokens per row for each T in Ts, over the same [1, S, C + R] cache."""
    launch = _launch("mla_decode", platform, dtype)

    def step(cache, *queries):
        return [mla_decode(ql, qr, cache, pos, scale=0.1, backend="pallas", **launch)
                for ql, qr, pos in zip(queries[0::3], queries[1::3], queries[2::3])]
    args = [a for T in Ts for a in (((1, T, N, C), dtype), ((1, T, N, R), dtype), ((1, T), jnp.int32))]
    return compile_for(platform, step, ((1, S, C + R), dtype), *args)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_mla_decode_compiles_for_one_and_four_new_tokens(platform, dtype):
    assert kernel_calls(_compile_decode(platform, dtype, 4096, (1, 4)), platform) == 2


GMM_MODES = {  # weights, activations, fp8_activations
    "fp8_weights": (FP8, jnp.bfloat16, False),
    "fp8_activations": (FP8, jnp.bfloat16, True),
    "bf16_weights": (jnp.bfloat16, jnp.bfloat16, False),
    "f32_weights": (jnp.float32, jnp.float32, False),
}


@pytest.mark.parametrize("mode", sorted(GMM_MODES))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_fp8_grouped_matmul_compiles_at_k2_expert_shapes(platform, mode):
    """A routed expert's up (7168 -> 2048) and down (2048 -> 7168) products, forward and d/dx (the kernel against
    transposed weights): four kernel launches; plain weights also get d/dw by the grouped weight-gradient kernel
    (two more), and no XLA ragged dot (whose weight gradient is a dense dot over every group)."""
    w_dtype, x_dtype, fp8_act = GMM_MODES[mode]
    G, M = 8, 256
    fp8 = w_dtype == FP8
    launch = _launch("fp8_grouped_matmul", platform, x_dtype)

    def gmm(x, w, sizes, s):
        return fp8_grouped_matmul(x, w, sizes, s, fp8_activations=fp8_act, backend="pallas", **launch)

    def step(x, w_up, w_down, sizes, *scales):
        s_up, s_down = scales if fp8 else (None, None)

        def loss(x, w_up, w_down):
            return jnp.sum(gmm(gmm(x, w_up, sizes, s_up), w_down, sizes, s_down).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=0 if fp8 else (0, 1, 2))(x, w_up, w_down)

    args = [((M, D), x_dtype), ((G, D, F), w_dtype), ((G, F, D), w_dtype), ((G,), jnp.int32)]
    if fp8:
        args += [((G, D // 128, F // 128), jnp.float32), ((G, F // 128, D // 128), jnp.float32)]
    compiled = compile_for(platform, step, *args)
    assert kernel_calls(compiled, platform) == (4 if fp8 else 6)
    assert "ragged-dot" not in compiled.as_text() and "ragged_dot" not in compiled.as_text()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_full_size_attention_and_long_cache_decode_compile(platform, dtype):
    """K2's 64 heads at 4K tokens; decode over a 128K-slot cache."""
    assert kernel_calls(_compile_attention(platform, dtype, 1, 64, 4096), platform) == 3
    assert kernel_calls(_compile_decode(platform, dtype, 131072, (1, 4)), platform) == 2
