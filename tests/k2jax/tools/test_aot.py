"""k2jax-aot: topology names, the collectives table of a compiled program, and the CLI end to end on a reduced K2
for a deviceless v5p-8 (4 chips): train and decode reports, and a planted oversize config that exits 1."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from k2jax.tools import aot

ROOT = Path(__file__).resolve().parents[3]
CONFIG = "tests/k2jax/configs/reduced_k2_v5p_8.py"


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


def test_default_topology_is_the_smallest_slice_for_the_mesh():
    assert aot.default_topology({"expert": 64, "fsdp": 4}).name == "v5p-512"
    with pytest.raises(aot.AotError, match="-1"):
        aot.default_topology({"fsdp": -1})


def _aot(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "k2jax.tools.aot", f"--config={CONFIG}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _expert_bytes_per_chip(config, weights: str) -> tuple[int, int]:
    """(bytes per chip of the config's routed expert weights in param_dtype, of them resident in `weights`: FP8,
    e4m3 + f32 scales per 128x128 block (the scales split over 'expert' only); INT4, 4 bits per value + a bf16 scale
    per 32 inputs (split like the weights)), from the shapes and the mesh: experts split over 'expert', the
    weights' D over 'fsdp'."""
    from k2jax.training.loop import model_config
    cfg, axes = model_config(config), dict(config.mesh.axes)
    L, E, D, F = cfg.num_moe_layers, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    values = 3 * L * E * D * F // (axes["expert"] * axes["fsdp"])
    if weights == "int4":
        resident = values // 2 + 2 * (values // 32)
    else:
        resident = values + 4 * 3 * L * (E // axes["expert"]) * -(-D // 128) * -(-F // 128)
    return values * np.dtype(cfg.param_dtype).itemsize, resident


def _dequantized_parameters_per_chip(config) -> int:
    """Bytes per chip of the config's model with every weight in param_dtype, on the v5p-8 mesh (no compile)."""
    from flax import nnx

    from k2jax.model.placement import abstract_model
    from k2jax.training.loop import model_config
    from sharding.mesh import make_mesh
    mesh = make_mesh(dict(config.mesh.axes), aot.parse_topology("v5p-8").devices())
    return aot._per_chip_bytes(nnx.state(abstract_model(model_config(config), mesh, config.mesh.strategy)))


# decode runs FP8- and INT4-resident (infer.weights); the dequantised decode step is compiled in test_generate_compile
@pytest.mark.parametrize("step,weights", [("train", None), ("decode", "fp8"), ("decode", "int4")])
def test_cli_compiles_reduced_k2_for_v5p_8(tmp_path, step, weights):
    report_path = tmp_path / "report.json"
    run = _aot(f"--step={step}", f"--report={report_path}", *([f"--config.infer.weights={weights}"] if weights else []))
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
    assert "ragged-all-to-all" in ops and ops["ragged-all-to-all"]["count"] >= 2  # EP there and back
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


def test_cli_bad_topology_is_one_line():
    run = _aot("--topology=v5p-24")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("k2jax-aot: ")


def test_cli_mesh_that_cannot_split_the_model_is_one_line():
    run = _aot("--topology=v5p:1x1x3", '--config.mesh.axes={"fsdp": 3}')
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith("k2jax-aot: the mesh {'fsdp': 3} cannot split the model: "), last


def test_unknown_infer_weights_is_an_error_before_compiling():
    config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
    config.infer.weights = "int3"
    with pytest.raises(aot.AotError, match=r"infer.weights must be one of \('dequantized', 'fp8', 'int4'\), "
                                           r"got 'int3'"):
        aot.compile_report(config, step="decode", log=lambda s: None)


def test_a_step_that_overflows_when_compiled_reports_its_temporaries():
    """Arguments that fit (a 56 GiB latent cache per chip) and temporaries that do not: XLA's HBM check fails the
    compile, and the report splits the compiler's required total into the arguments and the temporaries."""
    config = runpy.run_path(str(ROOT / CONFIG))["get_config"]()
    config.infer.batch = 40960
    r = aot.compile_report(config, step="decode", log=lambda s: None)
    m = r["memory"]
    assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["error"] and "compile_seconds" in r
    assert m["parameters"] + m["cache"] < r["hbm_per_chip"] < m["total"]
    assert m["total"] == m["parameters"] + m["cache"] + m["temporaries"] and r["hbm_margin"] < 0
    # a decode step's temporaries hold about one more copy of the cache (the fitting half-size step: 1.12 x)
    assert 0.8 * m["cache"] < m["temporaries"] < 1.5 * m["cache"]
    assert "DOES NOT FIT" in aot.format_report(r) and "infer.batch" in r["advice"]
