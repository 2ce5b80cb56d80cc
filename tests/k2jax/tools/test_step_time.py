"""step_time: a step's predicted time from its compiled program, checked exactly on hand-written HLO (ops, loops,
synchronous and asynchronous collectives, DMA) and on programs compiled for a deviceless v5p slice with and without
XLA:TPU's async collective fusion."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from k2jax.tools import aot, startup
from k2jax.tools.hlo_cost import HloCost, replica_groups
from k2jax.tools.step_time import Machine, StepTime, collective_seconds

ROOT = Path(__file__).resolve().parents[3]
W = 1e9  # bytes/s per link and direction
HBM = 1e10
HOST = 1e8  # bytes/s of the host link
RING4 = Machine(peak_flops=1e12, hbm_bandwidth=HBM, link_bandwidth=W, shape=(4,), wraps=(True,),
                coords=((0,), (1,), (2,), (3,)), host_bandwidth=HOST)
LINE4 = Machine(1e12, HBM, W, (4,), (False,), ((0,), (1,), (2,), (3,)), HOST)

# a [64,64] x [64,64] f32 dot: 2 * 64^3 FLOPs (0.52 us at 1e12), 3 x 16 KiB of HBM (4.9 us at 1e10): memory-bound
DOT = "%d = f32[64,64]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}"
DOT_SECONDS = 3 * 64 * 64 * 4 / HBM
GATHER_BYTES = 4 * 64 * 64 * 4  # the gathered f32[256,64]
GATHER_SECONDS = GATHER_BYTES * 3 / 4 / (2 * W)  # 24.6 us on the ring: 5 dots
GATHER_HBM_SECONDS = (64 * 64 * 4 + GATHER_BYTES) / HBM  # its own HBM traffic: reads x, writes the result


def _module(entry: str, extra: str = "") -> str:
    """A scheduled module: `extra` computations, then an entry taking x: f32[64,64] and running `entry`'s ops."""
    ops = "\n".join("  " + line.strip() for line in entry.strip().splitlines())
    return (f"HloModule m, is_scheduled=true\n\n{textwrap.dedent(extra)}\n"
            f"ENTRY %main (x: f32[64,64]) -> f32[64,64] {{\n  %x = f32[64,64]{{1,0}} parameter(0)\n{ops}\n}}\n")


def test_compute_efficiency_scales_compute_bound_ops_only():
    """A [64,64] x [64,64] dot made compute-bound (a slow chip): its time is FLOPs over peak x efficiency; a
    memory-bound op keeps its HBM time."""
    hlo = _module(f"""
        {DOT}
        ROOT %n = f32[64,64]{{1,0}} negate(%d)
        """)
    slow = Machine(1e9, HBM, W, (4,), (True,), RING4.coords, HOST)
    flops, negate = 2 * 64 ** 3, 2 * 64 * 64 * 4 / HBM
    assert StepTime(HloCost(hlo), slow).seconds == pytest.approx(flops / 1e9 + negate)
    half = Machine(1e9, HBM, W, (4,), (True,), RING4.coords, HOST, compute_efficiency=0.5)
    assert StepTime(HloCost(hlo), half).seconds == pytest.approx(flops / 0.5e9 + negate)


def test_collective_bandwidth_terms_on_rings_and_lines():
    ring, line = list(RING4.coords), list(LINE4.coords)
    b = 1e6
    assert collective_seconds("all-gather", b, ring, RING4) == pytest.approx(b * 3 / 4 / (2 * W))
    assert collective_seconds("all-gather", b, line, LINE4) == pytest.approx(b * 3 / 4 / (2 * W))
    assert collective_seconds("all-gather", b, ring[:2], RING4) == pytest.approx(b / 2 / W)  # 2 of 4: a line
    assert collective_seconds("all-reduce", b, ring, RING4) == pytest.approx(2 * b * 3 / 4 / (2 * W))
    assert collective_seconds("all-to-all", b, ring, RING4) == pytest.approx(b * 4 / (8 * W))
    assert collective_seconds("all-to-all", b, line, LINE4) == pytest.approx(b * 4 / (4 * W))
    assert collective_seconds("collective-permute", b, [ring[0], ring[3]], RING4) == pytest.approx(b / W)  # wraps
    assert collective_seconds("collective-permute", b, [line[0], line[3]], LINE4) == pytest.approx(3 * b / W)
    cube = Machine(1e12, 1e9, W, (4, 4), (True, True), tuple((x, y) for y in range(4) for x in range(4)), HOST)
    assert collective_seconds("all-gather", b, list(cube.coords), cube) == pytest.approx(b * 15 / 16 / (4 * W))
    assert collective_seconds("all-reduce", b, [(0, 0)], cube) == 0.0


