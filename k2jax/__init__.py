"""k2jax: Kimi K2 in JAX (Flax NNX).

    cfg = k2jax.K2Config.from_hf("config.json")      # or k2jax.model.config.kimi_k2(), tiny(), ...
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens_BT)                        # [B, T, V] float32
    model = k2jax.from_hf_tensors(cfg, tensors)      # {release tensor name: dequantised array}
    model = k2jax.load_hf_checkpoint("dir/", mesh=mesh, shardings="ep_fsdp")   # the release layout, streamed
    model = k2jax.load_checkpoint("k2-bf16", mesh=mesh, shardings="ep_fsdp")   # a converted (Orbax) checkpoint
    model = k2jax.load_checkpoint("k2-fp8", mesh=mesh, shardings="ep_fsdp", weights="fp8")  # FP8-resident experts
    model = k2jax.quantize_experts(model, "fp8")     # a loaded model's routed experts -> FP8 (or "int4"), in place
    outs = k2jax.Generator(model).generate(prompts, max_new_tokens=64, sampling=k2jax.Sampling(temperature=0.6))
    chat = k2jax.Chat(model, k2jax.Tokenizer.from_dir("Kimi-K2-Instruct")); chat.send("Hello")
    reply = k2jax.parse_tool_calls(outs[0], tokenizer)   # K2 tool calls in generated ids or text
"""

import importlib

# where each public name lives. `import k2jax` imports none of them, so a command can quiet the libraries' start-up
# before jax is imported (k2jax/tools/startup.py); the first public name used imports them all, as `import k2jax`
# used to (k2jax.model.placement, ... are there after it)
_PUBLIC = {
    "k2jax.checkpoint.hf_checkpoint": ("HFCheckpoint", "load_hf_checkpoint", "write_hf_checkpoint"),
    "k2jax.checkpoint.hf_mapping": ("from_hf_tensors", "to_hf_tensors"),
    "k2jax.checkpoint.orbax_checkpoint": ("CheckpointError", "load_checkpoint", "save_checkpoint"),
    "k2jax.inference.chat": ("Chat",),
    "k2jax.inference.chat_template": ("ChatTemplateError",),
    "k2jax.inference.generate": ("Completion", "Generator", "LatentCache", "Sampling", "generate"),
    "k2jax.inference.tokenizer": ("Tokenizer", "TokenizerError"),
    "k2jax.inference.tool_calls": ("ParsedReply", "ToolCall", "ToolCallParser", "parse_tool_calls"),
    "k2jax.model.config": ("ConfigError", "K2Config", "YarnScaling"),
    "k2jax.model.experts": ("RoutedExperts", "quantize_experts"),
    "k2jax.model.placement": ("init_sharded", "shard_model"),
    "k2jax.model.transformer": ("Transformer", "param_info"),
}


def __getattr__(name: str):
    """The public names and subpackages, imported on first use."""
    if not name.startswith("__"):
        for module, names in _PUBLIC.items():
            imported = importlib.import_module(module)
            globals().update({n: getattr(imported, n) for n in names})
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module 'k2jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {n for names in _PUBLIC.values() for n in names})


__all__ = ["K2Config", "YarnScaling", "ConfigError", "Transformer", "from_hf_tensors", "to_hf_tensors",
           "CheckpointError", "HFCheckpoint", "load_hf_checkpoint", "write_hf_checkpoint", "load_checkpoint",
           "save_checkpoint", "param_info", "Generator", "Sampling", "LatentCache", "Completion", "generate",
           "Tokenizer", "TokenizerError", "ChatTemplateError", "parse_tool_calls", "ToolCallParser", "ToolCall",
           "ParsedReply", "Chat", "init_sharded", "shard_model", "RoutedExperts", "quantize_experts"]
