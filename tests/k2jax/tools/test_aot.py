"""k2jax-aot: topology names, the collectives table of a compiled program, and the CLI end to end on a reduced K2
for a deviceless v5p-8 (4 chips): train and decode reports, a planted oversize config that exits 1, usage errors in
one line (exit 2), Ctrl-C during a compile."""

import dataclasses
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from k2jax.tools import aot
from k2jax.tools.hlo_cost import HloCost
from k2jax.tools.step_time import StepTime
from tests.shell_signals import sigint_as_from_a_shell

ROOT = Path(__file__).resolve().parents[3]
CONFIG = "configs/reduced_k2_v5p_8.py"


@pytest.mark.parametrize("name,generation,shape", [
    ("v5p-8", "v5p", (2, 2, 1)), ("v5p-512", "v5p", (4, 8, 8)), ("v5p-2048", "v5p", (8, 8, 16)),
    ("v4-32", "v4", (2, 2, 4)), ("v5e-256", "v5e", (16, 16)), ("v5litepod-32", "v5e", (4, 8)),
    ("v6e-8", "v6e", (2, 4)), ("v5p:4x4x12", "v5p", (4, 4, 12)), ("v6e:2x2", "v6e", (2, 2)),
])
def test_topology_names(name, generation, shape):
    topo = aot.parse_topology(name)
    assert (topo.generation, topo.shape) == (generation, shape)


@pytest.mark.parametrize("name,message", [("v5p-12", "power of two"), ("v9-8", "generation"),
                                          ("v5p:4x4", "3 dimensions"), ("tpu", "expected"),
                                          ("v5p-7", "2 cores per chip")])
def test_bad_topology_names_say_what_is_wrong(name, message):
    with pytest.raises(aot.AotError, match=message):
        aot.parse_topology(name)


def test_without_libtpu_it_says_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def no_tpu(**_):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
    with pytest.raises(aot.AotError, match=r"needs libtpu: pip install 'jax\[tpu\]=="):
        aot.parse_topology("v5p-8").devices()


def test_the_deviceless_topology_leaves_the_environment_as_it_was():
    """libtpu's settings for a deviceless topology are set for its call alone: a process started afterwards (a
    train.py run by a test or a notebook) must not find TPU_WORKER_HOSTNAMES and take itself for a pod host."""
    before = dict(os.environ)
    aot.parse_topology("v5p-8").devices()
    assert dict(os.environ) == before


def test_default_topology_is_the_smallest_slice_for_the_mesh():
    assert aot.default_topology({"expert": 64, "fsdp": 4}).name == "v5p-512"
    with pytest.raises(aot.AotError, match="-1"):
        aot.default_topology({"fsdp": -1})


def _aot_cmd(*args, config=CONFIG):
    return [sys.executable, "-m", "k2jax.tools.aot", *([f"--config={config}"] if config else []), *args]


