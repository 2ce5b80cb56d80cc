"""k2jax.model.layers: `project`, in both forms of pallas_kernels.matmul (plain and the CPU form with its hand-written
gradient), against plain autodiff of einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model.layers import project


@pytest.mark.parametrize("impl", ["cpu", "xla"])
@pytest.mark.parametrize("n_in,dtype,out_dtype", [(1, jnp.float32, None), (2, jnp.float32, None),
                                                  (1, jnp.bfloat16, jnp.float32), (2, jnp.bfloat16, None)])
def test_project_and_its_gradient_match_einsum(n_in, dtype, out_dtype, impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)), dtype)  # [B, T, *in]: in = (6,) or (4, 6)
    w = jnp.asarray(rng.standard_normal((6, 7, 2) if n_in == 1 else (4, 6, 7)), dtype)
    eq = "btnh,hvd->btnvd" if n_in == 1 else "btnh,nhd->btd"

    def ours(a, b):
        return project(a, b, n_in, impl=impl, preferred_element_type=out_dtype)

    def ref(a, b):
        return jnp.einsum(eq, a, b, preferred_element_type=out_dtype)

    got, want = ours(x, w), ref(x, w)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)

    def grads(f):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * dy), argnums=(0, 1)))(x, w)

    for g, r, arg in zip(grads(ours), grads(ref), (x, w)):
        assert g.dtype == arg.dtype and g.shape == arg.shape
        scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol * scale)
