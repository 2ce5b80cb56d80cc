"""The sharding a stored ([*lead, out, in]) array is read with, carried over from its parameter's."""

import jax

from k2jax.checkpoint.shardings import stored_sharding
from k2jax.formats.weight_layout import Matmul


def test_stored_sharding_keeps_each_devices_part_of_the_release_oriented_weight():
    mesh = jax.make_mesh((2, 4), ("expert", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    P = jax.sharding.PartitionSpec

    def stored(spec, m, shape):
        return stored_sharding(jax.sharding.NamedSharding(mesh, spec), m, shape).spec

    # experts [L, E, D, F] -> stored [L, E, F, D]: lead axes kept, in / out swapped
    assert (stored(P(None, "expert", None, "model"), Matmul(2, 64, 32), (3, 8, 64, 32))
            == P(None, "expert", "model", None))
    # q_b [Q, N, H] heads split -> stored [N*H, Q]: the merged out axis split like its major (head) axis
    assert stored(P(None, "model", None), Matmul(0, 48, 8 * 24), (48, 8, 24)) == P("model", None)
    # o_proj [N, V, D] heads split -> stored [D, N*V]
    assert stored(P("model", None, None), Matmul(0, 8 * 16, 64), (8, 16, 64)) == P(None, "model")
    # a minor merged axis split cannot be expressed on the merged axis: unsharded there (the transpose reshards)
    assert stored(P(None, None, "model"), Matmul(0, 48, 8 * 24), (48, 8, 24)) == P(None, None)
