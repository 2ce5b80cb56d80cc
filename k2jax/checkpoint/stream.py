"""A k2jax checkpoint written and read one parameter slot at a time, never holding a whole parameter (the
converter and the export stream the release through these).

    w = StreamingWriter(path, cfg, dtype[, scheme]); w.write(name, index, slot_array) ...; w.finish()
    r = CheckpointReader(path); r.slot(name, index)

`StreamingWriter` builds the same checkpoint `save_checkpoint` does (`k2jax.checkpoint.format`): Orbax writes the
tree's skeleton with 1-element placeholders, then each parameter is created at full size with tensorstore and
filled slot by slot (a (layer, expert) slot is one chunk), so memory stays at about one slot. Orbax restores such
a checkpoint like any other. Its writes are not fsynced one by one (that made each 29 MB slot write 4x slower):
`sync()` makes everything written so far durable at once, and `finish()` calls it before the metadata.

`CheckpointReader` checks every chunk is on disk when it opens (`check_chunks`) and never fills a missing one.
"""

from __future__ import annotations

import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from k2jax.checkpoint.format import (
    STATE_DIR,
    CheckpointError,
    check_chunks,
    metadata,
    nest,
    read_metadata,
    save_tree,
    write_metadata,
)
from k2jax.checkpoint.orbax_checkpoint import stored_template
from k2jax.formats import quant
from k2jax.model.config import K2Config

_CHUNK_BYTES = 64 * 2 ** 20


def chunk_shape(shape: tuple[int, ...], slot_ndim: int) -> list[int]:
    """One chunk per slot (the trailing `slot_ndim` dims), split along its first dim to stay under 64 MiB."""
    lead = [1] * (len(shape) - slot_ndim)
    slot = list(shape[len(shape) - slot_ndim:])
    if slot:
        row_bytes = max(1, math.prod(slot[1:])) * 4
        slot[0] = max(1, min(slot[0], _CHUNK_BYTES // row_bytes))
    return lead + slot


class StreamingWriter:
    """Writes a k2jax checkpoint parameter slot by parameter slot (see the module docstring).

    w = StreamingWriter(path, cfg, dtype); w.write(name, index, slot_array) ...; w.finish()
    `path` may already hold a partial run of the same writer (resume): existing arrays are kept. scheme: an int4
    checkpoint's INT4 scheme (the release's); multimodal: a K2.5 release's settings outside the text model. Both
    go into k2jax.json."""

    def __init__(self, path: str | os.PathLike, cfg: K2Config, dtype: str, scheme: quant.Int4Scheme | None = None,
                 multimodal: dict | None = None):
        self.path, self.cfg, self.dtype = os.fspath(path), cfg, dtype
        self.scheme, self.multimodal = scheme, multimodal
        template = stored_template(cfg, dtype, scheme)
        self.shapes = {n: (tuple(a.shape), jnp.dtype(a.dtype).name) for n, a in template.items()}
        self.state_dir = os.path.join(self.path, STATE_DIR)
        self._arrays: dict[str, ts.TensorStore] = {}
        self._context = ts.Context({"file_io_sync": False})  # durability comes from sync()
        if not os.path.exists(self.state_dir):
            os.makedirs(self.path, exist_ok=True)
            placeholders = {n: np.zeros((1,) * len(a.shape), a.dtype) for n, a in template.items()}
            save_tree(self.state_dir, nest(placeholders))

    def _array(self, name: str, slot_ndim: int) -> ts.TensorStore:
        if name not in self._arrays:
            shape, dtype = self.shapes[name]
            array_dir = os.path.join(self.state_dir, name)
            marker = os.path.join(array_dir, ".k2jax_full")
            if not os.path.exists(marker):  # still Orbax's placeholder: replace it by the full-size array
                shutil.rmtree(array_dir, ignore_errors=True)
                spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": array_dir},
                        "metadata": {"shape": list(shape), "data_type": dtype, "fill_value": 0,
                                     "chunk_grid": {"name": "regular",
                                                    "configuration": {"chunk_shape": chunk_shape(shape, slot_ndim)}},
                                     # raw bytes: trained weights barely compress and zstd would
                                     # cost more time than the whole rest of the conversion
                                     "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}}
                ts.open(spec, create=True).result()
                open(marker, "w").close()
            # all-zero slots (a fresh router bias, a zeroed expert) must be written too: Orbax's reader treats a
            # missing chunk as an error rather than as the fill value
            self._arrays[name] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": array_dir},
                                          "store_data_equal_to_fill_value": True}, open=True,
                                         context=self._context).result()
        return self._arrays[name]

    @staticmethod
    def sync() -> None:
        """Blocks until every slot whose write has completed is on disk (not only in the page cache)."""
        os.sync()

    def write(self, name: str, index: tuple[int, ...], slot: np.ndarray, *, wait: bool = True):
        """Writes one slot (the parameter at leading `index`). With wait=False returns the tensorstore future
        instead of waiting for it (the caller must keep `slot` alive and `.result()` it)."""
        shape, dtype = self.shapes[name]
        if tuple(slot.shape) != shape[len(index):]:
            raise CheckpointError(f"{name}{list(index)}: slot shape {list(slot.shape)}, expected "
                                  f"{list(shape[len(index):])}")
        array = self._array(name, len(shape) - len(index))
        future = array[index].write(np.ascontiguousarray(slot, dtype=jnp.dtype(dtype)))  # one pass: cast + layout
        return future.result() if wait else future

    def finish(self) -> None:
        """Writes k2jax.json once every slot is durable: from here on the checkpoint counts as complete."""
        for name in self.shapes:
            if not os.path.exists(os.path.join(self.state_dir, name, ".k2jax_full")):
                raise CheckpointError(f"{self.path}: parameter {name} was never written")
        self.sync()
        write_metadata(self.path, metadata(self.cfg, self.dtype, self.shapes, multimodal=self.multimodal,
                                           quantization=None if self.scheme is None else self.scheme.to_json()))


class CheckpointReader:
    """Reads single slots of a k2jax checkpoint's arrays straight from disk (for streaming export). Every chunk
    is checked to exist when it opens (`check_chunks`), and reads never fill a missing one."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.meta = read_metadata(self.path)
        check_chunks(self.path)
        self.dtype = self.meta["dtype"]
        self.cfg = K2Config.from_hf(self.meta["config"])
        try:
            self.scheme = quant.scheme_from_json(self.meta.get("quantization")) if self.dtype == "int4" else None
        except quant.QuantError as e:
            raise CheckpointError(f"{self.path}: k2jax.json: {e}") from None
        self._arrays: dict[str, ts.TensorStore] = {}

    def slot(self, name: str, index: tuple[int, ...]) -> np.ndarray:
        if name not in self.meta["params"]:
            raise CheckpointError(f"{self.path}: has no parameter {name}")
        if name not in self._arrays:
            array_dir = os.path.join(self.path, STATE_DIR, name)
            # all-zero slots (a fresh router bias, a zeroed expert) must be written too: Orbax's reader treats a
            # missing chunk as an error rather than as the fill value
            self._arrays[name] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": array_dir},
                                          "store_data_equal_to_fill_value": True,
                                          "fill_missing_data_reads": False}, open=True).result()
        try:
            return np.asarray(self._arrays[name][index].read().result())
        except ValueError as e:  # tensorstore: NOT_FOUND: chunk {...} stored at local file "..." is missing
            raise CheckpointError(f"{self.path}: array {name}{list(index)}: {' '.join(str(e).split())}") from None
