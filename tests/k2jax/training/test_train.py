"""train.py end to end in subprocesses (8 or 4 fake CPU devices): the loss falls, what it prints (banner,
compiling, steps; no library logs), a preempted job exits 75 and a SIGKILLed one resumes bit-identically with each
step logged once, a finished workdir is not trained again, a damaged checkpoint is one line and the one before it
resumes onto a different mesh, a planted NaN stops the job and keeps the last good checkpoint, bad configs are one
line, every config in configs/ loads."""

import glob
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import types

import pytest
from flax import nnx

import k2jax
from k2jax.job_config import base_config
from k2jax.model.config import tiny
from k2jax.model.placement import abstract_model
from k2jax.training.metrics import read_metrics, read_tensorboard
from sharding.mesh import resolve_axis_sizes
from sharding.rules import param_specs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FAST = ["--config.model.overrides={'num_hidden_layers': 2}", "--config.seq_len=32", "--config.global_batch=8",
        "--config.metrics.every=1", "--config.metrics.tensorboard=False", "--config.checkpoint.async_save=False"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(workdir, *args, devices=8, check=True, script=os.path.join(ROOT, "train.py"), env=None):
    cmd = [sys.executable, script, f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", *FAST, *args]
    r = subprocess.run(cmd, env={**_env(devices), **(env or {})}, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def _losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def _steps(workdir) -> list[int]:
    names = [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))]
    return sorted(int(n) for n in names if n.isdigit())  # committed checkpoints only


STRAIGHT = ("--config.steps=12", "--config.checkpoint.every=4", "--config.profile.start_step=2",
            "--config.profile.num_steps=2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 12-step run, checkpoints every 4 steps, a profiler trace of steps 2-3. Its stdout and
    stderr are kept next to the workdir."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    r = _train(workdir, *STRAIGHT)
    for name in ("stdout", "stderr"):
        with open(os.path.join(os.path.dirname(workdir), name), "w") as f:
            f.write(getattr(r, name))
    return workdir


def _output(workdir, name):
    with open(os.path.join(os.path.dirname(workdir), name)) as f:
        return f.read()


_LIBRARY_INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", re.M)  # absl's INFO lines (Orbax, ...)


def _one_line_error(r, code):
    """The run failed with `code` and told why in one line (no traceback)."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), r.stderr[-3000:]
    return errors[0]


def test_the_loss_falls_and_checkpoints_are_kept(straight):
    losses = _losses(straight)
    assert sorted(losses) == list(range(12))
    assert sum(losses[s] for s in (9, 10, 11)) / 3 < sum(losses[s] for s in (0, 1, 2)) / 3 - 0.05
    assert _steps(straight) == [4, 8, 12]
    assert glob.glob(os.path.join(straight, "profile", "**", "*.xplane.pb"), recursive=True)  # the trace
    rows = read_metrics(straight)
    assert {"lr", "grad_norm", "update_norm", "tokens_per_s", "tflops_per_device", "attn_max_logit",
            "expert_load_max_over_mean"} <= set(rows[-1])
    # the explicit parallelism the step ran with: none on an fsdp mesh
    assert {k: rows[-1][k] for k in ("expert_parallel", "pipeline_stages", "pipeline_microbatches")} == {
        "expert_parallel": 1, "pipeline_stages": 1, "pipeline_microbatches": 0}


def test_it_prints_a_banner_then_compiling_then_steps_and_no_library_logs(straight):
    out, err = _output(straight, "stdout"), _output(straight, "stderr")
    for line in ("config: ", "model: preset tiny, 2 layers, ", "mesh: fsdp 8 over 8 cpu devices in 1 process",
                 "parallelism: no expert or pipeline parallelism",
                 "batch: 8 rows x 32 tokens = 256 tokens per step", "run: steps 0 -> 12 (fresh)"):
        assert line in out, out
    assert out.index("batch: ") < out.index("compiling the train step") < out.index("step 0/12: loss ")
    assert "finished at step 12" in out
    assert not _LIBRARY_INFO.search(err), _LIBRARY_INFO.search(err).group(0)  # Orbax logged ~60 INFO lines


def test_throughput_leaves_out_compilation_and_warm_up(straight):
    """The first step's window held the compilation (7 tok/s), and windows between fetches of steps that had
    already run gave millions of tokens per second; now the first row has none and the rest agree."""
    rows = read_metrics(straight)
    assert "tokens_per_s" not in rows[0]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    assert len(speeds) >= 8, rows
    median = statistics.median(speeds)
    assert all(median / 20 < v < median * 20 for v in speeds), speeds


def test_rerunning_a_finished_workdir_trains_nothing(straight):
    before = read_metrics(straight)
    r = _train(straight, *STRAIGHT)
    assert "already at step 12" in r.stdout and "nan" not in r.stdout, r.stdout
    assert "compiling" not in r.stdout and read_metrics(straight) == before
    assert _steps(straight) == [4, 8, 12]


def _start(workdir, *args):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
           *FAST, *args]
    return subprocess.Popen(cmd, env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, done, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not done():
        time.sleep(0.05)


def test_preemption_and_sigkill_then_resume_bit_identically(straight, tmp_path):
    """SIGTERM (a preemption notice) saves where the job is and exits 75 ("run me again"); the restart is
    SIGKILLed right after its step-8 checkpoint; the third run finishes. Every loss after the first save equals
    the uninterrupted run's exactly (same parameters, same batches), and metrics.jsonl and TensorBoard hold each
    step once, as if the job had never stopped."""
    workdir = str(tmp_path / "interrupted")
    args = ("--config.steps=12", "--config.checkpoint.every=4", "--config.metrics.tensorboard=True")
    proc = _start(workdir, *args)
    _wait_for(proc, lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(read_metrics(workdir)) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]  # not 0: a scheduler must restart the job
    first = _steps(workdir)
    assert first and 2 <= first[-1] < 8, first  # saved where it stopped, not only on the schedule
    assert f"preempted (SIGTERM) at step {first[-1]}" in err and "run the same command again to resume" in err
    proc = _start(workdir, *args)
    _wait_for(proc, lambda: 8 in _steps(workdir))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 in _steps(workdir) and 12 not in _steps(workdir), "the kill came too late to test anything"
    r = _train(workdir, *args)
    assert "compiled in" in r.stdout and "(from the compilation cache)" in r.stdout, r.stdout  # compiled before
    want, got = _losses(straight), _losses(workdir)
    for step in range(first[-1], 12):
        assert got[step] == want[step], step
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(12))  # the steps between a checkpoint and a kill, once
    board = read_tensorboard(workdir)["loss"]
    assert [step for step, _ in board] == list(range(12))
    assert all(abs(value - got[step]) <= 1e-6 * abs(got[step]) for step, value in board)


def test_ctrl_c_saves_at_the_next_step_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT) was a 48-line KeyboardInterrupt traceback that lost the steps since the last checkpoint: now,
    like SIGTERM, it saves at the next step, says so in one line and exits 130. Before the first step there is
    nothing to save: Ctrl-C during the compile stops the job at once (it used to wait for the compile to end) and
    leaves no empty workdir behind."""
    compiling = str(tmp_path / "compiling")
    out = tmp_path / "compiling.out"
    with open(out, "w") as f:  # another learning rate: a program no other run compiled (the compile takes ~30 s)
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py",
                                 f"--workdir={compiling}", *FAST, "--config.optimizer.lr=0.00123"], env=_env(8),
                                stdout=f, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, lambda: "compiling the train step ..." in out.read_text())
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    _, err = proc.communicate(timeout=300)
    stopped = time.perf_counter() - sent
    assert proc.returncode == 130 and "compiled in" not in out.read_text(), err[-2000:]
    assert "train.py: error: interrupted (Ctrl-C) before the first step: nothing new to save; no checkpoint yet" \
        in _one_line_error(subprocess.CompletedProcess(proc.args, 130, "", err), 130)
    assert stopped < 10, stopped
    assert not os.path.exists(compiling)
    workdir = str(tmp_path / "stepping")  # the preemption test's program: compiled once for both
    proc = _start(workdir, "--config.steps=12", "--config.checkpoint.every=4", "--config.metrics.tensorboard=True")
    _wait_for(proc, lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(read_metrics(workdir)) >= 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    saved = _steps(workdir)
    assert saved and 2 <= saved[-1] < 12, saved  # saved where it stopped, not only on the schedule
    assert err.strip().splitlines()[-1] == (f"train.py: interrupted (Ctrl-C) at step {saved[-1]}: saved in {workdir}; "
                                            f"run the same command again to resume (exit 130)")


def test_a_damaged_checkpoint_is_one_line_and_the_one_before_resumes_onto_a_different_mesh(straight, tmp_path):
    """The step-8 checkpoint lost its data files: one line naming it (exit 1). Moved out of the way as that line
    says, the job resumes from step 4, on 4 devices instead of 8, and matches the uninterrupted run."""
    workdir = str(tmp_path / "remeshed")
    shutil.copytree(straight, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
    for chunk in glob.glob(os.path.join(workdir, "checkpoints", "8", "state", "ocdbt.process_0", "d", "*")):
        os.remove(chunk)  # the arrays' data files (any one may hold only data no array reads any more)
    args = ("--config.steps=12", "--config.checkpoint.every=4")
    error = _one_line_error(_train(workdir, *args, devices=4, check=False), 1)
    assert f"{workdir}/checkpoints/8: cannot restore it: " in error and "move it out of" in error, error
    shutil.move(os.path.join(workdir, "checkpoints", "8"), str(tmp_path / "damaged-8"))
    r = _train(workdir, *args, devices=4)  # 8 devices -> 4
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == list(range(12))  # steps 4-11 logged again, once
    got, want = _losses(workdir), _losses(straight)
    for step in range(4, 12):  # continued from the step-4 checkpoint
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    assert "finished at step 12" in r.stdout


def test_a_planted_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    r = _train(workdir, "--config.steps=12", "--config.checkpoint.every=4", check=False,  # train.py, NaN at step 6
               script=os.path.join(os.path.dirname(os.path.abspath(__file__)), "planted_nan.py"),
               env={"K2JAX_NAN_STEP": "6"})
    error = _one_line_error(r, 1)
    assert "step 6: loss nan" in error and "Last good checkpoint: step 4" in error
    assert _steps(workdir) == [4]  # steps 5 and 6 ran but nothing after the bad step was saved


def test_bad_configs_fail_in_one_line_before_anything_runs(tmp_path):
    """Each used to be a 20-55 line traceback (or, for seq_len, a silent run; for another model's init_from
    checkpoint, a TypeError after compiling for 38 s); --verbosity=1 adds the traceback and keeps the exit code (it
    was 1). Run from another directory: --config=tiny is the installed configs/tiny.py, and a model field given on
    its own (--config.model.overrides.remat) reaches the model."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    workdir = tmp_path / "never-created"
    bigger = str(tmp_path / "bigger")
    k2jax.save_checkpoint(bigger, k2jax.Transformer(tiny(), rngs=nnx.Rngs(0)))  # 3 layers, not FAST's 2
    cases = {  # arguments: (exit code, the error)
        ("--config.stepz=20",): (2, "--config.stepz=20: the config has no field 'stepz' (Did you mean \"steps\""),
        ("--config.mesh.axes={'fsdp': 3}",): (2, "config.mesh.axes: mesh {'fsdp': 3} has 3 devices, but 8 are available"),
        ("--config.mesh.axes={'tensor': 8}", "--config.mesh.strategy=tensor"):  # the tiny model's 4 heads
            (2, "is not divisible by mesh axis tensor (8) under strategy 'tensor'"),
        ("--config.seq_len=200",): (2, "config.seq_len=200 is longer than the model's max_position_embeddings (128)"),
        ("--config.mesh.axes={'context': 4, 'fsdp': 2}", "--config.seq_len=30"):
            (2, "config.seq_len=30 does not split over the mesh's context axis (4): make it a multiple of 4"),
        (f"--workdir={a_file}",): (2, f"--workdir={a_file} is a file, not a directory"),
        ("--workdir=gs://bucket/run",): (2, "--workdir=gs://bucket/run: k2jax reads and writes it with local file APIs"),
        ("--config.data.source=array_record:/no/such.arrayrecord", f"--workdir={tmp_path / 'data'}"):
            (1, "missing files ['/no/such.arrayrecord']"),
        (f"--config.init_from={bigger}/",):
            (2, f"config.init_from={bigger}/ holds another model than the job's: num_hidden_layers 3 there, 2 here; "
                f"describe it in config.model"),
        ("--config=tiny", "--config.model.overrides.remat=fool"):  # "the config has no field 'remat'"
            (2, "config.model: RunOptions: remat must be one of ('none', 'full', 'dots'), got 'fool'"),
        ("--config.steps=-1", "--verbosity=1"): (2, "config.steps=-1: must be at least 1"),  # and its traceback
    }
    procs = {args: subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
         *FAST, *args] if not args[0].startswith("--config=") else  # --config comes before its overrides
        [sys.executable, os.path.join(ROOT, "train.py"), args[0], f"--workdir={workdir}", *FAST, *args[1:]],
        cwd=tmp_path, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in cases}
    for args, (code, want) in cases.items():
        out, err = procs[args].communicate(timeout=300)
        assert ("Traceback" in err) == ("--verbosity=1" in args), err[-2000:]  # the debug view: the same code
        last = err.strip().splitlines()[-1:] if "--verbosity=1" in args else err.splitlines()
        assert want in _one_line_error(subprocess.CompletedProcess(args, procs[args].returncode, out,
                                                                   "\n".join(last)), code), err[-2000:]
        assert "compiling" not in out
    assert not workdir.exists()  # a config error writes nothing
    assert not (tmp_path / "data").exists()  # nor does a run that fails: no empty workdir or checkpoints/ (it did)


def test_another_models_workdir_and_text_data_without_a_tokenizer_are_config_errors(straight):
    """Checked before anything is built or written (train.py exits 2, as for every TrainConfigError): a workdir
    whose checkpoints hold another model (it said "cannot restore it: ... tree structures do not match" after
    compiling, and the README's advice for that exit 1, move the checkpoint away, was wrong for it); jsonl data
    without a tokenizer (exit 1, after the banner and creating workdir/checkpoints/)."""
    from k2jax.training import loop
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.overrides = {"num_hidden_layers": 2}
    assert loop.check_config(config, straight) == tiny(num_hidden_layers=2)  # its own model: resumes
    config.model.preset = "moonlight_16b"
    with pytest.raises(loop.TrainConfigError) as e:
        loop.check_config(config, straight)
    assert str(e.value).startswith(f"--workdir={straight} holds checkpoints of another model than the job's: ")
    assert "hidden_size 64 there, 2048 here" in str(e.value) and str(e.value).endswith(
        f"resume it with its own model (--config.model.hf_config={straight}/model_config.json) or pass a new --workdir")
    config.model.preset, config.data.source = "tiny", "jsonl:/no/such.jsonl"
    with pytest.raises(loop.TrainConfigError, match="config.data.source=jsonl:/no/such.jsonl: jsonl data needs "
                                                    "config.data.tokenizer_dir"):
        loop.check_config(config, "/no/such/workdir")


def test_a_step_too_big_for_the_devices_is_a_config_error(monkeypatch):
    """seq_len=4096 on the tiny model used to run 99 s and be OOM-killed without a word: the compiled step's
    memory is checked against the devices' before anything is allocated."""
    from k2jax.training import loop

    class Compiled:
        def memory_analysis(self):
            return types.SimpleNamespace(argument_size_in_bytes=2**30, output_size_in_bytes=2**30,
                                         alias_size_in_bytes=2**30, temp_size_in_bytes=3 * 2**30)

    config = base_config()
    monkeypatch.setattr(loop, "device_memory", lambda: (2 * 2**30, "test memory"))
    with pytest.raises(loop.TrainConfigError, match=r"needs 4.00 GiB per device, more than the 2.00 GiB of test "
                                                    r"memory \(config.seq_len=128, config.global_batch=8\): "
                                                    r"lower") as e:
        loop.check_fits(Compiled(), config)
    assert str(e.value).endswith("--config.model.overrides.remat=full")  # a flag that works as printed
    monkeypatch.setattr(loop, "device_memory", lambda: (8 * 2**30, "test memory"))
    assert loop.check_fits(Compiled(), config) == 4 * 2**30
    monkeypatch.undo()
    limit, what = loop.device_memory()  # CPU: the host's available memory shared by the 8 devices
    assert 0 < limit and what.endswith("/ 8 CPU devices")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads(path):
    if os.path.basename(path) == "__init__.py":
        return
    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    from k2jax.job_config import model_config
    assert set(config.keys()) == set(base_config().keys())
    cfg = model_config(config)
    assert config.global_batch % config.grad_accum == 0 and cfg.num_params() > 0
    # the mesh splits every parameter as its strategy says (sharding rules raise on a dimension left whole)
    axes = dict(config.mesh.axes)
    devices = math.prod(abs(n) for n in axes.values()) * (8 if -1 in axes.values() else 1)
    abstract = abstract_model(cfg)
    param_specs(k2jax.param_info(abstract), resolve_axis_sizes(axes, devices), config.mesh.strategy)
    # its run command: train.py for a training job, k2jax-aot for an inference job's compiled check
    assert "python train.py --config=" in module.__doc__ or "k2jax-aot --config=configs/" in module.__doc__


def test_configs_import_each_other_from_any_directory(tmp_path):
    """configs/ ships with the package: a config that builds on another (`from configs.k2_infer_v5p import ...`)
    loads when train.py or k2jax-aot reads it from another directory with no PYTHONPATH (it failed with
    ModuleNotFoundError: configs was not an installed package)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import runpy, sys; c = runpy.run_path(sys.argv[1])['get_config'](); "
            "print(c.model.preset, c.infer.weights)")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "configs", "k2_infer_int4_v5p.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["kimi_k2_thinking", "int4"]


@pytest.mark.slow  # ~60-100 s on 2 cores: outside the 20-minute default suite
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
    """init_from loads parameters only: with a zeroed lm_head every logit is 0, so step 0's loss is ln(V). Paths
    with a trailing slash (save_checkpoint's, --workdir's); the compiled step goes to --compilation_cache (where
    JAX_COMPILATION_CACHE_DIR is not set: the tests' own cache, which train.py otherwise leaves alone); the
    workdir records its model."""
    import math

    import jax.numpy as jnp

    model = k2jax.Transformer(tiny(num_hidden_layers=2), rngs=nnx.Rngs(5))
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    k2jax.save_checkpoint(str(tmp_path / "k2") + "/", model)
    workdir, cache = str(tmp_path / "init"), tmp_path / "cache"
    env = {k: v for k, v in _env(8).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/tiny.py",
                        f"--workdir={workdir}/", *FAST, "--config.steps=1", f"--config.init_from={tmp_path / 'k2'}",
                        f"--compilation_cache={cache}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(_losses(workdir)[0] - math.log(model.cfg.vocab_size)) < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["cache", "init", "k2"] and _steps(workdir) == [1]
    assert os.listdir(cache)  # the compiled step (and the smaller programs compiled for more than a second)
    with open(os.path.join(workdir, "model_config.json")) as f:
        assert k2jax.K2Config.from_hf(json.load(f)) == tiny(num_hidden_layers=2)


def test_ep_overflow_fail_stops_at_the_step_that_dropped_rows(tmp_path, capsys):
    """A receive buffer of a quarter of the balanced load must drop rows: config.ep_overflow='fail' stops the job
    at step 0 with EPOverflowError naming the count, before anything is saved."""
    import importlib.util

    from k2jax.training.loop import EPOverflowError, train
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.overrides = {"ep_capacity_factor": 0.25}
    config.mesh.axes, config.mesh.strategy = {"expert": 4, "fsdp": 2}, "ep_fsdp"
    config.steps, config.seq_len, config.checkpoint.every, config.ep_overflow = 3, 32, 1, "fail"
    with pytest.raises(EPOverflowError, match=r"step 0: expert parallelism's receive buffers dropped \d+ routed"):
        train(config, str(tmp_path / "run"))
    assert _steps(str(tmp_path / "run")) == []
    assert "parallelism: expert parallel over 4 groups" in capsys.readouterr().out  # the banner says EP runs


@pytest.mark.parametrize("environ,processes", [
    ({}, 1),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, 1),  # one TPU VM (or a deviceless compile's setting)
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, 4),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, 1),  # a single-task SLURM allocation
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8"}, 16),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
    ({"OMPI_COMM_WORLD_SIZE": "two"}, 1),
])
def test_jax_distributed_starts_only_for_a_launch_of_several_processes(environ, processes):
    from k2jax.training.loop import launched_processes
    assert launched_processes(environ) == processes
