"""train.py end to end in subprocesses (8 or 4 fake CPU devices): the loss falls, a SIGKILLed job resumes
bit-identically, a job resumes onto a different mesh, a planted NaN stops the job and keeps the last good
checkpoint, every config in configs/ loads."""

import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from k2jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FAST = ["--config.model.overrides={'num_hidden_layers': 2}", "--config.seq_len=32", "--config.global_batch=8",
        "--config.metrics.every=1", "--config.metrics.tensorboard=False", "--config.checkpoint.async_save=False"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(workdir, *args, devices=8, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
           *FAST, *args]
    r = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def _losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def _steps(workdir) -> list[int]:
    names = [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))]
    return sorted(int(n) for n in names if n.isdigit())  # committed checkpoints only


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 12-step run, checkpoints every 4 steps, a profiler trace of steps 2-3."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    _train(workdir, "--config.steps=12", "--config.checkpoint.every=4", "--config.profile.start_step=2",
           "--config.profile.num_steps=2")
    return workdir


def test_the_loss_falls_and_checkpoints_are_kept(straight):
    losses = _losses(straight)
    assert sorted(losses) == list(range(12))
    assert sum(losses[s] for s in (9, 10, 11)) / 3 < sum(losses[s] for s in (0, 1, 2)) / 3 - 0.05
    assert _steps(straight) == [4, 8, 12]
    assert glob.glob(os.path.join(straight, "profile", "**", "*.xplane.pb"), recursive=True)  # the trace
    rows = read_metrics(straight)
    assert {"lr", "grad_norm", "update_norm", "tokens_per_s", "tflops_per_device", "attn_max_logit",
            "expert_load_max_over_mean"} <= set(rows[-1])


def _start(workdir, *args):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
           *FAST, *args]
    return subprocess.Popen(cmd, env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, done, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not done():
        time.sleep(0.05)


def test_preemption_and_sigkill_then_resume_bit_identically(straight, tmp_path):
    """SIGTERM (a preemption notice) saves where the job is and exits cleanly; the restart is SIGKILLed right
    after its step-8 checkpoint; the third run finishes. Every loss after the first save equals the
    uninterrupted run's exactly (same parameters, same batches)."""
    workdir = str(tmp_path / "interrupted")
    args = ("--config.steps=12", "--config.checkpoint.every=4")
    proc = _start(workdir, *args)
    _wait_for(proc, lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(read_metrics(workdir)) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    first = _steps(workdir)
    assert first and 2 <= first[-1] < 8, first  # saved where it stopped, not only on the schedule
    proc = _start(workdir, *args)
    _wait_for(proc, lambda: 8 in _steps(workdir))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 in _steps(workdir) and 12 not in _steps(workdir), "the kill came too late to test anything"
    _train(workdir, *args)
    want, got = _losses(straight), _losses(workdir)
    for step in range(first[-1], 12):
        assert got[step] == want[step], step


def test_resume_onto_a_different_mesh(straight, tmp_path):
    workdir = str(tmp_path / "remeshed")
    shutil.copytree(straight, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    r = _train(workdir, "--config.steps=12", "--config.checkpoint.every=4", devices=4)  # 8 devices -> 4
    got, want = _losses(workdir), _losses(straight)
    assert sorted(got) == [8, 9, 10, 11]  # continued from the step-8 checkpoint
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    assert "finished at step 12" in r.stdout


def test_a_planted_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    r = _train(workdir, "--config.steps=12", "--config.checkpoint.every=4", "--config.debug_nan_step=6", check=False)
    assert r.returncode != 0
    assert "NonFiniteError: step 6: loss nan" in r.stderr and "Last good checkpoint: step 4" in r.stderr
    assert _steps(workdir) == [4]  # steps 5 and 6 ran but nothing after the bad step was saved


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads(path):
    if os.path.basename(path) == "__init__.py":
        return
    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    from k2jax.training.loop import base_config, model_config
    assert set(config.keys()) == set(base_config().keys())
    cfg = model_config(config)
    assert config.global_batch % config.grad_accum == 0 and cfg.num_params() > 0
    assert "python train.py --config=" in module.__doc__


def test_two_processes_train_like_one(straight, tmp_path):
    """jax.distributed with 2 local CPU processes x 4 devices (coordinator on 127.0.0.1) against 1 x 8."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "two")
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
         *FAST, "--config.steps=8", "--config.checkpoint.every=4",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}"], env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got, want = _losses(workdir), _losses(straight)
    assert sorted(got) == list(range(8))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    assert _steps(workdir) == [4, 8]


def test_init_from_a_converted_checkpoint(tmp_path):
    """init_from loads parameters only: with a zeroed lm_head every logit is 0, so step 0's loss is ln(V)."""
    import math

    import jax.numpy as jnp
    from flax import nnx

    import k2jax
    from k2jax.config import tiny
    model = k2jax.Transformer(tiny(num_hidden_layers=2), rngs=nnx.Rngs(5))
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    k2jax.save_checkpoint(str(tmp_path / "k2"), model)
    workdir = str(tmp_path / "init")
    _train(workdir, "--config.steps=1", f"--config.init_from={tmp_path / 'k2'}")
    assert abs(_losses(workdir)[0] - math.log(model.cfg.vocab_size)) < 1e-5
