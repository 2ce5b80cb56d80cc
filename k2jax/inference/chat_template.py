"""The release's own chat template: found in a release directory and rendered the way transformers renders it.

    template = ChatTemplate.from_dir("Kimi-K2-Instruct")    # chat_template.jinja, else tokenizer_config.json's
    text = template.render(messages, tools=tools, add_generation_prompt=True)
    template.source                                         # the file it came from, or BUILTIN_SOURCE

Where a template comes from, in transformers' order: `chat_template.jinja` (named extras in
`additional_chat_templates/NAME.jinja`), else `tokenizer_config.json`'s "chat_template": a string, or the named
list form [{"name": ..., "template": ...}]. With several templates, `chat_template=NAME` picks one; without a name
"tool_use" is used when tools are given and it exists, else "default". A directory with no template at all gets
k2jax's built-in one (`render_builtin`, named by BUILTIN_SOURCE): Python that renders exactly what the
Kimi-K2-Instruct-0905 chat_template.jinja renders (tested against it).

Rendering follows transformers (transformers.utils.chat_template_utils): jinja2's ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and the loopcontrols extension; a `tojson` filter taking ensure_ascii, indent,
separators and sort_keys (no HTML escaping); the globals `raise_exception`, `strftime_now`, `dict` and a
`namespace` that refuses underscore names; a `{% generation %}` block that renders its body. The template sees
`messages`, `tools`, `documents`, `add_generation_prompt`, the special-token names of tokenizer_config.json
(bos_token, eos_token, ...) and any extra keyword. Messages are normalised as transformers' apply_chat_template
does: keys whose value is None are dropped, and reasoning given as "reasoning_content", "thinking" or "reasoning"
is passed under "reasoning_content" and "thinking" too.

Special tokens inside user text: `mark_specials` wraps each special-token name found in messages, tools, documents
and extra variables in two private-use characters before rendering; `split_rendered` then tells the template's
own special tokens (unmarked) from the ones that came in with the user's strings (marked), which the tokenizer
encodes as plain text, so a message cannot forge a turn. transformers does the same under
apply_chat_template(sanitize_control_tokens=True). Like there, a template that builds a special token out of
pieces of user strings (e.g. '<|' + role + '|>') is not covered.

Errors (a template that does not parse, messages it cannot render, malformed messages) raise ChatTemplateError
with one line naming the template file and, where jinja knows it, the template line.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

BUILTIN_SOURCE = "k2jax's built-in K2 template (renders as Kimi-K2-Instruct-0905's chat_template.jinja)"
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# tokenizer_config.json keys transformers passes to every template (PreTrainedTokenizerBase.special_tokens_map)
SPECIAL_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                           "mask_token")
MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # private use; the ones transformers uses
# reasoning fields, in the order transformers reads them (the first one set wins)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_MEDIA = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered, or messages it cannot render (one line)."""


