"""A multi-turn chat for notebooks: the K2 chat template, streaming replies, the latent cache kept between turns.

    chat = k2jax.Chat(model, tokenizer, sampling=k2jax.Sampling(temperature=0.6), max_new_tokens=256)
    reply = chat.send("What is MLA?")        # prints the reply as it is generated and returns it
    for piece in chat.stream("Shorter?"):    # or take the pieces yourself
        ...
    chat.messages                            # [{"role": "user", ...}, {"role": "assistant", ...}, ...]
    chat.reset()

Each turn runs only the new tokens (the user's message and the assistant header) over the cached conversation,
so a turn costs its own length, not the conversation's. The cache has max_context slots; a conversation that
would outgrow it fails before generating with a message saying so. If a turn is interrupted (e.g. a notebook
KeyboardInterrupt), the partial reply is dropped and the next turn re-reads the conversation from `messages`.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

from k2jax.generate import Generator, Sampling
from k2jax.model import Transformer
from k2jax.tokenizer import StreamDecoder, Tokenizer


class Chat:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, system: str | None = None,
                 sampling: Sampling = Sampling(), max_new_tokens: int = 512, max_context: int | None = None,
                 seed: int = 0):
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                             f"{model.cfg.vocab_size}")
        self.tokenizer, self.sampling, self.max_new_tokens, self.seed = tokenizer, sampling, max_new_tokens, seed
        self.max_context = min(max_context or 4096, model.cfg.max_position_embeddings)
        self.generator = Generator(model)
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (keeps the compiled functions)."""
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self._cache, self._pending, self._turn = None, [], 0

    def stream(self, text: str) -> Iterator[str]:
        """Adds a user message and yields the assistant's reply as text pieces while it is generated."""
        tok = self.tokenizer
        user = {"role": "user", "content": text}
        if self._cache is None:  # first turn, or after an interruption: render the whole conversation
            new_ids = tok.apply_chat_template(self.messages + [user], add_generation_prompt=True)
        else:
            new_ids = self._pending + tok.apply_chat_template([user], add_generation_prompt=True, continuation=True)
        cache, self._cache = self._cache, None  # donated to the generator; restored only when the turn completes
        reply_ids, decoder, last = [], StreamDecoder(tok), None
        steps = self.generator.stream([new_ids], max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                      stop_tokens=[tok.eos_id], seed=self.seed + self._turn, cache=cache,
                                      max_len=self.max_context)
        for step in steps:  # one row: the generator ends by itself after the stop token, handing back the cache
            last = int(step[0])
            if last != tok.eos_id:
                reply_ids.append(last)
                piece = decoder.push(last)
                if piece:
                    yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        self._cache = self.generator.last_cache
        # the last sampled token is not in the cache yet; a reply cut by max_new_tokens still needs its end
        self._pending = [last] if last == tok.eos_id else [last, tok.eos_id]
        self.messages += [user, {"role": "assistant", "content": tok.decode(reply_ids)}]
        self._turn += 1

    def send(self, text: str, *, stream: bool = True) -> str:
        """Adds a user message and returns the reply, printing it as it comes when `stream`."""
        pieces = []
        for piece in self.stream(text):
            pieces.append(piece)
            if stream:
                print(piece, end="", flush=True)
        if stream:
            print(file=sys.stdout, flush=True)
        return "".join(pieces)