def test_replica_groups_in_each_printed_form():
    assert replica_groups("replica_groups={{0,2},{1,3}}, dimensions={0}", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups={}, to_apply=%add", 4) == [[0, 1, 2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups=[1,4]<=[4], x", 4) == [[0, 1, 2, 3]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=2] {'b'}, use_global_device_ids=true", 4) == [[0, 1],
                                                                                                       [2, 3]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=2] {'a'}, x", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'a'}, x", 4) == [[0, 1],
                                                                                                        [2, 3]]
    assert replica_groups("source_target_pairs={{0,1},{1,2}}", 4) == [[0, 1], [1, 2]]


def test_a_synchronous_collective_adds_all_its_time():
    hlo = _module(f"""
        {DOT}
        ROOT %g = f32[256,64]{{1,0}} all-gather(%d), replica_groups={{{{0,1,2,3}}}}, dimensions={{0}}
        """)
    est = StepTime(HloCost(hlo), RING4)
    assert GATHER_SECONDS > GATHER_HBM_SECONDS
    assert est.seconds == pytest.approx(DOT_SECONDS + GATHER_SECONDS)
    s = est.summary()
    assert s["exposed_seconds"] == pytest.approx({"all-gather": GATHER_SECONDS - GATHER_HBM_SECONDS})
    assert s["memory_bound_seconds"] == pytest.approx(DOT_SECONDS + GATHER_HBM_SECONDS)
    assert s["compute_seconds"] == 0


@pytest.mark.parametrize("dots", [2, 6])
def test_an_asynchronous_collective_is_exposed_only_past_the_ops_between_start_and_done(dots):
    between = "\n".join(DOT.replace("%d ", f"%d{k} ") for k in range(dots))
    hlo = _module(f"""
        %s = (f32[64,64]{{1,0}}, f32[256,64]{{1,0}}) all-gather-start(%x), replica_groups={{{{0,1,2,3}}}}, dimensions={{0}}
        {between}
        ROOT %g = f32[256,64]{{1,0}} all-gather-done(%s)
        """)
    cost = HloCost(hlo)
    start = cost.op_hbm_bytes(cost.computations[cost.entry][1]) / HBM  # the start's own traffic (x and the tuple)
    est = StepTime(cost, RING4)
    assert 2 * DOT_SECONDS < GATHER_SECONDS < 6 * DOT_SECONDS  # two dots hide part of it, six all
    assert est.seconds == pytest.approx(start + max(dots * DOT_SECONDS, GATHER_SECONDS))
    exposed = est.summary()["exposed_seconds"].get("all-gather", 0.0)
    assert exposed == pytest.approx(max(GATHER_SECONDS - dots * DOT_SECONDS, 0.0))
    assert est.summary()["collective_busy_seconds"] == pytest.approx({"all-gather": GATHER_SECONDS})


