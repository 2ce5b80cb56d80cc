"""The release's weight formats: block FP8 (e4m3, 128x128 scales, ragged edge blocks included), and INT4 groups
(compressed-tensors pack-quantized: quantisation, packing and dequantisation bit for bit as the compressed-tensors
library does them; the quantization_config parser, each unsupported field one line naming it)."""

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_name

from k2jax.formats.quant import (
    BLOCK,
    E4M3,
    E4M3_MAX,
    K2_INT4_QUANTIZATION_CONFIG,
    Fp8Scheme,
    Int4Scheme,
    QuantError,
    check_int4_scale,
    check_no_nan,
    dequantize,
    dequantize_int4,
    int4_shapes,
    max_int4_scale,
    pack_int4,
    parse_quantization_config,
    quantize,
    quantize_int4,
    scale_shape,
    scheme_from_json,
)
from pallas_kernels.int4_grouped_matmul import unpack

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


# ---- INT4 groups (compressed-tensors pack-quantized), checked against the compressed-tensors library ------------
CT_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32,
                           scale_dtype=torch.bfloat16)
INT4_NAME = "model.layers.1.mlp.experts.7.down_proj.weight"


@pytest.mark.parametrize("shape", [(16, 64), (7, 40), (3, 1), (5, 96)])
def test_pack_int4_is_compressed_tensors_pack_to_int32(shape):
    values = np.random.default_rng(3).integers(-8, 8, shape).astype(np.int8)
    packed = pack_int4(values)
    theirs = pack_to_int32(torch.from_numpy(values), 4).numpy()
    assert packed.dtype == np.int32 and packed.shape == theirs.shape == int4_shapes(shape)[0]
    np.testing.assert_array_equal(packed, theirs)
    np.testing.assert_array_equal(np.asarray(unpack(packed, axis=-1, size=shape[1])), values)  # its inverse


def _ct_quantize(w):
    """compressed-tensors' quantisation of a float32 weight with bfloat16 group scales: (packed, scale)."""
    t = torch.from_numpy(w)
    groups = t.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), CT_ARGS)
    q = ct_quantize(t, scale, None, CT_ARGS, dtype=torch.int8)
    return pack_to_int32(q, 4).numpy(), scale.to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("shape", [(32, 64), (7, 96)])
def test_quantize_int4_is_compressed_tensors_rule(shape):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, (shape[0], 1)))).astype(np.float32)
    w[0, :32] = 0  # an all-zero group: compressed-tensors gives it bfloat16's eps, not 0
    w[1, 32:64] = -np.abs(w[1, 32:64])  # only negative values: -amax lands on -8
    packed, scale = quantize_int4(w, name=INT4_NAME)
    want_packed, want_scale = _ct_quantize(w)
    assert scale.dtype == ml_dtypes.bfloat16 and scale.shape == int4_shapes(shape)[1]
    np.testing.assert_array_equal(packed, want_packed)
    np.testing.assert_array_equal(scale.astype(np.float32), want_scale)
    assert scale[0, 0] == ml_dtypes.finfo(ml_dtypes.bfloat16).eps
    back = dequantize_int4(packed, scale, shape)  # within half a step, plus the bf16 scale's rounding at +amax
    step = np.repeat(scale.astype(np.float32), 32, -1)[:, :shape[1]]
    assert np.all(np.abs(back - w) <= step * (0.5 + 7.5 * 2.0 ** -8))


