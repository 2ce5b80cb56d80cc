"""How a K2 matmul weight is laid out: in the release (and every k2jax checkpoint) versus in k2jax's model.

The release stores each linear layer as one 2-D tensor [out, in] per slot (a slot: one layer, or one
(layer, expert) of a stacked parameter); k2jax's model holds [*lead, in, ...out] with the lead (layer / expert)
axes first and the out axis split per head where the layer has heads:

    q_b_proj  [Q, N, P+R]     kv_b_proj [C, N, P+U]     o_proj [N, U, D]     (in split per head: o_proj)
    experts.down_proj [L, E, F, D]   release: model.layers.l.mlp.experts.e.down_proj.weight [D, F]

`Matmul` is that layout; `to_stored` / `from_stored` are the one transpose between the two, on NumPy or JAX
arrays. Which weight has which `Matmul` is the table in `k2jax.checkpoint.hf_mapping`: each release tensor's
`HFTensorSpec.matmul` (None: copied as it is), and `matmul_params(cfg)` / `fp8_params(cfg)` keyed by parameter.
`hf_mapping` (release tensors <-> a model in memory) and `k2jax.checkpoint.orbax_checkpoint` (on the devices at save /
load) both transpose through here.

Letter legend: D hidden, N heads, Q q_lora, C kv_lora, P nope dim, R rope dim, U value dim, F ffn, L layers,
E experts.
"""

from __future__ import annotations

from typing import NamedTuple


class Matmul(NamedTuple):
    """A matmul weight as the release and checkpoints store it: [*lead, out, in], the release's 2-D tensor per
    stacked slot; in k2jax's model it is [*lead, *in axes, *out axes] (`from_stored`)."""
    n_lead: int  # stacked (layer / expert) axes in front of the matmul
    in_dim: int
    out_dim: int


def to_stored(w, m: Matmul):
    """k2jax's layout -> the stored [*lead, out, in] (NumPy or JAX arrays)."""
    return w.reshape(w.shape[:m.n_lead] + (m.in_dim, m.out_dim)).swapaxes(-1, -2)


def from_stored(w, m: Matmul, shape: tuple[int, ...]):
    """The stored [*lead, out, in] -> k2jax's layout of `shape`."""
    return w.swapaxes(-1, -2).reshape(shape)