def test_async_collective_fusion_is_one_launch_from_its_start_to_its_done():
    """XLA:TPU's async collective fusion: a start fusion, steps fused into compute, a done fusion, each holding
    the collective; counted once, exposed past the ops between start and done."""
    fused = textwrap.dedent("""\
        %start_body (p: f32[64,64]) -> (f32[64,64], f32[256,64]) {
          %p = f32[64,64]{1,0} parameter(0)
          %ag = f32[256,64]{1,0} all-gather(%p), replica_groups={{0,1,2,3}}, dimensions={0}
          ROOT %t = (f32[64,64]{1,0}, f32[256,64]{1,0}) tuple(%p, %ag)
        }

        %async_collective_fusion.1 (q: (f32[64,64], f32[256,64])) -> (f32[64,64], f32[256,64]) {
          %q = (f32[64,64]{1,0}, f32[256,64]{1,0}) parameter(0)
          %q0 = f32[64,64]{1,0} get-tuple-element(%q), index=0
          %ag2 = f32[256,64]{1,0} all-gather(%q0), replica_groups={{0,1,2,3}}, dimensions={0}
          ROOT %t2 = (f32[64,64]{1,0}, f32[256,64]{1,0}) tuple(%q0, %ag2)
        }

        %done_body (r: (f32[64,64], f32[256,64])) -> f32[256,64] {
          %r = (f32[64,64]{1,0}, f32[256,64]{1,0}) parameter(0)
          %r0 = f32[64,64]{1,0} get-tuple-element(%r), index=0
          ROOT %ag3 = f32[256,64]{1,0} all-gather(%r0), replica_groups={{0,1,2,3}}, dimensions={0}
        }
        """)
    hlo = _module(f"""
        %async-collective-start.1 = (f32[64,64]{{1,0}}, f32[256,64]{{1,0}}) fusion(%x), kind=kCustom, calls=%start_body
        %fusion.1 = (f32[64,64]{{1,0}}, f32[256,64]{{1,0}}) fusion(%async-collective-start.1), kind=kCustom, calls=%async_collective_fusion.1
        {DOT}
        ROOT %async-collective-done.1 = f32[256,64]{{1,0}} fusion(%fusion.1), kind=kCustom, calls=%done_body
        """, extra=fused)
    cost = HloCost(hlo)
    assert cost.collectives() == [{"op": "all-gather", "count": 1, "bytes": GATHER_BYTES}]
    est = StepTime(cost, RING4)
    assert est.summary()["collective_busy_seconds"] == pytest.approx({"all-gather": GATHER_SECONDS})
    own = [cost.op_hbm_bytes(i) / HBM for i in cost.computations[cost.entry][1:]]  # start, step, dot, done
    assert own[2] == pytest.approx(DOT_SECONDS)
    assert own[1] + own[2] < GATHER_SECONDS  # the gather outlasts the step and the dot: the done waits
    assert est.seconds == pytest.approx(own[0] + GATHER_SECONDS + own[3])
    assert est.summary()["exposed_seconds"] == pytest.approx({"all-gather": GATHER_SECONDS - own[1] - own[2]})


def test_a_sparsecore_offloaded_collective_runs_from_its_call_start_to_its_call_done():
    """SparseCore collective offload (MaxText's v5p recipes): the collective is the body of an async call on the
    SparseCore thread; the TensorCore runs the ops between call-start and call-done and waits for the rest."""
    offloaded = textwrap.dedent("""\
        %called_computation.1 (p: f32[64,64]) -> f32[256,64] {
          %p = f32[64,64]{1,0} parameter(0)
          ROOT %ag = f32[256,64]{1,0} all-gather(%p), replica_groups={{0,1,2,3}}, dimensions={0}
        }, execution_thread="sparsecore"
        """)
    hlo = _module(f"""
        %ag.call-start = ((f32[64,64]{{1,0}}), f32[256,64]{{1,0}}) call-start(%x), async_execution_thread="sparsecore", to_apply=%called_computation.1
        {DOT}
        ROOT %ag.call-done = f32[256,64]{{1,0}} call-done(%ag.call-start)
        """, extra=offloaded)
    cost = HloCost(hlo)
    assert cost.collectives() == [{"op": "all-gather", "count": 1, "bytes": GATHER_BYTES}]
    est = StepTime(cost, RING4)
    assert est.seconds == pytest.approx(GATHER_SECONDS)  # the call moves no HBM bytes of the TensorCore's
    assert est.summary()["exposed_seconds"] == pytest.approx({"all-gather": GATHER_SECONDS - DOT_SECONDS})
    assert est.summary()["collective_busy_seconds"] == pytest.approx({"all-gather": GATHER_SECONDS})


