"""hlo_cost: the costs of a compiled program counted from its HLO text with loop trip counts applied, checked on
hand-written HLO and against XLA's own cost analysis of the same program unrolled (deviceless v5p, libtpu)."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.tools import aot
from k2jax.tools.hlo_cost import HloCost

HLO = """HloModule m, entry_computation_layout={()->f32[8]{0}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = bf16[16,4]{1,0} all-gather(%x), dimensions={0}
  %ars = f32[8]{0} all-reduce-start(%x), to_apply=%add
  %ard = f32[8]{0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ard)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]{0}) parameter(0)
  %n = s32[]{:T(128)} constant(12)
  %i = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body2 (p2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %cp = f32[8]{0} collective-permute(%z), source_target_pairs={{0,1}}
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main () -> f32[8] {
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"60"}}
  %a2a = f32[2,8]{1,0} all-to-all(%y), dimensions={0}
  %w2 = (s32[], f32[8]{0}) while(%init2), condition=%cond, body=%body2
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_trips_and_async_pairs_once():
    got = {c["op"]: (c["count"], c["bytes"]) for c in HloCost(HLO).collectives()}
    assert got == {"all-gather": (60, 60 * 16 * 4 * 2), "all-reduce": (60, 60 * 8 * 4), "all-to-all": (1, 2 * 8 * 4),
                   "collective-permute": (12, 12 * 8 * 4)}  # a loop with no known_trip_count: its `i < 12`