def test_dequantize_int4_is_compressed_tensors_dequantisation():
    rng = np.random.default_rng(5)
    packed = pack_int4(rng.integers(-8, 8, (24, 128)).astype(np.int8))
    scale = rng.uniform(1e-3, 1e-1, (24, 4)).astype(ml_dtypes.bfloat16)
    theirs = ct_dequantize(unpack_from_int32(torch.from_numpy(packed), 4, torch.Size((24, 128))),
                           torch.from_numpy(scale.astype(np.float32)), None, CT_ARGS).numpy()
    np.testing.assert_array_equal(dequantize_int4(packed, scale, (24, 128)), theirs)
    bf16 = dequantize_int4(packed, scale, (24, 128), dtype=ml_dtypes.bfloat16)
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16, theirs.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("edit, match", [
    (lambda p, s: (p.astype(np.int64), s), "_packed: expected int32\\[32, 8\\] for weight_shape \\[32, 64\\], got "
                                           "int64"),
    (lambda p, s: (p[:, :7], s), "_packed: expected int32\\[32, 8\\] .* got int32\\[32, 7\\]"),
    (lambda p, s: (p, s[:, :1]), "_scale: expected shape \\[32, 2\\] for weight_shape \\[32, 64\\] and group size 32"),
    (lambda p, s: (p, s.astype(np.int32)), "_scale: expected a float scale"),
    (lambda p, s: (p, np.where(np.arange(2) == 1, np.nan, s).astype(s.dtype)), "_scale: group \\[0, 1\\] is nan"),
    (lambda p, s: (p, np.zeros_like(s)), "_scale: group \\[0, 0\\] is 0; scales must be finite, > 0"),
    (lambda p, s: (p, -s), "_scale: group \\[0, 0\\] is -.*; scales must be finite, > 0"),
    (lambda p, s: (p, np.full_like(s, np.inf)), "_scale: group \\[0, 0\\] is inf"),
    (lambda p, s: (p, np.full(s.shape, 1e38, np.float32)),
     "_scale: group \\[0, 0\\] is 1e\\+38; .* at most 4.25e\\+37 \\(8 x scale"),
])
def test_bad_int4_inputs_fail_with_the_tensor_named(edit, match):
    packed, scale = quantize_int4(np.ones((32, 64), np.float32))
    packed, scale = edit(packed, scale)
    with pytest.raises(QuantError, match=f"{INT4_NAME}{match}"):
        dequantize_int4(packed, scale, (32, 64), name=INT4_NAME)


def test_int4_scales_are_bounded_by_the_dtype_they_dequantise_to():
    assert max_int4_scale(np.float32) * 8 == pytest.approx(np.finfo(np.float32).max)
    scale = np.full((4, 2), (max_int4_scale("bfloat16") + max_int4_scale(np.float32)) / 2, np.float32)
    check_int4_scale(scale, (4, 64))
    with pytest.raises(QuantError, match="8 x scale must fit in bfloat16"):
        check_int4_scale(scale, (4, 64), dtype="bfloat16")


def _with(path, value, config=None):
    """K2_INT4_QUANTIZATION_CONFIG (or `config`) with the field at `path` (keys) set to `value` (DELETE: removed)."""
    config = copy.deepcopy(config or K2_INT4_QUANTIZATION_CONFIG)
    node = config
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


DELETE = object()
WEIGHTS = ("config_groups", "group_0", "weights")


def test_parse_quantization_config():
    scheme = parse_quantization_config(K2_INT4_QUANTIZATION_CONFIG)
    assert isinstance(scheme, Int4Scheme) and scheme.group_size == 32 and scheme.config == K2_INT4_QUANTIZATION_CONFIG
    assert scheme.ignore == tuple(K2_INT4_QUANTIZATION_CONFIG["ignore"])
    assert scheme_from_json(scheme.to_json()) == scheme
    assert isinstance(parse_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 128]}), Fp8Scheme)
    assert parse_quantization_config(None) is None
    for group in (8, 128):  # other group sizes that divide 128 hold whole int32 words
        assert parse_quantization_config(_with(WEIGHTS + ("group_size",), group)).group_size == group
    newer = _with(WEIGHTS + ("scale_dtype",), "torch.bfloat16", _with(("sparsity_config",), {}))
    assert parse_quantization_config(_with(WEIGHTS + ("zp_dtype",), None, newer)).scale_dtype == "bfloat16"
    assert parse_quantization_config(_with(("quantization_status",), DELETE)).group_size == 32


