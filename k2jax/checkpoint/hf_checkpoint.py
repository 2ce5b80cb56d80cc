"""The HF release's on-disk layout: config.json, model.safetensors.index.json and N safetensors shards.

    ckpt = HFCheckpoint("Kimi-K2-Instruct/")      # validates config, index and every shard header at open
    ckpt.check()                                  # every tensor the config needs, no others, right shapes/dtypes
    w = ckpt.read("model.layers.3.mlp.experts.17.down_proj.weight")   # dequantised float32 [D, F]
    model = load_hf_checkpoint("dir/", mesh=mesh, shardings="ep_fsdp", weights="fp8")   # streamed onto devices

    write_hf_checkpoint("out/", cfg, tensors, dtype="fp8")   # release-named arrays -> the release layout

The formats (config.json's quantization_config, k2jax.formats.quant):
- FP8 (K2-Instruct / Base / 0905; hf_mapping.release_dtype): e4m3 with a float32 `weight_scale_inv` per 128x128
  block for attention / dense-MLP / expert matmuls, BF16 for embeddings, lm_head, norms and the router gate, F32
  for e_score_correction_bias.
- INT4 (K2-Thinking, K2.5 and later): compressed-tensors pack-quantized groups for every Linear its `ignore` list
  does not name (the routed experts): `weight_packed` int32 [out, in/8], `weight_scale` bf16 [out, in/32],
  `weight_shape` [2]; everything else BF16 (the router bias F32).
- K2.5 layout (config model_type kimi_k25): the text model's config under text_config, its tensors prefixed
  (`language_model.model.layers...`, `language_model.lm_head.weight`; hf_mapping.detect_text_layout finds the
  prefixes from the index), and a vision tower and projector (`vision_tower.*`, `mm_projector.*`), which are left
  out (one logged line: how many tensors, how many bytes). Tensors are named by the text model's own names
  (`model.layers...`) in this API and by the release's names in messages.
`write_hf_checkpoint(dtype="bfloat16" | "float32")` stores the matmuls unquantised; "fp8" / "int4" in those formats
(the text model's layout: a K2.5 source is written as its K2-Thinking-layout text model).

Every problem is reported in one line naming the file and tensor: a missing shard, a truncated or corrupt
header, a tensor the index lists but its shard lacks, a missing or unexpected tensor, a wrong shape or dtype, a
missing, non-finite, non-positive or too large scale (weights that would dequantise to inf), an e4m3 NaN, an INT4
weight whose weight_packed / weight_scale / weight_shape is missing or does not fit the others or the config, a
tensor the quantization_config says is INT4 stored otherwise (or the reverse), a config that does not match the
weights. The writer builds the whole directory under a temporary name and renames it into place at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from k2jax.checkpoint.format import CheckpointError, local_path
from k2jax.checkpoint.hf_mapping import (
    GROUP_SCALE_SUFFIX,
    INT4_SUFFIXES,
    PACKED_SUFFIX,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    HFTensorSpec,
    check_names,
    detect_text_layout,
    hf_tensor_specs,
    hf_to_k2,
    int4_quantized,
    is_mtp_tensor,
    quantized_weight,
    release_dtype,
)
from k2jax.checkpoint.orbax_checkpoint import (
    _flat,
    abstract_state,
    resident_names,
    with_resident,
)
from k2jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors_streaming
from k2jax.checkpoint.shardings import ShardingSpec, resolve_shardings, sharding_for
from k2jax.formats import quant
from k2jax.model.config import K2Config, read_hf_config, split_multimodal
from k2jax.model.experts import EXPERT_PARAMS, expert_format_of, scale_sharding
from k2jax.model.transformer import Transformer, param_name

INDEX = "model.safetensors.index.json"
_STORE_DTYPES = ("fp8", "bfloat16", "float32", "int4")


def _scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


class HFCheckpoint:
    """A validated release directory. Tensors are named by the text model's names (hf_mapping; `self.stored(name)`
    is the release's own); `config` is the text model's K2Config, `scheme` the quantization_config's
    (k2jax.formats.quant: None, Fp8Scheme or Int4Scheme), `multimodal` a K2.5-layout release's settings outside its
    text model (None otherwise)."""

    def __init__(self, path: str | os.PathLike, **config_overrides):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: no such directory")
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (a release checkpoint is a directory with "
                                  f"config.json, {INDEX} and the shards)")
        config_path = os.path.join(self.path, "config.json")
        self.config = K2Config.from_hf(config_path, **config_overrides)
        src, raw = read_hf_config(config_path)
        text, self.multimodal = split_multimodal(raw, src)
        self.scheme = quant.parse_quantization_config(text.get("quantization_config"))  # from_hf checked it
        stored_map = self._read_index()
        self.layout = detect_text_layout(stored_map)
        if isinstance(self.scheme, quant.Int4Scheme):  # the ignore list matches the release's names too
            self.scheme = dataclasses.replace(self.scheme, text_prefixes=(self.layout.body, self.layout.head))
        self.weight_map, self._stored, left_out = {}, {}, {}
        for stored, file in stored_map.items():
            name = self.layout.canonical(stored)
            if name is None and self.multimodal is not None:  # the vision tower and projector
                left_out[stored] = file
                continue
            name = stored if name is None else name
            self.weight_map[name], self._stored[name] = file, stored
        self._files: dict[str, SafetensorsFile] = {}
        for file in sorted(set(self.weight_map.values())):
            self._open(file)
        self.specs = {s.name: s for s in hf_tensor_specs(self.config)}
        if left_out:
            self._log_left_out(left_out)

    def _log_left_out(self, left_out: Mapping[str, str]) -> None:
        """One logged line: the multimodal tensors (vision tower, projector) are not loaded."""
        groups = collections.Counter(name.split(".")[0] + ".*" for name in left_out)
        nbytes = 0
        for stored, file in left_out.items():
            try:
                f = self._open(file)
                nbytes += int(np.prod(f.shape(stored))) * f.dtype(stored).itemsize
            except (CheckpointError, SafetensorsError):
                pass  # not read, so not checked: its size is just not counted
        size = next(f"{nbytes / unit:.4g} {name}" for unit, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"),
                                                                      (1, "bytes")) if nbytes >= unit or unit == 1)
        kinds = ", ".join(f"{g} {n}" for g, n in sorted(groups.items()))
        logging.warning("%s: the vision tower was not loaded (k2jax reads the text model): left out %d tensors, %s "
                        "(%s)", self.path, len(left_out), size, kinds)

    def stored(self, name: str) -> str:
        """The release's own name of a tensor (K2.5: prefixed)."""
        return self._stored[name] if name in self._stored else self.layout.stored(name)

    def _read_index(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if not os.path.exists(index):
            single = os.path.join(self.path, "model.safetensors")
            if os.path.exists(single):
                return {name: "model.safetensors" for name in SafetensorsFile(single).names()}
            raise CheckpointError(f"{index}: missing (and no single model.safetensors)")
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        return weight_map

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            path = os.path.join(self.path, file)
            if not os.path.exists(path):
                listed = sorted(self.stored(n) for n, f in self.weight_map.items() if f == file)
                raise CheckpointError(f"{path}: missing shard (the index lists {len(listed)} tensor(s) in it, "
                                      f"e.g. {listed[0] if listed else None})")
            try:
                self._files[file] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        return self._files[file]

    def _file_of(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: the index has no tensor {self.stored(name)}")
        shard = self._open(self.weight_map[name])
        if self.stored(name) not in shard:
            raise CheckpointError(f"{shard.path}: tensor {self.stored(name)} is listed in {INDEX} but absent from "
                                  f"the shard")
        return shard

    def _header(self, name: str) -> np.ndarray:
        """A zero-cost array with the tensor's shape and dtype (header only), for the format checks."""
        f = self._file_of(name)
        return np.broadcast_to(np.zeros((), f.dtype(self.stored(name))), f.shape(self.stored(name)))

    def _raw(self, name: str) -> tuple[SafetensorsFile, np.ndarray]:
        f = self._file_of(name)
        return f, f.read(self.stored(name))

    def check(self) -> None:
        """Validates names, shapes and dtypes of every tensor against the config and the quantization_config
        (reads headers only, and each INT4 weight's weight_shape)."""
        check_names(self.config, self.weight_map, list(self.specs.values()), source=self.path, quantized=True,
                    display=self.stored)
        orphans = sorted(n for n in self.weight_map if quantized_weight(n) is not None
                         and quantized_weight(n) not in self.specs and not is_mtp_tensor(n, self.config))
        if orphans:
            raise CheckpointError(f"{self.path}: quantisation tensor(s) for no known weight, e.g. "
                                  f"{[self.stored(n) for n in orphans[:3]]}")
        int4_dtypes: dict[tuple[str, str], str] = {}
        for spec in self.specs.values():
            if self.is_int4(spec.name):
                int4_dtypes.setdefault(self._check_int4(spec), spec.name)
            else:
                self._check_tensor(spec)
        if len(int4_dtypes) > 1:
            (first, a), (second, b) = list(int4_dtypes.items())[:2]
            raise CheckpointError(f"{self._file_of(b + PACKED_SUFFIX).path}: tensor {self.stored(b)}: weight_scale / "
                                  f"weight_shape stored as {second}, {self.stored(a)} as {first}: k2jax keeps one of "
                                  f"each per release")
        if int4_dtypes:
            scale_dtype, shape_dtype = next(iter(int4_dtypes))
            self.scheme = dataclasses.replace(self.scheme, scale_dtype=scale_dtype, weight_shape_dtype=shape_dtype)

    def check_scales(self, dtype=np.float32) -> None:
        """Reads every FP8 block scale (about 1/16000 of the weights) and INT4 group scale (1/8 of the packed
        weights) and checks it is finite, positive and small enough that the weights it dequantises to `dtype`
        are finite (quant.check_scale, quant.check_int4_scale)."""
        for name, spec in self.specs.items():
            if self.is_int4(name):
                self.read_group_scale(name, dtype=dtype)
            elif _scale_name(name) in self.weight_map:
                self.read_scale(name, spec.shape, dtype=dtype)

    def _scale_file(self, name: str) -> tuple[str, SafetensorsFile]:
        """(scale tensor name, its shard) for FP8 weight `name`; an error naming both if the scale is missing."""
        scale = _scale_name(name)
        if scale not in self.weight_map:
            raise CheckpointError(f"{self._file_of(name).path}: tensor {self.stored(name)} is float8 but "
                                  f"{self.stored(scale)} is missing")
        return scale, self._file_of(scale)

    def read_scale(self, name: str, weight_shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
        """The float32 block scale of FP8 weight `name`, checked (shape, finite, > 0, dequantises to finite values
        of `dtype`)."""
        scale, f = self._scale_file(name)
        try:
            return quant.check_scale(f.read(self.stored(scale)), weight_shape, name=self.stored(name), dtype=dtype)
        except quant.QuantError as e:
            raise CheckpointError(f"{f.path}: tensor {e}") from None

    def _check_tensor(self, spec: HFTensorSpec) -> None:
        shard = self._file_of(spec.name)
        stored = self.stored(spec.name)
        shape, dtype = shard.shape(stored), shard.dtype(stored)
        if shape != spec.shape:
            raise CheckpointError(f"{shard.path}: tensor {stored}: shape {list(shape)}, config.json implies "
                                  f"{list(spec.shape)}")
        if isinstance(self.scheme, quant.Int4Scheme) and int4_quantized(spec, self.scheme):
            raise CheckpointError(f"{shard.path}: tensor {stored}: stored as {dtype}, but config.json's "
                                  f"quantization_config makes it INT4 (weight_packed / weight_scale / weight_shape; "
                                  f"no ignore entry matches it)")
        if dtype == quant.E4M3:
            if release_dtype(spec) != "fp8":
                raise CheckpointError(f"{shard.path}: tensor {stored}: float8 where the release stores "
                                      f"{release_dtype(spec)}")
            scale, scale_file = self._scale_file(spec.name)
            want = quant.scale_shape(spec.shape)
            if scale_file.shape(self.stored(scale)) != want:
                raise CheckpointError(f"{scale_file.path}: tensor {self.stored(scale)}: shape "
                                      f"{list(scale_file.shape(self.stored(scale)))}, expected {list(want)} for "
                                      f"{stored} {list(spec.shape)}")
        elif not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
            raise CheckpointError(f"{shard.path}: tensor {stored}: dtype {dtype} is not a float type")

    def is_int4(self, name: str) -> bool:
        """Whether weight `name` is stored as INT4 groups (weight_packed / weight_scale / weight_shape)."""
        return name + PACKED_SUFFIX in self.weight_map

    def _int4_part(self, name: str, suffix: str) -> tuple[str, SafetensorsFile]:
        """(tensor name, its shard) of INT4 weight `name`'s weight_packed / _scale / _shape; an error naming the
        weight if it is missing."""
        part = name + suffix
        if part not in self.weight_map:
            raise CheckpointError(f"{self._file_of(name + PACKED_SUFFIX).path}: tensor {self.stored(name)}"
                                  f"{PACKED_SUFFIX} is INT4 but {self.stored(part)} is missing")
        return part, self._file_of(part)

    def _int4_error(self, part: str, e: Exception):
        raise CheckpointError(f"{self._file_of(part).path}: tensor {e}") from None

    def _check_int4(self, spec: HFTensorSpec) -> tuple[str, str]:
        """Checks INT4 weight `spec` (headers, and its weight_shape's values); -> its (scale, weight_shape) dtypes."""
        name, stored = spec.name, self.stored(spec.name)
        packed_file = self._file_of(name + PACKED_SUFFIX)
        if not isinstance(self.scheme, quant.Int4Scheme):
            described = "none" if self.scheme is None else f"{self.scheme.format}"
            raise CheckpointError(f"{packed_file.path}: tensor {stored}{PACKED_SUFFIX}: INT4 groups, but config.json's "
                                  f"quantization_config is {described} (expected compressed-tensors pack-quantized)")
        if not int4_quantized(spec, self.scheme):
            raise CheckpointError(f"{packed_file.path}: tensor {stored}{PACKED_SUFFIX}: INT4, but config.json's "
                                  f"quantization_config keeps it unquantised (its ignore list "
                                  f"{list(self.scheme.ignore)} matches it, or it is not a Linear)")
        if name in self.weight_map:
            raise CheckpointError(f"{packed_file.path}: tensor {stored}{PACKED_SUFFIX}: {stored} is stored too")
        self.read_weight_shape(name)
        scale = self._int4_part(name, GROUP_SCALE_SUFFIX)[0]
        try:
            quant.check_int4_packed(self._header(name + PACKED_SUFFIX), spec.shape, name=stored)
        except quant.QuantError as e:
            self._int4_error(name + PACKED_SUFFIX, e)
        try:
            quant.check_int4_scale(self._header(scale), spec.shape, name=stored, group_size=self.scheme.group_size,
                                   values=False)
        except quant.QuantError as e:
            self._int4_error(scale, e)
        return self._header(scale).dtype.name, self._header(name + SHAPE_SUFFIX).dtype.name

    def read_weight_shape(self, name: str) -> tuple[int, int]:
        """INT4 weight `name`'s weight_shape [out, in], checked against the config (when it describes the weight)."""
        part, f = self._int4_part(name, SHAPE_SUFFIX)
        value = f.read(self.stored(part))
        spec = self.specs.get(name)
        try:
            quant.check_weight_shape(value, spec.shape if spec else tuple(value.reshape(-1)[:2]),
                                     name=self.stored(name))
        except quant.QuantError as e:
            self._int4_error(part, e)
        return tuple(map(int, value))

    def read_packed(self, name: str) -> np.ndarray:
        """INT4 weight `name`'s weight_packed as stored (int32 [out, ceil(in/8)]), checked against its weight_shape."""
        shape = self.read_weight_shape(name)
        f, packed = self._raw(name + PACKED_SUFFIX)
        try:
            return quant.check_int4_packed(packed, shape, name=self.stored(name))
        except quant.QuantError as e:
            self._int4_error(name + PACKED_SUFFIX, e)

    def read_group_scale(self, name: str, dtype=np.float32) -> np.ndarray:
        """INT4 weight `name`'s weight_scale as stored, checked: shape, finite, > 0, dequantises to finite values
        of `dtype`."""
        shape = self.read_weight_shape(name)
        part, f = self._int4_part(name, GROUP_SCALE_SUFFIX)
        group = self.scheme.group_size if isinstance(self.scheme, quant.Int4Scheme) else quant.INT4_GROUP_SIZE
        try:
            return quant.check_int4_scale(f.read(self.stored(part)), shape, name=self.stored(name), group_size=group,
                                          dtype=dtype)
        except quant.QuantError as e:
            self._int4_error(part, e)

    def read_int4(self, name: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """An INT4 weight's (weight_packed, weight_scale) exactly as stored, checked so that it dequantises to
        finite values of `dtype`."""
        return self.read_packed(name), self.read_group_scale(name, dtype)

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        """One release tensor, dequantised when stored as FP8 or INT4, cast to `dtype`."""
        if self.is_int4(name):
            packed, scale = self.read_int4(name, dtype)
            return quant.dequantize_int4(packed, scale, self.read_weight_shape(name), dtype, name=self.stored(name),
                                         group_size=self.scheme.group_size, checked=True)
        shard, array = self._raw(name)
        if array.dtype == quant.E4M3:
            array, scale = self.read_fp8(name, dtype)
            return quant.dequantize(array, scale, dtype, name=self.stored(name))
        return array.astype(dtype)

    def stored_nbytes(self, name: str) -> int:
        """Bytes a tensor takes on disk, its FP8 scale or INT4 parts included (headers only)."""
        def size(n):
            f = self._file_of(n)
            return int(np.prod(f.shape(self.stored(n)))) * f.dtype(self.stored(n)).itemsize
        parts = [name] + [name + s for s in (SCALE_SUFFIX,) + INT4_SUFFIXES]
        return sum(size(n) for n in parts if n in self.weight_map)

    def read_raw(self, name: str) -> np.ndarray:
        """One tensor exactly as stored (FP8 stays FP8; an INT4 weight's parts by their names: X.weight_packed)."""
        return self._raw(name)[1]

    def stored_dtype(self, name: str) -> np.dtype:
        """A tensor's dtype on disk (header only); an INT4 weight's is its weight_packed's, int32."""
        return self._header(name + PACKED_SUFFIX if self.is_int4(name) else name).dtype

    def shard_path(self, name: str) -> str:
        """The file holding weight `name` (an INT4 weight's: its weight_packed's)."""
        return self._file_of(name + PACKED_SUFFIX if self.is_int4(name) else name).path

    def stored_format(self, name: str) -> str:
        """"int4", "fp8", or the dtype a weight is stored in (header only)."""
        return "int4" if self.is_int4(name) else "fp8" if self.stored_dtype(name) == quant.E4M3 else \
            self.stored_dtype(name).name

    def read_fp8(self, name: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """An FP8 weight exactly as stored and its block scale, both checked so that the weight dequantises to
        finite values of `dtype`: no e4m3 NaN, every scale finite, > 0 and at most quant.max_scale(dtype)."""
        shard, raw = self._raw(name)
        try:
            quant.check_no_nan(raw, name=self.stored(name))
        except quant.QuantError as e:
            raise CheckpointError(f"{shard.path}: tensor {e}") from None
        return raw, self.read_scale(name, raw.shape, dtype=dtype)

    def iter_tensors(self, dtype=np.float32) -> Iterator[tuple[HFTensorSpec, np.ndarray]]:
        """Every tensor the config needs, in file order, dequantised (one at a time: bounded memory)."""
        for spec in self.specs.values():
            yield spec, self.read(spec.name, dtype)


def load_hf_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, shardings: ShardingSpec = None,
                       weights: str = "dequantized", **config_overrides) -> Transformer:
    """Reads a release-layout checkpoint straight onto the devices, one release tensor (slot) at a time: each
    device's shard of a parameter is assembled from the slots it covers, and a slot is dropped from host memory
    once every device that needs it has its part. mesh / shardings as in k2jax.load_checkpoint.

    weights: "dequantized" (default): every weight dequantised (W = e4m3 x weight_scale_inv per block, or
    (nibble - 8) x weight_scale per group) into cfg.run.param_dtype; "fp8" / "int4": the routed experts stay resident in
    the release's format (k2jax.model.experts: its e4m3 bytes and block scales, or its packed int32 and group
    scales, transposed per slot to [in(/8), out], never dequantised), the other weights as with "dequantized".
    A converted checkpoint (convert_checkpoint.py, k2jax.load_checkpoint) reads faster: each device reads only
    its shard."""
    expert_format_of(weights, "load_hf_checkpoint: weights")
    ckpt = HFCheckpoint(path, **config_overrides)
    ckpt.check()
    cfg = ckpt.config
    graphdef, state = abstract_state(cfg)
    shardings = resolve_shardings(shardings, mesh, nnx.merge(graphdef, state), "load_hf_checkpoint")
    slots: dict[str, dict[tuple[int, ...], HFTensorSpec]] = {}
    for spec in ckpt.specs.values():
        slots.setdefault(param_name(spec.path), {})[spec.index] = spec
    resident = () if weights == "dequantized" else resident_names(
        ckpt.path, {n: None for n in EXPERT_PARAMS if n in slots}, weights)
    for name in resident:
        for spec in slots[name].values():
            if ckpt.stored_format(spec.name) != weights:
                raise CheckpointError(f"{ckpt.shard_path(spec.name)}: tensor {ckpt.stored(spec.name)} is stored as "
                                      f"{ckpt.stored_format(spec.name)}, not {weights.upper()}: weights={weights!r} "
                                      f"needs the release's "
                                      f"{weights.upper()} experts (load it with weights='dequantized')")
    abstract = _flat(nnx.to_pure_dict(state))
    params = {}
    for name, leaf in abstract.items():
        if name not in slots:
            raise CheckpointError(f"{ckpt.path}: no release tensor fills parameter {name}")
        if name not in resident:
            params[name] = _place(tuple(leaf.shape), leaf.dtype, sharding_for(name, leaf.shape, mesh, shardings),
                                  slots[name], lambda spec, slot, dtype=leaf.dtype:
                                  hf_to_k2(spec, ckpt.read(spec.name, np.float32), slot).astype(dtype))
    kept = _resident_arrays(ckpt, slots, resident, weights, abstract, mesh, shardings)
    return with_resident(cfg, params, kept, weights, ckpt.scheme)


def _resident_arrays(ckpt: HFCheckpoint, slots, resident, fmt: str, abstract, mesh, shardings) -> dict[str, tuple]:
    """{expert parameter: (weight, scales)} for weights="fp8" / "int4": the release's e4m3 [.., in, out] and block
    scales [.., Ib, Ob], or packed int32 [.., ceil(in/8), out] and group scales [.., ceil(in/G), out], one slot's
    transpose at a time, the weight with the parameter's sharding, the scales with k2jax.model.experts'
    scale_sharding's."""
    dtype = ckpt.config.run.param_dtype  # the scales must dequantise to finite values of it
    kept = {}
    for name in resident:
        shape = tuple(abstract[name].shape)
        sharding = sharding_for(name, shape, mesh, shardings)
        scales_sharding = scale_sharding(sharding, len(shape), fmt)
        if fmt == "fp8":
            w = _place(shape, quant.E4M3, sharding, slots[name],
                       lambda spec, slot: hf_to_k2(spec, ckpt.read_fp8(spec.name, dtype)[0], slot))
            s = _place(shape[:-2] + quant.scale_shape(shape[-2:]), np.float32, scales_sharding, slots[name],
                       lambda spec, slot: ckpt.read_scale(spec.name, spec.shape, dtype).T)
        else:
            (out, packed), (_, groups) = quant.int4_shapes(shape[:-3:-1], ckpt.scheme.group_size)
            w = _place(shape[:-2] + (packed, out), np.int32, sharding, slots[name],
                       lambda spec, slot: ckpt.read_packed(spec.name).T)
            s = _place(shape[:-2] + (groups, out), np.dtype(ckpt.scheme.scale_dtype), scales_sharding, slots[name],
                       lambda spec, slot: ckpt.read_group_scale(spec.name, dtype).T)
        kept[name] = (w, s)
    return kept


def _place(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding,
           slots: Mapping[tuple[int, ...], HFTensorSpec], read: Callable[[HFTensorSpec, tuple], np.ndarray]):
    """The array of `shape` on `sharding` whose slot at each leading index is read(spec, slot_shape): each device's
    shard assembled from the slots it covers, each slot read once and dropped once its last device has it."""
    n_lead = len(next(iter(slots)))
    slot_shape = shape[n_lead:]
    device_indices = sharding.addressable_devices_indices_map(shape)

    def covered(index) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(*s.indices(n)) for s, n in zip(index[:n_lead], shape[:n_lead]))))

    uses = collections.Counter(lead for index in device_indices.values() for lead in covered(index))
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def shard(index) -> np.ndarray:
        leads, rest = covered(index), tuple(index[n_lead:])
        sizes = tuple(len(range(*s.indices(n))) for s, n in zip(index[:n_lead], shape[:n_lead]))
        parts = []
        for lead in leads:
            if lead not in cache:
                cache[lead] = np.asarray(read(slots[lead], slot_shape))
            parts.append(cache[lead][rest])
            uses[lead] -= 1
            if uses[lead] == 0:
                del cache[lead]
        return np.stack(parts).reshape(sizes + parts[0].shape).astype(dtype, copy=False)

    return jax.make_array_from_callback(shape, sharding, shard)


def _shard_groups(specs: list[HFTensorSpec], num_shards: int) -> list[list[HFTensorSpec]]:
    """Splits specs into `num_shards` contiguous runs, never splitting a layer (the release's scheme)."""
    groups: list[list[HFTensorSpec]] = []
    key = None
    for spec in specs:
        parts = spec.name.split(".")
        k = parts[2] if parts[:2] == ["model", "layers"] else ("embed" if "embed" in spec.name else "head")
        if k != key:
            groups.append([])
            key = k
        groups[-1].append(spec)
    num_shards = max(1, min(num_shards, len(groups)))
    bounds = np.linspace(0, len(groups), num_shards + 1).round().astype(int)
    return [[s for g in groups[a:b] for s in g] for a, b in zip(bounds[:-1], bounds[1:])]


def _layout(spec: HFTensorSpec, dtype: str, scheme: quant.Int4Scheme | None = None
            ) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what `spec` becomes on disk when writing with `dtype` (int4: `scheme` says which
    weights are INT4, their group size and scale / weight_shape dtypes)."""
    kind = release_dtype(spec)
    if dtype == "int4" and int4_quantized(spec, scheme):
        packed, scales = quant.int4_shapes(spec.shape, scheme.group_size)
        return [(spec.name + PACKED_SUFFIX, np.dtype(np.int32), packed),
                (spec.name + GROUP_SCALE_SUFFIX, np.dtype(scheme.scale_dtype), scales),
                (spec.name + SHAPE_SUFFIX, np.dtype(scheme.weight_shape_dtype), (2,))]
    if kind == "fp8" and dtype == "fp8":
        return [(spec.name, quant.E4M3, spec.shape),
                (_scale_name(spec.name), np.dtype(np.float32), quant.scale_shape(spec.shape))]
    if kind == "float32" or (kind == "fp8" and dtype == "float32"):
        return [(spec.name, np.dtype(np.float32), spec.shape)]
    return [(spec.name, np.dtype(quant.ml_dtypes.bfloat16), spec.shape)]


class _Producer:
    """Turns source values into stored arrays one spec at a time; a quantised weight's other tensors (FP8 scale,
    INT4 scale and weight_shape) are produced right after it, from the same quantisation."""

    def __init__(self, specs, source, dtype, scheme):
        self.source, self.dtype, self.scheme = source, dtype, scheme
        self.owner = {entry: spec for spec in specs for entry, _, _ in _layout(spec, dtype, scheme)}
        self.pending: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.pending:
            self.pending.update(self._stored(self.owner[name]))
        return self.pending.pop(name)

    def _stored(self, spec: HFTensorSpec) -> dict[str, np.ndarray]:
        layout = _layout(spec, self.dtype, self.scheme)
        names, stored_dtype = [n for n, _, _ in layout], layout[0][1]
        value = self.source(spec)
        if isinstance(value, tuple):  # already (e4m3, scale) / (packed int32, scale): stored as they are
            q, s = map(np.asarray, value)
            got = "INT4" if q.dtype == np.int32 else "FP8"
            if len(layout) == 1 or (len(layout) == 3) != (got == "INT4"):
                raise CheckpointError(f"tensor {spec.name}: got {got} data but it is written as "
                                      f"{'int4' if len(layout) == 3 else stored_dtype}")
            if got == "FP8":
                return dict(zip(names, (q, s.astype(np.float32))))
            return dict(zip(names, (q, s.astype(layout[1][1]), np.asarray(spec.shape, layout[2][1]))))
        value = np.asarray(value)
        if value.shape != spec.shape:
            raise CheckpointError(f"tensor {spec.name}: expected shape {spec.shape}, got {value.shape}")
        if len(layout) == 3:
            q, s = quant.quantize_int4(value, name=spec.name, group_size=self.scheme.group_size,
                                       scale_dtype=layout[1][1])
            return dict(zip(names, (q, s, np.asarray(spec.shape, layout[2][1]))))
        if len(layout) == 2:
            return dict(zip(names, quant.quantize(value, name=spec.name)))
        return {spec.name: np.asarray(value, np.float32).astype(stored_dtype)}


def write_hf_checkpoint(out_dir: str | os.PathLike, cfg: K2Config,
                        tensors: Mapping[str, np.ndarray] | Callable[[HFTensorSpec], Any], *,
                        dtype: str = "fp8", num_shards: int | None = None,
                        scheme: quant.Int4Scheme | None = None) -> None:
    """Writes the release layout. `tensors` maps release names to float arrays, or is a function
    spec -> float array, or -> (e4m3 array, scale) / (int32 weight_packed, weight_scale) for a weight already in
    FP8 / INT4 (stored bit for bit). With dtype="fp8" matmuls are quantised (scale = block amax / 448); with "int4"
    the weights `scheme` makes INT4 (default: K2-Thinking's, the routed experts in groups of 32) are quantised by
    quant.quantize_int4 and config.json carries the scheme's quantization_config; "bfloat16" / "float32" store
    them as they are. One tensor is in memory at a time; `out_dir` must not exist and appears only once complete."""
    if dtype not in _STORE_DTYPES:
        raise CheckpointError(f"write_hf_checkpoint: dtype must be one of {_STORE_DTYPES}, got {dtype!r}")
    if dtype == "int4" and scheme is None:
        scheme = quant.parse_quantization_config(quant.K2_INT4_QUANTIZATION_CONFIG)
    out_dir = local_path(out_dir)
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir}: already exists; refusing to overwrite")
    specs = hf_tensor_specs(cfg)
    if isinstance(tensors, Mapping):
        check_names(cfg, tensors.keys(), specs)
        mapping = tensors
        tensors = lambda spec: mapping[spec.name]  # noqa: E731
    produce = _Producer(specs, tensors, dtype, scheme)
    shards = _shard_groups(specs, num_shards or cfg.num_hidden_layers + 1)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    os.makedirs(tmp)
    try:
        weight_map, total = {}, 0
        for i, group in enumerate(tqdm(shards, desc="write shards", unit="shard", disable=len(shards) < 8), 1):
            file = f"model-{i:05d}-of-{len(shards):06d}.safetensors"
            layout = [entry for spec in group for entry in _layout(spec, dtype, scheme)]
            total += write_safetensors_streaming(os.path.join(tmp, file), layout, produce, metadata={"format": "pt"})
            weight_map.update({name: file for name, _, _ in layout})
        hf_config = cfg.to_hf()
        if dtype == "fp8":
            hf_config["quantization_config"] = dict(quant.FP8_QUANTIZATION_CONFIG)
        elif dtype == "int4":
            hf_config["quantization_config"] = scheme.config
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