FUSED = """HloModule m, entry_computation_layout={()->bf16[512,1024]{1,0}}

%slice_layer (p0: bf16[6,1024,1024], p1: s32[]) -> bf16[1024,1024] {
  %p0 = bf16[6,1024,1024]{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[]{:T(128)S(6)} parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,1024,1024]{2,1,0:T(8,128)(2,1)} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,1024,1024}
  ROOT %b = bf16[1024,1024]{1,0:T(8,128)(2,1)} bitcast(%ds)
}

%matmul (q0: bf16[512,1024], q1: bf16[6,1024,1024], q2: s32[]) -> bf16[512,1024] {
  %q0 = bf16[512,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %q1 = bf16[6,1024,1024]{2,1,0:T(8,128)(2,1)} parameter(1)
  %q2 = s32[]{:T(128)S(6)} parameter(2)
  %w = bf16[1024,1024]{1,0:T(8,128)(2,1)} fusion(%q1, %q2), kind=kLoop, calls=%slice_layer
  %heads = bf16[2,256,4,192]{3,1,2,0:T(8,128)(2,1)} convolution(%q0b, %wh), window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
  ROOT %c = bf16[512,1024]{1,0:T(8,128)(2,1)} convolution(%q0, %w), dim_labels=bf_io->bf
}

%store (r0: bf16[6,512,1024], r1: bf16[512,1024], r2: s32[]) -> bf16[6,512,1024] {
  %r0 = bf16[6,512,1024]{2,1,0} parameter(0)
  %r1 = bf16[512,1024]{1,0} parameter(1)
  %r2 = s32[] parameter(2)
  %z2 = s32[] constant(0)
  %u = bf16[1,512,1024]{2,1,0} bitcast(%r1)
  ROOT %dus = bf16[6,512,1024]{2,1,0} dynamic-update-slice(%r0, %u, %r2, %z2, %z2)
}

%body (p: (s32[], bf16[512,1024], bf16[6,1024,1024], bf16[6,512,1024])) -> (s32[], bf16[512,1024], bf16[6,1024,1024], bf16[6,512,1024]) {
  %p = (s32[], bf16[512,1024]{1,0}, bf16[6,1024,1024]{2,1,0}, bf16[6,512,1024]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[512,1024]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %ws = bf16[6,1024,1024]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p), index=2
  %q0b = bf16[2,256,1536,1]{2,1,3,0:T(8,128)(2,1)} parameter(1)
  %wh = bf16[4,192,1536,1]{2,1,0,3:T(8,128)(2,1)} parameter(2)
  %ys = bf16[6,512,1024]{2,1,0} get-tuple-element(%p), index=3
  %y = bf16[512,1024]{1,0:T(8,128)(2,1)} fusion(%x, %ws, %i), kind=kOutput, calls=%matmul
  %k = f32[512,1024]{1,0} custom-call(%y), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"cost_estimate":{"flops":"1000","transcendentals":"0","bytes_accessed":"77","remote_bytes_transferred":"0"}}, "kernel_name":"f", "pallas_call"}
  %ys2 = bf16[6,512,1024]{2,1,0} fusion(%ys, %y, %i), kind=kLoop, calls=%store
  ROOT %t = (s32[], bf16[512,1024]{1,0}, bf16[6,1024,1024]{2,1,0}, bf16[6,512,1024]{2,1,0}) tuple(%i, %y, %ws, %ys2)
}

%cond (q: (s32[], bf16[512,1024], bf16[6,1024,1024], bf16[6,512,1024])) -> pred[] {
  %q = (s32[], bf16[512,1024]{1,0}, bf16[6,1024,1024]{2,1,0}, bf16[6,512,1024]{2,1,0}) parameter(0)
  %n = s32[]{:T(128)} constant(6)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: bf16[512,1024], b: bf16[6,1024,1024], c: f32[64,32]) -> bf16[512,1024] {
  %loop = (s32[], bf16[512,1024]{1,0}, bf16[6,1024,1024]{2,1,0}, bf16[6,512,1024]{2,1,0}) while(%init), condition=%cond, body=%body
  %a2 = f32[64,32]{1,0} parameter(2)
  %d = f32[64,16]{1,0} dot(%a2, %a2t), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %r = bf16[512,1024]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_flops_and_bytes_of_a_loop_count_every_trip():
    cost = HloCost(FUSED)
    per_layer = (2 * 512 * 1024 * 1024  # the [512, 1024] x [1024, 1024] convolution
                 + 2 * (2 * 256) * (4 * 192) * 1536  # heads as a padded spatial dimension: one valid tap each
                 + 1000)  # the Pallas kernel's declared cost estimate
    assert cost.flops == 6 * per_layer + 2 * 64 * 16 * 32  # six trips of `i < 6`, and the dot outside the loop
    layer_bytes = (512 * 1024 * 2 + 1024 * 1024 * 2 + 512 * 1024 * 2  # x, one layer's slice of ws, y
                   + 77  # the kernel's declared bytes_accessed
                   + 512 * 1024 * 2 * 2  # the in-place store: y read, one [512, 1024] slice written
                   + 2 * 4)  # the two fusions read the loop index
    outside = 64 * 32 * 4 + 64 * 16 * 4 + (4 + 4 + 1)  # the dot's operand and result; the loop condition
    assert cost.hbm_bytes == 6 * layer_bytes + outside
    assert cost.pallas_kernels() == 1


def test_an_instruction_continued_over_several_lines_is_read_whole():
    """A Pallas kernel's frontend_attributes can hold newlines (MaxText's megablox kernels print their tiling
    so): the cost estimate in the backend_config on a later line, and a line that starts with `}}`, still belong to
    the custom-call; a computation still ends at its own `}` line, with or without an execution thread."""
    hlo = textwrap.dedent("""\
        HloModule m, is_scheduled=true

        %sc (p: f32[8]) -> f32[8] {
          ROOT %p = f32[8]{0} parameter(0)
        }, execution_thread="sparsecore"

        ENTRY %main (x: f32[64,64]) -> f32[64,64] {
          %x = f32[64,64]{1,0} parameter(0)
          %gmm = f32[64,64]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
        "xprof_metadata":"{\\"tiling\\": {\\"tile_m\\": 512}}"
        }}, metadata={op_name="jit(f)/pallas_call"}, backend_config={"custom_call_config":{"cost_estimate":{"flops":"1234","bytes_accessed":"99"}}}
          %splash.3 = f32[64,64]{1,0} custom-call(%gmm), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/pallas_call"}
          %k2 = f32[64,64]{1,0} custom-call(%splash.3), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
        "a = f32[] negate(3)"

        }}, backend_config={"custom_call_config":{"cost_estimate":{"flops":"10","bytes_accessed":"1"}}}
          ROOT %n = f32[64,64]{1,0} negate(%k2)
        }
        """)
    cost = HloCost(hlo)
    assert list(cost.computations) == ["sc", "main"] and cost.entry == "main"
    # a continuation that looks like an instruction and a blank line stay in their instruction
    assert [i.op for i in cost.computations["main"]] == ["parameter"] + ["custom-call"] * 3 + ["negate"]
    assert cost.flops == 1234 + 10
    # the kernels' declared bytes; the kernel without an estimate and negate read and write theirs
    assert cost.hbm_bytes == 99 + 1 + 2 * (2 * 64 * 64 * 4)
    assert cost.pallas_kernels() == 2  # the third has no op_name="...pallas_call"
    assert cost.uncosted_kernels() == {"splash": 1}


@pytest.fixture(scope="module")
def v5p_chip():
    jax.config.update("jax_platforms", "cpu")
    return jax.sharding.Mesh(np.array(aot.parse_topology("v5p-8").devices()[:1]), ("x",))


def _compile(f, mesh, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, P())) for s in shapes]
    return jax.jit(f).lower(*args).compile()


L = 6


def _layers(x, w, layer, scan: bool):
    if scan:
        return jax.lax.scan(lambda h, wi: (layer(h, wi), None), x, w)[0]
    for i in range(L):
        x = layer(x, w[i])
    return x


def _mlp(h, w_DD):
    return jnp.tanh(h @ w_DD)


def _attention(h_BTHD, k_BSHD):
    # scores and values per head (XLA:TPU writes them as batch-as-spatial convolutions); no softmax: XLA counts
    # ~1 FLOP per element of elementwise work, which hlo_cost leaves out, and this compares the matrix FLOPs
    s_BHTS = jnp.einsum("bthd,bshd->bhts", h_BTHD, k_BSHD)
    return jnp.einsum("bhts,bshd->bthd", s_BHTS, k_BSHD)


@pytest.mark.parametrize("layer,shapes,per_layer,grad", [  # gradients: the forward's convolutions and more
    (_mlp, ((512, 1024), (L, 1024, 1024)), 3 * 2 * 512 * 1024 * 1024, True),  # forward, dx, dw
    (_attention, ((2, 256, 4, 192), (L, 2, 256, 4, 192)), 6 * 2 * 2 * 4 * 256 * 256 * 192, True),
])
def test_a_compiled_scan_counts_every_layer(v5p_chip, layer, shapes, per_layer, grad):
    def program(scan):
        def f(x, w):
            return _layers(x, w, layer, scan)
        if grad:
            return jax.grad(lambda x, w: f(x, w).astype(jnp.float32).sum(), argnums=(0, 1))  # all of dx: as a scan
        return f

    scanned, unrolled = (_compile(program(scan), v5p_chip, *shapes) for scan in (True, False))
    assert HloCost(scanned.as_text()).flops == pytest.approx(L * per_layer, rel=1e-3)
    # the same counting on the unrolled program agrees with XLA's (which may drop work the unrolled program does
    # not need, as the first layer's unused gradient)
    assert HloCost(unrolled.as_text()).flops == pytest.approx(unrolled.cost_analysis()["flops"], rel=0.01)
    assert scanned.cost_analysis()["flops"] < 0.5 * L * per_layer  # XLA's own count: the loop body once


SCATTER = """HloModule s, entry_computation_layout={()->bf16[61,2,4096,576]{3,2,1,0}}

