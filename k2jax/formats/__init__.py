"""The release's weight formats, independent of the model: FP8 128x128 blocks and compressed-tensors INT4 groups,
with the quantization_config parser (quant.py), and how a matmul weight is laid out in the release and in k2jax
(weight_layout.py)."""
