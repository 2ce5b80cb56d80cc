"""The host-side .safetensors reader/writer: every dtype round-trips, bad files fail at open."""

import ml_dtypes
import numpy as np
import pytest

from k2jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors


def test_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "fp8": rng.standard_normal((4, 4)).astype(ml_dtypes.float8_e4m3fn),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float16),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.names() == list(tensors) and f.metadata == {"format": "pt"}
    for name, a in tensors.items():
        b = f.read(name)
        assert b.dtype == a.dtype and b.shape == a.shape
        assert b.tobytes() == a.tobytes(), name
    assert not list(tmp_path.glob("*.tmp-*"))


def test_bad_files(tmp_path):
    with pytest.raises(SafetensorsError, match="no such file"):
        SafetensorsFile(tmp_path / "none.safetensors")
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="no header length"):
        SafetensorsFile(tmp_path / "short")
    write_safetensors(tmp_path / "ok", {"a": np.ones((4,), np.float32)})
    data = (tmp_path / "ok").read_bytes()
    (tmp_path / "cut").write_bytes(data[:-4])
    with pytest.raises(SafetensorsError, match="tensor a: data ends at byte 16 .* truncated"):
        SafetensorsFile(tmp_path / "cut")
    with pytest.raises(SafetensorsError, match="has no tensor b"):
        SafetensorsFile(tmp_path / "ok").read("b")
    with pytest.raises(SafetensorsError, match="cannot be stored"):
        write_safetensors(tmp_path / "c", {"c": np.ones(2, np.complex128)})
