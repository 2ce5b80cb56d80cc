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

from k2jax.checkpoint.hf_checkpoint import HFCheckpoint, load_hf_checkpoint, write_hf_checkpoint
from k2jax.checkpoint.hf_mapping import from_hf_tensors, to_hf_tensors
from k2jax.checkpoint.orbax_checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from k2jax.inference.chat import Chat
from k2jax.inference.chat_template import ChatTemplateError
from k2jax.inference.generate import Completion, Generator, LatentCache, Sampling, generate
from k2jax.inference.tokenizer import Tokenizer, TokenizerError
from k2jax.inference.tool_calls import ParsedReply, ToolCall, ToolCallParser, parse_tool_calls
from k2jax.model.config import ConfigError, K2Config, YarnScaling
from k2jax.model.experts import RoutedExperts, quantize_experts
from k2jax.model.placement import init_sharded, shard_model
from k2jax.model.transformer import Transformer, param_info

__all__ = ["K2Config", "YarnScaling", "ConfigError", "Transformer", "from_hf_tensors", "to_hf_tensors",
           "CheckpointError", "HFCheckpoint", "load_hf_checkpoint", "write_hf_checkpoint", "load_checkpoint",
           "save_checkpoint", "param_info", "Generator", "Sampling", "LatentCache", "Completion", "generate",
           "Tokenizer", "TokenizerError", "ChatTemplateError", "parse_tool_calls", "ToolCallParser", "ToolCall",
           "ParsedReply", "Chat", "init_sharded", "shard_model", "RoutedExperts", "quantize_experts"]
