"""Inference: generate.py (LatentCache, Generator, sampling), tokenizer.py, chat_template.py (the release's own
template), tool_calls.py (K2's tool-call sections), chat.py (multi-turn Chat over a kept cache)."""
