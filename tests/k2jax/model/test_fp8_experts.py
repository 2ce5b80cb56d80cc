"""k2jax.model.fp8_experts: the FP8-resident model against the same weights loaded dequantised (W = e4m3 x scale put
into the plain model), float32 compute: logits within 1e-5 of max|logit| with the same expert choices, and the same
greedy tokens, unsharded and on 8 devices with expert parallelism. The expert dims (hidden 200, expert FFN 72) are not
multiples of 128, so every scale grid has ragged edge blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.formats import quant
from k2jax.inference.generate import Generator
from k2jax.model.config import ConfigError, tiny
from k2jax.model.fp8_experts import FP8RoutedExperts, quantize_experts
from k2jax.model.placement import shard_model
from k2jax.model.target import Target
from pallas_kernels.grouped_matmul import reference_ffn
from sharding.mesh import make_mesh
from tests.fp8_checks import assert_fp8_experts, assert_same_logits
from tests.oracle import random_release_tensors

CFG = tiny(hidden_size=200, moe_intermediate_size=72)
E, D, F, L = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size, CFG.num_moe_layers
PROMPTS = [[1, 17, 33, 4, 250, 9, 61], [1, 5, 200]]


@pytest.fixture(scope="module")
def tensors():
    return random_release_tensors(CFG, seed=5)


@pytest.fixture(scope="module")
def dequantised(tensors):
    """The plain model with each routed expert weight replaced by dequantise(quantise(W)), quantised in the
    release's [out, in] orientation by k2jax.formats.quant (the scale grid of W and of its transpose are the same
    blocks)."""
    return k2jax.from_hf_tensors(CFG, {name: quant.dequantize(*quant.quantize(w, name=name))
                                       if ".mlp.experts." in name else w for name, w in tensors.items()})


def _fp8_model(tensors, **overrides):
    return quantize_experts(k2jax.from_hf_tensors(CFG.replace(**overrides), tensors))


@pytest.fixture(scope="module")
def fp8(tensors):
    return _fp8_model(tensors)


def _sharded(model, mesh):
    """shard_model from a host copy: placing device arrays compiles a reshard per array (seconds on CPU)."""
    graphdef, state = nnx.split(model)
    return shard_model(nnx.merge(graphdef, jax.device_get(state)), mesh, "ep_fsdp")


@nnx.jit
def _forward(model, tokens_BT):
    return model(tokens_BT, return_aux=True)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 24)))


@pytest.fixture(scope="module")
def want(dequantised, tokens):
    logits, aux = _forward(dequantised, tokens)
    return np.asarray(logits), np.asarray(aux["router_topk_ids"])


def test_experts_are_e4m3_with_ragged_block_scales(fp8):
    assert_fp8_experts(fp8)
    params = {k2jax.model.transformer.param_name(p) for p, _ in nnx.to_flat_state(nnx.state(fp8, nnx.Param))}
    assert not any(".experts." in p for p in params)  # frozen: no optimizer sees them
    with pytest.raises(ValueError, match="FP8 already"):
        quantize_experts(fp8)


def test_logits_equal_the_dequantised_model(fp8, tokens, want):
    """On CPU the FFN is the tiled loop, dequantising one expert at a time from the scanned layers' stacks."""
    assert_same_logits(_forward(fp8, tokens), want)


def test_expert_parallel_model_equals_unsharded(tensors, fp8, tokens, want):
    """The FFN runs inside expert parallelism's shard_map, each device's scales split with its experts. Placed by
    the rules (shard_model) or quantised in place on the mesh (quantize_experts keeps each weight's sharding and
    gives its scales the same split on the leading axes), the FP8 experts are the same arrays, laid out alike."""
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    sharded = _sharded(fp8, mesh)
    experts = sharded.moe_blocks.mlp.experts
    assert experts.gate_proj[...].sharding.spec[:3] == (None, "expert", "fsdp")
    assert tuple(experts.gate_proj_scale_inv[...].sharding.spec) == (None, "expert", None, None)
    on_mesh = quantize_experts(_sharded(k2jax.from_hf_tensors(CFG, tensors), mesh)).moe_blocks.mlp.experts
    for name in ("gate_proj", "down_proj_scale_inv"):
        a, b = getattr(on_mesh, name)[...], getattr(experts, name)[...]
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    with jax.set_mesh(mesh):
        got = _forward(sharded, tokens)
        hlo = _forward.lower(sharded, tokens).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo  # the rows travelled to their experts
    assert_same_logits(got, want)


@pytest.fixture(scope="module")
def want_tokens(dequantised):
    return Generator(dequantised).generate(PROMPTS, max_new_tokens=6)


def test_greedy_generation_gives_the_same_tokens(fp8, want_tokens):
    assert Generator(fp8).generate(PROMPTS, max_new_tokens=6) == want_tokens


