"""The release's weight formats, independent of the model: FP8 128x128 blocks (quant.py) and how a matmul weight
is laid out in the release and in k2jax (weight_layout.py)."""
