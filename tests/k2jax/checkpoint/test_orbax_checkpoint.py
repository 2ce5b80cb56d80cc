"""save_checkpoint / load_checkpoint of an in-memory model (converted checkpoints: test_convert.py)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from k2jax import Transformer, load_checkpoint, save_checkpoint
from k2jax.checkpoint.orbax_checkpoint import CheckpointError
from k2jax.model.config import tiny


def test_save_checkpoint_round_trip(tmp_path):
    m = Transformer(tiny(param_dtype="bfloat16"), rngs=nnx.Rngs(3))
    save_checkpoint(str(tmp_path / "c"), m)
    back = load_checkpoint(str(tmp_path / "c"))
    assert back.cfg.run.param_dtype == "bfloat16"
    saved, restored = nnx.to_pure_dict(nnx.state(m)), nnx.to_pure_dict(nnx.state(back))
    assert jax.tree.structure(saved) == jax.tree.structure(restored)
    for want, got in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(str(tmp_path / "c"), m)
    # a checkpoint of the first layout (matmul weights stored [in, out]) is refused, not misread
    meta_path = tmp_path / "c" / "k2jax.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": "k2jax-orbax-v1"}))
    with pytest.raises(CheckpointError, match="k2jax-orbax-v1.*convert the release again"):
        load_checkpoint(str(tmp_path / "c"))