def test_expert_parallel_greedy_generation_gives_the_same_tokens(fp8, want_tokens):
    mesh = make_mesh({"expert": 8})
    with jax.set_mesh(mesh):  # prefill and decode with the experts expert-parallel
        assert Generator(_sharded(fp8, mesh)).generate(PROMPTS, max_new_tokens=6) == want_tokens


# ---- the FFN's forms, on routed rows (no model) ---------------------------------------------------------------
def _experts_and_rows(G=6, M=150):
    """FP8 experts of k2jax.formats.quant-quantised random weights, routed rows with ragged and empty groups, and the
    same weights dequantised."""
    rng = np.random.default_rng(4)
    quantized, plain = {}, []
    for name, (K, N) in (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D))):
        pairs = [quant.quantize(rng.standard_normal((K, N)).astype(np.float32) / np.sqrt(K)) for _ in range(G)]
        w, s = (jnp.asarray(np.stack(a)) for a in zip(*pairs))
        quantized[name] = (w, s, ("expert", "embed", "moe_mlp"))
        plain.append(jnp.asarray(np.stack([quant.dequantize(*p) for p in pairs])))
    experts = FP8RoutedExperts(CFG, quantized=quantized)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    sizes = jnp.asarray([31, 0, 70, 1, 0, 40], jnp.int32)  # 8 rows past the groups
    return experts, plain, x, sizes


@pytest.mark.parametrize("moe_impl", ["tiled", "ragged_dot", "interpret"])
def test_ffn_forms_equal_the_dequantised_ffn(moe_impl):
    """The CPU tiled loop, fp8_grouped_matmul's XLA reference and its Pallas kernel (interpreted) against the
    plain FFN over the dequantised weights; the tiled form also under jax.grad (to the rows only)."""
    experts, plain, x, sizes = _experts_and_rows()
    ffn = experts.grouped_ffn(Target.of(CFG.replace(moe_impl=moe_impl)), None)
    got = jax.jit(lambda x: ffn(x, *experts.expert_arrays(), sizes))(x)
    want = reference_ffn(x, *plain, sizes)
    assert np.max(np.abs(np.asarray(got - want))) <= 1e-5 * np.max(np.abs(np.asarray(want)))
    if moe_impl == "tiled":
        dx = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(ffn(x, *experts.expert_arrays(), sizes)))))(x)
        want_dx = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(reference_ffn(x, *plain, sizes)))))(x)
        assert np.max(np.abs(np.asarray(dx - want_dx))) <= 1e-5 * np.max(np.abs(np.asarray(want_dx)))


def test_cpu_form_holds_no_whole_layer_dequantised_copy():
    """The compiled tiled FFN has no float32 array of a layer's expert stack; the XLA reference form (the control)
    does."""
    experts, _, x, sizes = _experts_and_rows()
    G = sizes.shape[0]
    stacks = (f"f32[{G},{D},{F}]", f"f32[{G},{F},{D}]")

    def hlo(moe_impl):
        ffn = experts.grouped_ffn(Target.of(CFG.replace(moe_impl=moe_impl)), None)
        return jax.jit(lambda x, *w: ffn(x, *w, sizes)).lower(x, *experts.expert_arrays()).compile().as_text()

    assert not [s for s in stacks if s in hlo("tiled")]
    assert all(s in hlo("ragged_dot") for s in stacks)


def test_fp8_activations_quantise_the_rows_in_every_kernel_form():
    """fp8_activations='on' (the GPU default): the XLA reference and the Pallas kernel (interpreted) give the same
    FFN, which is not the dequantised-weights FFN (the rows were rounded to e4m3) but within e4m3's rounding of it;
    the tiled CPU form refuses it in one line."""
    experts, plain, x, sizes = _experts_and_rows()
    want = np.asarray(reference_ffn(x, *plain, sizes))
    got = {}
    for moe_impl in ("ragged_dot", "interpret"):
        ffn = experts.grouped_ffn(Target.of(CFG.replace(moe_impl=moe_impl, fp8_activations="on")), None)
        got[moe_impl] = np.asarray(jax.jit(lambda x: ffn(x, *experts.expert_arrays(), sizes))(x))
    scale = np.max(np.abs(want))
    assert np.max(np.abs(got["interpret"] - got["ragged_dot"])) <= 1e-5 * np.max(np.abs(got["ragged_dot"]))
    assert 1e-4 * scale < np.max(np.abs(got["ragged_dot"] - want)) < 0.1 * scale
    with pytest.raises(ConfigError, match="fp8_activations='on' needs moe_impl"):
        experts.grouped_ffn(Target.of(CFG.replace(moe_impl="tiled", fp8_activations="on")), None)
