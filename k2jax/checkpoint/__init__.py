"""Checkpoints on disk: the release's safetensors layout and k2jax's Orbax checkpoints.

    safetensors_io.py  validated host-side .safetensors reader / writer
    hf_mapping.py      release tensor names <-> the parameter tree (the one table); from_hf_tensors / to_hf_tensors
    hf_checkpoint.py   the release directory: HFCheckpoint (validated reader), load_hf_checkpoint (streamed onto a
                       mesh), write_hf_checkpoint
    format.py          what a k2jax checkpoint is on disk (k2jax.json, arrays, scales), check_chunks, CheckpointError
    orbax_checkpoint.py  save_checkpoint / load_checkpoint onto any mesh
    shardings.py       where each stored array lands on the mesh at load
    stream.py          StreamingWriter / CheckpointReader: a checkpoint slot by slot
    convert.py         release <-> k2jax checkpoint, streamed and resumable (its command: k2jax.tools.convert)
"""
