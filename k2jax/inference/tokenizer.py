"""The Kimi K2 tokenizer on tiktoken, with the release's own chat template.

    tok = Tokenizer.from_dir("Kimi-K2-Instruct")      # tiktoken.model, tokenizer_config.json, chat_template.jinja
    ids = tok.encode("Hello")                         # special-token text in user strings stays plain text
    text = tok.decode(ids)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tools=tools)   # the release's prompt ids
    text = tok.apply_chat_template(messages, tokenize=False)                         # ... or its text
    tok.chat_template.source                          # which file the template came from
    tok.eos_id                                        # <|im_end|>: where an assistant turn ends

The release's `tiktoken.model` holds one "base64(token bytes) rank" line per BPE token (163,584 of them); the
special tokens follow the BPE ranks: 256 ids starting at the number of ranks, named by the release's
tokenizer_config.json ("added_tokens_decoder") when the directory has one, otherwise by SPECIAL_TOKENS below (the
release's names and offsets), the rest `<|reserved_token_{id}|>`. Text is split with the release's pattern
(PAT_STR, from tokenization_kimi.py) and long runs are cut as the release cuts them.

`apply_chat_template` renders the directory's own chat template (k2jax.inference.chat_template: chat_template.jinja,
else tokenizer_config.json's chat_template, rendered as transformers renders it; a directory without one gets k2jax's
built-in K2 template, and from_dir logs a warning saying so). The ids are the template's special tokens as their ids and
everything else encoded as text, which for ordinary messages is what the release's tokenization_kimi.py gives (tiktoken
with every special token allowed). Special-token text inside messages, tools and template variables stays text by
default, so a message cannot forge a turn; special_tokens_in_content=True encodes it as special ids, as the release's
tokenizer does. `train_bpe` builds a small tokenizer file (tests and the notebook use it; the real one comes with the
release)."""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tiktoken
from absl import logging

from k2jax.inference.chat_template import ChatTemplate, special_pattern, split_rendered

# The release's pre-tokenisation pattern (tokenization_kimi.py): Han runs, words with case and contractions,
# up to 3 digits, punctuation runs, newlines, spaces.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_SPECIAL_TOKENS = 256
# Offset from the number of BPE ranks -> name (163584 + offset in the release).
SPECIAL_TOKENS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}
CHAT_TOKENS = ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
# tiktoken's Rust splitter is slow on very long runs of one character class; the release cuts text likewise.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


class TokenizerError(ValueError):
    """A tokenizer file or chat message that cannot be used."""


def read_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parses a tiktoken BPE file ("base64 rank" per line), checking every line: ranks must be 0..n-1 with no
    gaps or repeats, tokens distinct, and every single byte present (so any text can be encoded)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the BPE file ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r}")
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{path}:{number}: bad base64 token or rank in {line[:60]!r}") from None
        if not token:
            raise TokenizerError(f"{path}:{number}: empty token")
        if token in ranks:
            raise TokenizerError(f"{path}:{number}: token {token!r} appears twice (ranks {ranks[token]} and {rank})")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no BPE ranks in the file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: single-byte tokens {missing[:5]} are missing, so some text cannot be "
                             f"encoded")
    return ranks


def write_bpe_ranks(path: str | os.PathLike, ranks: Mapping[bytes, int]) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    os.replace(tmp, path)


def special_tokens_for(num_ranks: int, names_by_id: Mapping[int, str] | None = None) -> dict[str, int]:
    """{name: id} for the NUM_SPECIAL_TOKENS ids after the BPE ranks. names_by_id: tokenizer_config.json's
    added_tokens_decoder ({id: name}); default: the release's SPECIAL_TOKENS offsets."""
    if names_by_id is None:
        names_by_id = {num_ranks + off: name for off, name in SPECIAL_TOKENS.items()}
    ids = range(num_ranks, num_ranks + NUM_SPECIAL_TOKENS)
    outside = sorted(i for i in names_by_id if i not in ids)
    if outside:
        raise TokenizerError(f"special token ids {outside[:3]} are outside the special range "
                             f"[{ids.start}, {ids.stop})")
    return {names_by_id.get(i, f"<|reserved_token_{i}|>"): i for i in ids}