def test_other_sparsecore_work_runs_beside_the_tensorcore_at_the_chips_rates():
    offloaded = textwrap.dedent(f"""\
        %called_computation.2 (x: f32[64,64]) -> f32[64,64] {{
          %x = f32[64,64]{{1,0}} parameter(0)
          {DOT}
          ROOT %e = f32[64,64]{{1,0}} dot(%d, %d), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
        }}, execution_thread="sparsecore"
        """)
    hlo = _module(f"""
        %s.call-start = ((f32[64,64]{{1,0}}), f32[64,64]{{1,0}}) call-start(%x), async_execution_thread="sparsecore", to_apply=%called_computation.2
        {DOT}
        ROOT %s.call-done = f32[64,64]{{1,0}} call-done(%s.call-start)
        """, extra=offloaded)
    est = StepTime(HloCost(hlo), RING4)
    assert est.seconds == pytest.approx(2 * DOT_SECONDS)  # two dots offloaded, one beside them: one exposed
    s = est.summary()
    assert s["exposed_seconds"] == pytest.approx({"sparsecore": DOT_SECONDS})
    assert s["offload_busy_seconds"] == pytest.approx({"sparsecore": 2 * DOT_SECONDS})
    assert s["memory_bound_seconds"] == pytest.approx(DOT_SECONDS)  # the TensorCore's own op only


@pytest.mark.parametrize("dots", [1, 80])
def test_host_offload_transfers_run_over_the_host_link(dots):
    """Host offloading (remat policy offload): a layer input stored to host memory (S(5)) by an async
    dynamic-update-slice and another read back by an async dynamic-slice, each at the host link's bandwidth (one
    direction each: at once), beside the ops between start and done; a second store queues behind the first."""
    host = "f32[4,64,64]{2,1,0:S(5)}"
    between = "\n".join(DOT.replace("%d ", f"%d{k} ") for k in range(dots))
    hlo = (f"HloModule m, is_scheduled=true\n\nENTRY %main (x: f32[64,64], h: {host}) -> f32[64,64] {{\n"
           f"  %x = f32[64,64]{{1,0}} parameter(0)\n  %h = {host} parameter(1)\n  %i = s32[] constant(1)\n"
           f"  %z = s32[] constant(0)\n  %u = f32[1,64,64]{{2,1,0}} bitcast(%x)\n"
           f"  %st = (({host}, f32[1,64,64]{{2,1,0}}, s32[], s32[], s32[]), {host}, u32[]{{:S(2)}}) "
           f"dynamic-update-slice-start(%h, %u, %i, %z, %z)\n"
           f"  %st2 = (({host}, f32[1,64,64]{{2,1,0}}, s32[], s32[], s32[]), {host}, u32[]{{:S(2)}}) "
           f"dynamic-update-slice-start(%h, %u, %z, %z, %z)\n"
           f"  %ld = (({host}, s32[], s32[], s32[]), f32[1,64,64]{{2,1,0}}, u32[]{{:S(2)}}) "
           f"dynamic-slice-start(%h, %z, %z, %z), dynamic_slice_sizes={{1,64,64}}\n"
           + "\n".join("  " + line for line in between.splitlines()) +
           f"\n  %std = {host} dynamic-update-slice-done(%st)\n  %std2 = {host} dynamic-update-slice-done(%st2)\n"
           f"  %ldd = f32[1,64,64]{{2,1,0}} dynamic-slice-done(%ld)\n"
           f"  ROOT %r = f32[64,64]{{1,0}} bitcast(%ldd)\n}}\n")
    cost = HloCost(hlo)
    transfers = [cost.transfer(i) for i in cost.computations[cost.entry] if i.op.endswith("slice-start")]
    assert transfers == [(64 * 64 * 4, "to host")] * 2 + [(64 * 64 * 4, "from host")]
    one = 64 * 64 * 4 / HOST  # 164 us at 1e8 bytes/s: 33 dots; 80 dots hide the two stores
    est = StepTime(cost, RING4)
    assert est.seconds == pytest.approx(max(dots * DOT_SECONDS, 2 * one))  # the load beside the stores
    s = est.summary()
    assert s["offload_busy_seconds"] == pytest.approx({"host transfer": 3 * one})
    assert s["exposed_seconds"].get("host transfer", 0.0) == pytest.approx(max(2 * one - dots * DOT_SECONDS, 0.0))


