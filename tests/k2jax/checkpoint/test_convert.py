"""convert_checkpoint: HF FP8 release layout -> k2jax Orbax checkpoint, restore on meshes, crash + resume, a full
disk, damaged checkpoints, the command line's exit codes and output."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from k2jax import load_checkpoint
from k2jax.checkpoint.convert import PROGRESS, _done_tensors, _ProgressLog, convert_hf_to_orbax, export_to_hf
from k2jax.checkpoint.hf_checkpoint import HFCheckpoint, load_hf_checkpoint, write_hf_checkpoint
from k2jax.checkpoint.hf_mapping import hf_tensor_specs
from k2jax.checkpoint.orbax_checkpoint import CheckpointError, read_metadata
from k2jax.formats import quant
from k2jax.model.config import ConfigError, tiny
from tests.oracle import oracle_forward, oracle_model, random_release_tensors
from tests.shell_signals import sigint_as_from_a_shell

CFG = tiny(hidden_size=160, q_lora_rank=144, kv_lora_rank=136)  # ragged 128x128 scale blocks everywhere
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny-fp8")
    write_hf_checkpoint(path, CFG, random_release_tensors(CFG, seed=31), dtype="fp8")
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "k2")
    convert_hf_to_orbax(hf_dir, out, dtype="float32", show_progress=False)
    return out


def _params(model):
    return {k: np.asarray(jax.device_get(v)) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}


def test_converted_model_matches_the_oracle(hf_dir, converted):
    assert sorted(os.listdir(os.path.dirname(converted))) == ["k2"]  # no .partial left behind
    ckpt = HFCheckpoint(hf_dir)
    tensors = {spec.name: a for spec, a in ckpt.iter_tensors()}
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 40))
    oracle = oracle_forward(oracle_model(CFG, tensors), tokens)
    model = load_checkpoint(converted)
    assert model.cfg == CFG.replace(param_dtype="float32") and read_metadata(converted)["dtype"] == "float32"
    logits, aux = model(jnp.asarray(tokens), return_aux=True)
    assert np.max(np.abs(np.asarray(logits) - oracle["logits"])) <= 1e-5 * np.max(np.abs(oracle["logits"]))
    np.testing.assert_array_equal(np.sort(np.asarray(aux["router_topk_ids"]), -1), oracle["topk_ids"])


def test_restore_onto_two_meshes(converted):
    auto = jax.sharding.AxisType.Auto  # GSPMD decides the computation's layout (explicit EP is sharding/'s job)
    mesh_a = jax.make_mesh((8,), ("expert",), axis_types=(auto,))
    mesh_b = jax.make_mesh((2, 4), ("data", "model"), axis_types=(auto, auto))

    def by_expert(name, shape):
        spec = ("expert" if name.startswith("moe_blocks.mlp.experts") else None)
        return jax.sharding.NamedSharding(mesh_a, jax.sharding.PartitionSpec(None, spec) if len(shape) > 1
                                          else jax.sharding.PartitionSpec())

    def by_model(name, shape):
        axes = [None] * len(shape)
        if len(shape) >= 2 and shape[-1] % 4 == 0:
            axes[-1] = "model"
        return jax.sharding.NamedSharding(mesh_b, jax.sharding.PartitionSpec(*axes))

    a, b = load_checkpoint(converted, shardings=by_expert), load_checkpoint(converted, shardings=by_model)
    experts = a.moe_blocks.mlp.experts.gate_proj[...]
    assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert")
    assert experts.addressable_shards[0].data.shape == (2, 2, 160, 32)
    assert b.lm_head[...].addressable_shards[0].data.shape == (160, 64)
    pa, pb, ref = _params(a), _params(b), _params(load_checkpoint(converted))
    for k in ref:
        np.testing.assert_array_equal(pa[k], ref[k])
        np.testing.assert_array_equal(pb[k], ref[k])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 24)))
    cpu = jax.devices()[0]
    la = jax.device_put(a(tokens), cpu)
    lb = jax.device_put(b(tokens), cpu)
    assert np.max(np.abs(np.asarray(la) - np.asarray(lb))) <= 1e-5 * np.max(np.abs(np.asarray(la)))


@pytest.mark.parametrize("strategy,axes", [("ep_fsdp", ("expert", "fsdp")), ("tensor", ("fsdp", "tensor"))])
def test_restore_with_a_sharding_strategy(converted, strategy, axes):
    mesh = jax.make_mesh((2, 4), axes, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = load_checkpoint(converted, mesh=mesh, shardings=strategy)
    if strategy == "ep_fsdp":
        assert model.moe_blocks.mlp.experts.down_proj[...].sharding.spec[1] == "expert"
    else:
        assert "tensor" in model.moe_blocks.self_attn.q_b_proj[...].sharding.spec  # heads split
    ref = _params(load_checkpoint(converted))
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, ref[k])


def test_bad_inputs_leave_no_complete_output(hf_dir, converted, tmp_path):
    with pytest.raises(CheckpointError, match="already exists"):
        convert_hf_to_orbax(hf_dir, converted, show_progress=False)
    with pytest.raises(ConfigError, match="config.json: no such file"):
        convert_hf_to_orbax(str(tmp_path), str(tmp_path / "out"), show_progress=False)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")
    with pytest.raises(CheckpointError, match="not a k2jax checkpoint"):
        load_checkpoint(str(tmp_path))
    bad_scale = str(tmp_path / "bad-scale")
    import shutil
    shutil.copytree(hf_dir, bad_scale)
    from tests.k2jax.checkpoint.test_hf_checkpoint import _rewrite_shard
    name = "model.layers.2.mlp.experts.9.down_proj.weight_scale_inv"

    def poison(tensors):
        scale = tensors[name].copy()
        scale[0, 0] = np.inf
        tensors[name] = scale

    _rewrite_shard(bad_scale, name, poison)
    with pytest.raises(CheckpointError, match=f"{name}: block \\[0, 0\\] is inf"):
        convert_hf_to_orbax(bad_scale, str(tmp_path / "y"), show_progress=False)
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "y.partial")
    # an e4m3 NaN is found while streaming: what was converted is kept for --resume, and the error says so
    from tests.k2jax.checkpoint.test_hf_checkpoint import NAN
    nan = str(tmp_path / "nan")
    shutil.copytree(hf_dir, nan)
    NAN[0](nan)
    with pytest.raises(CheckpointError, match=NAN[1] + ".*; " + re.escape(
            f"{tmp_path}/z.partial is kept: once the input is fixed, run the same command with --resume to continue")):
        convert_hf_to_orbax(nan, str(tmp_path / "z") + "/", show_progress=False)
    assert os.path.exists(tmp_path / "z.partial") and not os.path.exists(tmp_path / "z")
    os.makedirs(tmp_path / "x.partial")
    with pytest.raises(CheckpointError, match="--resume"):
        convert_hf_to_orbax(hf_dir, str(tmp_path / "x"), show_progress=False)


def _signalled(cmd, sig: str, after: int):
    """cmd (a convert_checkpoint.py command) run so that it sends itself SIG`sig` once it has recorded `after`
    tensors as done (tests/k2jax/checkpoint/signal_after.py): part-way through at a fixed point, on any machine."""
    assert cmd[1].endswith("convert_checkpoint.py")
    return [cmd[0], os.path.join(ROOT, "tests", "k2jax", "checkpoint", "signal_after.py"), sig, str(after), *cmd[2:]]


def _convert_cmd(hf, out, *extra):
    return [sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), f"--hf_dir={hf}", f"--out_dir={out}",
            "--dtype=float32", *extra]


_LIBRARY_INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", re.M)  # absl's INFO lines (Orbax, ...)


def _one_line_error(r, code):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("convert_checkpoint.py: error: "), r.stderr[-3000:]
    return errors[0]


def _on_a_small_disk(cmd):
    """`cmd` where no file may grow past 20 KiB (writes past it fail with EFBIG, as on a full disk): bash's ulimit
    and SIGXFSZ ignored, so no fork of this multithreaded process is needed."""
    return ["bash", "-c", 'ulimit -f 20 && trap "" XFSZ && exec "$@"', "bash", *cmd]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL mid-run, then: without --resume, one line saying to pass it; --resume with another --dtype, one
    line saying which --dtype resumes; a full disk, exit 74 with OUT_DIR.partial kept; Ctrl-C, one line (it was a
    38-line traceback) saying OUT_DIR.partial is kept, exit 130; finally --resume (no --dtype: the interrupted
    run's; --out_dir with a trailing slash) completes, printing its own lines and no library logs, and equals an
    uninterrupted conversion."""
    cfg = CFG.replace(n_routed_experts=64, num_hidden_layers=4)  # more tensors than the 200 recorded before the kill
    hf = str(tmp_path / "hf")
    write_hf_checkpoint(hf, cfg, random_release_tensors(cfg, seed=8))
    out = str(tmp_path / "out")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    # --sync_gb=0: every tensor is recorded as soon as it is durable; the run kills itself once 200 are recorded
    killed = subprocess.run(_signalled(_convert_cmd(hf, out, "--sync_gb=0"), "KILL", 200), env=env,
                            capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = os.path.join(out + ".partial", PROGRESS)
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    done_before = sum(1 for _ in open(progress)) - 1
    assert done_before == 200 < len(hf_tensor_specs(cfg))  # killed part-way, right after the 200th record
    result = subprocess.run(_convert_cmd(hf, out), env=env, capture_output=True, text=True)
    assert "pass --resume to continue it" in _one_line_error(result, 1)
    with pytest.raises(CheckpointError, match="writes float32, not fp8: add --dtype=float32 to resume it"):
        convert_hf_to_orbax(hf, out, dtype="fp8", resume=True, show_progress=False)  # it said "delete it"
    resume = [sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), f"--hf_dir={hf}/", f"--out_dir={out}/",
              "--resume"]
    no_cache = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # its files are over 20 kB too
    full = subprocess.run(_on_a_small_disk(resume), env=no_cache, capture_output=True, text=True)
    error = _one_line_error(full, 74)
    assert "cannot write the output: " in error and "File too large" in error, error
    assert f"{out}.partial is kept: once that is fixed, run the same command with --resume to continue" in error
    assert not os.path.exists(out) and os.path.exists(progress)
    done_before = sum(1 for _ in open(progress)) - 1
    interrupted = subprocess.run(_signalled(resume + ["--sync_gb=0"], "INT", 20), env=env, capture_output=True,
                                 preexec_fn=sigint_as_from_a_shell,
                                 text=True, timeout=600)
    assert done_before + 20 <= sum(1 for _ in open(progress)) - 1 < len(hf_tensor_specs(cfg))  # interrupted part-way
    error = _one_line_error(interrupted, 130)
    assert error.endswith(f"interrupted (Ctrl-C); {out}.partial is kept: run the same command with --resume to "
                          f"continue"), error
    result = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"converting {hf} " in result.stderr and f" to {out} as float32; " in result.stderr
    assert f"wrote {out}: streamed " in result.stderr  # (benchmarks/convert.py reads its figures)
    assert not _LIBRARY_INFO.search(result.stderr), _LIBRARY_INFO.search(result.stderr).group(0)  # ~25 from Orbax
    clean = str(tmp_path / "clean")
    convert_hf_to_orbax(hf, clean, dtype="float32", show_progress=False)
    resumed, reference = _params(load_checkpoint(out)), _params(load_checkpoint(clean))
    assert resumed.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k])


