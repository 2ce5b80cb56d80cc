"""The README's first command runs k2jax-demo; keep it working."""

import numpy as np
import pytest

from k2jax import demo


def test_demo_runs_and_reports():
    r = demo.run("tiny", batch=2, seq_len=40, seed=0)
    cfg = r["cfg"]
    assert r["logits"].shape == (2, 40, cfg.vocab_size)
    assert np.all(np.isfinite(np.asarray(r["logits"])))
    assert np.asarray(r["aux"]["expert_load"]).sum() == cfg.num_moe_layers * 2 * 40 * cfg.num_experts_per_tok


def test_demo_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="seq_len"):
        demo.run("tiny", batch=1, seq_len=10_000, seed=0)
