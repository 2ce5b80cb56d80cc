"""k2jax.model.target: every per-platform choice follows the platform compiled for (cfg.platform, else the mesh's
devices, else the default device), never the host."""

import jax
import pytest

from k2jax.model.config import ConfigError, kimi_k2, tiny
from k2jax.model.target import KERNEL_LAUNCH, Target
from tests.compile_targets import gpu_mesh, tpu_mesh

K2 = kimi_k2()


def _traced(cfg) -> Target:
    """Target.of while tracing under the mesh in context (as the model calls it)."""
    seen = []
    jax.jit(lambda: seen.append(Target.of(cfg))).trace()
    return seen[0]


def test_cpu_gets_the_cpu_paths():
    t = Target.of(K2)
    assert (t.platform, t.attention, t.moe_impl, t.ep_exchange, t.cpu_matmul) == ("cpu", "xla", "tiled",
                                                                                 "all_to_all", True)
    assert not t.fp8_activations
    assert t.scan_unroll == K2.num_moe_layers and t.launch("mla_attention", "bfloat16") == {}


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_the_meshs_devices_decide(platform):
    mesh = (tpu_mesh if platform == "tpu" else gpu_mesh)({"expert": 2})
    with jax.set_mesh(mesh):
        for t in (Target.of(K2), _traced(K2)):
            assert (t.platform, t.attention, t.moe_impl, t.ep_exchange, t.scan_unroll, t.cpu_matmul) == (
                platform, "pallas", "pallas", "native", 1, False)
            assert t.fp8_activations == (platform == "gpu")  # FP8 tensor cores on H100; v5p has no FP8 MXU
            launch = t.launch("mla_attention", "bfloat16")
            assert launch == {"platform": platform, **KERNEL_LAUNCH[("mla_attention", platform, "bfloat16")]}
        # tiny's head dims (rope 8) do not suit the kernels' tiles: XLA attention even on an accelerator
        assert Target.of(tiny()).attention == "xla"
        # cfg.platform names the platform outright; cfg fields override single choices
        assert Target.of(K2.replace(platform="cpu")).moe_impl == "tiled"
        assert Target.of(K2.replace(attention_impl="xla", scan_unroll=3)).attention == "xla"
        assert Target.of(K2.replace(scan_unroll=3)).scan_unroll == 3
        assert Target.of(K2.replace(fp8_activations="on")).fp8_activations
        assert not Target.of(K2.replace(fp8_activations="off")).fp8_activations
    assert Target.of(K2.replace(platform=platform)).platform == platform  # no mesh needed


def test_platform_is_checked():
    with pytest.raises(ConfigError, match="platform must be one of"):
        kimi_k2(platform="metal")
    with pytest.raises(ConfigError, match="fp8_activations must be one of"):
        kimi_k2(fp8_activations=True)
