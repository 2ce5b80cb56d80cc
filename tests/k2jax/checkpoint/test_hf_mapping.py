"""from_hf_tensors / to_hf_tensors: exact round trip and one clear error per kind of bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax.checkpoint.hf_mapping import hf_tensor_specs
from k2jax.checkpoint.orbax_checkpoint import CheckpointError
from k2jax.model.config import tiny
from tests.oracle import random_release_tensors

CFG = tiny()


@pytest.fixture(scope="module")
def tensors():
    return random_release_tensors(CFG, seed=5)


def test_round_trip_is_exact(tensors):
    back = k2jax.to_hf_tensors(k2jax.from_hf_tensors(CFG, tensors))
    assert back.keys() == tensors.keys()
    for name, a in tensors.items():
        np.testing.assert_array_equal(back[name], a, err_msg=name)


def test_specs_cover_the_release_layout():
    names = [s.name for s in hf_tensor_specs(CFG)]
    assert len(names) == len(set(names))
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in names
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_mtp_layers_are_skipped(tensors):
    cfg = CFG.replace(num_nextn_predict_layers=1)
    extra = dict(tensors, **{"model.layers.3.eh_proj.weight": np.zeros((64, 128), np.float32)})
    k2jax.from_hf_tensors(cfg, extra)
    with pytest.raises(CheckpointError, match="model.layers.3.eh_proj.weight"):
        k2jax.from_hf_tensors(CFG, extra)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"), "missing 1 .*experts.3.up_proj"),
    (lambda t: t.update({"model.layers.1.mlp.experts.16.up_proj.weight": np.zeros((32, 64), np.float32)}),
     "does not describe.*experts.16"),
    (lambda t: t.update({"model.layers.1.self_attn.kv_b_proj.weight": np.zeros((32, 32), np.float32)}),
     "kv_b_proj.weight: expected shape \\(128, 32\\), got \\(32, 32\\)"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": np.ones((1, 1), np.float32)}),
     "o_proj.weight_scale_inv.*dequantise"),
    (lambda t: t.update({"model.norm.weight": np.ones((64,), np.int32)}), "model.norm.weight: expected a floating"),
])
def test_bad_tensor_sets_name_what_is_wrong(tensors, edit, match):
    bad = dict(tensors)
    edit(bad)
    with pytest.raises(CheckpointError, match=match):
        k2jax.from_hf_tensors(CFG, bad)


def test_param_dtype_is_applied(tensors):
    model = k2jax.from_hf_tensors(CFG.replace(param_dtype="bfloat16", dtype="bfloat16"), tensors)
    assert model.moe_blocks.mlp.experts.down_proj[...].dtype == jnp.bfloat16
    assert model.moe_blocks.mlp.gate.e_score_correction_bias[...].dtype == jnp.float32
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32