def _aot(*args, cwd=ROOT, config=CONFIG):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(_aot_cmd(*args, config=config), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


# libtpu's start-up lines off a TPU VM (k2jax-aot tells it the slice and a worker host itself)
_LIBTPU_NOISE = re.compile(r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|worker hostname|InitGoogle")


def _expert_bytes_per_chip(config, weights: str) -> tuple[int, int]:
    """(bytes per chip of the config's routed expert weights in param_dtype, of them resident in `weights`: FP8,
    e4m3 + f32 scales per 128x128 block (the scales split over 'expert' only); INT4, 4 bits per value + a bf16 scale
    per 32 inputs (split like the weights)), from the shapes and the mesh: experts split over 'expert', the
    weights' D over 'fsdp'."""
    from k2jax.job_config import model_config
    cfg, axes = model_config(config), dict(config.mesh.axes)
    L, E, D, F = cfg.num_moe_layers, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    values = 3 * L * E * D * F // (axes["expert"] * axes["fsdp"])
    if weights == "int4":
        resident = values // 2 + 2 * (values // 32)
    else:
        resident = values + 4 * 3 * L * (E // axes["expert"]) * -(-D // 128) * -(-F // 128)
    return values * np.dtype(cfg.run.param_dtype).itemsize, resident


def _dequantized_parameters_per_chip(config) -> int:
    """Bytes per chip of the config's model with every weight in param_dtype, on the v5p-8 mesh (no compile)."""
    from flax import nnx

    from k2jax.job_config import model_config
    from k2jax.model.placement import abstract_model
    from sharding.mesh import make_mesh
    mesh = make_mesh(dict(config.mesh.axes), aot.parse_topology("v5p-8").devices())
    return aot._per_chip_bytes(nnx.state(abstract_model(model_config(config), mesh, config.mesh.strategy)))


# decode runs FP8- and INT4-resident (infer.weights); the dequantised decode step is compiled in test_generate_compile
@pytest.mark.parametrize("step,weights", [("train", None), ("decode", "fp8"), ("decode", "int4")])
def test_cli_compiles_reduced_k2_for_v5p_8(tmp_path, step, weights):
    report_path = tmp_path / "report.json"
    run = _aot(f"--step={step}", f"--report={report_path}", f"--save_hlo={tmp_path / 'step.hlo'}",
               *([f"--config.infer.weights={weights}"] if weights else []))
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(report_path.read_text())
    assert (r["step"], r["topology"], r["chips"], r["fits"]) == (step, "v5p-8", 4, True)
    assert r["mesh"] == {"fsdp": 2, "expert": 2}
    m = r["memory"]
    assert 0 < m["parameters"] <= m["arguments"] and 0 < m["temporaries"] and m["total"] < r["hbm_per_chip"]
    assert m["total"] == m["arguments"] + m["temporaries"] + m["outputs_not_aliased"] + m["generated_code"]
    f = r["flops"]
    # loop trips counted: the compiled matrix FLOPs are at least the useful ones
    assert f["useful_per_chip"] == sum(v for k, v in f.items() if k in ("model_per_chip", "optimizer_per_chip"))
    assert 0.98 * f["useful_per_chip"] < f["compiled_per_chip"]
    assert r["hbm_bytes_accessed_per_chip"] > 0 and r["tokens_per_second_bound"] > 0
    ops = {c["op"]: c for c in r["collectives"]}
    if step == "train":
        assert "ragged-all-to-all" in ops and ops["ragged-all-to-all"]["count"] >= 2  # EP there and back
    else:  # decode: the rows are whole on every chip, the weights used where they lie: activations move, not weights
        assert "ragged-all-to-all" not in ops and ops["all-reduce"]["count"] >= 2
        # all that is gathered is the routed experts' other fsdp half (this mesh splits them over fsdp as well; the
        # inference configs split them over expert alone) and a few rows of activations
        config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
        assert ops["all-gather"]["bytes"] < 2 * _expert_bytes_per_chip(config, weights)[1] + 0.01 * m["parameters"]
        assert 1 <= r["hbm_bytes_over_minimum"] < 3  # the experts' gathered halves weigh on a model this small
    # the step-time estimate: at least the compiled FLOPs at peak, made of its parts, the collectives costed
    st = r["step_time"]
    assert r["step_seconds_estimate"] >= f["compiled_per_chip"] / aot.TPUS["v5p"].peak_bf16_flops
    assert r["step_seconds_estimate"] == pytest.approx(st["compute_seconds"] + st["memory_bound_seconds"]
                                                       + sum(st["exposed_seconds"].values()))
    assert st["collective_busy_seconds"] and len(st["top_ops"]) == 5
    assert 0 < r["mfu_estimate"] <= 1 and "step time estimate:" in run.stdout
    # calibrated: compute-bound ops slower (decode has none: as fast)
    assert r["step_seconds_calibrated"] >= r["step_seconds_estimate"] and "calibrated (" in run.stdout
    assert (r["step_seconds_calibrated"] > r["step_seconds_estimate"]) == (st["compute_seconds"] > 0)
    # the saved program estimates again the same (--hlo), its devices placed as the config's mesh placed them
    from sharding.mesh import make_mesh
    topo = aot.parse_topology("v5p-8")
    coords = [list(d.coords) for d in make_mesh(r["mesh"], topo.devices()).devices.flat]
    (tmp_path / "devices.json").write_text(json.dumps(coords))
    again = aot.hlo_report(str(tmp_path / "step.hlo"), "v5p-8", devices=str(tmp_path / "devices.json"),
                           useful_flops_per_chip=f["useful_per_chip"])
    assert again["step_seconds_estimate"] == pytest.approx(r["step_seconds_estimate"])
    assert again["mfu_calibrated"] == pytest.approx(r["mfu_calibrated"])
    assert (again["flops"]["compiled_per_chip"], again["collectives"]) == (f["compiled_per_chip"], r["collectives"])
    if step == "train":
        assert m["optimizer_state"] > m["parameters"]  # MuonClip momentum + AdamW moments, f32
        assert r["model"]["remat"] == "full"
        assert r["pallas_kernels"] >= 3 + 9  # attention fwd / dq / dkv; gate, up, down: fwd, dx, dw
        # the step is the model's forward, recomputed forward and backward plus MuonClip's Newton-Schulz
        assert f["optimizer_per_chip"] > 0 and f["compiled_over_useful"] < 1.25
        assert f["xla_cost_analysis_per_chip"] < f["compiled_per_chip"]  # XLA: each loop body once
    else:
        assert m["cache"] > 0 and r["hbm_bytes_per_generated_token"] > 0
        assert r["pallas_kernels"] >= 1 + 3  # absorbed decode; the experts' grouped matmuls
        assert r["model"]["weights"] == weights and f"routed experts {weights.upper()}-resident" in run.stdout
        # the parameters are the dequantised model's with the routed experts' bytes replaced by their resident form
        config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
        dense, resident = _expert_bytes_per_chip(config, weights)
        assert m["parameters"] == _dequantized_parameters_per_chip(config) - dense + resident
    assert "fits" in run.stdout and "memory per chip" in run.stdout
    assert "model: 5 layers, 8 experts, 16.4M params" in run.stdout  # it said 0.0164B
    assert not _LIBTPU_NOISE.search(run.stderr), run.stderr[-3000:]


def test_decode_of_fewer_rows_than_chips_splits_the_cache_over_its_slots(tmp_path):
    """One row on 4 chips: the latent cache is split along its slots (a quarter per chip, never replicated), each
    chip attends over its part and the partial softmaxes are merged (an all-reduce)."""
    report_path = tmp_path / "report.json"
    run = _aot("--step=decode", "--config.infer.batch=1", "--config.infer.weights=fp8", f"--report={report_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(report_path.read_text())
    config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
    from k2jax.job_config import model_config
    cfg = model_config(config)
    slot = -(-(cfg.kv_lora_rank + cfg.qk_rope_head_dim) // 128) * 128  # padded to 128 values on TPU
    whole = cfg.num_hidden_layers * config.infer.max_len * slot * 2  # one row's cache, bf16
    assert r["memory"]["cache"] == whole // 4 and r["fits"]
    assert {c["op"] for c in r["collectives"]} >= {"all-reduce"} and 1 <= r["hbm_bytes_over_minimum"] < 3


def test_cli_exits_1_when_it_does_not_fit(tmp_path):
    """A decode batch whose latent cache alone is ~3x a v5p chip's HBM."""
    report_path = tmp_path / "report.json"
    run = _aot("--step=decode", "--config.infer.batch=4096", "--config.infer.max_len=65536",
               f"--report={report_path}")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "does not fit v5p-8" in run.stderr and "infer.batch" in run.stderr
    r = json.loads(report_path.read_text())
    assert r["fits"] is False and r["memory"]["cache"] > r["hbm_per_chip"]
    assert "arguments alone" in r["error"] and "compile_seconds" not in r  # found before compiling


def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path):
    """Each was a 41-56 line traceback or absl's "FATAL Flags parsing error" with exit 1, which also meant "does
    not fit". Run from another directory: configs/k2_v5p_1024.py (which imports configs.k2_v5p_256) is the
    installed config."""
    cases = {  # arguments (the first: --config, or None for none): the error
        ("configs/k2_v5p_1024.py", "--topology=v5p-24"): "no standard TPU slice has 12 chips",
        (CONFIG, "--topology=v5p:1x1x3", '--config.mesh.axes={"fsdp": 3}'): "the mesh {'fsdp': 3} cannot split the "
                                                                             "model: ",
        ("no/such/config.py",): "--config=no/such/config.py: cannot load it: ",
        (CONFIG, "--config.infer.bach=4"): "--config.infer.bach=4: the config has no field 'bach' (Did you mean",
        (CONFIG, "--stepp=decode"): "Unknown command line flag 'stepp'",
        (CONFIG, "--config.model.overrides.bogus=1"): "config.model.overrides.bogus: K2Config has no field 'bogus'",
        (None,): "give one of --config (a job to compile) and --hlo (a program compiled already)",
        (CONFIG, "--hlo=x.hlo", "--topology=v5p-8"): "give one of --config (a job to compile) and --hlo",
        (None, "--hlo=x.hlo"): "--hlo needs --topology: the slice the program was compiled for",
        (None, "--hlo=no/such.hlo", "--topology=v5p-8"): "--hlo no/such.hlo: No such file or directory",
        (None, "--hlo=x.hlo", "--topology=v5p-8", "--step=decode"): "--step and --save_hlo are for compiling a",
        (CONFIG, "--hlo_devices=d.json"): "--hlo_devices and --hlo_useful_flops go with --hlo",
        (CONFIG, "--save_hlo=no/such/dir/step.hlo"): "--save_hlo no/such/dir/step.hlo: No such file or directory",
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {args: subprocess.Popen(_aot_cmd(*args[1:], config=args[0] and (
        str(ROOT / args[0]) if args[0] == CONFIG else args[0])), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for args in cases}
    for args, want in cases.items():
        _, err = procs[args].communicate(timeout=300)
        assert procs[args].returncode == 2 and "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if "error" in line]  # after its progress lines, if any
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert errors[0].startswith("k2jax-aot: error: ") and want in errors[0], errors


def test_cli_estimates_a_program_compiled_elsewhere(tmp_path):
    """--hlo: the step-time estimate of a compiled program's text (e.g. MaxText's train_compile), on the slice
    it was compiled for, with the program's devices placed as --hlo_devices says."""
    hlo = tmp_path / "step.hlo"
    hlo.write_text(textwrap.dedent("""\
        HloModule m, is_scheduled=true

        ENTRY %main (x: f32[64,64]) -> f32[256,64] {
          %x = f32[64,64]{1,0} parameter(0)
          %d = f32[64,64]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
          ROOT %g = f32[256,64]{1,0} all-gather(%d), replica_groups={{0,1,2,3}}, dimensions={0}
        }
        """))
    chips = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]
    (tmp_path / "devices.json").write_text(json.dumps(chips))
    r = _aot("--topology=v5p-8", f"--hlo={hlo}", f"--hlo_devices={tmp_path / 'devices.json'}",
             "--hlo_useful_flops=1e6", f"--report={tmp_path / 'r.json'}", config=None, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    topo = aot.parse_topology("v5p-8")
    want = StepTime(HloCost(hlo.read_text()), topo.machine([tuple(c) for c in chips])).seconds
    assert report["step_seconds_estimate"] == pytest.approx(want)
    assert report["flops"]["compiled_per_chip"] == 2 * 64 ** 3
    assert report["mfu_estimate"] == pytest.approx(1e6 / (want * topo.spec.peak_bf16_flops))
    slower = dataclasses.replace(topo.machine([tuple(c) for c in chips]), compute_efficiency=0.58)
    assert topo.spec.calibrated_efficiency == 0.58  # v5p's, from MaxText's measured DeepSeek-V3 run
    assert report["step_seconds_calibrated"] == pytest.approx(StepTime(HloCost(hlo.read_text()), slower).seconds)
    assert f"step time estimate: {want * 1e3:.2f} ms" in r.stdout and "all-gather" in r.stdout
    # devices that are not the slice's chips, one each, and a program for another slice are one-line errors
    (tmp_path / "twice.json").write_text(json.dumps(chips[:3] + chips[:1]))
    (tmp_path / "big.hlo").write_text(hlo.read_text().replace("is_scheduled=true", "num_partitions=8"))
    for args, want in ((f"--hlo_devices={tmp_path / 'twice.json'}", "expected 4 distinct chips of v5p-8"),
                       (f"--hlo={tmp_path / 'big.hlo'}", "the program runs on 8 devices, v5p-8 has 4 chips")):
        r = _aot("--topology=v5p-8", f"--hlo={hlo}", args, config=None, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("k2jax-aot: error: ")
        assert want in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_stops_a_compile_at_once():
    """Ctrl-C waited for the compile to end (55 s of a full K2 compile): the compile runs in a worker thread and
    the command stops within a second, one line, exit 130."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no entry of the train test's
    proc = subprocess.Popen(_aot_cmd(), cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},  # (libtpu can't load it)
                            preexec_fn=sigint_as_from_a_shell,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the reduced K2's train step compiles for ~50 s on 2 cores
        lines.append(line)
        if line.startswith("compiling for TPU"):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    _, err = proc.communicate(timeout=300)
    stopped = time.perf_counter() - sent
    assert proc.returncode == 130, "".join(lines) + err
    assert err.strip() == "k2jax-aot: error: interrupted (Ctrl-C): nothing was compiled or written", err
    assert stopped < 3, stopped


def test_counts_are_printed_in_the_unit_their_size_calls_for():
    assert [aot.count(n) for n in (1_026_408_232_448, 32_860_000_000, 16_400_000, 12_000, 7)] == [
        "1.03T", "32.9B", "16.4M", "12K", "7"]


def test_unknown_infer_weights_is_an_error_before_compiling():
    config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
    config.infer.weights = "int3"
    with pytest.raises(aot.AotError, match=r"infer.weights must be one of \('dequantized', 'fp8', 'int4'\), "
                                           r"got 'int3'"):
        aot.compile_report(config, step="decode", log=lambda s: None)


def test_a_step_that_overflows_when_compiled_reports_its_temporaries():
    """Arguments that fit (a 50 GiB latent cache per chip) and temporaries that do not (a one-pass prefill's grow with
    rows x prompt tokens): XLA's HBM check fails the compile, and the report splits the compiler's required total
    into the arguments and the temporaries."""
    config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
    config.infer.batch, config.infer.prompt_len, config.infer.max_len = 8192, 4096, 4096
    config.infer.prefill_chunk = 4096  # one pass
    r = aot.compile_report(config, step="prefill", log=lambda s: None)
    m = r["memory"]
    assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["error"] and "compile_seconds" in r
    assert m["parameters"] + m["cache"] < r["hbm_per_chip"] < m["total"]
    assert m["total"] == m["parameters"] + m["cache"] + m["temporaries"] and r["hbm_margin"] < 0
    assert m["temporaries"] > r["hbm_per_chip"] - m["parameters"] - m["cache"]  # the temporaries overflow
    assert "DOES NOT FIT" in aot.format_report(r) and "infer.batch" in r["advice"]


def _prefill_report(**infer) -> dict:
    config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
    for k, v in infer.items():
        setattr(config.infer, k, v)
    return aot.compile_report(config, step="prefill", log=lambda s: None)


def test_the_prefill_compiles_in_chunks_as_the_generator_runs_it():
    """A 2048-token prompt for 4 rows in chunks of 128 tokens per row (16 passes in one device-side loop): its
    temporaries are below the one-pass prefill's, every pass's expert exchange counted (16 chunks x 4 MoE
    layers x there and back). (This small model's temporaries are mostly fixed costs: 16.9 MB chunked against 32.1
    MB in one pass, libtpu 0.0.42.1.)"""
    config = dict(batch=4, prompt_len=2048, max_len=2048)
    chunked, one_pass = _prefill_report(**config, prefill_chunk=128), _prefill_report(**config, prefill_chunk=2048)
    assert chunked["fits"] and one_pass["fits"]
    assert (chunked["prefill_chunk"], one_pass["prefill_chunk"]) == (128, 2048)
    assert "prefill: 128 tokens per row per pass" in aot.format_report(chunked)
    assert chunked["memory"]["temporaries"] < one_pass["memory"]["temporaries"] / 1.5
    ragged = {c["op"]: c["count"] for c in chunked["collectives"]}["ragged-all-to-all"]
    assert ragged == 16 * 4 * 2
    assert chunked["flops"]["compiled_per_chip"] > 0.98 * chunked["flops"]["useful_per_chip"]


def test_a_kernel_out_of_vmem_is_not_reported_as_hbm(monkeypatch):
    """The absorbed-decode kernel launched with all of a 4096-token chunk's query rows (x 4 heads) in one block
    (16,384 rows x 512 float32 accumulators: far past a TensorCore's VMEM): k2jax-aot says a kernel launch is out of VMEM, not
    that the program needs more chips."""
    from pallas_kernels import mla_decode
    monkeypatch.setitem(mla_decode.LAUNCH, ("tpu", "bfloat16"), dict(block_s=1024, block_m=1 << 20))
    r = _prefill_report(batch=1, prompt_len=8192, max_len=8192, prefill_chunk=4096)
    assert r["fits"] is False and r["vmem_exceeded"] is True and "compile_seconds" in r
    assert "VMEM" in r["advice"] and "more chips do not help" in r["advice"] and "fsdp" not in r["advice"]
    text = aot.format_report(r)
    assert "exceeds its VMEM (not HBM)" in text and "does not fit" not in text
