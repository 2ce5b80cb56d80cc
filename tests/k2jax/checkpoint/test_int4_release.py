"""The K2 family's INT4 releases (K2-Thinking layout, K2.5 layout), written by compressed-tensors and safetensors
(tests/int4_release.py, not by k2jax): they read, load (dequantised: float32 logits equal transformers' DeepseekV3
on the weights compressed-tensors dequantises, the same experts and the same greedy (argmax) token at every
position, unsharded and with expert parallelism on 8 devices), convert (--dtype int4 keeps the packed int32 and
scales; bfloat16 / float32 dequantise), export back byte for byte, and load INT4-resident (the oracle's logits, and
the dequantised load's generated tokens); damage fails in one line naming the file and tensor (or field). Both
layouts hold the same weights, so one oracle serves both."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from k2jax import Generator, load_checkpoint
from k2jax.checkpoint.convert import convert_hf_to_orbax, export_to_hf
from k2jax.checkpoint.hf_checkpoint import INDEX, HFCheckpoint, load_hf_checkpoint, write_hf_checkpoint
from k2jax.checkpoint.hf_mapping import hf_tensor_specs
from k2jax.checkpoint.orbax_checkpoint import CheckpointError, read_metadata
from k2jax.formats import quant
from k2jax.model.config import ConfigError, tiny
from pallas_kernels.int4_grouped_matmul import dequantize as dequantize_groups
from sharding.mesh import make_mesh
from tests.fp8_checks import assert_same_logits
from tests.int4_release import write_int4_release
from tests.k2jax.checkpoint.test_convert import _params, _raw_tensors
from tests.k2jax.checkpoint.test_hf_checkpoint import _edit_index, _rewrite_shard
from tests.oracle import oracle_forward, oracle_model, random_release_tensors

# K2-Thinking's own values where the tiny model has room for them: eps 1e-5, another eos id
CFG = tiny(rms_norm_eps=1e-5, eos_token_id=3)
F32 = {"param_dtype": "float32", "dtype": "float32"}
E, D, F, L = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size, CFG.num_moe_layers
EXPERT = "model.layers.2.mlp.experts.5.up_proj.weight"  # [F, D] = [32, 64]: 8 packed int32, 2 groups per row
EXPERT_K25 = "language_model." + EXPERT
MIN_MARGIN = 1e-4  # each position's top-1 minus top-2 logit over max|logit|: 10x the logits' tolerance


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """{layout: release directory} (the same weights in both) and the weights compressed-tensors dequantises."""
    tensors = random_release_tensors(CFG, seed=29)
    root = tmp_path_factory.mktemp("int4")
    dequantised = write_int4_release(root / "thinking", CFG, tensors)
    write_int4_release(root / "k25", CFG, tensors, layout="k25")
    return {layout: str(root / layout) for layout in ("thinking", "k25")}, dequantised


@pytest.fixture(scope="module")
def oracle(releases):
    """(tokens [2, 32], transformers' logits and sorted expert ids)."""
    tokens = np.random.default_rng(7).integers(0, CFG.vocab_size, (2, 32))
    out = oracle_forward(oracle_model(CFG, releases[1]), tokens)
    top2 = np.sort(out["logits"], -1)[..., -2:]
    assert np.min(top2[..., 1] - top2[..., 0]) > MIN_MARGIN * np.max(np.abs(out["logits"]))  # no near-tie
    return tokens, (out["logits"], out["topk_ids"])


@pytest.fixture(scope="module")
def converted(releases, tmp_path_factory):
    """The K2.5-layout release converted with --dtype int4."""
    out = str(tmp_path_factory.mktemp("k2") / "int4")
    convert_hf_to_orbax(releases[0]["k25"], out, dtype="int4", show_progress=False)
    return out


@pytest.fixture(scope="module")
def dequantised_model(releases):
    return load_hf_checkpoint(releases[0]["thinking"], **F32)


@nnx.jit
def _forward(model, tokens_BT):
    return model(tokens_BT, return_aux=True)


def _ep():
    return make_mesh({"expert": 4, "fsdp": 2})


def _assert_matches_oracle(model, oracle, mesh=None):
    """Logits within 1e-5 of max|logit| of the oracle's, the same experts, the same greedy next token at every
    position."""
    tokens, want = oracle
    if mesh is None:
        got = _forward(model, jnp.asarray(tokens))
    else:
        with jax.set_mesh(mesh):
            got = _forward(model, jnp.asarray(tokens))
    assert_same_logits(got, want)
    np.testing.assert_array_equal(np.argmax(np.asarray(got[0]), -1), np.argmax(want[0], -1))


@pytest.mark.parametrize("layout", ["thinking", "k25"])
def test_release_reads_as_compressed_tensors_dequantises_it(releases, layout, caplog):
    ckpt = HFCheckpoint(releases[0][layout])
    ckpt.check()
    assert ckpt.config == CFG
    assert isinstance(ckpt.scheme, quant.Int4Scheme) and ckpt.scheme.group_size == 32
    assert ckpt.scheme.weight_shape_dtype == ("int32" if layout == "k25" else "int64")  # as each release stores it
    assert ckpt.stored(EXPERT) == (EXPERT_K25 if layout == "k25" else EXPERT)
    if layout == "k25":
        assert ckpt.multimodal["vision_config"]["vt_num_hidden_layers"] == 27
        vision = [r.getMessage() for r in caplog.records if "vision tower was not loaded" in r.getMessage()]
        assert len(vision) == 1 and "left out 8 tensors" in vision[0], vision
    experts = [spec.name for spec in hf_tensor_specs(CFG) if ".mlp.experts." in spec.name]
    assert all(ckpt.is_int4(n) for n in experts)
    assert not ckpt.is_int4("model.layers.1.mlp.shared_experts.up_proj.weight")
    for name, want in releases[1].items():  # every tensor: experts bit for bit as compressed-tensors dequantises
        np.testing.assert_array_equal(ckpt.read(name), want, err_msg=name)
    assert ckpt.read_packed(EXPERT).shape == (CFG.moe_intermediate_size, D // 8)


@pytest.mark.parametrize("layout, ep", [("thinking", False), ("k25", False), ("k25", True)])
def test_dequantised_load_matches_the_oracle(releases, oracle, dequantised_model, layout, ep):
    mesh = _ep() if ep else None
    if layout == "thinking" and not ep:
        model = dequantised_model
    else:
        model = load_hf_checkpoint(releases[0][layout], mesh=mesh, shardings="ep_fsdp" if ep else None, **F32)
    _assert_matches_oracle(model, oracle, mesh)


@pytest.mark.parametrize("ep", [False, True])
def test_int4_conversion_loads_dequantised(converted, oracle, ep):
    meta = read_metadata(converted)
    assert meta["dtype"] == "int4" and meta["quantization"]["group_size"] == 32
    assert meta["quantization"]["quantization_config"]["format"] == "pack-quantized"
    assert meta["multimodal"]["vision_config"]["patch_size"] == 14  # K2.5's vision settings, kept
    assert meta["params"]["moe_blocks.mlp.experts.up_proj"] == {"shape": [L, E, F, D // 8], "dtype": "int32"}
    assert meta["params"]["int4_scales.moe_blocks.mlp.experts.up_proj"] == {"shape": [L, E, F, 2],
                                                                             "dtype": "bfloat16"}
    mesh = _ep() if ep else None
    model = load_checkpoint(converted, mesh=mesh, shardings="ep_fsdp" if ep else None, **F32)
    _assert_matches_oracle(model, oracle, mesh)


@pytest.mark.parametrize("layout", ["thinking", "k25"])
def test_int4_round_trip_is_byte_identical(releases, converted, layout, tmp_path):
    """release -> Orbax (int4) -> release: every tensor of the text model, byte for byte (a K2.5 source comes back
    as its text model in the K2-Thinking layout)."""
    k2 = converted
    if layout == "thinking":
        k2 = str(tmp_path / "k2")
        convert_hf_to_orbax(releases[0][layout], k2, dtype="int4", show_progress=False)
    back = str(tmp_path / "hf")
    export_to_hf(k2, back, show_progress=False)  # the checkpoint's own dtype: int4
    original, again = _raw_tensors(releases[0][layout]), _raw_tensors(back)
    assert original.keys() == again.keys() and len(original) > 300
    for name, a in original.items():
        assert a.dtype == again[name].dtype and a.shape == again[name].shape, name
        assert a.tobytes() == again[name].tobytes(), name
    with open(os.path.join(back, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"] == releases_config(releases[0][layout])["quantization_config"]
    assert HFCheckpoint(back).config == CFG


def releases_config(path):
    """The text model's config.json dict of a release directory (K2.5: its text_config)."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return config.get("text_config", config)


def test_float32_conversion_dequantises_and_exports_as_int4(releases, dequantised_model, tmp_path):
    """--dtype float32 holds the dequantised weights; exporting that with --dtype int4 quantises the routed experts
    (groups of 32, quant.quantize_int4: compressed-tensors' rule, tests/k2jax/formats/test_quant.py) and keeps the
    rest as BF16."""
    f32 = str(tmp_path / "f32")
    convert_hf_to_orbax(releases[0]["thinking"], f32, dtype="float32", show_progress=False)
    want = _params(dequantised_model)
    for k, v in _params(load_checkpoint(f32)).items():
        np.testing.assert_array_equal(v, want[k], err_msg=str(k))
    back = str(tmp_path / "hf")
    export_to_hf(f32, back, dtype="int4", show_progress=False)
    exported = HFCheckpoint(back)
    exported.check()
    for name, source in releases[1].items():
        if exported.is_int4(name):
            packed, scale = quant.quantize_int4(source, name=name)
            assert exported.read_packed(name).tobytes() == packed.tobytes(), name
            assert exported.read_group_scale(name).tobytes() == scale.tobytes(), name
        else:
            np.testing.assert_array_equal(exported.read(name), source.astype(ml_dtypes.bfloat16)
                                          .astype(np.float32) if source.dtype != np.float32 or "bias" not in name
                                          else source, err_msg=name)
    assert sum(exported.is_int4(n) for n in releases[1]) == 3 * L * E


@pytest.mark.parametrize("source", ["converted", "release"])
def test_int4_resident_load(releases, converted, oracle, source):
    """weights="int4": the model's routed experts hold the packed int32 [L, E, ceil(I/8), O] with the expert
    parameter's sharding and their bf16 scales [L, E, ceil(I/32), O] split like it, nothing dequantised; they
    dequantise to the dequantised load's expert weights, and the INT4-resident model matches the oracle."""
    path = converted if source == "converted" else releases[0]["k25"]
    load = load_checkpoint if source == "converted" else load_hf_checkpoint
    mesh = _ep()
    model = load(path, mesh=mesh, shardings="ep_fsdp", weights="int4", **F32)
    experts = model.moe_blocks.mlp.experts
    assert (experts.fmt, experts.group_size) == ("int4", 32)
    dequantised = load(path, mesh=mesh, shardings="ep_fsdp", **F32).moe_blocks.mlp.experts
    for name, (n_in, n_out) in (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D))):
        packed, scales = getattr(experts, name)[...], getattr(experts, name + "_scale")[...]
        want = getattr(dequantised, name)[...]
        assert (packed.shape, packed.dtype) == ((L, E, n_in // 8, n_out), jnp.int32)
        assert (scales.shape, scales.dtype) == ((L, E, n_in // 32, n_out), jnp.bfloat16)
        assert packed.sharding.is_equivalent_to(want.sharding, 4)
        assert tuple(packed.sharding.spec)[:2] == (None, "expert")
        assert scales.sharding.is_equivalent_to(want.sharding, 4)
        np.testing.assert_array_equal(np.asarray(dequantize_groups(packed, scales, axis=-2, size=n_in)),
                                      np.asarray(want))
    _assert_matches_oracle(model, oracle, mesh)


def test_int4_resident_generates_the_dequantised_loads_tokens(converted, dequantised_model):
    """Greedy generation (prefill, then decode steps over the latent cache) from prompts of different lengths: the
    INT4-resident load of the converted K2.5 release gives the tokens of the same weights loaded dequantised."""
    prompts = [[1, 17, 33, 4, 250, 9, 61], [1, 5, 200]]
    want = Generator(dequantised_model).generate(prompts, max_new_tokens=6)
    assert Generator(load_checkpoint(converted, weights="int4", **F32)).generate(prompts, max_new_tokens=6) == want


def test_formats_do_not_mix(releases, converted, tmp_path):
    fp8 = str(tmp_path / "fp8")
    write_hf_checkpoint(fp8, CFG, random_release_tensors(CFG, seed=2), dtype="fp8")
    with pytest.raises(CheckpointError, match="experts.0.gate_proj.weight is stored as fp8, not INT4"):
        load_hf_checkpoint(fp8, weights="int4")
    with pytest.raises(CheckpointError, match="tensor language_model.model.layers.1.mlp.experts.0.gate_proj.weight is "
                                              "stored as int4, not FP8"):
        load_hf_checkpoint(releases[0]["k25"], weights="fp8")
    with pytest.raises(CheckpointError, match="weights='fp8' needs an fp8 checkpoint .* this one is int4"):
        load_checkpoint(converted, weights="fp8")
    for source, dtype, other in ((fp8, "int4", "fp8"), (releases[0]["thinking"], "fp8", "int4")):
        with pytest.raises(CheckpointError, match=f"--dtype {dtype} of a {other} checkpoint would requantise") as e:
            convert_hf_to_orbax(source, str(tmp_path / "out"), dtype=dtype, show_progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="--dtype fp8 of a int4 checkpoint"):
        export_to_hf(converted, str(tmp_path / "back"), dtype="fp8", show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["fp8"]


@pytest.fixture
def broken(releases, tmp_path):
    """A fresh copy of the K2-Thinking-layout release for a test to damage."""
    path = str(tmp_path / "copy")
    shutil.copytree(releases[0]["thinking"], path)
    return path


def _set(name, value):
    return lambda t: t.__setitem__(name, value(t[name]))


def _edit_config(path, edit):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    edit(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _group_value(value):
    def edit(scale):
        scale = scale.copy()
        scale[3, 1] = value
        return scale
    return edit


def _weights_field(field, value):
    return lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__(field, value)


PACKED, SCALE, SHAPE = EXPERT + "_packed", EXPERT + "_scale", EXPERT + "_shape"
# (damage to a copy of the release, the error it must produce: one line naming the file and the tensor or field)
DAMAGE = [
    (lambda p: _rewrite_shard(p, PACKED, _set(PACKED, lambda a: a[:, :-1])),
     f"{PACKED}: expected int32\\[32, 8\\] for weight_shape \\[32, 64\\], got int32\\[32, 7\\]"),
    (lambda p: _rewrite_shard(p, SHAPE, _set(SHAPE, lambda a: np.array([32, 72], a.dtype))),
     f"{SHAPE}: is \\[32, 72\\], the config implies \\[32, 64\\]"),
    (lambda p: _rewrite_shard(p, SCALE, _set(SCALE, _group_value(np.nan))), f"{SCALE}: group \\[3, 1\\] is nan"),
    (lambda p: _rewrite_shard(p, SCALE, _set(SCALE, _group_value(0))), f"{SCALE}: group \\[3, 1\\] is 0; scales must"),
    (lambda p: _rewrite_shard(p, SCALE, _set(SCALE, _group_value(-1))), f"{SCALE}: group \\[3, 1\\] is -1"),
    (lambda p: _rewrite_shard(p, SCALE, _set(SCALE, lambda a: a[:, :1])), f"{SCALE}: expected shape \\[32, 2\\]"),
    (lambda p: _edit_index(p, lambda m: m.pop(SCALE)), f"{PACKED} is INT4 but {SCALE} is missing"),
    (lambda p: _edit_index(p, lambda m: m.pop(SHAPE)), f"{PACKED} is INT4 but {SHAPE} is missing"),
    (lambda p: _edit_index(p, lambda m: m.pop(PACKED)), f"missing 1 tensor.*{EXPERT}"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"]["ignore"].append("re:.*experts.*")),
     "experts.0.gate_proj.weight_packed: INT4, but config.json's quantization_config keeps it unquantised"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"]["ignore"].remove("re:.*shared_experts.*")),
     "shared_experts.gate_proj.weight: stored as bfloat16, but config.json's quantization_config makes it INT4"),
    (lambda p: _edit_config(p, _weights_field("num_bits", 8)),
     "config.json: quantization_config.config_groups.group_0.weights.num_bits: 8 is not supported"),
    (lambda p: _edit_config(p, _weights_field("symmetric", False)),
     "config.json: quantization_config.config_groups.group_0.weights.symmetric: False is not supported"),
    (lambda p: _edit_config(p, lambda c: c["quantization_config"]["config_groups"]["group_0"].__setitem__(
        "input_activations", {"num_bits": 8, "type": "float", "dynamic": True})),
     "config.json: quantization_config.config_groups.group_0.input_activations: .* activation quantisation"),
]


@pytest.mark.parametrize("damage, match", DAMAGE)
def test_damaged_release_fails_in_one_line(broken, damage, match):
    damage(broken)
    with pytest.raises((CheckpointError, ConfigError), match=match) as e:
        load_hf_checkpoint(broken)
    assert "\n" not in str(e.value) and (os.path.basename(broken) in str(e.value))


def test_damage_in_a_k25_release_names_its_tensors(releases, tmp_path):
    path = str(tmp_path / "k25")
    shutil.copytree(releases[0]["k25"], path)
    scale = EXPERT_K25 + "_scale"
    _rewrite_shard(path, scale, _set(scale, _group_value(np.inf)))
    with open(os.path.join(path, INDEX)) as f:
        shard = json.load(f)["weight_map"][scale]
    with pytest.raises(CheckpointError, match=f"{shard}: tensor {scale}: group \\[3, 1\\] is inf"):
        HFCheckpoint(path).read(EXPERT)
    _edit_config(path, lambda c: c["text_config"]["quantization_config"].__setitem__("format", "float-quantized"))
    with pytest.raises(ConfigError, match="config.json text_config: quantization_config.format: 'float-quantized'"):
        HFCheckpoint(path)


def test_k25_ignore_entries_match_the_release_names_too(releases, tmp_path):
    """compressed-tensors matched the ignore list against the module names of the model it saved: an entry may
    name K2.5's prefixed module (language_model.lm_head) as well as the text model's (lm_head)."""
    path = str(tmp_path / "k25")
    shutil.copytree(releases[0]["k25"], path)
    ignore = lambda c: c["text_config"]["quantization_config"]["ignore"]  # noqa: E731
    _edit_config(path, lambda c: ignore(c).__setitem__(0, "language_model.lm_head"))
    HFCheckpoint(path).check()
    _edit_config(path, lambda c: ignore(c).__setitem__(0, "language_model.model.lm_head"))
    with pytest.raises(CheckpointError, match="tensor language_model.lm_head.weight: stored as bfloat16, but "
                                              "config.json's quantization_config makes it INT4"):
        HFCheckpoint(path).check()
