"""Conversations for fine-tuning: rendered by the release's own chat template, with a loss weight per token.

    sequences = render_chat(tokenizer, messages, tools=tools)  # Tokenizer.from_dir(release): its own template
    chat = sequences[0]  # one RenderedChat for most templates and conversations; several where the template needs it
    chat.ids        # int32 [L]: a training sequence, the tokens the template renders
    chat.weights    # float32 [L]: 1 on what the assistant produces, 0 on everything else
    chat.spans      # [(message index, start, end)]: each assistant turn trained here, ids[start:end]
    print(show_trained(tokenizer, chat.ids, chat.weights))  # the text with its trained tokens between ⟦ and ⟧

Each assistant turn is trained on the tokens the model sees when it produces that turn: the conversation before it
rendered with the generation prompt (the prompt it answers; weight 0), then the turn as the model produces it
(weight 1: reasoning where the template renders it, content, tool calls, the end-of-turn token `tokenizer.eos_id`,
<|im_end|>; what a template adds after that token is weight 0). K2's templates mark nothing (no `{% generation %}`
blocks), so both come from the template itself: for assistant message k,
  prompt = messages[:k] rendered with the generation prompt, and
  turn   = what messages[:k] + [message k] rendered without it has after the prompt, message k without its `name`
           (the model produced it after the generation prompt's role name, `<|im_assistant|>assistant<|im_middle|>`).
Where the turn's rendering does not start with the prompt, only because of earlier reasoning the template drops once
the turn ends the conversation, the turn is what follows the prompt rendered without that reasoning.

Sequences. A turn is trained in a sequence whose tokens start with its prompt + turn. For most templates every
turn's prompt + turn is a prefix of the whole conversation (earlier turns render the same whatever follows): the
conversation is one sequence, the whole conversation as rendered (K2-Instruct, K2-Instruct-0905, k2jax's built-in
template). A template that renders an earlier turn differently once later turns follow leaves some turns' prompt +
turn out of the whole conversation; those train elsewhere. Turns are placed from the last to the first, each in a
sequence already made whose tokens start with its prompt + turn, else in a new one made of its own prompt + turn
(its context weight 0), which the turns before it then try. So a sequence ends at the turn it was made for and
holds every earlier turn that renders the same there, and each turn trains once. The extra sequences repeat the
history before them: that is the price of exactness, counted in the metrics (conversations split and the sequences
they became: k2jax.training.data).

K2-Thinking's template is such a template. It renders the reasoning (`<think>...</think>`) of the tool-call turns
after the last plain reply (an agentic episode in progress), drops it once a later plain reply is part of the
conversation, and renders every plain reply as `<think></think>` and its content. The model, which always thinks,
produced a plain reply as `<think>` its reasoning `</think>` and the content: a plain reply with reasoning_content
(or thinking / reasoning) is trained so, the reasoning in the empty `<think></think>` the template renders for it. So
an agentic conversation (reasoning, tool calls, tool results, an answer, per user turn) becomes one sequence per
plain reply whose episode carries reasoning: the earlier episodes as history (no reasoning), the user turn, this
episode's tool-call turns with their reasoning and the tool results, the reply; trained: this episode's assistant
turns. Turns whose rendering does not change (no reasoning) stay in the whole conversation, as does an episode not
yet answered by a plain reply. The sequences of a conversation with E such replies repeat its history E times (each
sequence is the prompt its last reply answers); no sequence per tool call.

A `name` on an assistant message (K2-Instruct-0905's and K2-Thinking's role-name line `<|im_assistant|>NAME`): later
turns see the name, the turn itself was produced after `<|im_assistant|>assistant<|im_middle|>`; it is trained in its
own sequence, prompt + its turn rendered without the name.

Refused (ChatMaskError, one line naming the message and what differs): a conversation that starts with the
assistant; a turn whose rendering starts neither with its prompt nor with its prompt without earlier reasoning (the
template rewrites more than reasoning: the tokens the model saw cannot be told from the rest); a template that
renders nothing for a turn; a prompt that ends in text the turn's first token takes (BPE merges across the cut).
Reasoning a template never renders and has no empty `<think></think>` for (K2-Instruct's templates) is not trained:
those models do not think.

Speed: the whole conversation is tokenised once; each prompt and turn is rendered as text (jinja, no BPE) and found
in a sequence's token boundaries. Where a cut is not next to one of the template's special tokens (so BPE could
merge across it), the prefix is tokenised and compared too. A sequence other than the whole conversation is
tokenised when it is made.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from k2jax.inference.chat_template import REASONING_FIELDS, normalize_messages
from k2jax.inference.tokenizer import Tokenizer

OPEN, CLOSE = "⟦", "⟧"  # around the trained text in show_trained
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # K2-Thinking's reasoning block
# a chat batch's per-row counts: sequences longer than a row cut to it or left out, conversations split into several
# sequences and how many sequences those became (k2jax.training.data)
CONVERSATION_COUNTS = ("conversations_truncated", "conversations_dropped", "conversations_split", "split_sequences")


class ChatMaskError(ValueError):
    """A conversation whose trained tokens cannot be derived from its chat template (one line)."""


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    ids: np.ndarray       # int32 [L]
    weights: np.ndarray   # float32 [L]
    spans: list[tuple[int, int, int]]  # (message index, start, end) per assistant turn trained in this sequence


@functools.lru_cache(maxsize=8)
def _token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """[vocab] int64: how many bytes of text each token id decodes to (special tokens: their names)."""
    return np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], np.int64)


def _snippet(text: str, at: int) -> str:
    return repr(text[max(at - 20, 0):at + 40])


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclasses.dataclass
class _Turn:
    """Assistant message k: its prompt's text and its turn's text (see the module docstring); ids() gives the tokens
    of prompt + turn, prompt_ids() those of the prompt (tokenised only when needed)."""
    k: int
    prompt: str
    turn: str
    prompt_ids: Callable[[], np.ndarray]
    ids: Callable[[], np.ndarray]


class _Sequence:
    """A candidate training sequence: its text and tokens, and the turns placed in it."""

    def __init__(self, tokenizer: Tokenizer, text: str, ids: np.ndarray):
        self.tokenizer, self.text, self.ids = tokenizer, text, np.asarray(ids, np.int32)
        self.ends = np.cumsum(_token_bytes(tokenizer)[self.ids])  # byte offset after each token
        self.lines_up = self.ends.size > 0 and self.ends[-1] == len(text.encode("utf-8"))
        self.spans: list[tuple[int, int, int]] = []

    def cut(self, text: str, ids: Callable[[], np.ndarray], what: str) -> int:
        """How many of this sequence's tokens the text (a prefix of it) is; ids: the text's own tokens."""
        size = len(text.encode("utf-8"))
        i = int(np.searchsorted(self.ends, size))  # the token whose end is the text's end, if one is
        exact = self.lines_up and i < self.ends.size and self.ends[i] == size
        if exact and any(j < self.ids.size and self.ids[j] >= self.tokenizer.num_ranks for j in (i, i + 1)):
            return i + 1
        own = ids()  # not next to a template token: BPE may merge across the cut, so compare the tokens
        if not np.array_equal(own, self.ids[:own.size]):
            raise ChatMaskError(f"the chat template's tokens of {what} are not a prefix of the sequence's (the text "
                                f"ends inside a token): its prefixes do not line up")
        return own.size

    def place(self, turn: _Turn) -> tuple[int, int, int] | None:
        """The turn's span here, or None where this sequence does not start with its prompt + turn."""
        if not (self.text.startswith(turn.prompt) and self.text.startswith(turn.turn, len(turn.prompt))):
            return None
        start = self.cut(turn.prompt, turn.prompt_ids, "the conversation up to this turn with the generation prompt")
        stop = self.cut(turn.prompt + turn.turn, turn.ids, "the conversation up to the end of this turn")
        if stop <= start:
            raise ChatMaskError("the chat template renders nothing for this turn")
        eos = np.flatnonzero(self.ids[start:stop] == self.tokenizer.eos_id)
        return turn.k, start, start + int(eos[0]) + 1 if eos.size else stop

    def rendered(self) -> RenderedChat:
        weights = np.zeros(self.ids.shape, np.float32)
        for _, start, end in self.spans:
            weights[start:end] = 1.0
        return RenderedChat(self.ids, weights, sorted(self.spans, key=lambda s: s[1]))