class ChatTemplate:
    """A release's chat template(s) plus the special-token variables its tokenizer_config.json gives them.

    templates: {name: jinja source}; empty means k2jax's built-in template. Every template is compiled here, so a
    broken one fails when the tokenizer is loaded, not at the first chat."""

    def __init__(self, templates: Mapping[str, str] | None = None, *, source: str | None = None,
                 variables: Mapping[str, Any] | None = None):
        self.templates = dict(templates or {})
        self.source = (source or "chat_template") if self.templates else BUILTIN_SOURCE
        self.variables = dict(variables or {})
        for name, text in self.templates.items():
            if not isinstance(text, str):
                raise ChatTemplateError(f"{self._where(name)}: the template must be a string, got "
                                        f"{type(text).__name__}")
            _compile(text, self._where(name))

    @property
    def builtin(self) -> bool:
        return not self.templates

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ChatTemplate:
        """The templates of a release directory (see the module docstring); the built-in one if it has none."""
        path = os.fspath(path)
        templates: dict[str, str] = {}
        source = None
        jinja_path = os.path.join(path, TEMPLATE_FILE)
        if os.path.exists(jinja_path):
            templates["default"], source = _read(jinja_path), jinja_path
        extra_dir = os.path.join(path, TEMPLATE_DIR)
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    templates[name[:-len(".jinja")]] = _read(os.path.join(extra_dir, name))
                    source = source or extra_dir
        config_path = os.path.join(path, "tokenizer_config.json")
        config = _read_config(config_path) if os.path.exists(config_path) else {}
        if not templates and config.get("chat_template") is not None:
            templates = _named_templates(config["chat_template"], f"{config_path} (chat_template)")
            source = f"{config_path} (chat_template)"
        variables = {}
        for key in SPECIAL_TOKEN_VARIABLES:
            value = config.get(key)
            value = value.get("content") if isinstance(value, Mapping) else value  # an AddedToken as a dict
            if isinstance(value, str):
                variables[key] = value
        return cls(templates, source=source, variables=variables)

    def _where(self, name: str) -> str:
        return self.source if list(self.templates) == [name] else f"{self.source} [{name!r}]"

    def select(self, chat_template: str | None = None, tools: Sequence | None = None) -> tuple[str | None, str]:
        """-> (jinja source, or None for the built-in template; where it comes from), as transformers'
        get_chat_template picks: a name of one of the templates, a template given as text, "tool_use" when
        tools are given, else "default". A directory's only template is used whatever its name."""
        if chat_template is not None and chat_template in self.templates:
            return self.templates[chat_template], self._where(chat_template)
        if chat_template is not None:
            return chat_template, "the chat_template argument"
        if len(self.templates) == 1:
            name = next(iter(self.templates))
        elif tools is not None and "tool_use" in self.templates:
            name = "tool_use"
        elif "default" in self.templates:
            name = "default"
        elif not self.templates:
            return None, BUILTIN_SOURCE
        else:
            raise ChatTemplateError(f"{self.source}: several chat templates {sorted(self.templates)} and none is "
                                    f"'default': pass chat_template=NAME")
        return self.templates[name], self._where(name)

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
               chat_template: str | None = None, mark: re.Pattern | None = None, **kwargs: Any) -> str:
        """The prompt text the template renders for these messages (transformers' apply_chat_template with
        tokenize=False and the same arguments; add_generation_prompt defaults to True here, as in
        Tokenizer.apply_chat_template). Extra keywords become template variables. mark: a
        `special_pattern`; the special-token names in messages, tools, documents and extra keywords are marked
        (`mark_specials`) for `split_rendered`."""
        messages = normalize_messages(messages)
        text, where = self.select(chat_template, tools)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be a list of JSON schemas (dicts such as {'type': 'function', "
                                    "'function': {'name': ..., 'parameters': ...}})")
        tools = None if tools is None else plain(list(tools))
        documents = None if documents is None else plain(list(documents))
        kwargs = plain(kwargs)
        if mark is not None:
            messages, tools, documents, kwargs = mark_specials((messages, tools, documents, kwargs), mark)
        variables = {**self.variables, **kwargs}
        if text is None:
            return render_builtin(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        template = _compile(text, where)
        try:
            return template.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # whatever the template raises becomes one clear line
            line = _template_line(e.__traceback__)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ChatTemplateError(f"{where}{f':{line}' if line else ''}: cannot render these messages: "
                                    f"{message}") from e


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checks messages and returns them as transformers hands them to a template: plain dicts, lists and scalars
    (see `plain`), keys whose value is None dropped, reasoning under every name templates read. One clear error
    for what no K2 template can render: not a list of dicts, a missing or non-string role, content that is not a
    string or a list of parts, malformed tool calls."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages is empty: a conversation needs at least one message")
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {n}: expected a dict with 'role' and 'content', got {message!r:.80}")
        message = {k: v for k, v in plain(dict(message)).items() if v is not None}
        _check_message(n, message)
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _check_message(n: int, message: dict[str, Any]) -> None:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ChatTemplateError(f"message {n}: needs a 'role' string (system, user, assistant or tool), got "
                                f"{role!r:.40}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise ChatTemplateError(f"message {n}: content must be a string or a list of parts such as "
                                    f"{{'type': 'text', 'text': str}}, got {content!r:.80}")
        for part in content:
            if part.get("type", "text") == "text" and not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"message {n}: a text part needs a 'text' string, got {part!r:.80}")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ChatTemplateError(f"message {n}: tool_calls must be a list, got {calls!r:.80}")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                    or not isinstance(function.get("arguments", ""), (str, dict, list))):
                raise ChatTemplateError(f"message {n}: each tool call needs 'function': {{'name': str, "
                                        f"'arguments': JSON text or object}}, got {call!r:.80}")
    for key in ("tool_call_id", "name"):
        if key in message and not isinstance(message[key], str):
            raise ChatTemplateError(f"message {n}: {key} must be a string, got {message[key]!r:.40}")