def test_a_missing_chunk_is_an_error_naming_it(converted, tmp_path):
    """tensorstore reads a missing chunk as zeros: the export wrote that expert's up_proj as zeros, exited 0, and
    the result passed HFCheckpoint.check()."""
    damaged = str(tmp_path / "damaged")
    shutil.copytree(converted, damaged)
    os.remove(os.path.join(damaged, "state", "moe_blocks.mlp.experts.up_proj", "c", "0", "3", "0", "0"))
    want = ("array moe_blocks.mlp.experts.up_proj: chunk [0, 3, 0, 0] (state/moe_blocks.mlp.experts.up_proj/c/0/3/0/0) "
            "is missing")
    with pytest.raises(CheckpointError, match=re.escape(want)):
        load_checkpoint(damaged)
    out = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), "--to_hf",
                        f"--ckpt_dir={damaged}", f"--out_dir={out}"], env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True)
    assert want in _one_line_error(r, 1)
    # without --dtype the export keeps the checkpoint's dtype, and says so (it silently wrote bfloat16)
    assert f"exporting {damaged} (float32 checkpoint) to {out} as float32 (the checkpoint's dtype" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["damaged"]  # nothing half-written
    with open(os.path.join(damaged, "state", "moe_blocks.mlp.experts.down_proj", "c", "1", "2", "0", "0"), "r+b") as f:
        f.truncate(100)  # there, but cut short: the reader names it too
    os.remove(os.path.join(damaged, "state", "moe_blocks.mlp.experts.up_proj", "zarr.json"))
    with pytest.raises(CheckpointError, match="array moe_blocks.mlp.experts.up_proj: unreadable .*zarr.json"):
        export_to_hf(damaged, out, show_progress=False)
    shutil.rmtree(os.path.join(damaged, "state", "moe_blocks.mlp.experts.up_proj"))
    shutil.copytree(os.path.join(converted, "state", "moe_blocks.mlp.experts.up_proj"),
                    os.path.join(damaged, "state", "moe_blocks.mlp.experts.up_proj"))
    with pytest.raises(CheckpointError, match=re.escape("array moe_blocks.mlp.experts.down_proj[1, 2]: ") + ".*Error "
                                                "reading local file .*down_proj/c/1/2/0/0"):
        export_to_hf(damaged, out, show_progress=False)
    assert not os.path.exists(out)


