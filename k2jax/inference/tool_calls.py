"""K2's tool calls: parse them out of generated text or ids, all at once or while streaming.

    reply = k2jax.parse_tool_calls(text)                  # or (ids, tokenizer), or (completion, tokenizer)
    reply.content                                         # the text outside the tool-call section
    reply.tool_calls                                      # [ToolCall(id="functions.get_weather:0",
                                                          #           name="get_weather", arguments={"city": ...})]
    reply.error                                           # None, or why a section was given back as text

    parser = ToolCallParser()                             # streaming: show what feed() returns as it comes
    for piece in pieces:
        print(parser.feed(piece), end="")
    print(parser.close()); reply = parser.reply

K2 writes tool calls after its text, in one section (MoonshotAI's docs/tool_call_guidance.md and the release's
chat template):

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>
    {"city": "Paris"}<|tool_call_end|> ... more calls ... <|tool_calls_section_end|>

Whitespace between the markers and around the id and the arguments is ignored. The id is
`functions.{name}:{index}`; the name is what lies between "functions." and the last ":". Arguments are JSON; when
they do not parse, `arguments` keeps the raw string and `arguments_valid` is False. A section that breaks the
format (text where a marker belongs, a marker out of place, an id that is not functions.NAME:IDX, a section still
open when the reply ends, e.g. cut by max_new_tokens) yields no calls: its raw text is given back in `content`
and `error` says what was wrong. Parsing never raises on model output.

From ids, only the five marker tokens count as markers (special ids); their names written as ordinary text are
text. From text, the marker names are recognised wherever they appear.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from k2jax.inference.tokenizer import Tokenizer

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
_MARKER_RE = re.compile("|".join(map(re.escape, MARKERS)))
_ID_RE = re.compile(r"(?:functions\.)?(?P<name>\S+):(?P<index>\d+)")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str                # "functions.get_weather:0", as the model wrote it (the tool result cites it)
    name: str              # "get_weather"
    arguments: Any         # the parsed JSON, or the raw string when it is not JSON (see arguments_valid)
    raw_arguments: str     # the arguments as the model wrote them (whitespace around them stripped)
    arguments_valid: bool  # raw_arguments parsed as JSON

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style entry of an assistant message's "tool_calls" (arguments as the raw JSON text, so the
        chat template renders them as the model wrote them)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.raw_arguments}}


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    content: str                      # the reply's text outside well-formed tool-call sections
    tool_calls: tuple[ToolCall, ...]  # in order
    error: str | None = None          # None when every section was well formed (malformed ones are in content)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_message(self) -> dict[str, Any]:
        """The assistant message for the conversation: {"role": "assistant", "content", "tool_calls"?}."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_message() for call in self.tool_calls]
        return message


