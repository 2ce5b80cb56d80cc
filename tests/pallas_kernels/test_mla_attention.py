"""MLA flash attention (interpret mode) against its XLA reference: outputs, the per-query max logit (exact),
gradients of q_nope, q_rope, k_nope, the shared k_rope and v; packed segments; lengths that are not a multiple of
either block; NaN in the kernel's own padding; separate forward / backward blocks. The TPU / GPU compiles are in
test_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_attention import mla_attention
from tests.pallas_kernels.kernel_checks import nan_padding, rel_err

SCALE = 0.3


def _inputs(B, N, T, P=16, R=8, V=12, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = ((B, N, T, P), (B, N, T, R), (B, N, T, P), (B, T, R), (B, N, T, V))
    return tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes))


def _loss_and_grads(backend, args, segment_ids, **launch):
    def loss(*a):
        out, rowmax = mla_attention(*a, segment_ids, scale=SCALE, backend=backend, **launch)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), (out, rowmax)
    (_, (out, rowmax)), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args)
    return out, rowmax, grads


# T = 37: not a multiple of either block; three packed segments in row 0, one in row 1.
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 7, [5] * 37], np.int32)


def test_matches_reference_f32_with_nan_padding():
    """The tpu form's launch table sets no backward blocks: the backward takes the forward's (16 x 8)."""
    args = _inputs(2, 2, 37)
    want_out, want_max, want_grads = _loss_and_grads("xla", args, SEGMENTS)
    with nan_padding():
        out, rowmax, grads = _loss_and_grads("interpret", args, SEGMENTS, platform="tpu", block_q=16, block_k=8)
    assert rel_err(out, want_out) <= 1e-5
    # the max itself is exact; the logits under it differ from XLA's by dot-product rounding (~1 ulp of max|logit|)
    assert rel_err(rowmax, want_max) <= 1e-6
    for name, g, want in zip(("q_nope", "q_rope", "k_nope", "k_rope", "v"), grads, want_grads):
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, want) <= 1e-5, name


def test_bf16_within_1e2():
    """Also the other block order (query blocks smaller than key blocks), and backward blocks other than the
    forward's."""
    args = _inputs(1, 2, 40, dtype=jnp.bfloat16, seed=1)
    seg = np.ones((1, 40), np.int32)
    want_out, want_max, want_grads = _loss_and_grads("xla", args, seg)
    out, rowmax, grads = _loss_and_grads("interpret", args, seg, platform="gpu", block_q=8, block_k=16,
                                          bwd_block_q=16, bwd_block_k=8)
    assert out.dtype == jnp.bfloat16 and rel_err(out, want_out) <= 1e-2
    assert rel_err(rowmax, want_max) <= 1e-2
    for g, want in zip(grads, want_grads):
        assert g.dtype == jnp.bfloat16 and rel_err(g, want) <= 1e-2


def test_single_block_and_query_max_logit_is_the_visible_max():
    """T smaller than one block; the reported max is the max over each query's visible keys only."""
    args = _inputs(1, 2, 5)
    seg = np.array([[1, 1, 2, 2, 2]], np.int32)
    _, rowmax = mla_attention(*args, seg, scale=SCALE, backend="interpret", platform="tpu", block_q=8, block_k=8)
    qn, qr, kn, kr, _ = (np.asarray(a, np.float64) for a in args)
    logits = (np.einsum("bntp,bnsp->bnts", qn, kn) + np.einsum("bntr,bsr->bnts", qr, kr)) * SCALE
    for t in range(5):
        visible = [s for s in range(t + 1) if seg[0, s] == seg[0, t]]
        np.testing.assert_allclose(rowmax[0, :, t], logits[0, :, t, visible].max(axis=0), rtol=1e-6)


def test_rejects_mismatched_shapes():
    qn, qr, kn, kr, v = _inputs(1, 2, 8)
    with pytest.raises(ValueError, match="k_rope"):
        mla_attention(qn, qr, kn, kr[:, :4], v, np.ones((1, 8), np.int32), scale=1.0, backend="interpret")
    with pytest.raises(ValueError, match="backend must be one of"):
        mla_attention(qn, qr, kn, kr, v, np.ones((1, 8), np.int32), scale=1.0, backend="cuda")