def plain(value: Any) -> Any:
    """Template data built only from JSON types (as transformers' _plain_template_data): str / int / float
    subclasses become the base type, mappings dicts, tuples stay tuples, dataclasses and pydantic models their
    fields; anything else an inert "<TypeName>" placeholder (templates only test media for presence)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, np.generic):
        return plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def render_builtin(messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None,
                   add_generation_prompt: bool = True) -> str:
    """k2jax's built-in K2 template, for release directories without one. Renders what Kimi-K2-Instruct-0905's
    chat_template.jinja renders for normalised messages (the test suite compares the two): tool declarations
    under "# Tools", the default system prompt before a first message that is not a system one, the message's
    "name" (else its role) after the role token, assistant tool calls as a tool-call section, tool results as
    "## Return of {tool_call_id}", text and image parts."""
    out = []
    if tools:
        out += ["<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  ", _tojson(tools), "<|im_end|>"]
    for n, message in enumerate(messages):
        role = message["role"]
        if n == 0 and role != "system":
            out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>")
        start = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
        out.append(f"{start}{_text(message.get('name') or role)}<|im_middle|>")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            if content:
                out.append(_text(content))
            out.append("<|tool_calls_section_begin|>")
            for call in message["tool_calls"]:
                args = call["function"].get("arguments", _MISSING)
                args = _text(args) if isinstance(args, str) or args is _MISSING else _tojson(args)
                out += ["<|tool_call_begin|>", _text(call.get("id", _MISSING)), "<|tool_call_argument_begin|>",
                        args, "<|tool_call_end|>"]
            out.append("<|tool_calls_section_end|>")
        elif role == "tool":
            out.append(f"## Return of {_text(message.get('tool_call_id', _MISSING))}\n    "
                       f"{_text(message.get('content', _MISSING))}")
        elif isinstance(content, str):
            out.append(content)
        elif content is not None:
            for part in content:
                image = part.get("type") == "image" or "image" in part or "image_url" in part
                out.append(_MEDIA + "\n" if image else _text(part.get("text", _MISSING)))
        out.append("<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(out)


_MISSING = object()


def _text(value: Any) -> str:
    """What jinja prints for a value: nothing for a missing one, else str()."""
    return "" if value is _MISSING else str(value)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson filter. Keeps the private-use marks of `mark_specials` as characters, so a marked
    special token stays marked under ensure_ascii=True too."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    if ensure_ascii:
        text = text.replace("\\udb80\\udc00", MARK_START).replace("\\udb80\\udc01", MARK_END)
    return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore-prefixed attributes (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set namespace attribute {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; here it renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs))
    return env


@functools.lru_cache(maxsize=32)
def _compile(text: str, where: str) -> jinja2.Template:
    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}:{e.lineno}: template syntax error: {e.message}") from None


def _template_line(tb: Any) -> int | None:
    """The template line of the innermost jinja frame in a traceback (jinja rewrites frames to template lines)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: cannot read the chat template ({e})") from None


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChatTemplateError(f"{path}: cannot read tokenizer_config.json ({e})") from None
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _named_templates(value: Any, where: str) -> dict[str, str]:
    """tokenizer_config.json's chat_template: a string, or a list of {"name": str, "template": str}."""
    if isinstance(value, str):
        return {"default": value}
    if (isinstance(value, list) and value
            and all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                    for t in value)):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(f"{where}: expected a template string or a list of {{'name': str, 'template': str}}, "
                            f"got {value!r:.80}")


def special_pattern(names: Sequence[str]) -> re.Pattern:
    """A regex matching any of these special-token names, longer names first."""
    return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))) or "(?!)")


def mark_specials(value: Any, pattern: re.Pattern) -> Any:
    """Wraps every special-token name in the strings of value (a string, or lists / dicts of them; dict keys are
    left alone) in MARK_START ... MARK_END. Marks already in a string are dropped first, so they cannot be forged."""
    if isinstance(value, str):
        value = value.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, value)
    if isinstance(value, Mapping):
        return {k: mark_specials(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mark_specials(v, pattern) for v in value)
    return value


def split_rendered(text: str, pattern: re.Pattern) -> Iterator[tuple[str, bool]]:
    """A text rendered from marked inputs -> (piece, is_special) in order: is_special pieces are the template's
    own special tokens; the rest is plain text with the marks removed (a marked special-token name is text). Text
    between two template tokens comes as one piece."""
    marked = re.compile(f"{MARK_START}(?:{pattern.pattern}){MARK_END}|({pattern.pattern})")
    start = 0
    for m in marked.finditer(text):
        if m.group(1) is not None:  # an unmarked name: the template's token (a marked one stays in the text)
            yield _unmark(text[start:m.start()]), False
            yield m.group(1), True
            start = m.end()
    yield _unmark(text[start:]), False


def _unmark(text: str) -> str:
    return text.replace(MARK_START, "").replace(MARK_END, "")