@pytest.mark.parametrize("path, value, match", [
    (WEIGHTS + ("num_bits",), 8, "config_groups.group_0.weights.num_bits: 8 is not supported"),
    (WEIGHTS + ("type",), "float", "weights.type: 'float' is not supported"),
    (WEIGHTS + ("symmetric",), False, "weights.symmetric: False is not supported"),
    (WEIGHTS + ("strategy",), "channel", "weights.strategy: 'channel' is not supported"),
    (WEIGHTS + ("group_size",), 48, "weights.group_size: 48 is not supported"),
    (WEIGHTS + ("dynamic",), True, "weights.dynamic: True: dynamic weight quantisation"),
    (WEIGHTS + ("actorder",), "group", "weights.actorder: 'group': act-order group indices"),
    (WEIGHTS + ("zp_dtype",), "torch.int8", "weights.zp_dtype: 'torch.int8' is not supported"),
    (WEIGHTS + ("some_new_knob",), 1, "weights.some_new_knob: unknown field"),
    (("config_groups", "group_0", "input_activations"), {"num_bits": 8, "type": "float", "dynamic": True},
     "group_0.input_activations: .*activation quantisation is not supported \\(W4A16 only\\)"),
    (("config_groups", "group_0", "output_activations"), {"num_bits": 8}, "group_0.output_activations"),
    (("config_groups", "group_0", "targets"), ["re:.*experts.*"], "group_0.targets: \\['re:.\\*experts.\\*'\\]"),
    (("config_groups", "group_1"), {"targets": ["Embedding"]}, "config_groups: expected one group"),
    (("format",), "nvfp4-pack-quantized", "quantization_config.format: 'nvfp4-pack-quantized' is not supported"),
    (("quantization_status",), "frozen", "quantization_status: 'frozen': only 'compressed'"),
    (("kv_cache_scheme",), {"num_bits": 8}, "kv_cache_scheme: .* is not supported \\(expected null\\)"),
    (("sparsity_config",), {"format": "sparse-24-bitmask"}, "sparsity_config: .*sparse weights are not supported"),
    (("ignore",), "lm_head", "ignore: expected a list"),
    (("ignore",), ["re:(unclosed"], "ignore: 're:\\(unclosed' is not a valid regular expression"),
    (("quant_method",), "awq", "quant_method 'awq' is not supported"),
    (("provider",), "someone", "quantization_config.provider: unknown field"),
])
def test_bad_quantization_configs_fail_naming_the_field(path, value, match):
    with pytest.raises(QuantError, match=match) as e:
        parse_quantization_config(_with(path, value))
    assert str(e.value).startswith("quantization_config") and "\n" not in str(e.value)


def test_ignore_list_matches_as_compressed_tensors_does():
    """re: entries by re.match from the start of the module name, plain entries by the whole name."""
    scheme = parse_quantization_config(_with(("ignore",), K2_INT4_QUANTIZATION_CONFIG["ignore"] + [
        "re:vision_tower.*", "model.layers.1.mlp.experts.3.up_proj"]))
    names = ["lm_head", "language_model.lm_head", "model.layers.1.self_attn.q_a_proj", "model.layers.0.mlp.gate_proj",
             "model.layers.1.mlp.shared_experts.down_proj", "model.layers.1.mlp.experts.0.gate_proj",
             "model.layers.1.mlp.experts.3.up_proj", "model.layers.1.mlp.experts.3.up_projection",
             "vision_tower.encoder.blocks.0.wqkv", "mm_projector.vision_tower.x", "model.layers.1.mlp.gate"]
    for name in names:
        assert scheme.ignores(name) == any(match_name(name, entry) for entry in scheme.ignore), name
    assert [scheme.ignores(n) for n in names] == [True, False, True, True, True, False, True, False, True, False,
                                                  False]
