"""Every Pallas kernel compiles for one TPU v5p chip (Mosaic) and one H100 (Triton, ptxas) at Kimi K2's shapes with
its defaults: no launch arguments, only backend="pallas" and the platform (each kernel takes its launch settings from
the LAUNCH table beside it), forward and backward, bf16 and float32: deviceless, on this CPU machine
(tests/compile_targets.py). A compile runs Mosaic's layout inference and VMEM check and Triton's shared-memory check,
which a lowering does not. Also: "pallas" without a TPU / GPU platform, and "auto", are one-line errors.

Sizes the kernels' programs do not depend on are cut for time: batch 1, 2 attention heads (heads are a grid axis
of mla_attention), 8 experts (a grid / schedule length). mla_attention compiles at 32K tokens (its TPU form's VMEM
holds blocks, not sequences; the GPU form's programs loop over the sequence); 128K and 256K run with -m slow.
mla_decode's program does depend on its heads (T·N query rows per block): 64 heads here. The 4K-token, 64-head
attention and the 128K-slot decode run with -m slow too."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_grouped_matmul as fp8_module
from pallas_kernels import grouped_weight_grad as wgrad_module
from pallas_kernels import int4_grouped_matmul as int4_module
from pallas_kernels import mla_attention as attention_module
from pallas_kernels import mla_decode as decode_module
from pallas_kernels.fp8_grouped_matmul import FP8, fp8_grouped_matmul
from pallas_kernels.grouped_weight_grad import grouped_weight_grad
from pallas_kernels.int4_grouped_matmul import int4_grouped_matmul
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_decode import mla_decode
from tests.pallas_kernels.kernel_checks import compile_for, kernel_calls

PLATFORMS = ("tpu", "gpu")
DTYPES = (jnp.bfloat16, jnp.float32)
KERNELS = {mla_attention: attention_module, mla_decode: decode_module, fp8_grouped_matmul: fp8_module,
           int4_grouped_matmul: int4_module, grouped_weight_grad: wgrad_module}
P, R, V, C = 128, 64, 128, 512  # K2: nope / rope / value head dims, kv_lora
D, F = 7168, 2048  # K2: hidden size, routed expert width


def test_each_kernels_launch_table_names_its_arguments():
    """A kernel's LAUNCH rows (per launch form and dtype) set only keys of its DEFAULTS, and each of those is a
    keyword-only argument of the entry point that defaults to None (= the table's value)."""
    for kernel, module in KERNELS.items():
        params = inspect.signature(kernel).parameters
        for (form, dtype), settings in module.LAUNCH.items():
            assert form in PLATFORMS and dtype in ("bfloat16", "float16", "float32"), kernel.__name__
            assert set(settings) <= set(module.DEFAULTS), (kernel.__name__, settings)
        for key in module.DEFAULTS:
            assert params[key].kind is inspect.Parameter.KEYWORD_ONLY and params[key].default is None, key
        assert params["backend"].default == "pallas" and params["platform"].default is None


def _kernel_calls_with(backend, platform):
    """A call of every kernel entry point at tiny sizes."""
    f32 = jnp.float32
    q = jnp.zeros((1, 1, 8, 16), f32)
    sizes = jnp.array([8], jnp.int32)
    yield lambda: mla_attention(q, q[..., :8], q, q[:, 0, :, :8], q, jnp.ones((1, 8), jnp.int32), scale=1.0,
                                backend=backend, platform=platform)
    yield lambda: mla_decode(q, q[..., :8], jnp.zeros((1, 8, 24), f32), jnp.zeros((1, 1), jnp.int32), scale=1.0,
                             backend=backend, platform=platform)
    yield lambda: fp8_grouped_matmul(jnp.zeros((8, 16), f32), jnp.zeros((1, 16, 16), f32), sizes, backend=backend,
                                     platform=platform)
    yield lambda: int4_grouped_matmul(jnp.zeros((8, 32), f32), jnp.zeros((1, 4, 16), jnp.int32), sizes,
                                      jnp.zeros((1, 1, 16), f32), backend=backend, platform=platform)
    yield lambda: grouped_weight_grad(jnp.zeros((8, 16), f32), jnp.zeros((8, 16), f32), sizes, backend=backend,
                                      platform=platform)


@pytest.mark.parametrize("backend, platform, message", [
    ("pallas", None, "backend='pallas' needs platform='tpu' or 'gpu'"),
    ("pallas", "cpu", "backend='pallas' needs platform='tpu' or 'gpu'"),
    ("auto", "tpu", "backend must be one of"),
    ("xla", "auto", "platform must be one of"),
])
def test_pallas_without_a_tpu_or_gpu_and_auto_are_one_line_errors(backend, platform, message):
    for call in _kernel_calls_with(backend, platform):
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    for call in _kernel_calls_with("xla", "cpu"):  # the references run anywhere
        assert np.isfinite(np.asarray(jax.tree.leaves(call())[0])).all()


def _attention_train_step(platform):
    def step(qn, qr, kn, kr, v, seg):
        def loss(*a):
            out, rowmax = mla_attention(*a, seg, scale=0.1, backend="pallas", platform=platform)
            return jnp.sum(out.astype(jnp.float32)), rowmax
        return jax.grad(loss, argnums=range(5), has_aux=True)(qn, qr, kn, kr, v)
    return step


def _compile_attention(platform, dtype, B, N, T):
    shapes = ((B, N, T, P), (B, N, T, R), (B, N, T, P), (B, T, R), (B, N, T, V))
    return compile_for(platform, _attention_train_step(platform), *((s, dtype) for s in shapes),
                       ((B, T), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_mla_attention_forward_and_backward_compile_at_32k_tokens(platform, dtype):
    """The forward, dq and dk/dv kernels of a training step, 32,768 tokens."""
    assert kernel_calls(_compile_attention(platform, dtype, 1, 2, 32768), platform) == 3


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [131072, 262144])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_mla_attention_forward_and_backward_compile_at_128k_and_256k_tokens(platform, dtype, tokens):
    assert kernel_calls(_compile_attention(platform, dtype, 1, 2, tokens), platform) == 3


def _compile_decode(platform, dtype, S, Ts, N=64):
    """One program decoding T new tokens per row for each T in Ts, over the same [1, S, C + R] cache."""
    def step(cache, *queries):
        return [mla_decode(ql, qr, cache, pos, scale=0.1, backend="pallas", platform=platform)
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

    def gmm(x, w, sizes, s):
        return fp8_grouped_matmul(x, w, sizes, s, fp8_activations=fp8_act, backend="pallas", platform=platform)

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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_int4_grouped_matmul_compiles_at_k2_expert_shapes(platform, dtype):
    """INT4 experts as K2-Thinking ships them (int32 packed, bf16 scales per 32 inputs) with bf16 or f32 activations:
    the up (7168 -> 2048) and down (2048 -> 7168) products, forward and d/dx (the kernel on the transposed product):
    four kernel launches, no XLA ragged dot."""
    G, M = 8, 256

    def step(x, p_up, s_up, p_down, s_down, sizes):
        def loss(x):
            h = int4_grouped_matmul(x, p_up, sizes, s_up, backend="pallas", platform=platform)
            return jnp.sum(int4_grouped_matmul(h, p_down, sizes, s_down, backend="pallas", platform=platform
                                               ).astype(jnp.float32))
        return jax.value_and_grad(loss)(x)

    compiled = compile_for(platform, step, ((M, D), dtype), ((G, D // 8, F), jnp.int32),
                           ((G, D // 32, F), jnp.bfloat16), ((G, F // 8, D), jnp.int32),
                           ((G, F // 32, D), jnp.bfloat16), ((G,), jnp.int32))
    assert kernel_calls(compiled, platform) == 4
    assert "ragged-dot" not in compiled.as_text() and "ragged_dot" not in compiled.as_text()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_full_size_attention_and_long_cache_decode_compile(platform, dtype):
    """K2's 64 heads at 4K tokens; decode over a 128K-slot cache."""
    assert kernel_calls(_compile_attention(platform, dtype, 1, 64, 4096), platform) == 3
    assert kernel_calls(_compile_decode(platform, dtype, 131072, (1, 4)), platform) == 2
