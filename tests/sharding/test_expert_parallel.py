"""Expert parallelism (shard_map + ragged all-to-all) equals the unsharded model: logits, gradients, loads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import tiny
from k2jax.model.placement import init_sharded, shard_model
from sharding.expert_parallel import ragged_all_to_all
from sharding.mesh import make_mesh

CFG = tiny()


def test_ragged_all_to_all_on_cpu_keeps_the_contract():
    """The CPU exchange against a plain-Python reading of jax.lax.ragged_all_to_all's contract."""
    n, rows, out_rows, D = 4, 10, 24, 3
    rng = np.random.default_rng(0)
    send = rng.integers(0, 4, (n, n))  # send[i, j]: rows device i sends to device j
    send[1] = [0, 0, 9, 0]              # one device sends everything to one place
    in_off = np.cumsum(send, 1) - send
    out_off = np.cumsum(send, 0) - send   # receiver j stacks sources in order
    x = rng.standard_normal((n, rows, D)).astype(np.float32)
    want = np.full((n, out_rows, D), -1.0, np.float32)
    for i in range(n):
        for j in range(n):
            want[j, out_off[i, j]:out_off[i, j] + send[i, j]] = x[i, in_off[i, j]:in_off[i, j] + send[i, j]]
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    spec = jax.sharding.PartitionSpec("expert")
    f = jax.jit(jax.shard_map(
        lambda x, a, b, c, d: ragged_all_to_all(x[0], jnp.full((out_rows, D), -1.0), a[0], b[0], c[0], d[0],
                                                axis_name="expert", impl="all_to_all")[None],
        mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))
    got = f(x, in_off, send, out_off, send.T.copy())
    np.testing.assert_array_equal(np.asarray(got), want)


def _loss_and_grads(model, tokens):
    def loss_fn(m):
        logits, aux = m(tokens, return_aux=True)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), (logits, aux)

    (loss, (logits, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return logits, aux, nnx.to_flat_state(grads)


@pytest.fixture(scope="module")
def reference():
    model = k2jax.Transformer(CFG, rngs=nnx.Rngs(0))
    # uneven routing: a bias that herds tokens to a few experts and starves others
    bias = np.zeros(CFG.n_routed_experts, np.float32)
    bias[[1, 6]], bias[[0, 9, 13]] = 0.5, -0.5
    model.moe_blocks.mlp.gate.e_score_correction_bias[...] = jnp.broadcast_to(bias, (CFG.num_moe_layers, len(bias)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 24)))
    return model, tokens, jax.jit(_loss_and_grads)(model, tokens)


@pytest.mark.parametrize("axes", [{"expert": 2, "fsdp": 4}, {"expert": 4, "data": 2}, {"expert": 8}])
def test_expert_parallel_model_equals_unsharded(reference, axes):
    model, tokens, (want_logits, want_aux, want_grads) = reference
    load = np.asarray(want_aux["expert_load"])
    assert (load == 0).any() and load.max() > 3 * load.mean()  # uneven, with idle experts
    mesh = make_mesh(axes)
    sharded = shard_model(model, mesh, "ep_fsdp")
    with jax.set_mesh(mesh):
        step = jax.jit(_loss_and_grads)
        logits, aux, grads = step(sharded, tokens)
        hlo = step.lower(sharded, tokens).as_text(debug_info=True)
    assert "all_to_all" in hlo or "all-to-all" in hlo  # the exchange really ran
    assert "ep_exchange/" in hlo  # and reads as such in a profile (jax.named_scope)
    scale = np.max(np.abs(np.asarray(want_logits)))
    assert np.max(np.abs(np.asarray(logits) - np.asarray(want_logits))) <= 1e-5 * scale
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load)
    for (path, g), (_, w) in zip(grads, want_grads):
        g, w = np.asarray(g[...]), np.asarray(w[...])
        assert np.max(np.abs(g - w)) <= 1e-5 * max(np.max(np.abs(w)), 1e-30), path


def test_init_sharded_builds_the_same_model_in_shards():
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    sharded = init_sharded(CFG, mesh, "ep_fsdp", seed=3)
    # the same program unsharded (a compiled init can round differently from eager ops: the tests compile with
    # LLVM's optimisation off, tests/conftest.py)
    plain = nnx.merge(nnx.graphdef(sharded), jax.jit(lambda: nnx.state(k2jax.Transformer(CFG, rngs=nnx.Rngs(3))))())
    w = sharded.moe_blocks.mlp.experts.down_proj[...]
    assert w.sharding.spec[1] == "expert" and len(w.addressable_shards) == 8
    assert w.addressable_shards[0].data.size == w.size // 8
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def _row_ffn(x_RD, experts, sizes_L, *, rows_in_use):
    """A grouped SwiGLU FFN written per row (each row's expert found from the group sizes): the buffer's rows past
    the groups get expert L, clamped; their output is never read. experts: (gate, up, down) blocks of this device
    (any pytree of [L, ...] arrays travels). rows_in_use: a cost-estimate hint (unused)."""
    w_gate_LDF, w_up_LDF, w_down_LFD = experts
    assert 0 < rows_in_use <= x_RD.shape[0]
    expert_R = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_L), jnp.arange(x_RD.shape[0]), side="right"),
                           len(sizes_L) - 1)
    g = jnp.einsum("rd,rdf->rf", x_RD, w_gate_LDF[expert_R])
    u = jnp.einsum("rd,rdf->rf", x_RD, w_up_LDF[expert_R])
    return jnp.einsum("rf,rfd->rd", jax.nn.silu(g) * u, w_down_LFD[expert_R])


