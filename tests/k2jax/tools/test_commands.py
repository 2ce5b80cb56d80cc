"""What the commands share (k2jax/tools/commands.py, startup.py): --help exits 0 on all four and, on a machine
without accelerators, no library prints its start-up lines; the heartbeat; Ctrl-C reaching the main thread during
a long call; --config found from any directory; path arguments in one spelling."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from k2jax.checkpoint.format import local_path
from k2jax.tools import commands, startup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# what libtpu and the CUDA plugin print when they start on a machine without their devices (k2jax/tools/startup.py)
NOISE = re.compile(r"cudart_stub|Could not find cuda drivers|absl::InitializeLog|Unable to load CUDA|"
                   r"TPU_ACCELERATOR_TYPE|worker hostname|InitGoogle|Jax plugin configuration error")


def quiet_env() -> dict:
    """The environment of a user who set nothing: no JAX_PLATFORMS (the tests' conftest sets it)."""
    return {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"PYTHONPATH": ROOT}


def test_help_exits_0_on_every_command_without_library_noise(tmp_path):
    """absl's --help exited 1, and with the test extra's CUDA plugin even --help printed 6 lines on stderr."""
    programs = {"k2jax-train": "k2jax.training.cli", "k2jax-convert": "k2jax.tools.convert",
                "k2jax-aot": "k2jax.tools.aot", "k2jax-demo": "k2jax.tools.demo"}
    scripts = os.path.dirname(sys.executable)  # the installed console scripts, else what they run
    procs = {name: subprocess.Popen(([os.path.join(scripts, name)] if os.path.exists(os.path.join(scripts, name)) else
                                     [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; "
                                      f"from {module} import cli; cli()"]) + ["--help"], cwd=tmp_path,
                                    env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, module in programs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        assert "flags:" in out and name in out.split("flags:")[0], (name, out[:2000])  # its docstring, then flags
        if not startup.accelerator_present():
            assert err == "", (name, err[-2000:])


def test_drop_noise_keeps_everything_else():
    preamble = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    driver = ("I0000 00:00:1796608041.596736   12181 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
              "GPU will not be used.\n")
    real = "E0000 00:00:1.0   1 something.cc:1] a real error\n"
    assert startup.drop_noise([preamble, driver, preamble, driver, real]) == [real]
    assert startup.drop_noise([preamble, real, "Traceback ...\n"]) == [preamble, real, "Traceback ...\n"]


def test_heartbeat_says_how_long_it_has_been():
    lines = []
    start = time.perf_counter()
    with commands.Heartbeat("compiling the train step", lines.append, every=0.05) as beat:
        while len(lines) < 3:  # the opening line and two beats, however loaded the machine
            assert time.perf_counter() - start < 60, f"the heartbeat stopped beating: {lines}"
            time.sleep(0.01)
    elapsed = time.perf_counter() - start
    assert lines[0] == "compiling the train step ..."
    assert all(re.fullmatch(r"  compiling the train step: \d+ s", line) for line in lines[1:]), lines
    assert 0.1 <= beat.seconds <= elapsed  # two beats apart at least, and no longer than the block took


class _Stop(Exception):
    pass


def test_a_signal_reaches_the_main_thread_during_a_long_call():
    """A call into code that does not return to Python (an XLA compile, here a sleep) held Ctrl-C until it
    returned; `interruptible` runs it in a worker thread, so the main thread's signal handler runs within 0.1 s."""
    def stop(*_):
        raise _Stop

    previous = signal.signal(signal.SIGUSR1, stop)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        start = time.perf_counter()
        timer.start()
        with pytest.raises(_Stop):
            commands.interruptible(time.sleep, 30)
        assert time.perf_counter() - start < 2
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert commands.interruptible(sum, [1, 2]) == 3
    with pytest.raises(ZeroDivisionError):
        commands.interruptible(lambda: 1 / 0)


def test_config_files_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    for given in ("configs/tiny.py", "tiny", "tiny.py", tiny):
        assert os.path.samefile(commands.resolve_config(given), tiny), given
    assert commands.resolve_config("configs/nope.py") == "configs/nope.py"  # its load error names it
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text("")
    assert commands.resolve_config("configs/tiny.py") == "configs/tiny.py"  # a file of one's own comes first
    argv, overrides = commands._job_config_args(
        ["prog", "--config=tiny", "--config.model.overrides.remat=full", "--config.model.overrides.hidden_size=32",
         "--config.steps=3"])
    assert argv[::2] == ["prog", "--config.steps=3"] and os.path.samefile(argv[1].removeprefix("--config="), tiny)
    assert [(field, value) for _, field, value in overrides] == [("remat", "full"), ("hidden_size", 32)]


def test_paths_have_one_spelling():
    assert local_path("out/") == "out" and local_path("/a//b/") == "/a/b" and local_path("./x/") == "x"
    assert local_path("~/k2") == os.path.join(os.path.expanduser("~"), "k2")
    assert local_path("gs://bucket/run/") == "gs://bucket/run/" and local_path("") == ""


def test_collective_flags_follow_the_job_configs_mesh(monkeypatch):
    """mesh.overlap_collectives / offload_collectives put their libtpu flags in LIBTPU_INIT_ARGS (beside the user's
    own), take them out again when off, and refuse both at once."""
    import ml_collections
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_user_flag=1")

    def mesh(overlap, offload):
        return ml_collections.ConfigDict({"overlap_collectives": overlap, "offload_collectives": offload})

    assert startup.collective_flags(mesh(False, True))
    assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_user_flag=1 " + startup.OFFLOAD_FLAGS
    assert not startup.collective_flags(mesh(False, True))  # already so
    assert startup.collective_flags(mesh(True, False))
    assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_user_flag=1 " + startup.OVERLAP_FLAGS
    assert startup.collective_flags(mesh(False, False))
    assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_user_flag=1"
    with pytest.raises(ValueError, match="exclude each other"):
        startup.collective_flags(mesh(True, True))
    monkeypatch.setenv("LIBTPU_INIT_ARGS", startup.OFFLOAD_FLAGS + " --xla_user_flag=1")  # in another order
    assert not startup.collective_flags(mesh(False, True))
    monkeypatch.delenv("LIBTPU_INIT_ARGS")
    assert not startup.collective_flags(mesh(False, False)) and "LIBTPU_INIT_ARGS" not in os.environ
