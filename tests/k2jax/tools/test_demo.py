"""The README's first command runs k2jax-demo; keep it working."""

import numpy as np
import pytest

from k2jax.tools import demo, startup


def test_demo_runs_and_reports():
    r = demo.run("tiny", batch=2, seq_len=40, seed=0)
    cfg = r["cfg"]
    assert r["logits"].shape == (2, 40, cfg.vocab_size)
    assert np.all(np.isfinite(np.asarray(r["logits"])))
    assert np.asarray(r["aux"]["expert_load"]).sum() == cfg.num_moe_layers * 2 * 40 * cfg.num_experts_per_tok


def test_demo_runs_a_given_checkpoint(tmp_path):
    from flax import nnx

    import k2jax
    from k2jax.checkpoint.hf_checkpoint import write_hf_checkpoint
    from k2jax.model.config import tiny
    cfg = tiny(n_routed_experts=8, num_experts_per_tok=2)
    write_hf_checkpoint(str(tmp_path / "ck"), cfg, k2jax.to_hf_tensors(k2jax.Transformer(cfg, rngs=nnx.Rngs(1))))
    r = demo.run("tiny", batch=1, seq_len=8, seed=0, hf_dir=str(tmp_path / "ck"))
    assert r["cfg"] == cfg and np.asarray(r["aux"]["expert_load"]).shape == (2, 8)


def test_demo_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="seq_len"):
        demo.run("tiny", batch=1, seq_len=10_000, seed=0)


def test_demo_command_line(tmp_path):
    """It can keep the checkpoint it writes (--keep_dir; with a trailing slash it was a 23-line traceback that
    left the directory behind); a bad --hf_dir is one line, not a traceback. Run as a user who set no JAX_PLATFORMS:
    on a machine without accelerators, no library start-up lines."""
    import os
    import subprocess
    import sys

    from tests.k2jax.tools.test_commands import NOISE, quiet_env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = quiet_env()
    kept = tmp_path / "tiny-release"
    bad = subprocess.Popen([sys.executable, "-m", "k2jax.tools.demo", f"--hf_dir={tmp_path / 'nope'}"], cwd=root,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run([sys.executable, "-m", "k2jax.tools.demo", "--seq_len=8", "--batch=1",
                             f"--keep_dir={kept}/"], capture_output=True, text=True, cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    if not startup.accelerator_present():
        assert not NOISE.search(result.stderr), result.stderr[-2000:]
    assert "written as an FP8 release-layout checkpoint and loaded" in result.stdout
    assert "1,026,408,232,448 parameters" in result.stdout
    assert f"kept the checkpoint in {kept}" in result.stdout
    assert demo.load_hf_checkpoint(str(kept)).cfg.num_hidden_layers == 3  # the release layout, complete
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert [line for line in err.splitlines() if "error" in line] == [
        f"k2jax-demo: error: {tmp_path / 'nope'}: no such directory"]


def test_a_tiny_release_has_a_chat_template(tmp_path, caplog):
    """write_tiny_release ships Kimi-K2-Instruct-0905's template (the one k2jax's built-in renders as): its loads
    used to warn that the directory has no chat template."""
    import k2jax
    from k2jax.inference.chat_template import ChatTemplate
    demo.write_tiny_release(tmp_path / "tiny")
    tok = k2jax.Tokenizer.from_dir(tmp_path / "tiny")
    assert not tok.chat_template.builtin and "has no chat template" not in caplog.text
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    assert tok.chat_template.render(messages) == ChatTemplate().render(messages)