def _reasoning(message: Mapping[str, Any]) -> str:
    """The message's reasoning as templates read it ("" when it has none)."""
    value = normalize_messages([message])[0].get("reasoning_content")
    return value if isinstance(value, str) else ""


def _fill_reasoning(tokenizer: Tokenizer, ids: np.ndarray, reasoning: str) -> np.ndarray:
    """The tokens of a turn rendered as `<think></think>` + the rest, with the reasoning inside the block: as the
    template tokenises reasoning (`<think>` and `</think>` special tokens where the tokenizer has them, else text
    of the run up to the next special token)."""
    specials = [tokenizer.special_tokens.get(t) for t in (THINK_OPEN, THINK_CLOSE)]
    if None not in specials:
        if list(ids[:2]) != specials:
            raise ChatMaskError(f"the chat template renders this turn's {THINK_OPEN}{THINK_CLOSE} as text, not as "
                                f"the tokenizer's special tokens: its reasoning cannot be put in")
        return np.concatenate([ids[:1], tokenizer.encode(reasoning), ids[1:]]).astype(np.int32)
    run = np.flatnonzero(ids >= tokenizer.num_ranks)
    run = int(run[0]) if run.size else ids.size
    rest = tokenizer.decode(ids[:run])[len(THINK_OPEN + THINK_CLOSE):]
    return np.concatenate([tokenizer.encode(THINK_OPEN + reasoning + THINK_CLOSE + rest), ids[run:]]).astype(np.int32)


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None) -> list[RenderedChat]:
    """The conversation's training sequences (see the module docstring): each `tokenizer.apply_chat_template`
    tokens with a weight per token, 1 on the assistant turns trained there, 0 elsewhere; every assistant turn is
    trained in exactly one. One sequence, the whole conversation without the generation prompt, unless the template
    renders earlier turns differently depending on what follows. Raises ChatMaskError where a turn's tokens cannot
    be derived, ChatTemplateError when the template cannot render the messages."""
    messages = list(messages)

    def render(msgs, generation_prompt: bool, tokenize: bool):
        out = tokenizer.apply_chat_template(list(msgs), tools=tools, tokenize=tokenize,
                                            add_generation_prompt=generation_prompt)
        return np.asarray(out, np.int32) if tokenize else out

    whole = _Sequence(tokenizer, render(messages, False, False), render(messages, False, True))

    def turn_of(k: int) -> _Turn:
        if k == 0:
            raise ChatMaskError("the conversation starts with the assistant: there is no prompt it answers")
        before = messages[:k]
        answer = [{key: v for key, v in messages[k].items() if key != "name"}]  # as the generation prompt names it
        prompt, ended = render(before, True, False), render(before + answer, False, False)
        prompt_ids = functools.cache(lambda: render(before, True, True))
        if ended.startswith(prompt):
            base, turn, ids = prompt, ended[len(prompt):], functools.cache(lambda: render(before + answer, False, True))
        else:  # the turn's own rendering drops earlier reasoning: find the turn after the prompt without it
            base = render([{key: v for key, v in m.items() if key not in REASONING_FIELDS}
                           if m.get("role") == "assistant" else m for m in before], True, False)
            if not ended.startswith(base):
                at = _first_difference(prompt, ended)
                raise ChatMaskError(f"the chat template renders the conversation up to this turn with the generation "
                                    f"prompt as {_snippet(prompt, at)} where the conversation up to the end of this "
                                    f"turn has {_snippet(ended, at)} (character {at}): the turn's rendering does not "
                                    f"follow its prompt, so its tokens cannot be told from the rest")
            turn, ids = ended[len(base):], None
        if not turn:
            raise ChatMaskError("the chat template renders nothing for this turn")
        reasoning = _reasoning(messages[k])
        fill = reasoning and turn.startswith(THINK_OPEN + THINK_CLOSE)
        if ids is None or fill:  # prompt + a turn that no rendering gives whole: its tokens put together
            turn_ids = _turn_ids(tokenizer, ended, render(before + answer, False, True), base)
            if fill:
                turn = THINK_OPEN + reasoning + THINK_CLOSE + turn[len(THINK_OPEN + THINK_CLOSE):]
                turn_ids = _fill_reasoning(tokenizer, turn_ids, reasoning)
            if prompt_ids()[-1] < tokenizer.num_ranks:
                raise ChatMaskError(f"the generation prompt ends in text ({_snippet(prompt, len(prompt))}), not a "
                                    f"special token: the turn's tokens cannot be put after it")
            ids = functools.cache(lambda: np.concatenate([prompt_ids(), turn_ids]).astype(np.int32))
        return _Turn(k, prompt, turn, prompt_ids, ids)

    made: list[_Sequence] = []  # newest last
    for k in reversed([k for k, m in enumerate(messages) if m.get("role") == "assistant"]):
        try:
            turn = turn_of(k)
            for seq in [*reversed(made), whole]:
                span = seq.place(turn)
                if span is not None:
                    break
            else:  # a sequence of its own: its prompt and its turn
                seq = _Sequence(tokenizer, turn.prompt + turn.turn, turn.ids())
                span = seq.place(turn)
                made.append(seq)
        except ChatMaskError as e:
            raise ChatMaskError(f"message {k} (assistant): {e}") from None
        seq.spans.append(span)
    used = [s for s in (whole, *made) if s.spans] or [whole]  # no assistant turn: the whole conversation, untrained
    return [s.rendered() for s in sorted(used, key=lambda s: min((k for k, _, _ in s.spans), default=0))]


def _turn_ids(tokenizer: Tokenizer, ended: str, ended_ids: np.ndarray, base: str) -> np.ndarray:
    """The tokens of `ended` (its rendering, tokenised) after its prefix `base`, which must end at a special token."""
    ends = np.cumsum(_token_bytes(tokenizer)[ended_ids])
    size = len(base.encode("utf-8"))
    i = int(np.searchsorted(ends, size))
    if not (ends.size and ends[-1] == len(ended.encode("utf-8")) and i < ends.size and ends[i] == size
            and ended_ids[i] >= tokenizer.num_ranks):
        raise ChatMaskError("the chat template's prompt does not end at a special token of the turn's rendering: its "
                            "tokens cannot be told from the rest")
    return ended_ids[i + 1:]


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