def test_command_line_errors_are_one_line(hf_dir, converted, tmp_path):
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "export"  # its parent is a file: every write fails, as on a read-only disk
    cases = {(f"--hf_dir={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'a'}"): (1, "missing: no such directory"),
             (f"--hf_dir={hf_dir}", f"--out_dir={tmp_path / 'b'}", "--sync_gb=-1"): (2, "--sync_gb=-1"),  # accepted
             (f"--hf_dir={hf_dir}",): (2, "--hf_dir and --out_dir are required"),
             ("--to_hf", f"--ckpt_dir={converted}", f"--out_dir={unwritable}"):
                 (74, f"Not a directory: '{unwritable}.partial-"),  # and "nothing was left at" it (checked below)
             (f"--hf_dir={hf_dir}", f"--out_dir={unwritable}"): (74, "; nothing was written")}
    procs = {args: subprocess.Popen([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), *args],
                                    env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for args in cases}
    for args, (code, want) in cases.items():
        out, err = procs[args].communicate(timeout=300)
        error = _one_line_error(subprocess.CompletedProcess(args, procs[args].returncode, out, err), code)
        assert want in error and ("--to_hf" not in args or f"nothing was left at {unwritable}" in error), error
    assert os.listdir(tmp_path) == ["a-file"]


def _raw_tensors(path):
    ckpt = HFCheckpoint(path)
    return {name: ckpt.read_raw(name) for name in ckpt.weight_map}


