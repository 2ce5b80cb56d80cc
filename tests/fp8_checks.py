"""Checks shared by the FP8-resident expert tests (tests/k2jax/model/test_experts.py, tests/k2jax/checkpoint/
test_fp8_resident.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.model.experts import FP8Scale, FP8Weight, RoutedExperts


def assert_same_logits(got, want):
    """got: (logits, aux) of a forward; want: (logits, router_topk_ids) as NumPy. Logits within 1e-5 of max|logit|,
    the same expert choices (unordered within K)."""
    logits, aux = got
    want_logits, want_ids = want
    assert np.max(np.abs(np.asarray(logits) - want_logits)) <= 1e-5 * np.max(np.abs(want_logits))
    np.testing.assert_array_equal(np.sort(np.asarray(aux["router_topk_ids"]), -1), np.sort(want_ids, -1))


def assert_fp8_experts(model) -> RoutedExperts:
    """The model's routed experts are FP8-resident: e4m3 [L, E, in, out] weights with f32 block scales
    [L, E, ceil(in / 128), ceil(out / 128)] on the 'scale_blocks' axes. Returns them."""
    cfg = model.cfg
    E, D, F, L = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_moe_layers
    experts = model.moe_blocks.mlp.experts
    assert isinstance(experts, RoutedExperts) and experts.fmt == "fp8"
    for name, (K, N) in (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D))):
        w, s = getattr(experts, name), getattr(experts, name + "_scale_inv")
        assert isinstance(w, FP8Weight) and isinstance(s, FP8Scale)
        assert isinstance(w[...], jax.Array) and isinstance(s[...], jax.Array)
        assert (w.shape, w.dtype) == ((L, E, K, N), jnp.float8_e4m3fn)
        assert (s.shape, s.dtype) == ((L, E, -(-K // 128), -(-N // 128)), jnp.float32)
        assert s.get_metadata("logical_axes") == ("layers", "expert", "scale_blocks", "scale_blocks")
    return experts
