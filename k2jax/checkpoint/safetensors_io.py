"""Reading and writing .safetensors files on the host, one tensor at a time, with FP8 and BF16.

The `safetensors` package's NumPy backend has no F8_E4M3 or BF16, the release's two main dtypes, so k2jax reads
the (simple) format itself: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data. Every header
field is checked against the file's size before any tensor is read, so a truncated or corrupt shard fails at
open with one line naming the file (and tensor). Tensors are read through a memory map: opening a shard costs
nothing, reading a tensor copies only that tensor.

Writes go to a temporary file renamed into place, so a crash never leaves a half-written shard under the
final name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20


class SafetensorsError(ValueError):
    """A .safetensors file that is missing, truncated or malformed."""


class SafetensorsFile:
    """A validated view of one .safetensors file: `names()`, `dtype(name)`, `shape(name)`, `read(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: truncated ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(f"{self.path}: header length {n} runs past the end of the file "
                                           f"({size} bytes): truncated or not a safetensors file")
                raw = f.read(n)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: no such file") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = {}
        for name, e in header.items():
            self._entries[name] = self._check_entry(name, e, size - self._data_start)
        self._mmap = None

    def _check_entry(self, name, e, data_size):
        def bad(msg):
            raise SafetensorsError(f"{self.path}: tensor {name}: {msg}")

        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            bad("corrupt header entry")
        if e["dtype"] not in DTYPES:
            bad(f"unsupported dtype {e['dtype']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            bad(f"bad shape {shape!r}")
        offsets = e["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            bad(f"bad data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[e["dtype"]].itemsize:
            bad(f"data_offsets {offsets} do not hold a {e['dtype']}{shape}")
        if end > data_size:
            bad(f"data ends at byte {end} but the file has {data_size} data bytes: truncated")
        return DTYPES[e["dtype"]], tuple(shape), begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def _entry(self, name):
        if name not in self._entries:
            raise SafetensorsError(f"{self.path}: has no tensor {name}")
        return self._entries[name]

    def read(self, name: str) -> np.ndarray:
        """A copy of one tensor (only its bytes are read)."""
        dtype, shape, begin, end = self._entry(name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)

    def close(self):
        self._mmap = None


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes tensors (in the given order) to `path` atomically. Returns the number of data bytes."""
    items = dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
    layout = [(name, a.dtype, a.shape) for name, a in items.items()]
    return write_safetensors_streaming(path, layout, items.__getitem__, metadata)


def write_safetensors_streaming(path: str | os.PathLike, layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                                produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None
                                ) -> int:
    """Writes a file whose tensors are known by (name, dtype, shape) up front and produced one at a time by
    `produce(name)`, in layout order: memory stays at one tensor. Atomic (temp file + rename). Returns the
    number of data bytes."""
    path = os.fspath(path)
    layout = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in layout]
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name}: dtype {dtype} cannot be stored")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape in layout:
                a = np.asarray(produce(name))
                if a.dtype != dtype or a.shape != shape:
                    raise SafetensorsError(f"{path}: tensor {name}: produced {a.dtype}{list(a.shape)}, the header "
                                           f"says {dtype}{list(shape)}")
                f.write(np.ascontiguousarray(a).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return offset