def test_loops_multiply_and_a_conditional_costs_its_slowest_branch():
    extra = textwrap.dedent(f"""\
        %body (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {{
          %p = (s32[], f32[64,64]{{1,0}}) parameter(0)
          %x = f32[64,64]{{1,0}} get-tuple-element(%p), index=1
          {DOT}
          %g = f32[256,64]{{1,0}} all-gather(%d), replica_groups={{{{0,1,2,3}}}}, dimensions={{0}}
          %i = s32[] get-tuple-element(%p), index=0
          ROOT %t = (s32[], f32[64,64]{{1,0}}) tuple(%i, %d)
        }}

        %cond (q: (s32[], f32[64,64])) -> pred[] {{
          %q = (s32[], f32[64,64]{{1,0}}) parameter(0)
          %n = s32[] constant(7)
          %i = s32[] get-tuple-element(%q), index=0
          ROOT %lt = pred[] compare(%i, %n), direction=LT
        }}

        %cheap (a: f32[64,64]) -> f32[64,64] {{
          ROOT %a = f32[64,64]{{1,0}} parameter(0)
        }}

        %dear (x: f32[64,64]) -> f32[64,64] {{
          %x = f32[64,64]{{1,0}} parameter(0)
          {DOT}
          ROOT %e = f32[64,64]{{1,0}} dot(%d, %d), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
        }}
        """)
    hlo = _module("""
        %w = (s32[], f32[64,64]{1,0}) while(%init), condition=%cond, body=%body
        %k = s32[] constant(1)
        ROOT %c = f32[64,64]{1,0} conditional(%k, %x, %x), branch_computations={%cheap, %dear}
        """, extra=extra)
    est = StepTime(HloCost(hlo), RING4)
    cond_op = next(i for i in HloCost(hlo).computations["cond"] if i.op == "compare")
    compare = HloCost(hlo).op_hbm_bytes(cond_op) / HBM  # two scalars compared: 9 bytes, counted
    assert est.seconds == pytest.approx(7 * (DOT_SECONDS + GATHER_SECONDS) + 8 * compare + 2 * DOT_SECONDS)
    assert est.summary()["collective_busy_seconds"] == pytest.approx({"all-gather": 7 * GATHER_SECONDS})


_OVERLAP_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from k2jax.tools import aot
from k2jax.tools.hlo_cost import HloCost
from k2jax.tools.step_time import StepTime
jax.config.update("jax_platforms", "cpu")
topo = aot.parse_topology("v5p-8")
mesh = jax.sharding.Mesh(topo.devices(), ("fsdp",))

def step(w1, w2, x):  # w2's gather needs nothing of x @ w1: free to run beside it
    return jnp.tanh(x @ w1) @ w2

w1 = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
w2 = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
compiled = jax.jit(step).lower(w1, w2, x).compile()
est = StepTime(HloCost(compiled.as_text()), topo.machine([tuple(d.coords) for d in mesh.devices.flat]))
print(json.dumps({"seconds": est.seconds, **est.summary()}))
"""


@pytest.mark.parametrize("overlap", [False, True])
def test_compiled_v5p_program_with_and_without_overlapped_gathers(overlap):
    """The same program compiled for a v5p-8 slice as libtpu does by default (a synchronous all-gather: the chip
    waits for it) and with async collective fusion (the gather runs beside the matmul that does not need it)."""
    env = dict(os.environ)
    if overlap:
        env["LIBTPU_INIT_ARGS"] = startup.OVERLAP_FLAGS
    r = subprocess.run([sys.executable, "-c", _OVERLAP_PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    busy, exposed = got["collective_busy_seconds"]["all-gather"], got["exposed_seconds"].get("all-gather", 0.0)
    v5p_8 = aot.parse_topology("v5p-8")
    chips = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert busy == pytest.approx(collective_seconds("all-gather", 4096 * 4096 * 2, chips, v5p_8.machine(chips)))
    if overlap:
        assert exposed < 0.5 * busy
    else:  # the chip waits for all of it: its own HBM traffic (reading its part, writing the whole) and the rest
        own_at_most = (4096 * 4096 * 2 * 5 / 4) / v5p_8.spec.hbm_bandwidth
        assert busy - own_at_most <= exposed <= busy and exposed > 0.5 * busy
    assert got["seconds"] == pytest.approx(got["compute_seconds"] + got["memory_bound_seconds"]
                                           + sum(got["exposed_seconds"].values()))