class ToolCallParser:
    """Incremental parser: feed() text pieces (and feed_marker() marker tokens when parsing ids); each call
    returns the content that can be shown now. Text that may still turn into a marker (e.g. a trailing "<|tool")
    and every open section are held back until they are decided. close() returns what is left to show and makes
    `reply` final. Never raises on its input."""

    def __init__(self, *, markers_in_text: bool = True):
        self.markers_in_text = markers_in_text
        self._content: list[str] = []      # content so far (including what was returned)
        self._calls: list[ToolCall] = []
        self._errors: list[str] = []
        self._held = ""                    # text that may be the start of a marker (markers_in_text only)
        self._section: list[str] | None = None  # raw text of the open section, from its begin marker
        self._state = "outside"            # outside | section | id | arguments | broken
        self._section_calls: list[ToolCall] = []  # the open section's finished calls
        self._id = self._args = ""
        self._problem: str | None = None   # why the open section is broken
        self._closed = False

    @property
    def reply(self) -> ParsedReply:
        """What was parsed so far (final after close())."""
        return ParsedReply("".join(self._content), tuple(self._calls), "; ".join(self._errors) or None)

    def feed(self, text: str) -> str:
        """A piece of generated text -> the content now safe to show."""
        self._check_open()
        shown_before = len(self._content)
        text = self._held + text
        self._held = ""
        if self.markers_in_text:
            pos = 0
            for m in _MARKER_RE.finditer(text):
                self._text(text[pos:m.start()])
                self._marker(m.group(0))
                pos = m.end()
            text = text[pos:]
            keep = _partial_marker_suffix(text)
            text, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self._text(text)
        return self._shown_since(shown_before)

    def feed_marker(self, marker: str) -> str:
        """A marker token (one of MARKERS, e.g. decoded from its special id) -> the content now safe to show."""
        self._check_open()
        if marker not in MARKERS:
            raise ValueError(f"feed_marker: {marker!r} is not one of {MARKERS}")
        shown_before = len(self._content)
        self._text(self._held)
        self._held = ""
        self._marker(marker)
        return self._shown_since(shown_before)

    def close(self) -> str:
        """Ends the reply: held-back text and a section left open (given back as text, flagged) -> the content
        still to show. `reply` is final afterwards."""
        if self._closed:
            return ""
        shown_before = len(self._content)
        held, self._held = self._held, ""
        if self._section is None:
            self._text(held)
        else:
            self._section.append(held)  # the start of a marker the reply did not finish
            what = {"section": "after its last call", "id": "inside a call id",
                    "arguments": "inside a call's arguments", "broken": ""}[self._state]
            self._break(f"the reply ended inside a tool-call section {what}".rstrip() + " (cut by max_new_tokens?)")
            self._give_back()
        self._closed = True
        return self._shown_since(shown_before)

    # -- the state machine ------------------------------------------------------------------------------------

    def _shown_since(self, n: int) -> str:
        return "".join(self._content[n:])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ToolCallParser: feed after close(); use a new parser for a new reply")

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._section is None:
            self._content.append(text)
            return
        self._section.append(text)
        if self._state == "id":
            self._id += text
        elif self._state == "arguments":
            self._args += text
        elif self._state == "section" and text.strip():
            self._break(f"text {text.strip()[:40]!r} between tool calls")

    def _marker(self, marker: str) -> None:
        if self._section is None:
            if marker == SECTION_BEGIN:
                self._section, self._state, self._section_calls = [marker], "section", []
            else:
                self._content.append(marker)
                self._errors.append(f"{marker} outside a tool-call section (kept as text)")
            return
        self._section.append(marker)
        expected = {"section": (CALL_BEGIN, SECTION_END), "id": (ARGUMENT_BEGIN,), "arguments": (CALL_END,),
                    "broken": (SECTION_END,)}[self._state]
        if marker not in expected:
            self._break(f"{marker} where {' or '.join(expected)} belongs")
        elif marker == CALL_BEGIN:
            self._state, self._id, self._args = "id", "", ""
        elif marker == ARGUMENT_BEGIN:
            self._state = "arguments"
        elif marker == CALL_END:
            self._finish_call()
        if marker == SECTION_END:
            if self._state == "broken":
                self._give_back()
            else:
                self._calls += self._section_calls
                self._section, self._state = None, "outside"

    def _finish_call(self) -> None:
        call_id, raw = self._id.strip(), self._args.strip()
        m = _ID_RE.fullmatch(call_id)
        if m is None:
            self._break(f"tool call id {call_id[:60]!r} is not functions.NAME:INDEX")
            return
        try:
            arguments, valid = json.loads(raw), True
        except ValueError:
            arguments, valid = raw, False
        self._section_calls.append(ToolCall(call_id, m.group("name"), arguments, raw, valid))
        self._state = "section"

    def _break(self, problem: str) -> None:
        if self._state != "broken":
            self._problem, self._state = problem, "broken"

    def _give_back(self) -> None:
        """The open (broken) section goes back into the content as raw text."""
        self._content.append("".join(self._section or []))
        self._errors.append(f"malformed tool-call section given back as text: {self._problem}")
        self._section, self._state, self._section_calls = None, "outside", []


def _partial_marker_suffix(text: str) -> int:
    """Length of the longest end of text that is the start of a marker (it may complete with the next piece)."""
    for n in range(min(len(text), max(map(len, MARKERS)) - 1), 0, -1):
        tail = text[-n:]
        if any(marker.startswith(tail) for marker in MARKERS):
            return n
    return 0


def parse_tool_calls(output: str | Iterable[int] | Any, tokenizer: Tokenizer | None = None) -> ParsedReply:
    """A reply -> ParsedReply(content, tool_calls, error). output: the reply's text; or its ids (a list, or a
    Completion from k2jax.Generator, whose .tokens are used) with the tokenizer that made them. Pass only the
    reply, not the prompt; a stop token left at the end is kept as text."""
    if isinstance(output, str):
        parser = ToolCallParser(markers_in_text=True)
        parser.feed(output)
        parser.close()
        return parser.reply
    ids = getattr(output, "tokens", output)
    if tokenizer is None:
        raise ValueError("parse_tool_calls: ids need the tokenizer that made them (parse_tool_calls(ids, tok))")
    return parse_ids(ids, tokenizer)


def parse_ids(ids: Iterable[int], tokenizer: Tokenizer) -> ParsedReply:
    """parse_tool_calls for ids: marker special ids are markers, every other id is decoded as text."""
    from k2jax.inference.tokenizer import StreamDecoder

    markers = {tokenizer.special_tokens[m]: m for m in MARKERS if m in tokenizer.special_tokens}
    parser, decoder = ToolCallParser(markers_in_text=False), StreamDecoder(tokenizer)
    for i in ids:
        i = int(i)
        if i in markers:
            parser.feed(decoder.flush())
            parser.feed_marker(markers[i])
        else:
            parser.feed(decoder.push(i))
    parser.feed(decoder.flush())
    parser.close()
    return parser.reply
