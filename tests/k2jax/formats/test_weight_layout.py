"""The one transpose between the release's [out, in] and k2jax's [*lead, in, ...out], and the table that says
which weight has which layout."""

import numpy as np
from flax import nnx

from k2jax import Transformer
from k2jax.checkpoint.hf_mapping import fp8_params, hf_tensor_specs, matmul_params
from k2jax.formats.weight_layout import Matmul, from_stored, to_stored
from k2jax.model.config import tiny
from k2jax.model.transformer import param_name


def test_each_stored_slot_is_the_release_tensor_and_the_transpose_inverts():
    m = Matmul(n_lead=2, in_dim=6, out_dim=4 * 5)  # [L, E, in, N, H]: the out axis split per head
    w = np.arange(3 * 2 * 6 * 4 * 5, dtype=np.float32).reshape(3, 2, 6, 4, 5)
    stored = to_stored(w, m)
    assert stored.shape == (3, 2, 20, 6)
    np.testing.assert_array_equal(stored[1, 0], w[1, 0].reshape(6, 20).T)  # slot (1, 0): the release's [out, in]
    np.testing.assert_array_equal(from_stored(stored, m, w.shape), w)


def test_the_table_covers_every_matmul_of_the_model():
    cfg = tiny()
    shapes = {param_name(p): v.shape for p, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))}
    table = matmul_params(cfg)
    assert table["moe_blocks.mlp.experts.down_proj"] == Matmul(2, cfg.moe_intermediate_size, cfg.hidden_size)
    for name, m in table.items():
        lead, rest = shapes[name][:m.n_lead], shapes[name][m.n_lead:]
        assert np.prod(rest) == m.in_dim * m.out_dim and len(lead) == m.n_lead, name
    for spec in hf_tensor_specs(cfg):  # each release tensor's layout is its parameter's entry
        assert spec.matmul == (table[param_name(spec.path)] if spec.linear else None), spec.name
        assert spec.matmul is None or (spec.matmul.out_dim, spec.matmul.in_dim) == spec.shape, spec.name
    fp8 = fp8_params(cfg)
    assert "lm_head" in table and "lm_head" not in fp8 and "moe_blocks.mlp.gate.weight" not in fp8
    assert set(fp8) < set(table)
