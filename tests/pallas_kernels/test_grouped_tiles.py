"""pallas_kernels.grouped_tiles: the TPU form's visit schedule reads the weight blocks of groups with rows only."""

import jax.numpy as jnp
import numpy as np

from pallas_kernels import grouped_tiles as gt


def test_visits_of_groups_without_rows_fetch_nothing():
    """Rows 0-149 in groups of sizes [40, 0, 100, 0, 10] over 3 row tiles (256 rows, 106 past the groups): the
    empty groups' visits and the third tile's visit are inactive and keep the last active visit's group (their
    index maps ask for the blocks already in VMEM), each tile still has a first visit (it is written), and the
    share of groups a launch's cost estimate reads follows the rows."""
    sizes = jnp.array([40, 0, 100, 0, 10], jnp.int32)
    first, last, starts, ends = gt.tables(sizes, 3)
    tile, group, active, first_visit = (np.asarray(a) for a in gt.visit_schedule(first, last, starts, ends))
    visits = [(int(t), int(g), int(a), int(f)) for t, g, a, f in zip(tile, group, active, first_visit)]
    # tile 0 (rows 0-127): groups 0, (1: empty), 2; tile 1 (128-255): 2, (3: empty), 4; tile 2: none, then padding
    assert visits == [(0, 0, 1, 1), (0, 0, 0, 0), (0, 2, 1, 0), (1, 2, 1, 1), (1, 2, 0, 0), (1, 4, 1, 0),
                      (2, 4, 0, 1)]
    assert abs(gt.visited_share(1, 384) - 1 / 384) < 1e-12 and gt.visited_share(10_000, 24) > 0.999
    assert abs(gt.visited_share(64 * 8, 384) - (1 - (1 - 1 / 384) ** 512)) < 1e-12
