"""The release layout on disk: write a tiny FP8 checkpoint, read it back, compare with the oracle, break it."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

from k2jax.checkpoint.hf_checkpoint import INDEX, HFCheckpoint, load_hf_checkpoint, write_hf_checkpoint
from k2jax.checkpoint.hf_mapping import release_dtype
from k2jax.checkpoint.orbax_checkpoint import CheckpointError
from k2jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from k2jax.model.config import tiny
from tests.oracle import oracle_forward, oracle_model, random_release_tensors

# hidden 160, q_lora 144, kv_lora 136 + rope 8 = 144 rows: every matmul has ragged 128x128 scale blocks.
CFG = tiny(hidden_size=160, q_lora_rank=144, kv_lora_rank=136)
KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-fp8")
    write_hf_checkpoint(path, CFG, random_release_tensors(CFG, seed=21), dtype="fp8", num_shards=3)
    return path


@pytest.fixture
def broken(fp8_dir, tmp_path):
    """A fresh copy of the checkpoint for a test to damage."""
    path = str(tmp_path / "copy")
    shutil.copytree(fp8_dir, path)
    return path


def _shard_of(path, name):
    with open(os.path.join(path, INDEX)) as f:
        return os.path.join(path, json.load(f)["weight_map"][name])


def _rewrite_shard(path, name, edit):
    """Rewrites the shard holding `name` with edit(dict of its tensors)."""
    shard = _shard_of(path, name)
    f = SafetensorsFile(shard)
    tensors = {n: f.read(n) for n in f.names()}
    f.close()
    edit(tensors)
    os.remove(shard)
    write_safetensors(shard, tensors)


def test_layout_and_dtypes_follow_the_release(fp8_dir):
    ckpt = HFCheckpoint(fp8_dir)
    ckpt.check()
    assert ckpt.config == CFG
    files = sorted(os.listdir(fp8_dir))
    assert files == ["config.json", "model-00001-of-000003.safetensors", "model-00002-of-000003.safetensors",
                     "model-00003-of-000003.safetensors", INDEX]
    for spec in ckpt.specs.values():
        raw = ckpt.read_raw(spec.name)
        assert raw.dtype.name == {"fp8": "float8_e4m3fn", "bfloat16": "bfloat16", "float32": "float32"}[
            release_dtype(spec)], spec.name
    assert ckpt.read_raw(KV_A + "_scale_inv").shape == (2, 2)  # 144 x 160 -> ragged on both axes


def test_real_safetensors_reads_the_same_values(fp8_dir):
    ckpt = HFCheckpoint(fp8_dir)
    for name in (KV_A, KV_A + "_scale_inv", "model.embed_tokens.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        with safe_open(_shard_of(fp8_dir, name), framework="pt") as f:
            theirs = f.get_tensor(name)
        ours = ckpt.read_raw(name)
        np.testing.assert_array_equal(theirs.view(torch.uint8).numpy().view(np.uint8).reshape(-1),
                                      ours.view(np.uint8).reshape(-1))


def test_fp8_checkpoint_matches_the_oracle(fp8_dir):
    ckpt = HFCheckpoint(fp8_dir)
    tensors = {spec.name: a for spec, a in ckpt.iter_tensors()}
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 40))
    oracle = oracle_forward(oracle_model(CFG, tensors), tokens)
    logits, aux = load_hf_checkpoint(fp8_dir)(jnp.asarray(tokens), return_aux=True)
    err = np.max(np.abs(np.asarray(logits) - oracle["logits"]))
    assert err <= 1e-5 * np.max(np.abs(oracle["logits"]))
    np.testing.assert_array_equal(np.sort(np.asarray(aux["router_topk_ids"]), -1), oracle["topk_ids"])


def test_writer_refuses_to_overwrite_and_leaves_nothing_on_failure(fp8_dir, tmp_path):
    with pytest.raises(CheckpointError, match="already exists"):
        write_hf_checkpoint(fp8_dir, CFG, random_release_tensors(CFG))
    bad = random_release_tensors(CFG)
    bad["model.layers.2.mlp.experts.5.up_proj.weight"][0, 0] = np.nan
    out = tmp_path / "out"
    with pytest.raises(Exception, match="non-finite"):
        write_hf_checkpoint(str(out), CFG, bad)
    assert os.listdir(tmp_path) == []


def _drop(name):
    return lambda t: t.pop(name)


def _with_nan(fp8):
    bits = fp8.view(np.uint8).copy()
    bits[3, 5] = 0xFF  # e4m3fn's NaN: S.1111.111
    return bits.view(fp8.dtype)


# (damage to a copy of the checkpoint, the error it must produce)
DAMAGE = [
    (lambda p: os.remove(_shard_of(p, KV_A)), "missing shard"),
    (lambda p: open(_shard_of(p, KV_A), "r+b").truncate(os.path.getsize(_shard_of(p, KV_A)) - 10), "truncated"),
    (lambda p: open(_shard_of(p, KV_A), "r+b").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), "corrupt header"),
    (lambda p: _rewrite_shard(p, KV_A, _drop(KV_A)), f"{KV_A} is listed in {INDEX} but absent"),
    (lambda p: _rewrite_shard(p, KV_A, _drop(KV_A + "_scale_inv")), "_scale_inv is listed"),
    (lambda p: _rewrite_shard(p, KV_A, lambda t: t.__setitem__(KV_A + "_scale_inv", -t[KV_A + "_scale_inv"])),
     "finite, > 0"),
    # finite, but 448 x 1e37 overflows float32: 1,789 inf weights and non-finite logits got through before
    (lambda p: _rewrite_shard(p, KV_A, lambda t: t.__setitem__(KV_A + "_scale_inv", np.full_like(
        t[KV_A + "_scale_inv"], 1e37))), f"{KV_A}_scale_inv: block \\[0, 0\\] is 1e\\+37.*at most 7.(57|6)e\\+35"),
    (lambda p: _rewrite_shard(p, KV_A, lambda t: t.__setitem__(KV_A, t[KV_A][:100])), "shape \\[100, 160\\]"),
    (lambda p: _rewrite_shard(p, "model.norm.weight", lambda t: t.__setitem__(
        "model.norm.weight", t["model.norm.weight"].astype(np.float32).astype(np.int32))), "not a float"),
]
# damage only reading the weights finds (the converter streams them once: it stops at the tensor, OUT_DIR never
# appears, and OUT_DIR.partial can be resumed once the input is fixed)
NAN = (lambda p: _rewrite_shard(p, KV_A, lambda t: t.__setitem__(KV_A, _with_nan(t[KV_A]))),
       f"{KV_A}: element \\[3, 5\\] is an e4m3 NaN")


@pytest.mark.parametrize("damage, match", DAMAGE + [NAN])
def test_damaged_checkpoints_fail_naming_file_and_tensor(broken, damage, match):
    damage(broken)
    with pytest.raises(CheckpointError, match=match):
        load_hf_checkpoint(broken)


def _edit_index(path, edit):
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)


def test_index_and_config_mismatches(broken):
    _edit_index(broken, lambda m: m.pop("model.layers.2.mlp.experts.3.down_proj.weight"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*experts.3.down_proj"):
        HFCheckpoint(broken).check()
    _edit_index(broken, lambda m: m.update({"model.layers.2.mlp.experts.3.down_proj.weight": m[KV_A]}))
    with pytest.raises(CheckpointError, match="experts.3.down_proj.weight is listed .* but absent"):
        HFCheckpoint(broken).check()


def test_config_weights_mismatch(broken):
    with open(os.path.join(broken, "config.json")) as f:
        config = json.load(f)
    config["n_routed_experts"] = 8  # the weights hold 16 experts per layer
    config["num_experts_per_tok"] = 2
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="does not describe.*experts.(8|9|1[0-5])"):
        load_hf_checkpoint(broken)


def test_a_missing_or_file_path_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such directory"):
        HFCheckpoint(str(tmp_path / "nope"))  # it said "not a directory"
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="file: not a directory"):
        HFCheckpoint(str(tmp_path / "file"))


def test_scales_are_bounded_by_the_dtype_they_dequantise_to(broken):
    """A scale under float32's bound (max / 448) can still overflow bfloat16, whose max is a little lower."""
    from k2jax.formats import quant
    bound32, bound16 = quant.max_scale(np.float32), quant.max_scale("bfloat16")
    assert bound16 < bound32 and bound32 * 448 <= np.finfo(np.float32).max
    _rewrite_shard(broken, KV_A, lambda t: t.__setitem__(KV_A + "_scale_inv", np.full_like(
        t[KV_A + "_scale_inv"], (bound16 + bound32) / 2)))
    ckpt = HFCheckpoint(broken)
    ckpt.check_scales(np.float32)
    assert np.all(np.isfinite(ckpt.read(KV_A, np.float32)))
    with pytest.raises(CheckpointError, match="at most 7.57e\\+35 \\(448 x scale must fit in bfloat16\\)"):
        ckpt.check_scales("bfloat16")


