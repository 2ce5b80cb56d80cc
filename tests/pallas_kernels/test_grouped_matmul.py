"""grouped_matmul / grouped_ffn dispatch: impls checked, "auto" by the platform compiled for, shapes checked, and the
interpreted Pallas kernel against the XLA reference (jax.lax.ragged_dot) through the dispatch, with gradients.
The kernels' own tests are in test_fp8_grouped_matmul.py and test_grouped_weight_grad.py; the CPU form's in
tests/k2jax/model/test_cpu_grouped_ffn.py."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_ffn, grouped_matmul, reference, reference_ffn
from tests.pallas_kernels.kernel_checks import rel_err

SIZES = [5, 0, 17, 1, 0, 14]  # 37 rows, odd sizes and empty groups


def _inputs(m=40, k=13, n=11, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32)


def test_auto_is_the_reference_on_cpu_and_impls_are_checked():
    x, w, sizes = _inputs()
    got = jax.jit(lambda a, b, s: grouped_matmul(a, b, s))(x, w, sizes)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reference(x, w, sizes)))
    for impl in ("cuda", "tiled"):  # the CPU form is k2jax.model.cpu_grouped_ffn, not an impl here
        with pytest.raises(ValueError, match="impl must be one of"):
            grouped_matmul(x, w, sizes, impl=impl)


def test_bad_arguments_fail_clearly():
    x, w, sizes = _inputs()
    with pytest.raises(ValueError, match="do not agree"):
        grouped_matmul(x, w[:, :5], sizes)
    with pytest.raises(ValueError, match="expected x"):
        grouped_matmul(x[None], w, sizes)
    with pytest.raises(ValueError, match="w_down"):
        grouped_ffn(x, w, w, w, sizes)


def test_interpreted_kernel_ffn_and_gradients_match_reference():
    x, w_gate, sizes = _inputs(seed=1)
    w_up = _inputs(seed=2)[1]
    w_down = jnp.swapaxes(_inputs(seed=3)[1], 1, 2)
    dy = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)

    def value_and_grads(f):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a, sizes) * dy), argnums=(0, 1, 2, 3)))(
            x, w_gate, w_up, w_down)

    got = value_and_grads(lambda *a: grouped_ffn(*a, impl="interpret"))
    want = value_and_grads(reference_ffn)
    assert rel_err(got[0], want[0]) <= 1e-5
    for name, g, r in zip(("dx", "dw_gate", "dw_up", "dw_down"), got[1], want[1]):
        assert rel_err(g, r) <= 1e-5, name


def _declared_flops(fn, *args) -> list[int]:
    """The FLOPs each pallas_call in fn's jaxpr declares (its pl.CostEstimate), in trace order."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn.params["cost_estimate"].flops
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("rows_in_use", [None, 128])
def test_cost_estimates_count_the_rows_in_use(rows_in_use):
    """An expert-parallel receive buffer is ep_capacity_factor x its balanced load; the kernels skip its empty
    tail, so with rows_in_use their estimates (what k2jax-aot sums) count those rows, forward and backward."""
    M, K, N, G = 512, 256, 384, 4
    x = jnp.ones((M, K), jnp.float32)
    w = jnp.ones((G, K, N), jnp.float32)
    sizes = jnp.array([40, 30, 50, 8], jnp.int32)
    rows = M if rows_in_use is None else rows_in_use

    def loss(x, w):
        return grouped_matmul(x, w, sizes, impl="interpret", rows_in_use=rows_in_use).sum()

    assert _declared_flops(lambda x, w: grouped_matmul(x, w, sizes, impl="interpret", rows_in_use=rows_in_use),
                           x, w) == [2 * rows * K * N]
    assert sorted(_declared_flops(jax.grad(loss, argnums=(0, 1)), x, w)) == [2 * rows * K * N] * 3  # fwd, dx, dw
