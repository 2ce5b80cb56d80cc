"""k2jax.model.experts: the FP8- and INT4-resident models against the same weights loaded dequantised (W = e4m3 x
scale, or (nibble - 8) x scale, put into the plain model), float32 compute: logits within 1e-5 of max|logit| with
the same expert choices, and the same greedy tokens, unsharded and on 8 devices with expert parallelism. The expert
dims (hidden 200, expert FFN 72) are not multiples of 128 (FP8 blocks), 32 (INT4 groups) or 8 (INT4 packing), so
every scale grid has ragged edges. The FFN's forms on routed rows, in every format: tests/pallas_kernels/
test_grouped_matmul.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.formats import quant
from k2jax.inference.generate import Generator
from k2jax.model.config import tiny
from k2jax.model.experts import quantize_experts
from k2jax.model.placement import shard_model
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
    with pytest.raises(ValueError, match="fp8 already"):
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


# ---- INT4-resident experts: the same model with its experts' 4-bit values dequantised into plain weights ---------
@pytest.fixture(scope="module")
def int4_and_plain():
    """A random INT4-resident model and the plain model with the same weights: the same seed builds the same
    non-expert weights (the expert init draws one key per projection in every format), and its plain experts are
    set to the INT4 experts dequantised (pallas_kernels.int4_grouped_matmul.dequantize, tested against
    compressed-tensors' packing in tests/pallas_kernels/test_int4_grouped_matmul.py)."""
    int4 = k2jax.Transformer(CFG, rngs=nnx.Rngs(3), expert_format="int4")
    plain = k2jax.Transformer(CFG, rngs=nnx.Rngs(3))
    dense = int4.moe_blocks.mlp.experts.weights().dequantized()
    for name, w in zip(("gate_proj", "up_proj", "down_proj"), (dense.gate, dense.up, dense.down)):
        getattr(plain.moe_blocks.mlp.experts, name)[...] = w
    return int4, plain


def test_int4_experts_are_packed_nibbles_with_group_scales(int4_and_plain):
    int4, _ = int4_and_plain
    experts = int4.moe_blocks.mlp.experts
    assert experts.fmt == "int4"
    for name, (I, O) in (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D))):
        w, s = getattr(experts, name), getattr(experts, name + "_scale")
        assert (w.shape, w.dtype) == ((L, E, -(-I // 8), O), jnp.int32)
        assert (s.shape, s.dtype) == ((L, E, -(-I // 32), O), jnp.bfloat16)
        assert s.get_metadata("logical_axes") == w.get_metadata("logical_axes")
    params = {k2jax.model.transformer.param_name(p) for p, _ in nnx.to_flat_state(nnx.state(int4, nnx.Param))}
    assert not any(".experts." in p for p in params)


@pytest.mark.parametrize("moe_impl", ["tiled", "ragged_dot", "interpret"])
def test_int4_logits_equal_the_dequantised_model(int4_and_plain, tokens, moe_impl):
    """Every form of the FFN in the model: the CPU tiled loop (the default here), the XLA reference and the Pallas
    kernel (interpreted); the same seed gives the same weights whatever the form."""
    int4, plain = int4_and_plain
    if moe_impl != "tiled":
        int4 = k2jax.Transformer(CFG.replace(moe_impl=moe_impl), rngs=nnx.Rngs(3), expert_format="int4")
    want_logits, want_aux = _forward(plain, tokens)
    assert_same_logits(_forward(int4, tokens), (np.asarray(want_logits), np.asarray(want_aux["router_topk_ids"])))


def test_int4_expert_parallel_greedy_generation(int4_and_plain):
    int4, plain = int4_and_plain
    want = Generator(plain).generate(PROMPTS, max_new_tokens=6)
    mesh = make_mesh({"expert": 8})
    with jax.set_mesh(mesh):  # prefill and decode with the packed experts and their scales split over `expert`
        assert Generator(_sharded(int4, mesh)).generate(PROMPTS, max_new_tokens=6) == want