class Tokenizer:
    """tiktoken with the release's ranks, pattern and special tokens, plus its chat template (`chat_template`: a
    k2jax.inference.chat_template.ChatTemplate; the built-in one when none is given)."""

    def __init__(self, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int], *, name: str = "k2",
                 chat_template: ChatTemplate | None = None):
        missing = [t for t in CHAT_TOKENS if t not in special_tokens]
        if missing:
            raise TokenizerError(f"tokenizer: special tokens {missing} are missing (the chat template needs them)")
        self.special_tokens = dict(special_tokens)
        self._special_names = {i: s for s, i in self.special_tokens.items()}
        self._special_re = special_pattern(list(self.special_tokens))
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=dict(ranks),
                                      special_tokens=self.special_tokens)
        self.num_ranks = len(ranks)
        self.vocab_size = self.num_ranks + len(self.special_tokens)
        self.eos_id = self.special_tokens["<|im_end|>"]
        self.chat_template = chat_template if chat_template is not None else ChatTemplate()

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """A release directory: tiktoken.model; tokenizer_config.json's special-token names if present; its chat
        template (chat_template.jinja, else tokenizer_config.json's chat_template), else the built-in one with a
        warning."""
        path = os.fspath(path)
        ranks = read_bpe_ranks(os.path.join(path, "tiktoken.model"))
        names = None
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(config_path):
            try:
                with open(config_path) as f:
                    added = json.load(f).get("added_tokens_decoder")
                if added is not None:
                    names = {int(i): entry["content"] for i, entry in added.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise TokenizerError(f"{config_path}: unreadable added_tokens_decoder ({e})") from None
        template = ChatTemplate.from_dir(path)
        if template.builtin:
            logging.warning("%s has no chat template (chat_template.jinja or tokenizer_config.json's "
                            "chat_template): using %s", path, template.source)
        return cls(ranks, special_tokens_for(len(ranks), names), name=os.path.basename(path.rstrip("/")) or "k2",
                   chat_template=template)

    def special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise TokenizerError(f"no special token {name!r}")
        return self.special_tokens[name]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token names in the text are encoded as ordinary text, unless allow_special: then
        they become their special ids (the release's TikTokenTokenizer.encode, allow_special_tokens=True)."""
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[start:start + _MAX_ENCODE_CHARS]):
                ids += self._enc.encode(piece, disallowed_special=(), allowed_special=allowed)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if i in self._special_names:
                out.append(self._special_names[i].encode())
            elif 0 <= i < self.num_ranks:
                out.append(self._enc.decode_single_token_bytes(i))
            else:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text (special tokens by name; invalid UTF-8 replaced)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
                            tokenize: bool = True, *, documents: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, special_tokens_in_content: bool = False,
                            **kwargs: Any) -> list[int] | str:
        """One conversation through the release's chat template, as transformers' apply_chat_template: the ids
        (tokenize=True) or the text (tokenize=False) of the prompt.

        messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str or [{"type": "text",
        "text": str}, ...], assistant "tool_calls": [{"id", "type": "function", "function": {"name",
        "arguments"}}], tool "tool_call_id" and optional "name"}, ...]. tools: JSON schemas. chat_template: the
        name of one of the directory's templates, or a template's text. Extra keywords are template variables.
        Special-token names inside messages, tools, documents and extra keywords are encoded as plain text,
        unless special_tokens_in_content (then anywhere in the rendered text they are special ids, as the
        release's own tokenizer encodes). Raises ChatTemplateError for malformed messages or a template that
        fails on them."""
        render_args = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                           chat_template=chat_template, **kwargs)
        if not tokenize:
            return self.chat_template.render(messages, **render_args)
        if special_tokens_in_content:
            return self.encode(self.chat_template.render(messages, **render_args), allow_special=True)
        ids: list[int] = []
        for piece, special in split_rendered(self.chat_template.render(messages, mark=self._special_re,
                                                                       **render_args), self._special_re):
            ids += [self.special_tokens[piece]] if special else self.encode(piece)
        return ids


def _split_long_runs(text: str) -> Iterable[str]:
    """Cuts text where a run of whitespace or of non-whitespace exceeds _MAX_RUN_CHARS."""
    start, run_start, run_space = 0, 0, None
    for i, ch in enumerate(text):
        space = ch.isspace()
        if space != run_space:
            run_start, run_space = i, space
        elif i - run_start >= _MAX_RUN_CHARS:
            yield text[start:i]
            start = run_start = i
    yield text[start:]


class StreamDecoder:
    """Turns generated ids into text as they come, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok, self._pending = tokenizer, b""

    def push(self, token_id: int) -> str:
        self._pending += self._tok.decode_bytes([token_id])
        for cut in range(len(self._pending), max(len(self._pending) - 4, -1), -1):
            try:
                text = self._pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = self._pending[cut:]
            return text
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""  # not UTF-8 at all
        return text

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


def train_bpe(texts: Iterable[str], num_ranks: int) -> dict[bytes, int]:
    """A small byte-level BPE (256 single bytes, then the most frequent adjacent pairs inside PAT_STR pieces,
    merged greedily) with num_ranks ranks. For tests and demos: real checkpoints ship their tiktoken.model."""
    import regex  # tiktoken's own dependency; PAT_STR needs its class intersections (V1)

    if num_ranks < 256:
        raise ValueError(f"num_ranks must be >= 256 (every byte is a rank), got {num_ranks}")
    pattern = regex.compile("(?V1)" + PAT_STR)
    words = collections.Counter(piece.encode() for text in texts for piece in pattern.findall(text))
    ranks = {bytes([b]): b for b in range(256)}
    split = {w: [bytes([b]) for b in w] for w in words}
    while len(ranks) < num_ranks:
        pairs: collections.Counter = collections.Counter()
        for w, parts in split.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if a + b not in ranks:  # the same bytes can arise from two different pairs
            ranks[a + b] = len(ranks)
        for w, parts in split.items():
            i, merged = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            split[w] = merged
    return ranks