%write (a0: bf16[61,2,4096,576], a1: s32[2,4], a2: bf16[2,576]) -> bf16[61,2,4096,576] {
  %a0 = bf16[61,2,4096,576]{3,2,1,0} parameter(0)
  %a1 = s32[2,4]{1,0} parameter(1)
  %a2 = bf16[2,576]{1,0} parameter(2)
  ROOT %sc = bf16[61,2,4096,576]{3,2,1,0} scatter(%a0, %a1, %a2), update_window_dims={1}, to_apply=%pick
}

%pick (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  ROOT %y = bf16[] parameter(1)
}

ENTRY %main (cache: bf16[61,2,4096,576], at: s32[2,4], new: bf16[2,576]) -> bf16[61,2,4096,576] {
  %cache = bf16[61,2,4096,576]{3,2,1,0} parameter(0)
  %at = s32[2,4]{1,0} parameter(1)
  %new = bf16[2,576]{1,0} parameter(2)
  %once = bf16[61,2,4096,576]{3,2,1,0} scatter(%cache, %at, %new), update_window_dims={1}, to_apply=%pick
  ROOT %fused = bf16[61,2,4096,576]{3,2,1,0} fusion(%once, %at, %new), kind=kLoop, calls=%write
}
"""


def test_a_cache_update_in_place_moves_only_the_new_rows():
    """A decode step's latent-cache write (a scatter into [layers, batch, slots, 576]): the update, not the cache."""
    new, at = 2 * 576 * 2, 2 * 4 * 4
    assert HloCost(SCATTER).hbm_bytes == 2 * new + (at + new + new)  # top level: read + write; fused: + indices


