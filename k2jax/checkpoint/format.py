"""What a k2jax checkpoint is on disk, how a reader knows it is complete and undamaged, and `CheckpointError`,
the one error every checkpoint reader and writer raises (k2jax's own checkpoints and the HF release alike).

    ckpt/k2jax.json     {"format", "config" (HF config.json dict of the text model), "dtype" (bfloat16 | float32 |
                         fp8 | int4), "params" {name: {"shape", "dtype"}}, and when converted from a release
                         "quantization" (int4: the release's scheme, k2jax.formats.quant.Int4Scheme.to_json: its
                         quantization_config, group size, scale and weight_shape dtypes: what the export needs to
                         write the release back) and "multimodal" (a K2.5-layout release's settings outside its
                         text model: vision_config, media ids, ...; the vision tower itself is not converted)}
    ckpt/state/<name>/  one zarr3 array per stored array (Orbax's PyTreeCheckpointHandler, no OCDBT), named by
                        the parameter's path in `nnx.state(Transformer)` ("moe_blocks.mlp.experts.down_proj")

Each array holds its release tensor exactly as the release stores it: matmul weights [*lead, out, in]
(`k2jax.formats.weight_layout`), stacked MoE layers (and experts) first. FP8 checkpoints (dtype "fp8") store every
matmul the release stores in FP8 as its e4m3 tensor with its block scales under `fp8_scales.<name>`
([..., ceil(out/128), ceil(in/128)], the release's grid); embeddings, norms and the router stay BF16 and the
router bias F32, as released. INT4 checkpoints (dtype "int4") store every matmul the release stores as INT4 groups
(the routed experts) as its int32 weight_packed [..., out, ceil(in/8)] with its group scales under
`int4_scales.<name>` ([..., out, ceil(in/G)], the release's dtype, bfloat16); weight_shape is not stored (the
config gives it; its dtype is in "quantization"); everything else BF16 / F32 as released.

A checkpoint directory is complete when `k2jax.json` is in it: writers put it there last, after everything else
is on disk. Readers (`load_checkpoint`, `CheckpointReader`, so `init_from` and the export too) first check that
every chunk file of every array is there (`check_chunks`): tensorstore reads a missing chunk as the fill value, so
a lost file would otherwise load or export as zeros. A missing chunk is a CheckpointError naming the array and
the chunk.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Any, Mapping

import orbax.checkpoint as ocp
from absl import logging as absl_logging

from k2jax.model.config import K2Config

FORMAT = "k2jax-orbax-v2"  # v2: matmul weights in the release's [out, in] orientation
METADATA = "k2jax.json"
STATE_DIR = "state"
SCALES = "fp8_scales"
INT4_SCALES = "int4_scales"
DTYPES = ("bfloat16", "float32", "fp8", "int4")
QUANTIZED = ("fp8", "int4")  # checkpoint dtypes whose matmuls stay quantised (they load as bfloat16 by default)


class CheckpointError(ValueError):
    """A checkpoint (k2jax's or the release's) or tensor set that is missing, damaged, or does not match the config
    it is loaded for."""


def local_path(path: str | os.PathLike) -> str:
    """A path argument in one spelling, as every reader and writer uses it: `~` expanded, trailing and doubled
    slashes dropped ("out/" -> "out": a writer's temporary `out.partial...` then sits beside it, not inside it).
    "" and URLs (gs://...) are left as they are."""
    path = os.fspath(path)
    if not path or "://" in path:
        return path
    return os.path.normpath(os.path.expanduser(path))


def checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True))


def save_tree(path: str, tree: dict) -> None:
    """Orbax's save, without its warning that there are no OCDBT files to merge (this format has none) unless
    INFO logs were asked for."""
    logger = absl_logging.get_absl_logger()
    level = logger.level
    if logger.getEffectiveLevel() >= logging.WARNING:
        logger.setLevel(logging.ERROR)
    try:
        checkpointer().save(path, tree)
    finally:
        logger.setLevel(level)


def nest(flat: Mapping[str, Any]) -> dict:
    """{"a.b.0.c": x} -> {"a": {"b": {"0": {"c": x}}}} (the tree Orbax saves; its array dirs are the flat names)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def metadata(cfg: K2Config, dtype: str, shapes: Mapping[str, tuple[tuple[int, ...], str]], *,
             quantization: Mapping | None = None, multimodal: Mapping | None = None) -> dict:
    meta = {"format": FORMAT, "config": cfg.to_hf(), "dtype": dtype,
            "params": {n: {"shape": list(s), "dtype": d} for n, (s, d) in shapes.items()}}
    if quantization is not None:
        meta["quantization"] = dict(quantization)
    if multimodal is not None:
        meta["multimodal"] = dict(multimodal)
    return meta


def write_metadata(path: str, meta: dict) -> None:
    """Writes k2jax.json atomically (temp + fsync + rename): from then on the checkpoint counts as complete."""
    tmp = os.path.join(path, METADATA + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, METADATA))


def read_metadata(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    meta_path = os.path.join(path, METADATA)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path}: no {METADATA}: not a k2jax checkpoint, or an incomplete one")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, this k2jax reads {FORMAT!r} (convert the "
                              f"release again with this version)")
    return meta


def check_chunks(path: str | os.PathLike) -> None:
    """Every chunk file of every array of the checkpoint at `path` exists; else a CheckpointError naming the
    array and the chunk (tensorstore would read the missing chunk as zeros). Lists each array's files once."""
    path = os.fspath(path)
    for name in read_metadata(path)["params"]:
        array_dir = os.path.join(path, STATE_DIR, name)
        try:
            with open(os.path.join(array_dir, "zarr.json")) as f:
                zarr = json.load(f)
            shape, chunk = zarr["shape"], zarr["chunk_grid"]["configuration"]["chunk_shape"]
            encoding = zarr.get("chunk_key_encoding", {"name": "default"})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: array {name}: unreadable {os.path.join(array_dir, 'zarr.json')} "
                                  f"({e!r}): the checkpoint is damaged") from None
        separator = encoding.get("configuration", {}).get("separator", "/" if encoding["name"] == "default" else ".")
        existing = {os.path.relpath(os.path.join(root, file), array_dir).replace(os.sep, "/")
                    for root, _, files in os.walk(array_dir) for file in files}
        for index in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunk))):
            parts = [str(i) for i in index]
            key = separator.join(["c", *parts]) if encoding["name"] == "default" else separator.join(parts) or "0"
            if key not in existing:
                raise CheckpointError(f"{path}: array {name}: chunk {list(index)} ({STATE_DIR}/{name}/{key}) is "
                                      f"missing: the checkpoint is damaged (convert or save it again)")
