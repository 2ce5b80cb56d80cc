"""A multi-turn chat for notebooks: the release's chat template, streaming replies, tool calls, the latent cache
kept between turns.

    chat = k2jax.Chat(model, tokenizer, sampling=k2jax.Sampling(temperature=0.6), max_new_tokens=256, tools=tools)
    reply = chat.send("What is MLA?")        # prints the reply as it is generated; a ParsedReply
    reply.content, reply.tool_calls          # the text, and [ToolCall(id, name, arguments)] if K2 called tools
    chat.send({"role": "tool", "tool_call_id": reply.tool_calls[0].id, "name": "get_weather", "content": "Sunny"})
    for piece in chat.stream("Shorter?"):    # or take the text pieces yourself; then chat.last_reply
        ...
    chat.messages                            # [{"role": "user", ...}, {"role": "assistant", ...}, ...]
    chat.reset()

Every turn renders the whole conversation with the tokenizer's chat template (exactly the prompt the release
would build) and runs only what the cache does not hold yet: when the cached tokens are a prefix of the new
prompt, just the rest (the new messages and the assistant header), otherwise the whole prompt again (e.g. after
an edit of `messages`, or when a reply does not re-encode to the ids that were generated).
`reused_tokens` says how many prompt tokens the last turn took from the cache. The cache has max_context slots
(default 4096; up to the model's 128K / 256K positions: a long prompt is prefilled in chunks of prefill_chunk tokens,
k2jax.inference.generate.Generator);
a conversation that would outgrow it fails before generating with a message saying so. If a turn is interrupted
(e.g. a notebook KeyboardInterrupt), the partial reply is dropped and the next turn re-reads the conversation.

Replies are parsed for K2 tool calls while they stream (k2jax.inference.tool_calls): the text outside the tool-call
section streams, the calls come in the returned ParsedReply, and the assistant message keeps them as "tool_calls" so the
template renders them back."""

from __future__ import annotations

import sys
from typing import Any, Iterator, Mapping, Sequence

from k2jax.inference.generate import Generator, Sampling
from k2jax.inference.tokenizer import StreamDecoder, Tokenizer
from k2jax.inference.tool_calls import MARKERS, ParsedReply, ToolCallParser
from k2jax.model.transformer import Transformer


class Chat:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, system: str | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None, sampling: Sampling = Sampling(),
                 max_new_tokens: int = 512, max_context: int | None = None, seed: int = 0,
                 prefill_chunk: int | None = None):
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                             f"{model.cfg.vocab_size}")
        self.tokenizer, self.sampling, self.max_new_tokens, self.seed = tokenizer, sampling, max_new_tokens, seed
        self.tools = list(tools) if tools else None
        self.max_context = min(max_context or 4096, model.cfg.max_position_embeddings)
        self.generator = Generator(model, prefill_chunk=prefill_chunk)
        self.system = system
        self._markers = {tokenizer.special_tokens[m]: m for m in MARKERS if m in tokenizer.special_tokens}
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (keeps the compiled functions)."""
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self._cache, self._cached_ids, self._turn = None, [], 0
        self.last_reply: ParsedReply | None = None
        self.reused_tokens = 0

    def stream(self, message: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Iterator[str]:
        """Adds a message (text is a user message; or a message dict, e.g. a tool result {"role": "tool",
        "tool_call_id", "name"?, "content"}; or a list of them) and yields the assistant's reply text as it is
        generated (tool-call sections are not shown). The parsed reply is then in `last_reply`."""
        tok = self.tokenizer
        new = _as_messages(message)
        prompt = tok.apply_chat_template(self.messages + new, tools=self.tools, add_generation_prompt=True)
        cache, self._cache = self._cache, None  # donated to the generator; restored only when the turn completes
        cached = len(self._cached_ids)
        if cache is not None and len(prompt) > cached and prompt[:cached] == self._cached_ids:
            feed, self.reused_tokens = prompt[cached:], cached
        else:
            cache, feed, self.reused_tokens = None, prompt, 0
        steps = self.generator.stream([feed], max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                      stop_tokens=[tok.eos_id], seed=self.seed + self._turn, cache=cache,
                                      max_len=self.max_context)
        generated: list[int] = []
        decoder, parser = StreamDecoder(tok), ToolCallParser(markers_in_text=False)
        for step in steps:  # one row: the generator ends by itself after the stop token, handing back the cache
            token = int(step[0])
            generated.append(token)
            if token == tok.eos_id:
                continue
            if token in self._markers:
                shown = parser.feed(decoder.flush()) + parser.feed_marker(self._markers[token])
            else:
                shown = parser.feed(decoder.push(token))
            if shown:
                yield shown
        tail = parser.feed(decoder.flush()) + parser.close()
        if tail:
            yield tail
        self._cache = self.generator.last_cache
        self._cached_ids = prompt + generated[:-1]  # the last sampled token is not in the cache
        self.last_reply = parser.reply
        self.messages += new + [self.last_reply.to_message()]
        self._turn += 1

    def send(self, message: str | Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
             stream: bool = True) -> ParsedReply:
        """Adds a message (see `stream`) and returns the parsed reply: .content (text), .tool_calls, .error.
        With `stream`, prints the text as it comes, then one line per tool call."""
        for piece in self.stream(message):
            if stream:
                print(piece, end="", flush=True)
        reply = self.last_reply
        if stream:
            for call in reply.tool_calls:
                print(f"\n[tool call {call.id}: {call.name}({call.raw_arguments})]", end="")
            if reply.error:
                print(f"\n[{reply.error}]", end="")
            print(file=sys.stdout, flush=True)
        return reply


def _as_messages(message: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(message, str):
        return [{"role": "user", "content": message}]
    if isinstance(message, Mapping):
        return [dict(message)]
    if isinstance(message, Sequence) and message and all(isinstance(m, Mapping) for m in message):
        return [dict(m) for m in message]
    raise ValueError(f"Chat: send text, a message dict or a list of them, got {message!r:.80}")