def test_fp8_round_trip_is_bit_exact(hf_dir, tmp_path):
    k2 = str(tmp_path / "k2-fp8")
    convert_hf_to_orbax(hf_dir, k2, dtype="fp8", show_progress=False)
    assert read_metadata(k2)["params"]["moe_blocks.mlp.experts.down_proj"]["dtype"] == "float8_e4m3fn"
    back = str(tmp_path / "hf-again")
    # the command line without --dtype: the checkpoint's own (fp8); it used to write bfloat16 without a word
    # (trailing slashes: the export used to exit 74 and leave an empty OUT_DIR behind)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert_checkpoint.py"), "--to_hf", f"--ckpt_dir={k2}/",
                        f"--out_dir={back}/"], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    assert r.returncode == 0 and "as fp8 (the checkpoint's dtype" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["hf-again", "k2-fp8"]
    original, again = _raw_tensors(hf_dir), _raw_tensors(back)
    assert original.keys() == again.keys()
    for name, a in original.items():
        assert a.dtype == again[name].dtype and a.tobytes() == again[name].tobytes(), name
    # dequantised on load: the same weights as reading the release directly
    direct = _params(load_hf_checkpoint(hf_dir, param_dtype="bfloat16"))
    loaded = load_checkpoint(k2)
    assert loaded.cfg.run.param_dtype == "bfloat16"
    mesh = jax.make_mesh((2, 4), ("expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = load_checkpoint(k2, mesh=mesh, shardings="tensor")  # dequantised and transposed on 8 devices
    assert len(sharded.moe_blocks.mlp.experts.down_proj[...].sharding.device_set) == 8
    for got in (_params(loaded), _params(sharded)):
        for k, v in direct.items():
            np.testing.assert_array_equal(got[k], v, err_msg=str(k))


def test_export_from_float32_checkpoint(converted, hf_dir, tmp_path):
    out = str(tmp_path / "hf-bf16")
    export_to_hf(converted, out, dtype="bfloat16")
    exported = HFCheckpoint(out)
    exported.check()
    original = HFCheckpoint(hf_dir)
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "lm_head.weight", "model.layers.0.self_attn.kv_b_proj.weight"):
        assert exported.read_raw(name).dtype.name == "bfloat16"
        np.testing.assert_array_equal(exported.read(name), original.read(name).astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(exported.read("model.layers.1.mlp.gate.e_score_correction_bias"),
                                  original.read("model.layers.1.mlp.gate.e_score_correction_bias"))


@pytest.mark.parametrize("dtype", ["float32", "fp8"])
def test_all_zero_tensors_are_stored(tmp_path, dtype):
    """A fresh model's router bias is all zeros, as can be an expert: zarr must still store those chunks."""
    tensors = random_release_tensors(CFG, seed=4)
    for name in tensors:
        if name.endswith("e_score_correction_bias") or ".experts.3." in name:
            tensors[name] = np.zeros_like(tensors[name])
    hf, out = str(tmp_path / "hf"), str(tmp_path / "out")
    write_hf_checkpoint(hf, CFG, tensors, dtype="fp8")
    convert_hf_to_orbax(hf, out, dtype=dtype, show_progress=False)
    model = load_checkpoint(out)
    assert not np.any(np.asarray(model.moe_blocks.mlp.gate.e_score_correction_bias[...]))
    assert not np.any(np.asarray(model.moe_blocks.mlp.experts.down_proj[...][:, 3]))
    assert np.all(np.asarray(model.moe_blocks.mlp.experts.down_proj[...][:, 2]) != 0)


def test_progress_log_records_a_tensor_only_after_the_sync_that_makes_it_durable(tmp_path):
    path = str(tmp_path / PROGRESS)
    events = []

    class Writer:
        def sync(self):
            events.append(("sync", open(path).read().count("done")))

    log = _ProgressLog(path, {"source": "s", "dtype": "float32"}, Writer(), sync_bytes=100)
    log.landed("a", 60)
    assert log.syncing is None  # 60 bytes pending: below the batch size, nothing synced or recorded
    log.landed("b", 60)  # 120 >= 100: one background sync, then "a" and "b" are recorded
    log.syncing.result()
    log.landed("c", 10)
    log.close()  # the rest: synced, then recorded
    assert events == [("sync", 0), ("sync", 2)]
    lines = [json.loads(line) for line in open(path)]
    assert lines == [{"source": "s", "dtype": "float32"}, {"done": "a"}, {"done": "b"}, {"done": "c"}]
    # resumed before anything was recorded, and after a crash cut a record short: one header, whole lines, so
    # every record after them still counts
    partial = tmp_path / "partial"
    partial.mkdir()
    path = str(partial / PROGRESS)
    header = {"source": "s", "dtype": "float32"}
    with open(path, "w") as f:
        f.write('{"sour')  # even the header was cut
    _ProgressLog(path, header, Writer(), sync_bytes=100).close()
    log = _ProgressLog(path, header, Writer(), sync_bytes=100)
    log.landed("a", 1)
    log.close()
    with open(path, "a") as f:
        f.write('{"done": "b')  # cut by the crash
    log = _ProgressLog(path, header, Writer(), sync_bytes=100)
    log.landed("c", 1)
    log.close()
    assert _done_tensors(str(partial), "s", "float32") == {"a", "c"}


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_a_bf16_release_converts(tmp_path, dtype):
    """A release stored in BF16 (no FP8 tensors): kept as it is, or quantised to the FP8 layout on the way."""
    hf, out = str(tmp_path / "hf"), str(tmp_path / "out")
    write_hf_checkpoint(hf + "/", CFG, random_release_tensors(CFG, seed=6), dtype="bfloat16")  # "out/": an OSError
    assert os.listdir(tmp_path) == ["hf"]
    convert_hf_to_orbax(hf, out, dtype=dtype, show_progress=False)
    loaded = _params(load_checkpoint(out))
    if dtype == "bfloat16":
        for k, v in _params(load_hf_checkpoint(hf, param_dtype="bfloat16")).items():
            np.testing.assert_array_equal(loaded[k], v, err_msg=str(k))
    else:  # exactly the release's quantisation of each BF16 weight (quant.quantize), and loads as its dequantisation
        back = str(tmp_path / "back")
        export_to_hf(out, back, dtype="fp8")
        source, exported = HFCheckpoint(hf), HFCheckpoint(back)
        n_fp8 = 0
        for name in source.specs:
            raw = exported.read_raw(name)
            if raw.dtype == quant.E4M3:
                n_fp8 += 1
                q, scale = quant.quantize(source.read_raw(name).astype(np.float32), name=name)
                assert raw.tobytes() == q.tobytes(), name
                np.testing.assert_array_equal(exported.read_scale(name, raw.shape), scale, err_msg=name)
            else:
                assert raw.tobytes() == source.read_raw(name).tobytes(), name
        assert n_fp8 > 0
        for k, v in _params(load_hf_checkpoint(back, param_dtype="bfloat16")).items():
            np.testing.assert_array_equal(loaded[k], v, err_msg=str(k))
        assert read_metadata(out)["params"]["moe_blocks.mlp.experts.down_proj"]["dtype"] == "float8_e4m3fn"