# XLA:TPU's slice of one layer of a stacked FP8 expert weight in a decode step (full K2, v5p): the stack's
# T(32,128) tiling copied to T(8,128) in a nested fusion, one layer sliced, and copied back
LAYER_OF_A_RETILED_STACK = """
HloModule retile

%copy_fusion (input: f8e4m3fn[60,24,256,512]) -> f8e4m3fn[60,24,256,512] {
  %input = f8e4m3fn[60,24,256,512]{3,2,1,0:T(32,128)(4,1)} parameter(0)
  ROOT %copy.1 = f8e4m3fn[60,24,256,512]{3,2,1,0:T(8,128)(4,1)} copy(%input)
}

%slice_layer (p0: f8e4m3fn[60,24,256,512], p1: s32[]) -> f8e4m3fn[24,512,256] {
  %p0 = f8e4m3fn[60,24,256,512]{3,2,1,0:T(32,128)(4,1)} parameter(0)
  %retiled = f8e4m3fn[60,24,256,512]{3,2,1,0:T(8,128)(4,1)} fusion(%p0), kind=kLoop, calls=%copy_fusion
  %p1 = s32[]{:T(128)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %ds = f8e4m3fn[1,24,256,512]{3,2,1,0:T(8,128)(4,1)} dynamic-slice(%retiled, %p1, %zero, %zero, %zero), dynamic_slice_sizes={1,24,256,512}
  %b = f8e4m3fn[24,256,512]{2,1,0:T(8,128)(4,1)} bitcast(%ds)
  %t = f8e4m3fn[24,512,256]{2,1,0:T(8,128)(4,1)} transpose(%b), dimensions={0,2,1}
  ROOT %back = f8e4m3fn[24,512,256]{2,1,0:T(32,128)(4,1)} copy(%t)
}

ENTRY %main (w: f8e4m3fn[60,24,256,512], i: s32[]) -> f8e4m3fn[24,512,256] {
  %w = f8e4m3fn[60,24,256,512]{3,2,1,0:T(32,128)(4,1)} parameter(0)
  %i = s32[]{:T(128)} parameter(1)
  ROOT %layer = f8e4m3fn[24,512,256]{2,1,0:T(32,128)(4,1)} fusion(%w, %i), kind=kLoop, calls=%slice_layer
}
"""


