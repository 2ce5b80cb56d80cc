"""Block FP8 (e4m3, 128x128 scales) as the release stores it, including ragged edge blocks."""

import ml_dtypes
import numpy as np
import pytest

from k2jax.formats.quant import BLOCK, E4M3, E4M3_MAX, QuantError, check_no_nan, dequantize, quantize, scale_shape

SHAPES = [(576, 300), (128, 256), (1, 1), (129, 127), (200, 130)]  # 576 = kv_lora 512 + rope 64


def _loop_dequant(q, s):
    """Independent reference: one block at a time."""
    out = np.empty(q.shape, np.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows, cols = slice(bi * BLOCK, (bi + 1) * BLOCK), slice(bj * BLOCK, (bj + 1) * BLOCK)
            out[rows, cols] = q[rows, cols].astype(np.float32) * s[bi, bj]
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_is_fp8_times_block_scale(shape):
    rng = np.random.default_rng(0)
    q = (rng.standard_normal(shape) * 100).clip(-448, 448).astype(E4M3)
    s = rng.uniform(1e-4, 1e-2, scale_shape(shape)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(q, s), _loop_dequant(q, s))
    bf16 = dequantize(q, s, dtype=ml_dtypes.bfloat16)
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16, _loop_dequant(q, s).astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_round_trip_within_e4m3_precision(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.uniform(-3, 3, (shape[0], 1)))
    q, s = quantize(w)
    assert q.dtype == E4M3 and s.dtype == np.float32 and s.shape == scale_shape(shape)
    back = dequantize(q, s)
    scale_el = np.repeat(np.repeat(s, BLOCK, 0), BLOCK, 1)[: shape[0], : shape[1]]
    # e4m3: 3 mantissa bits (relative half-ulp 2^-4); subnormal spacing 2^-9 of the scale.
    assert np.all(np.abs(back - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * scale_el)
    # each block's largest magnitude lands on the e4m3 maximum
    amax_q = np.abs(np.pad(q.astype(np.float32), [(0, -n % BLOCK) for n in shape]))
    amax_q = amax_q.reshape(s.shape[0], BLOCK, s.shape[1], BLOCK).max(axis=(1, 3))
    np.testing.assert_array_equal(amax_q, E4M3_MAX)


def test_quantize_is_idempotent_through_dequantize():
    w = np.random.default_rng(2).standard_normal((300, 260)).astype(np.float32)
    q, s = quantize(w)
    q2, s2 = quantize(dequantize(q, s))
    np.testing.assert_allclose(s2, s, rtol=1e-6)
    assert np.max(np.abs(dequantize(q2, s2) - dequantize(q, s))) <= 1e-6 * np.max(np.abs(w))


def test_zero_blocks_get_a_positive_scale():
    w = np.zeros((130, 260), np.float32)
    w[:128, :128] = 1.0
    q, s = quantize(w)
    assert np.all(s > 0) and s[0, 0] == pytest.approx(1 / 448)
    np.testing.assert_array_equal(dequantize(q, s), w)


def _with_nan(q, i, j):
    bits = q.view(np.uint8).copy()
    bits[i, j] = 0x7F  # e4m3fn's NaN (S.1111.111): it would dequantise to NaN
    return bits.view(q.dtype)


@pytest.mark.parametrize("edit, match", [
    (lambda q, s: (q.astype(np.float32), s), "float8_e4m3fn"),
    (lambda q, s: (q, s[:, :1]), "expected shape \\[5, 3\\]"),
    (lambda q, s: (q, np.where(np.arange(3) == 1, np.nan, s).astype(np.float32)), "block \\[0, 1\\] is nan"),
    (lambda q, s: (q, -s), "finite, > 0"),
    (lambda q, s: (q, np.zeros_like(s)), "finite, > 0"),
    (lambda q, s: (q, np.full_like(s, 1e37)), "block \\[0, 0\\] is 1e\\+37; .* at most 7.6e\\+35"),  # 448 x 1e37 = inf
    (lambda q, s: (_with_nan(q, 2, 7), s), "element \\[2, 7\\] is an e4m3 NaN"),
    (lambda q, s: (q, s.astype(np.int32)), "float scale"),
])
def test_bad_fp8_inputs_fail_with_the_tensor_named(edit, match):
    q, s = quantize(np.ones((576, 300), np.float32))
    q, s = edit(q, s)
    with pytest.raises(QuantError, match="model.layers.1.self_attn.kv_a_proj_with_mqa.weight"):
        dequantize(q, s, name="model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
    with pytest.raises(QuantError, match=match):
        dequantize(q, s)


def test_the_nan_check_finds_every_nan_pattern_and_nothing_else():
    """check_no_nan reads eight bytes at a time: every byte position, both NaN patterns, every other value."""
    q = np.arange(256, dtype=np.uint8)
    finite = q[(q & 0x7F) != 0x7F].view(E4M3)
    check_no_nan(np.resize(finite, (31, 9)))  # odd sizes: a tail shorter than eight bytes
    for nan in (0x7F, 0xFF):
        for position in range(19):
            bits = np.resize(finite.view(np.uint8), 19)
            bits[position] = nan
            with pytest.raises(QuantError, match=f"element \\[{position}\\] is an e4m3 NaN"):
                check_no_nan(bits.view(E4M3))


def test_quantize_rejects_non_finite():
    with pytest.raises(QuantError, match="non-finite"):
        quantize(np.array([[1.0, np.inf]], np.float32))