def _expected_with_buffer(x, w, ids, wg, wu, wd, n, R):
    """numpy reading of the bounded receive buffer: device s holds tokens [s T/n, (s+1) T/n); destination j
    keeps its incoming rows in (source, local expert, source's row order) order up to R rows."""
    T, K = ids.shape
    E = wg.shape[0]
    L = E // n
    kept = np.zeros((T, K), bool)
    for j in range(n):
        filled = 0
        for s in range(n):
            rows = [(t, k) for t in range(s * T // n, (s + 1) * T // n) for k in range(K) if ids[t, k] // L == j]
            rows.sort(key=lambda tk: (ids[tk], tk[0] * K + tk[1]))  # the source's sort by expert (stable)
            for t, k in rows:
                kept[t, k] = filled < R
                filled += 1
    out = np.zeros(x.shape, np.float64)
    for t in range(T):
        for k in range(K):
            if kept[t, k]:
                e = ids[t, k]
                h = (x[t] @ wg[e]) / (1 + np.exp(-(x[t] @ wg[e]))) * (x[t] @ wu[e])
                out[t] += w[t, k] * (h @ wd[e])
    return out, int((~kept).sum())


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, 8.0])
def test_bounded_receive_buffer_drops_and_counts_the_overflow(capacity_factor):
    """Herded routing (most rows to device 0's experts): with a buffer of c x the balanced load, the rows past it
    are dropped exactly as documented (the rest of the result unchanged) and counted; c = 0 or >= n drops none."""
    from sharding.expert_parallel import expert_parallel_ffn, receive_buffer_rows
    n, T, K, E, D, F = 4, 32, 2, 8, 8, 16
    rng = np.random.default_rng(0)
    ids = np.where(rng.random((T, K)) < 0.7, rng.integers(0, 2, (T, K)), rng.integers(0, E, (T, K)))
    ids[:, 1] = np.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1])  # distinct choices per token
    x = rng.standard_normal((T, D)).astype(np.float32)
    w = rng.random((T, K)).astype(np.float32)
    wg, wu = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    M = T // n * K
    R = receive_buffer_rows(M, n, capacity_factor)
    want, want_dropped = _expected_with_buffer(x, w, ids, wg, wu, wd, n, R)
    mesh = make_mesh({"expert": n}, devices=jax.devices()[:n])
    with jax.set_mesh(mesh):
        got, dropped = jax.jit(lambda *a: expert_parallel_ffn(*a, ffn=_row_ffn, impl="all_to_all",
                                                              capacity_factor=capacity_factor))(
            x, w, ids.astype(np.int32), (wg, wu, wd))
    assert int(dropped) == want_dropped
    assert (want_dropped > 0) == (0 < capacity_factor < 2), (capacity_factor, want_dropped)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("axes,chunk_rows", [({"expert": 4}, None), ({"expert": 4, "fsdp": 2}, None),
                                             ({"expert": 4}, 3)])
def test_every_row_form_runs_each_devices_experts_where_the_rows_are(axes, chunk_rows):
    """every_row (every device holds every token: a decode step): no exchange, each device runs the rows of its own
    experts, in chunks (3 rows: the hot devices run several), and the outputs are summed over `expert`: the
    dropless result, herded routing with idle devices included, and nothing dropped."""
    from sharding.expert_parallel import expert_parallel_ffn
    n, T, K, E, D, F = 4, 6, 2, 8, 8, 16
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(4)[:K] for _ in range(T)]).astype(np.int32)  # experts 4..7 (devices 2, 3) idle
    x = rng.standard_normal((T, D)).astype(np.float32)
    w = rng.random((T, K)).astype(np.float32)
    wg, wu = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    want, _ = _expected_with_buffer(x, w, ids, wg, wu, wd, n, T * K)
    mesh = make_mesh(axes, devices=jax.devices()[:n * axes.get("fsdp", 1)])
    with jax.set_mesh(mesh):
        f = jax.jit(lambda *a: expert_parallel_ffn(*a, ffn=_row_ffn, impl="all_to_all", every_row=True,
                                                   chunk_rows=chunk_rows))
        got, dropped = f(x, w, ids, (wg, wu, wd))
        text = f.lower(x, w, ids, (wg, wu, wd)).as_text()
    assert int(dropped) == 0 and "all_to_all" not in text and "all-to-all" not in text
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_receive_buffer_rows():
    from sharding.expert_parallel import receive_buffer_rows
    assert receive_buffer_rows(100, 8, 0.0) == 800       # dropless: every row of every device
    assert receive_buffer_rows(100, 8, 1.25) == 125
    assert receive_buffer_rows(100, 8, 20.0) == 800      # never more than dropless needs
    with pytest.raises(ValueError, match="capacity_factor"):
        receive_buffer_rows(100, 8, -1.0)