def test_a_slice_through_a_retiling_copy_reads_only_the_slice():
    layer = 24 * 256 * 512  # e4m3: one byte each
    assert HloCost(LAYER_OF_A_RETILED_STACK).hbm_bytes == layer + 4 + layer  # the layer and the index; the result


# XLA:TPU's decomposed reduce-scatter of a decode step's projection (full K2, v5p): each trip of its loop takes one
# piece of the padded weight shard
PIECE_OF_A_PADDED_WEIGHT = """
HloModule padded

%piece (p0: bf16[448,1,1536], p1: s32[]) -> bf16[448,2,96] {
  %p0 = bf16[448,1,1536]{0,2,1:T(8,128)(2,1)} parameter(0)
  %zero = bf16[]{:T(256)} constant(0)
  %padded = bf16[448,3,1536]{0,2,1:T(8,128)(2,1)} pad(%p0, %zero), padding=0_0x1_1x0_0
  %p1 = s32[]{:T(128)} parameter(1)
  %c0 = s32[]{:T(128)} constant(0)
  ROOT %ds = bf16[448,2,96]{0,2,1:T(8,128)(2,1)} dynamic-slice(%padded, %c0, %c0, %p1), dynamic_slice_sizes={448,2,96}
}

ENTRY %main (w: bf16[448,1,1536], i: s32[]) -> bf16[448,2,96] {
  %w = bf16[448,1,1536]{0,2,1:T(8,128)(2,1)} parameter(0)
  %i = s32[]{:T(128)} parameter(1)
  ROOT %r = bf16[448,2,96]{0,2,1:T(8,128)(2,1)} fusion(%w, %i), kind=kLoop, calls=%piece
}
"""


def test_a_slice_of_a_padded_weight_reads_only_the_slice():
    piece = 448 * 2 * 96 * 2
    assert HloCost(PIECE_OF_A_PADDED_WEIGHT).hbm_bytes == piece + 4 + piece  # the piece (at most) and the index; result


# XLA:TPU's windowed einsum (a matmul overlapped with the all-gather of its weight): a u32 counter from 0 by 2
# below 16, two matmuls of a weight shard per trip (one per direction around the ring)
WINDOWED_EINSUM = """
HloModule windowed

%cond (p: (u32[], bf16[128,256], bf16[256,64])) -> pred[] {
  %p = (u32[], bf16[128,256]{1,0}, bf16[256,64]{1,0}) parameter(0)
  %bound = u32[]{:T(128)} constant(16)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%body (q: (u32[], bf16[128,256], bf16[256,64])) -> (u32[], bf16[128,256], bf16[256,64]) {
  %q = (u32[], bf16[128,256]{1,0}, bf16[256,64]{1,0}) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%q), index=0
  %x = bf16[128,256]{1,0} get-tuple-element(%q), index=1
  %w = bf16[256,64]{1,0} get-tuple-element(%q), index=2
  %y0 = bf16[128,64]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %y1 = bf16[128,64]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = u32[]{:T(128)} constant(2)
  %next = u32[]{:T(128)} add(%i, %two)
  ROOT %t = (u32[], bf16[128,256]{1,0}, bf16[256,64]{1,0}) tuple(%next, %x, %w)
}

ENTRY %main (x: bf16[128,256], w: bf16[256,64]) -> bf16[128,256] {
  %x = bf16[128,256]{1,0} parameter(0)
  %w = bf16[256,64]{1,0} parameter(1)
  %zero = u32[]{:T(128)} constant(0)
  %init = (u32[], bf16[128,256]{1,0}, bf16[256,64]{1,0}) tuple(%zero, %x, %w)
  %loop = (u32[], bf16[128,256]{1,0}, bf16[256,64]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[128,256]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_windowed_einsum_loop_counts_its_trips_by_its_step():
    assert HloCost(WINDOWED_EINSUM).flops == 8 * 2 * (2 * 128 * 64 * 256)  # 0, 2, ..., 14: 8 trips of 2 dots
