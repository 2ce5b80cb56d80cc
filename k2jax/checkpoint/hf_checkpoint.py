"""The HF release's on-disk layout: config.json, model.safetensors.index.json and N safetensors shards.

    ckpt = HFCheckpoint("Kimi-K2-Instruct/")      # validates config, index and every shard header at open
    ckpt.check()                                  # every tensor the config needs, no others, right shapes/dtypes
    w = ckpt.read("model.layers.3.mlp.experts.17.down_proj.weight")   # dequantised float32 [D, F]
    model = load_hf_checkpoint("dir/", mesh=mesh, shardings="ep_fsdp", weights="fp8")   # streamed onto devices

    write_hf_checkpoint("out/", cfg, tensors, dtype="fp8")   # release-named arrays -> the release layout

Release dtypes (hf_mapping.release_dtype): FP8 e4m3 with a float32 `weight_scale_inv` per 128x128 block for
attention / dense-MLP / expert matmuls, BF16 for embeddings, lm_head, norms and the router gate, F32 for
e_score_correction_bias. `write_hf_checkpoint(dtype="bfloat16" | "float32")` stores the matmuls unquantised.

Every problem is reported in one line naming the file and tensor: a missing shard, a truncated or corrupt
header, a tensor the index lists but its shard lacks, a missing or unexpected tensor, a wrong shape or dtype, a
missing, non-finite, non-positive or too large scale (weights that would dequantise to inf), an e4m3 NaN, a
config that does not match the weights. The writer builds the whole directory under a temporary name and renames
it into place at the end.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from k2jax.checkpoint.format import CheckpointError
from k2jax.checkpoint.hf_mapping import (
    SCALE_SUFFIX,
    HFTensorSpec,
    check_names,
    hf_tensor_specs,
    hf_to_k2,
    is_mtp_tensor,
    release_dtype,
)
from k2jax.checkpoint.orbax_checkpoint import _flat, _unflat_like, abstract_state, check_weights, resident_names
from k2jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors_streaming
from k2jax.checkpoint.shardings import ShardingSpec, resolve_shardings, sharding_for
from k2jax.formats import quant
from k2jax.model.config import K2Config
from k2jax.model.fp8_experts import EXPERT_PARAMS, resident_experts, scale_sharding
from k2jax.model.transformer import Transformer, param_name

INDEX = "model.safetensors.index.json"
_STORE_DTYPES = ("fp8", "bfloat16", "float32")


def _scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


class HFCheckpoint:
    def __init__(self, path: str | os.PathLike, **config_overrides):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: no such directory")
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (a release checkpoint is a directory with "
                                  f"config.json, {INDEX} and the shards)")
        self.config = K2Config.from_hf(os.path.join(self.path, "config.json"), **config_overrides)
        self.weight_map = self._read_index()
        self._files: dict[str, SafetensorsFile] = {}
        for file in sorted(set(self.weight_map.values())):
            self._open(file)
        self.specs = {s.name: s for s in hf_tensor_specs(self.config)}

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
                listed = sorted(n for n, f in self.weight_map.items() if f == file)
                raise CheckpointError(f"{path}: missing shard (the index lists {len(listed)} tensor(s) in it, "
                                      f"e.g. {listed[0]})")
            try:
                self._files[file] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        return self._files[file]

    def _file_of(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: the index has no tensor {name}")
        shard = self._open(self.weight_map[name])
        if name not in shard:
            raise CheckpointError(f"{shard.path}: tensor {name} is listed in {INDEX} but absent from the shard")
        return shard

    def check(self) -> None:
        """Validates names, shapes and dtypes of every tensor against the config (reads headers only)."""
        check_names(self.config, self.weight_map, list(self.specs.values()), source=self.path, fp8_scales=True)
        scales = {n for n in self.weight_map if n.endswith(SCALE_SUFFIX)}
        for spec in self.specs.values():
            self._check_tensor(spec)
        orphans = sorted(s for s in scales
                         if s[: -len(SCALE_SUFFIX)] not in self.specs and not is_mtp_tensor(s, self.config))
        if orphans:
            raise CheckpointError(f"{self.path}: scale(s) for no known weight, e.g. {orphans[:3]}")

    def check_scales(self, dtype=np.float32) -> None:
        """Reads every FP8 scale (about 1/16000 of the weights) and checks it is finite, positive and small enough
        that the weights it dequantises to `dtype` are finite (quant.check_scale)."""
        for name, spec in self.specs.items():
            scale = _scale_name(name)
            if scale in self.weight_map:
                self.read_scale(name, spec.shape, dtype=dtype)

    def _scale_file(self, name: str) -> tuple[str, SafetensorsFile]:
        """(scale tensor name, its shard) for FP8 weight `name`; an error naming both if the scale is missing."""
        scale = _scale_name(name)
        if scale not in self.weight_map:
            raise CheckpointError(f"{self._file_of(name).path}: tensor {name} is float8 but {scale} is missing")
        return scale, self._file_of(scale)

    def read_scale(self, name: str, weight_shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
        """The float32 block scale of FP8 weight `name`, checked (shape, finite, > 0, dequantises to finite values
        of `dtype`)."""
        scale, f = self._scale_file(name)
        try:
            return quant.check_scale(f.read(scale), weight_shape, name=name, dtype=dtype)
        except quant.QuantError as e:
            raise CheckpointError(f"{f.path}: tensor {e}") from None

    def _check_tensor(self, spec: HFTensorSpec) -> None:
        shard = self._file_of(spec.name)
        shape, dtype = shard.shape(spec.name), shard.dtype(spec.name)
        if shape != spec.shape:
            raise CheckpointError(f"{shard.path}: tensor {spec.name}: shape {list(shape)}, config.json implies "
                                  f"{list(spec.shape)}")
        if dtype == quant.E4M3:
            if release_dtype(spec) != "fp8":
                raise CheckpointError(f"{shard.path}: tensor {spec.name}: float8 where the release stores "
                                      f"{release_dtype(spec)}")
            scale, scale_file = self._scale_file(spec.name)
            want = quant.scale_shape(spec.shape)
            if scale_file.shape(scale) != want:
                raise CheckpointError(f"{scale_file.path}: tensor {scale}: shape {list(scale_file.shape(scale))}, "
                                      f"expected {list(want)} for {spec.name} {list(spec.shape)}")
        elif not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
            raise CheckpointError(f"{shard.path}: tensor {spec.name}: dtype {dtype} is not a float type")

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        """One release tensor, dequantised when stored as FP8, cast to `dtype`."""
        shard = self._file_of(name)
        array = shard.read(name)
        if array.dtype == quant.E4M3:
            array, scale = self.read_fp8(name, dtype)
            return quant.dequantize(array, scale, dtype, name=name)
        return array.astype(dtype)

    def stored_nbytes(self, name: str) -> int:
        """Bytes a tensor takes on disk, its FP8 scale included (headers only)."""
        def size(n):
            f = self._file_of(n)
            return int(np.prod(f.shape(n))) * f.dtype(n).itemsize
        scale = _scale_name(name)
        return size(name) + (size(scale) if scale in self.weight_map else 0)

    def read_raw(self, name: str) -> np.ndarray:
        """One tensor exactly as stored (FP8 stays FP8)."""
        return self._file_of(name).read(name)

    def stored_dtype(self, name: str) -> np.dtype:
        """A tensor's dtype on disk (header only)."""
        return self._file_of(name).dtype(name)

    def read_fp8(self, name: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """An FP8 weight exactly as stored and its block scale, both checked so that the weight dequantises to
        finite values of `dtype`: no e4m3 NaN, every scale finite, > 0 and at most quant.max_scale(dtype)."""
        shard = self._file_of(name)
        raw = shard.read(name)
        try:
            quant.check_no_nan(raw, name=name)
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

    weights: "dequantized" (default): every weight dequantised (W = e4m3 x weight_scale_inv per block) into
    cfg.param_dtype; "fp8": the routed experts stay FP8-resident (k2jax.model.fp8_experts: the release's e4m3 bytes and
    block scales, transposed per slot to [in, out], never dequantised), the other weights as with "dequantized".
    A converted checkpoint (convert_checkpoint.py, k2jax.load_checkpoint) reads faster: each device reads only
    its shard."""
    check_weights(weights, "load_hf_checkpoint")
    ckpt = HFCheckpoint(path, **config_overrides)
    ckpt.check()
    cfg = ckpt.config
    graphdef, state = abstract_state(cfg)
    shardings = resolve_shardings(shardings, mesh, nnx.merge(graphdef, state), "load_hf_checkpoint")
    slots: dict[str, dict[tuple[int, ...], HFTensorSpec]] = {}
    for spec in ckpt.specs.values():
        slots.setdefault(param_name(spec.path), {})[spec.index] = spec
    resident = resident_names(ckpt.path, {n: None for n in EXPERT_PARAMS if n in slots}) if weights == "fp8" else ()
    for name in resident:
        for spec in slots[name].values():
            if ckpt.stored_dtype(spec.name) != quant.E4M3:
                raise CheckpointError(f"{ckpt._file_of(spec.name).path}: tensor {spec.name} is stored as "
                                      f"{ckpt.stored_dtype(spec.name)}, not FP8: weights='fp8' needs the release's "
                                      f"FP8 experts (load it with weights='dequantized')")
    abstract = _flat(nnx.to_pure_dict(state))
    params, kept = {}, {}
    for name, leaf in abstract.items():
        if name not in slots:
            raise CheckpointError(f"{ckpt.path}: no release tensor fills parameter {name}")
        shape, sharding = tuple(leaf.shape), sharding_for(name, leaf.shape, mesh, shardings)
        if name in resident:  # e4m3 [.., in, out] and its scales [.., Kb, Nb], one slot's transpose at a time
            w = _place(shape, quant.E4M3, sharding, slots[name],
                       lambda spec, slot: hf_to_k2(spec, ckpt.read_fp8(spec.name, cfg.param_dtype)[0], slot))
            scales_shape = shape[:-2] + quant.scale_shape(shape[-2:])
            s = _place(scales_shape, np.float32, scale_sharding(sharding, len(shape)), slots[name],
                       lambda spec, slot: ckpt.read_scale(spec.name, spec.shape, cfg.param_dtype).T)
            params[name] = w  # holds the Param's slot until resident_experts replaces the experts
            kept[name] = (w, s)
        else:
            params[name] = _place(shape, leaf.dtype, sharding, slots[name], lambda spec, slot, dtype=leaf.dtype:
                                  hf_to_k2(spec, ckpt.read(spec.name, np.float32), slot).astype(dtype))
    nnx.replace_by_pure_dict(state, _unflat_like(nnx.to_pure_dict(state), params))
    model = nnx.merge(graphdef, state)
    return resident_experts(model, kept) if kept else model


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


def _layout(spec: HFTensorSpec, dtype: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what `spec` becomes on disk when writing with `dtype`."""
    kind = release_dtype(spec)
    if kind == "fp8" and dtype == "fp8":
        return [(spec.name, quant.E4M3, spec.shape),
                (_scale_name(spec.name), np.dtype(np.float32), quant.scale_shape(spec.shape))]
    if kind == "float32" or (kind == "fp8" and dtype == "float32"):
        return [(spec.name, np.dtype(np.float32), spec.shape)]
    return [(spec.name, np.dtype(quant.ml_dtypes.bfloat16), spec.shape)]


class _Producer:
    """Turns source values into stored arrays one spec at a time; an FP8 weight's scale is produced right after
    it, from the same quantisation."""

    def __init__(self, specs, source, dtype):
        self.specs, self.source, self.dtype = {s.name: s for s in specs}, source, dtype
        self.pending_scale: tuple[str, np.ndarray] | None = None

    def __call__(self, name: str) -> np.ndarray:
        if self.pending_scale is not None and self.pending_scale[0] == name:
            scale, self.pending_scale = self.pending_scale[1], None
            return scale
        spec = self.specs[name]
        value = self.source(spec)
        (_, stored_dtype, _), *scale = _layout(spec, self.dtype)
        if isinstance(value, tuple):  # already (e4m3, scale): stored as they are
            if not scale:
                raise CheckpointError(f"tensor {name}: got FP8 data but it is written as {stored_dtype}")
            q, s = value
            self.pending_scale = (scale[0][0], np.asarray(s, np.float32))
            return np.asarray(q)
        value = np.asarray(value)
        if value.shape != spec.shape:
            raise CheckpointError(f"tensor {name}: expected shape {spec.shape}, got {value.shape}")
        if scale:
            q, s = quant.quantize(value, name=name)
            self.pending_scale = (scale[0][0], s)
            return q
        return np.asarray(value, np.float32).astype(stored_dtype)


def write_hf_checkpoint(out_dir: str | os.PathLike, cfg: K2Config,
                        tensors: Mapping[str, np.ndarray] | Callable[[HFTensorSpec], Any], *,
                        dtype: str = "fp8", num_shards: int | None = None) -> None:
    """Writes the release layout. `tensors` maps release names to float arrays, or is a function
    spec -> float array, or -> (e4m3 array, scale) for a weight already in FP8 (stored bit for bit). With
    dtype="fp8" matmuls are quantised (scale = block amax / 448); "bfloat16" / "float32" store them as they are.
    One tensor is in memory at a time; `out_dir` must not exist and appears only once complete."""
    if dtype not in _STORE_DTYPES:
        raise CheckpointError(f"write_hf_checkpoint: dtype must be one of {_STORE_DTYPES}, got {dtype!r}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir}: already exists; refusing to overwrite")
    specs = hf_tensor_specs(cfg)
    if isinstance(tensors, Mapping):
        check_names(cfg, tensors.keys(), specs)
        mapping = tensors
        tensors = lambda spec: mapping[spec.name]  # noqa: E731
    produce = _Producer(specs, tensors, dtype)
    shards = _shard_groups(specs, num_shards or cfg.num_hidden_layers + 1)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    os.makedirs(tmp)
    try:
        weight_map, total = {}, 0
        for i, group in enumerate(tqdm(shards, desc="write shards", unit="shard", disable=len(shards) < 8), 1):
            file = f"model-{i:05d}-of-{len(shards):06d}.safetensors"
            layout = [entry for spec in group for entry in _layout(spec, dtype)]
            total += write_safetensors_streaming(os.path.join(tmp, file), layout, produce, metadata={"format": "pt"})
            weight_map.update({name: file for name, _, _ in layout})
        hf_config = cfg.to_hf()
        if dtype == "fp8":
            hf_config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                "weight_block_size": [quant.BLOCK, quant.BLOCK]}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
