"""k2jax.model.target: every per-platform choice follows the platform compiled for (cfg.run.platform, else the mesh's
devices, else the default device), never the host."""

import jax
import jax.numpy as jnp
import pytest

from k2jax.model.config import ConfigError, kimi_k2, tiny
from k2jax.model.target import Target, target_platform
from tests.compile_targets import gpu_mesh, tpu_mesh

K2 = kimi_k2()


def _traced(cfg) -> Target:
    """Target.of while tracing under the mesh in context (as the model calls it)."""
    seen = []
    jax.jit(lambda: seen.append(Target.of(cfg))).trace()
    return seen[0]


def test_cpu_gets_the_cpu_paths():
    t = Target.of(K2)
    assert (t.platform, t.attention, t.moe_impl, t.ep_exchange, t.matmul) == ("cpu", "xla", "tiled",
                                                                                 "all_to_all", "cpu")
    assert not t.fp8_activations
    assert t.scan_unroll == K2.num_moe_layers


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_the_meshs_devices_decide(platform):
    mesh = (tpu_mesh if platform == "tpu" else gpu_mesh)({"expert": 2})
    with jax.set_mesh(mesh):
        for t in (Target.of(K2), _traced(K2)):
            assert (t.platform, t.attention, t.moe_impl, t.ep_exchange, t.scan_unroll, t.matmul) == (
                platform, "pallas", "pallas", "native", 1, "xla")
            assert t.fp8_activations == (platform == "gpu")  # FP8 tensor cores on H100; v5p has no FP8 MXU
        # tiny's head dims (rope 8) do not suit the kernels' tiles: XLA attention even on an accelerator
        assert Target.of(tiny()).attention == "xla"
        assert Target.of(K2.replace(qk_nope_head_dim=192)).attention == "xla"  # nor dims that are not powers of 2
        # cfg.run.platform names the platform outright; cfg fields override single choices
        assert Target.of(K2.replace(platform="cpu")).moe_impl == "tiled"
        assert Target.of(K2.replace(attention_impl="xla", scan_unroll=3)).attention == "xla"
        assert Target.of(K2.replace(scan_unroll=3)).scan_unroll == 3
        assert Target.of(K2.replace(fp8_activations="on")).fp8_activations
        assert not Target.of(K2.replace(fp8_activations="off")).fp8_activations
    assert Target.of(K2.replace(platform=platform)).platform == platform  # no mesh needed


def test_the_target_platform_is_named_or_the_meshs():
    assert target_platform() == "cpu"  # no mesh: the default device
    assert target_platform("tpu") == "tpu" and target_platform("cuda") == "gpu"
    assert target_platform("auto") == "cpu"
    with pytest.raises(ValueError, match="platform must be one of"):
        target_platform("metal")
    for mesh, want in ((tpu_mesh({"x": 4}), "tpu"), (gpu_mesh({"x": 2}), "gpu"),
                       (jax.make_mesh((8,), ("x",)), "cpu")):
        with jax.set_mesh(mesh):
            assert target_platform() == want
            seen = []  # while tracing (the abstract mesh)
            jax.jit(lambda: seen.append(target_platform()) or jnp.zeros(())).trace()
            assert seen == [want]
        assert target_platform() == "cpu"


def test_platform_is_checked():
    with pytest.raises(ConfigError, match="platform must be one of"):
        kimi_k2(platform="metal")
    for field in ("moe_impl", "attention_impl"):  # each knob's values are those of the module that runs it
        with pytest.raises(ConfigError, match=f"{field} must be one of"):
            kimi_k2(**{field: "cuda"})
    with pytest.raises(ConfigError, match="fp8_activations must be one of"):
        kimi_k2(fp8_activations=True)