def test_missing_scale_for_fp8_weight(broken):
    _edit_index(broken, lambda m: m.pop(KV_A + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"{KV_A} is float8 but {KV_A}_scale_inv is missing"):
        load_hf_checkpoint(broken)


@pytest.mark.parametrize("damage, match", DAMAGE)
def test_converter_stops_on_damage_before_writing(broken, damage, match, tmp_path):
    from k2jax.checkpoint.convert import convert_hf_to_orbax
    damage(broken)
    out = tmp_path / "converted"
    with pytest.raises(CheckpointError, match=match):
        convert_hf_to_orbax(broken, str(out), show_progress=False)
    assert not out.exists() and not (tmp_path / "converted.partial").exists()


def test_converter_stops_at_a_nan_weight(broken, tmp_path):
    from k2jax.checkpoint.convert import convert_hf_to_orbax
    NAN[0](broken)
    for dtype in ("bfloat16", "fp8"):
        out = tmp_path / dtype
        with pytest.raises(CheckpointError, match=NAN[1]):
            convert_hf_to_orbax(broken, str(out), dtype=dtype, show_progress=False)
        assert not out.exists()


def test_mtp_layers_are_skipped_only_when_the_config_declares_them(broken):
    extra = os.path.join(broken, "mtp.safetensors")
    write_safetensors(extra, {"model.layers.3.eh_proj.weight": np.zeros((4, 4), np.float32)})
    _edit_index(broken, lambda m: m.update({"model.layers.3.eh_proj.weight": "mtp.safetensors"}))
    with pytest.raises(CheckpointError, match="does not describe.*model.layers.3.eh_proj"):
        HFCheckpoint(broken).check()
    with open(os.path.join(broken, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(config, f)
    HFCheckpoint(broken).check()
