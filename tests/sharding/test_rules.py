"""Meshes and the logical-axis rules table, on the 8 fake devices and on an abstract pod-sized mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.config import kimi_k2, tiny
from k2jax.model.placement import abstract_model
from sharding.mesh import MeshError, abstract_mesh, make_mesh, resolve_axis_sizes
from sharding.rules import (
    MAY_REPLICATE,
    STRATEGIES,
    ShardingRuleError,
    param_shardings,
    partition_spec,
    sharding_table,
    total_bytes_per_device,
)


def test_mesh_sizes_and_errors():
    mesh = make_mesh({"expert": 4, "fsdp": -1})
    assert dict(mesh.shape) == {"fsdp": 2, "expert": 4}
    with pytest.raises(MeshError, match="has 6 devices, but 8"):
        make_mesh({"expert": 3, "fsdp": 2})
    with pytest.raises(MeshError, match="not k2jax axes"):
        make_mesh({"model": 8})
    with pytest.raises(MeshError, match="only one mesh axis may be -1"):
        resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(MeshError, match="do not divide"):
        resolve_axis_sizes({"expert": 3, "data": -1}, 8)


def test_partition_specs_follow_the_table(monkeypatch):
    shape, axes = (2, 16, 64, 32), ("layers", "expert", "embed", "moe_mlp")
    mesh_shape = {"fsdp": 2, "expert": 4, "stage": 2}
    assert partition_spec(shape, axes, mesh_shape, "ep_fsdp") == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
    assert partition_spec(shape, axes, mesh_shape, "ep_pp") == jax.sharding.PartitionSpec("stage", "expert", "fsdp", None)
    assert partition_spec(shape, axes, mesh_shape, "fsdp") == jax.sharding.PartitionSpec(None, None, "fsdp", None)
    # a dimension the mesh axis does not divide is an error naming parameter, dimension, axis and sizes ...
    with pytest.raises(ShardingRuleError, match=r"^w \(2, 6, 64, 32\): dimension 1 \('expert', size 6\) is not "
                                                r"divisible by mesh axis expert \(4\) under strategy 'ep_fsdp'"):
        partition_spec((2, 6, 64, 32), axes, mesh_shape, "ep_fsdp", "w")
    # ... unless the strategy opts that axis in to replicating
    monkeypatch.setitem(MAY_REPLICATE, "ep_fsdp", frozenset({"expert"}))
    assert partition_spec((2, 6, 64, 32), axes, mesh_shape, "ep_fsdp")[1] is None
    # a tuple candidate that does not divide falls back to the next candidate; no candidate axis in the mesh: whole
    assert partition_spec((8, 6), ("vocab", "embed"), {"fsdp": 2, "expert": 4}, "ep_fsdp") == \
        jax.sharding.PartitionSpec(None, "fsdp")
    with pytest.raises(ValueError, match="unknown sharding strategy"):
        partition_spec(shape, axes, mesh_shape, "zero3")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_restore_with_each_strategy_matches_unsharded(tmp_path, strategy):
    model = k2jax.Transformer(tiny(), rngs=nnx.Rngs(0))
    k2jax.save_checkpoint(str(tmp_path / "c"), model)
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2} if strategy != "ep_pp" else {"fsdp": 2, "expert": 2, "stage": 2})
    shardings = param_shardings(k2jax.param_info(model), mesh, strategy)
    sharded = k2jax.load_checkpoint(str(tmp_path / "c"), shardings=lambda name, shape: shardings[name])
    experts = sharded.moe_blocks.mlp.experts.gate_proj[...]
    assert experts.sharding.spec == shardings["moe_blocks.mlp.experts.gate_proj"].spec
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
    a, b = np.asarray(model(tokens)), np.asarray(sharded(tokens))
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_kimi_k2_params_on_a_256_chip_pod_slice():
    """The 1T model's parameters (bf16) under EP 64 x FSDP 4, planned with eval_shape: nothing is allocated."""
    cfg = kimi_k2(param_dtype="bfloat16")
    info = k2jax.param_info(abstract_model(cfg))
    mesh = abstract_mesh({"expert": 64, "fsdp": 4}, 256)
    per_device = total_bytes_per_device(info, dict(mesh.shape), "ep_fsdp")
    table = sharding_table(info, dict(mesh.shape), "ep_fsdp")
    print(table.splitlines()[-1])
    for name, (shape, _, axes) in info.items():
        spec = partition_spec(shape, axes, dict(mesh.shape), "ep_fsdp")
        assert any(a is not None for a in spec), f"{name} {shape} {axes} would be replicated on every chip"
    experts = partition_spec(*[info["moe_blocks.mlp.experts.gate_proj"][i] for i in (0, 2)], dict(mesh.shape),
                             "ep_fsdp")
    assert experts == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)  # 1T of weights split 256 ways
    assert per_device < 95 * 2**30


