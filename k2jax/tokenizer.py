"""The Kimi K2 tokenizer on tiktoken, and the K2 chat template.

    tok = Tokenizer.from_dir("Kimi-K2-Instruct")      # reads tiktoken.model (+ tokenizer_config.json if present)
    ids = tok.encode("Hello")                         # special-token text in user strings stays plain text
    text = tok.decode(ids)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tok.eos_id                                        # <|im_end|>: where an assistant turn ends

The release's `tiktoken.model` holds one "base64(token bytes) rank" line per BPE token (163,584 of them); the
special tokens follow the BPE ranks: 256 ids starting at the number of ranks, named by the release's
tokenizer_config.json ("added_tokens_decoder") when the directory has one, otherwise by SPECIAL_TOKENS below (the
release's names and offsets), the rest `<|reserved_token_{id}|>`.

The chat template reproduces the release's (chat_template in tokenizer_config.json) for text messages, tool
declarations, assistant tool calls and tool results:

    <|im_system|>system<|im_middle|>You are Kimi, ...<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>
    <|im_assistant|>assistant<|im_middle|>

Special tokens are inserted as ids, never parsed out of message text, so a user cannot forge a turn.
`train_bpe` builds a small tokenizer file (tests and the notebook use it; the real one comes with the release).
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tiktoken

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
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = {"system": ("<|im_system|>", "system"), "user": ("<|im_user|>", "user"),
         "assistant": ("<|im_assistant|>", "assistant"), "tool": ("<|im_system|>", "tool")}
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
    def __init__(self, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int], *, name: str = "k2"):
        missing = [t for t in CHAT_TOKENS if t not in special_tokens]
        if missing:
            raise TokenizerError(f"tokenizer: special tokens {missing} are missing (the chat template needs them)")
        self.special_tokens = dict(special_tokens)
        self._special_names = {i: s for s, i in self.special_tokens.items()}
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=dict(ranks),
                                      special_tokens=self.special_tokens)
        self.num_ranks = len(ranks)
        self.vocab_size = self.num_ranks + len(self.special_tokens)
        self.eos_id = self.special_tokens["<|im_end|>"]

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """A release directory: tiktoken.model, and tokenizer_config.json's special-token names if present."""
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
        return cls(ranks, special_tokens_for(len(ranks), names), name=os.path.basename(path.rstrip("/")) or "k2")

    def special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise TokenizerError(f"no special token {name!r}")
        return self.special_tokens[name]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Special-token names in the text are encoded as ordinary text."""
        ids: list[int] = []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[start:start + _MAX_ENCODE_CHARS]):
                ids += self._enc.encode(piece, disallowed_special=(), allowed_special=set())
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

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, continuation: bool = False
                            ) -> list[int]:
        """Messages ({"role": system|user|assistant|tool, "content": str or [{"type": "text", "text": ...}],
        assistant "tool_calls", tool "tool_call_id"}) -> ids, as the release's chat template renders them. A
        conversation that does not start with a system message gets the default system prompt, unless
        `continuation` says these messages continue an already rendered conversation."""
        ids: list[int] = []
        sp = self.special
        if tools:
            ids += [sp("<|im_system|>"), *self.encode("tool_declare"), sp("<|im_middle|>"),
                    *self.encode(json.dumps(list(tools), ensure_ascii=False)), sp("<|im_end|>")]
        for n, message in enumerate(messages):
            role, content = _check_message(n, message)
            if n == 0 and role != "system" and not continuation:
                ids += [sp("<|im_system|>"), *self.encode("system"), sp("<|im_middle|>"),
                        *self.encode(DEFAULT_SYSTEM_PROMPT), sp("<|im_end|>")]
            start, role_name = ROLES[role]
            ids += [sp(start), *self.encode(role_name), sp("<|im_middle|>")]
            if role == "assistant" and message.get("tool_calls"):
                ids += self.encode(content)
                ids.append(sp("<|tool_calls_section_begin|>"))
                for call in message["tool_calls"]:
                    args = call["function"]["arguments"]
                    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    ids += [sp("<|tool_call_begin|>"), *self.encode(str(call["id"])),
                            sp("<|tool_call_argument_begin|>"), *self.encode(args), sp("<|tool_call_end|>")]
                ids.append(sp("<|tool_calls_section_end|>"))
            elif role == "tool":
                ids += self.encode(f"## Return of {message.get('tool_call_id')}\n{content}")
            else:
                ids += self.encode(content)
            ids.append(sp("<|im_end|>"))
        if add_generation_prompt:
            ids += [sp("<|im_assistant|>"), *self.encode("assistant"), sp("<|im_middle|>")]
        return ids


def _check_message(n: int, message: Mapping[str, Any]) -> tuple[str, str]:
    """-> (role, content as text); one clear error for anything the template cannot render."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise TokenizerError(f"message {n}: expected a dict with 'role' and 'content', got {message!r:.80}")
    role = message["role"]
    if role not in ROLES:
        raise TokenizerError(f"message {n}: role {role!r} is not one of {sorted(ROLES)}")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) and p.get("type", "text") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
        return role, "".join(p["text"] for p in content)
    raise TokenizerError(f"message {n}: content must be a string or a list of {{'type': 'text', 'text': str}} "
                         f"parts, got {content!r:.80}")


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
