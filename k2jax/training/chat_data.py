"""Conversations for fine-tuning: rendered by the release's own chat template, with a loss weight per token.

    chat = render_chat(tokenizer, messages, tools=tools)   # Tokenizer.from_dir(release): its own template
    chat.ids        # int32 [L]: the whole conversation as the template renders it (no generation prompt)
    chat.weights    # float32 [L]: 1 on what the assistant produces, 0 on everything else
    chat.spans      # [(message index, start, end)]: each assistant turn's trained tokens ids[start:end]
    print(show_trained(tokenizer, chat.ids, chat.weights))  # the text with its trained tokens between ⟦ and ⟧

K2's templates mark nothing (no `{% generation %}` blocks), so the mask comes from the template itself, by
rendering prefixes of the conversation: for assistant message k,
  start = the tokens of messages[:k] rendered with the generation prompt (the prompt the model answers), and
  stop  = the tokens of messages[:k + 1] rendered without it,
both of which must be prefixes of the whole conversation's tokens; the trained span is ids[start:stop] up to and
including its first end-of-turn token (`tokenizer.eos_id`, <|im_end|>): the assistant's content, reasoning where
the template renders it, tool calls and the end of its turn. What the template adds after the end-of-turn token,
the turn headers, system / user / tool messages and tool declarations are weight 0.

A template whose prefixes do not line up with the whole conversation is refused (ChatMaskError, one line naming the
message and the first text that differs): the tokens the model would be trained on are then not the ones it sees
when it answers at that turn. K2-Thinking's template does this for agentic turns: it keeps the reasoning of
tool-call turns after the last plain reply while rendering the conversation up to a turn, and drops it once a
later plain reply is part of the conversation; a message `name` on an assistant turn (0905's role-name line) does
not match the generation prompt either.

Speed: the whole conversation is tokenised once; each prefix is rendered as text (jinja, no BPE) and found in
the whole conversation's token boundaries. Where a prefix's end is not next to one of the template's special
tokens (so BPE could merge across it), the prefix is tokenised and compared too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from k2jax.inference.tokenizer import Tokenizer

OPEN, CLOSE = "⟦", "⟧"  # around the trained text in show_trained
# a chat batch's per-row counts of conversations longer than a row: cut to it, or left out (k2jax.training.data)
CONVERSATION_COUNTS = ("conversations_truncated", "conversations_dropped")


class ChatMaskError(ValueError):
    """A conversation whose trained tokens cannot be derived from its chat template (one line)."""


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    ids: np.ndarray       # int32 [L]
    weights: np.ndarray   # float32 [L]
    spans: list[tuple[int, int, int]]  # (message index, start, end) per assistant turn


@functools.lru_cache(maxsize=8)
def _token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """[vocab] int64: how many bytes of text each token id decodes to (special tokens: their names)."""
    return np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], np.int64)


def _snippet(text: str, at: int) -> str:
    return repr(text[max(at - 20, 0):at + 40])


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None) -> RenderedChat:
    """The conversation's ids as `tokenizer.apply_chat_template` renders them (no generation prompt) and a weight per
    token: 1 on each assistant turn's own output (see the module docstring), 0 elsewhere. Raises ChatMaskError
    when the template's prefixes do not line up, ChatTemplateError when it cannot render the messages."""
    def render(upto: int, generation_prompt: bool, tokenize: bool):
        return tokenizer.apply_chat_template(list(messages[:upto]), tools=tools, tokenize=tokenize,
                                             add_generation_prompt=generation_prompt)

    whole = render(len(messages), False, False)
    ids = np.asarray(render(len(messages), False, True), np.int32)
    ends = np.cumsum(_token_bytes(tokenizer)[ids])  # byte offset after each token
    text_lines_up = ends.size > 0 and ends[-1] == len(whole.encode("utf-8"))

    def boundary(k: int, generation_prompt: bool) -> int:
        """How many of the whole conversation's tokens the rendering of messages[:k] makes."""
        what = "up to this turn with the generation prompt" if generation_prompt else "up to the end of this turn"
        prefix = render(k, generation_prompt, False)
        if not whole.startswith(prefix):
            at = next((i for i, (a, b) in enumerate(zip(prefix, whole)) if a != b), min(len(prefix), len(whole)))
            raise ChatMaskError(f"the chat template renders the conversation {what} as {_snippet(prefix, at)} where "
                                f"the whole conversation has {_snippet(whole, at)} (character {at}): its prefixes "
                                f"do not line up, so the assistant's tokens cannot be told from the rest")
        size = len(prefix.encode("utf-8"))
        i = int(np.searchsorted(ends, size))  # the token whose end is the prefix's end, if one is
        n = i + 1
        exact = text_lines_up and i < ends.size and ends[i] == size
        special = exact and any(j < ids.size and ids[j] >= tokenizer.num_ranks for j in (i, n))
        if not special:  # not next to a template token: BPE may merge across the cut, so compare the tokens
            prefix_ids = np.asarray(render(k, generation_prompt, True), np.int32)
            n = prefix_ids.size
            if not np.array_equal(prefix_ids, ids[:n]):
                raise ChatMaskError(f"the chat template's tokens of the conversation {what} are not a prefix of the "
                                    f"whole conversation's (the text ends inside a token): its prefixes do not "
                                    f"line up")
        return n

    weights = np.zeros(ids.shape, np.float32)
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        try:
            if k == 0:
                raise ChatMaskError("the conversation starts with the assistant: there is no prompt it answers")
            start, stop = boundary(k, True), boundary(k + 1, False)
            if stop <= start:
                raise ChatMaskError("the chat template renders nothing for this turn")
        except ChatMaskError as e:
            raise ChatMaskError(f"message {k} (assistant): {e}") from None
        eos = np.flatnonzero(ids[start:stop] == tokenizer.eos_id)
        end = start + int(eos[0]) + 1 if eos.size else stop
        weights[start:end] = 1.0
        spans.append((k, start, end))
    return RenderedChat(ids, weights, spans)


def show_trained(tokenizer: Tokenizer, ids: np.ndarray, weights: np.ndarray, *, max_run_chars: int = 600) -> str:
    """The decoded text with each run of trained tokens (weight > 0) between OPEN and CLOSE; the middle of any run
    longer than max_run_chars is left out ("...[N characters]...")."""
    trained = np.asarray(weights) > 0
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    out = []
    for piece_ids, piece_trained in zip(np.split(np.asarray(ids), cuts), np.split(trained, cuts)):
        text = tokenizer.decode(piece_ids)
        if len(text) > max_run_chars:
            half = max_run_chars // 2
            text = f"{text[:half]}...[{len(text) - 2 * half} characters]...{text[-half:]}"
        out.append(f"{OPEN}{text}{CLOSE}" if piece_trained.size and piece_trained[0] else text)
    return "".join(out)