def test_constrain_splits_the_batch_over_batch_like_axes():
    from sharding.rules import ACTIVATION_BTD, constrain
    x = jnp.zeros((8, 3, 4))
    assert constrain(x, ACTIVATION_BTD) is x  # no mesh set: untouched
    with jax.set_mesh(make_mesh({"data": 2, "expert": 2, "tensor": 2})):
        y = jax.jit(lambda a: constrain(a * 2, ACTIVATION_BTD))(x)
        assert y.sharding.spec[0] == ("data", "expert")
        odd = jax.jit(lambda a: constrain(a, ACTIVATION_BTD))(jnp.zeros((2, 3, 4)))  # 2 rows: only data divides
        assert odd.sharding.spec[0] in ("data", ("data",))


def test_decode_layout_keeps_rows_whole_and_the_cache_is_never_replicated():
    """In the decode layout the rows are whole on every device, the latent axis is split as the weights' hidden
    axes are; the latent cache is laid out the same in both layouts: rows over the batch-like axes as far as they
    divide, then slots over the axes the rows left; no mesh axis serves two dimensions of one array."""
    from sharding.rules import ACTIVATION_BTD, CACHE_AXES_LBSX, activation_spec
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    P = jax.sharding.PartitionSpec
    cache = lambda rows: activation_spec((3, rows, 64, 8), CACHE_AXES_LBSX, mesh)  # noqa: E731
    assert activation_spec((8, 1, 4), ACTIVATION_BTD, mesh) == P(("data", "fsdp", "expert"), None, None)
    assert activation_spec((8, 1, 4), ACTIVATION_BTD, mesh, "decode") == P(None, None, None)
    assert activation_spec((8, 1, 4, 16), ("batch", None, "heads", "latent"), mesh, "decode") == P(
        None, None, None, ("fsdp", "expert"))
    assert activation_spec((3, 8, 64, 8), CACHE_AXES_LBSX, mesh, "decode") == cache(8) == P(
        None, ("data", "fsdp", "expert"), None, None)
    assert cache(2) == P(None, "data", ("fsdp", "expert"), None)      # 2 rows: their slots over the rest
    assert cache(1) == P(None, None, ("data", "fsdp", "expert"), None)  # one row: split along the sequence
    assert activation_spec((3, 1, 6, 8), CACHE_AXES_LBSX, mesh) == P(None, None, "data", None)  # 6 slots: what divides
    with pytest.raises(ValueError, match="activation layout must be one of"):
        activation_spec((8, 1, 4), ACTIVATION_BTD, mesh, "prefil")


def test_multi_slice_mesh_keeps_ici_axes_inside_a_slice():
    devices = jax.devices()
    mesh = make_mesh({"fsdp": 2, "expert": 2}, dcn={"data": 2}, num_slices=2)  # 2 slices of 4 devices
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2}
    slice_of = {d: i // 4 for i, d in enumerate(devices)}
    grid = mesh.devices
    for data in range(2):  # every ICI sub-grid lies in one slice, the data axis crosses slices
        assert {slice_of[d] for d in grid[data].reshape(-1)} == {data}
    mixed = make_mesh({"expert": 2}, dcn={"expert": 2, "data": 2}, num_slices=4)  # an axis spanning ICI and DCN
    assert dict(mixed.shape) == {"data": 2, "expert": 4}
    for data in range(2):
        column = [slice_of_4 for slice_of_4 in (devices.index(d) // 2 for d in mixed.devices[data])]
        assert column[0] == column[1] and column[2] == column[3] and column[0] != column[2]  # dcn outer
    with pytest.raises(MeshError, match="equal slices"):
        make_mesh({"fsdp": 1}, dcn={"data": 3}, num_slices=3)
