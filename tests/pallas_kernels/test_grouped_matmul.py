"""grouped_matmul / grouped_ffn dispatch: impls and shapes checked, every form against the XLA reference
(jax.lax.ragged_dot) through the dispatch in every weight format, with gradients. The kernels' own tests are in
test_fp8_grouped_matmul.py, test_int4_grouped_matmul.py and test_grouped_weight_grad.py; the CPU form's in
test_cpu_grouped_ffn.py."""

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.expert_weights import ExpertWeights
from pallas_kernels.grouped_matmul import IMPLS, grouped_ffn, grouped_matmul, reference, reference_ffn
from tests.pallas_kernels.kernel_checks import rel_err

SIZES = [5, 0, 17, 1, 0, 14]  # 37 rows, odd sizes and empty groups


def _inputs(m=40, k=13, n=11, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32)


RUNNABLE_HERE = [impl for impl in IMPLS if impl != "pallas"]  # compiled Pallas needs a TPU / GPU (test_compile.py)


@pytest.mark.parametrize("impl", RUNNABLE_HERE)
def test_every_form_is_the_reference(impl):
    x, w, sizes = _inputs()
    got = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, impl=impl))(x, w, sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference(x, w, sizes)), rtol=1e-5, atol=1e-5)


def test_bad_arguments_fail_clearly():
    x, w, sizes = _inputs()
    for impl in ("auto", "cuda"):  # the caller (k2jax.model.target) resolves "auto": nothing here guesses
        with pytest.raises(ValueError, match="impl must be one of"):
            grouped_matmul(x, w, sizes, impl=impl)
    with pytest.raises(ValueError, match="do not agree"):
        grouped_matmul(x, w[:, :5], sizes, impl="ragged_dot")
    with pytest.raises(ValueError, match="expected x"):
        grouped_matmul(x[None], w, sizes, impl="ragged_dot")
    with pytest.raises(ValueError, match="gate weights must be"):
        grouped_ffn(x, ExpertWeights("plain", w, w, w), sizes, impl="ragged_dot")
    with pytest.raises(ValueError, match="format must be one of"):
        grouped_ffn(x, ExpertWeights("int8", w, w, w), sizes, impl="ragged_dot")


def test_interpreted_kernel_ffn_and_gradients_match_reference():
    x, w_gate, sizes = _inputs(seed=1)
    w_up = _inputs(seed=2)[1]
    w_down = jnp.swapaxes(_inputs(seed=3)[1], 1, 2)
    dy = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)

    def value_and_grads(f):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a, sizes) * dy), argnums=(0, 1, 2, 3)))(
            x, w_gate, w_up, w_down)

    got = value_and_grads(lambda x, wg, wu, wd, s: grouped_ffn(x, ExpertWeights("plain", wg, wu, wd), s,
                                                                impl="interpret"))
    want = value_and_grads(reference_ffn)
    assert rel_err(got[0], want[0]) <= 1e-5
    for name, g, r in zip(("dx", "dw_gate", "dw_up", "dw_down"), got[1], want[1]):
        assert rel_err(g, r) <= 1e-5, name


def _quantised_experts(fmt, G=6, D=40, F=24, seed=5):
    """Random experts in `fmt` (FP8 by k2jax's block quantiser, INT4 as random nibbles and scales: the format only)."""
    rng = np.random.default_rng(seed)
    if fmt == "fp8":
        from k2jax.formats import quant
        pairs = [[quant.quantize(rng.standard_normal((i, o)).astype(np.float32) / np.sqrt(i)) for _ in range(G)]
                 for i, o in ((D, F), (D, F), (F, D))]
        ws = [jnp.asarray(np.stack([p[0] for p in ps])) for ps in pairs]
        scales = [jnp.asarray(np.stack([p[1] for p in ps])) for ps in pairs]
        return ExpertWeights("fp8", *ws, *scales)
    packed = [jnp.asarray(rng.integers(-2**31, 2**31, (G, -(-i // 8), o)), jnp.int32) for i, o in ((D, F), (D, F), (F, D))]
    scales = [jnp.asarray(rng.uniform(0.5, 1.5, (G, -(-i // 32), o)) / (4 * np.sqrt(i)), jnp.bfloat16)
              for i, o in ((D, F), (D, F), (F, D))]
    return ExpertWeights("int4", *packed, *scales, group_size=32)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("impl", RUNNABLE_HERE)
def test_every_form_of_the_ffn_in_every_format_is_the_dequantised_ffn(fmt, impl):
    """Each form over FP8 / INT4 experts against the plain reference over the same weights dequantised, with the
    gradient to the rows (the weights are frozen)."""
    experts = _quantised_experts(fmt)
    plain = experts.dequantized()
    x = jnp.asarray(np.random.default_rng(6).standard_normal((37, experts.hidden)), jnp.float32)
    sizes = jnp.asarray(SIZES, jnp.int32)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(f(x)))))(x)

    got = loss(lambda x: grouped_ffn(x, experts, sizes, impl=impl))
    want = loss(lambda x: reference_ffn(x, plain.gate, plain.up, plain.down, sizes))
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


# each kernel module's products in both launch forms (plain and FP8 weights share fp8_grouped_matmul's)
@pytest.mark.parametrize("fmt, form", [("plain", "tpu"), ("fp8", "gpu"), ("int4", "tpu"), ("int4", "gpu")])
def test_stacks_read_in_place_equal_the_layers_own_weights(fmt, form):
    """stack=(experts of 3 layers, layer): the kernels read layer 1 straight from the stacks (the layer index
    scalar-prefetched on TPU) and give what its own arrays give, with the gradient to the rows and, for plain
    weights, to the layer's own arrays."""
    layers = [_quantised_experts(fmt, seed=s) if fmt != "plain" else
              ExpertWeights("plain", *(_quantised_experts("fp8", seed=s).dequantized().projections()[i][0]
                                       for i in range(3))) for s in (7, 8, 9)]
    stacks = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((37, stacks.hidden)), jnp.float32)
    sizes = jnp.asarray(SIZES, jnp.int32)
    ffn = functools.partial(grouped_ffn, group_sizes_G=sizes, impl="interpret", platform=form)

    def run(stack):
        def loss(x, own):
            return jnp.sum(jnp.sin(ffn(x, own, stack=stack)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if fmt == "plain" else 0))(x, layers[1])

    got, want = run((jax.lax.stop_gradient(stacks), jnp.int32(1))), run(None)
    assert rel_err(got[0], want[0]) <= 1e-6
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel_err(g, w) <= 1e-6


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
