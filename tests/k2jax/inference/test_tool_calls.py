"""K2 tool-call parsing: whole replies, streamed pieces (any split gives the same result), ids, malformed and
truncated sections (given back as text with an error, never an exception)."""

import numpy as np
import pytest

import k2jax
from k2jax.inference.generate import Completion
from k2jax.inference.tokenizer import Tokenizer, special_tokens_for, train_bpe
from k2jax.inference.tool_calls import ARGUMENT_BEGIN as A
from k2jax.inference.tool_calls import CALL_BEGIN as B
from k2jax.inference.tool_calls import CALL_END as E
from k2jax.inference.tool_calls import SECTION_BEGIN as SB
from k2jax.inference.tool_calls import SECTION_END as SE
from k2jax.inference.tool_calls import ToolCall, ToolCallParser, parse_tool_calls

TWO_CALLS = (f"I'll check both.{SB}{B}functions.get_weather:0{A}{{\"city\": \"Paris\"}}{E}"
             f"{B}functions.web.search:1{A}{{\"q\": \"jazz\", \"n\": [1, 2]}}{E}{SE}")


@pytest.fixture(scope="module")
def tok():
    ranks = train_bpe(["functions get weather city Paris jazz search the <|tool_call_begin|>"] * 10, 320)
    return Tokenizer(ranks, special_tokens_for(len(ranks)))


def _calls(reply):
    return [(c.id, c.name, c.arguments, c.arguments_valid) for c in reply.tool_calls]


def test_calls_come_back_structured():
    reply = k2jax.parse_tool_calls(TWO_CALLS)
    assert reply.ok and reply.content == "I'll check both."
    assert _calls(reply) == [("functions.get_weather:0", "get_weather", {"city": "Paris"}, True),
                             ("functions.web.search:1", "web.search", {"q": "jazz", "n": [1, 2]}, True)]
    assert reply.to_message() == {"role": "assistant", "content": "I'll check both.", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "functions.web.search:1", "type": "function",
         "function": {"name": "web.search", "arguments": '{"q": "jazz", "n": [1, 2]}'}}]}
    plain = parse_tool_calls("No tools needed.")
    assert plain.ok and plain.content == "No tools needed." and plain.tool_calls == ()
    assert "tool_calls" not in plain.to_message()


def test_whitespace_between_markers_and_text_after_the_section():
    text = f"{SB}\n{B} functions.f:3 {A}\n {{\"a\": 1}} \n{E}\n{SE} done"
    reply = parse_tool_calls(text)
    assert reply.ok and reply.content == " done"
    assert reply.tool_calls == (ToolCall("functions.f:3", "f", {"a": 1}, '{"a": 1}', True),)


def test_arguments_that_are_not_json_keep_the_raw_string():
    reply = parse_tool_calls(f"{SB}{B}functions.f:0{A}{{city: Paris}}{E}{B}functions.g:1{A}{E}{SE}")
    assert reply.ok
    assert _calls(reply) == [("functions.f:0", "f", "{city: Paris}", False), ("functions.g:1", "g", "", False)]


@pytest.mark.parametrize("text, problem", [
    (f"a{SB}{B}functions.f:0{A}{{}}{E}oops{B}functions.g:1{A}{{}}{E}{SE}b", "text 'oops' between tool calls"),
    (f"a{SB}{B}get weather{A}{{}}{E}{SE}b", "is not functions.NAME:INDEX"),
    (f"a{SB}{B}functions.f:0{E}{SE}b", f"{E} where {A} belongs"),
    (f"a{SB}{B}functions.f:0{A}{{}}{SB}{E}{SE}b", f"{SB} where {E} belongs"),
    (f"a{SB}{B}functions.f:0{A}{{}}{SE}b", f"{SE} where {E} belongs"),
])
def test_malformed_sections_are_given_back_as_text(text, problem):
    reply = parse_tool_calls(text)
    assert not reply.ok and problem in reply.error and "given back as text" in reply.error
    assert reply.tool_calls == () and reply.content == text  # nothing lost


@pytest.mark.parametrize("cut", [f"{SB}", f"{SB}{B}functions.f:0", f"{SB}{B}functions.f:0{A}{{\"a\":",
                                 f"{SB}{B}functions.f:0{A}{{}}{E}", f"{SB}{B}functions.f:0{A}{{}}{E}<|tool_ca"])
def test_truncated_sections_are_flagged(cut):
    reply = parse_tool_calls("Sure." + cut)
    assert reply.tool_calls == () and reply.content == "Sure." + cut
    assert "ended inside a tool-call section" in reply.error and "max_new_tokens" in reply.error


def test_stray_markers_outside_a_section_stay_text():
    reply = parse_tool_calls(f"x{E}y{SE}")
    assert reply.content == f"x{E}y{SE}" and reply.tool_calls == ()
    assert reply.error.count("outside a tool-call section") == 2


@pytest.mark.parametrize("text", [TWO_CALLS, TWO_CALLS + " and after", f"a{SB}{B}bad id{A}{{}}{E}{SE}b",
                                  "Sure." + f"{SB}{B}functions.f:0{A}{{\"a\":", "<|tool <|im_end|> plain <|"])
def test_streaming_any_split_equals_parsing_at_once(text):
    """Pieces split anywhere, markers included: feed() returns exactly the content, in order, and the result
    is the one-shot parse."""
    whole = parse_tool_calls(text)
    rng = np.random.default_rng(len(text))
    for _ in range(30):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=rng.integers(1, 12), replace=False))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        parser = ToolCallParser()
        shown = "".join(parser.feed(p) for p in pieces) + parser.close()
        assert parser.reply == whole and shown == whole.content
    with pytest.raises(RuntimeError, match="after close"):
        parser.feed("x")


def test_content_streams_before_the_section_and_nothing_of_it_leaks():
    parser = ToolCallParser()
    assert parser.feed("Let me ") == "Let me "
    assert parser.feed("check.<|tool_calls_sec") == "check."  # a possible marker is held back
    assert parser.feed("tion_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}") == ""
    assert parser.feed("<|tool_call_end|><|tool_calls_section_end|> Done.") == " Done."
    assert parser.close() == "" and _calls(parser.reply) == [("functions.f:0", "f", {}, True)]


def test_ids_only_special_marker_ids_are_markers(tok):
    ids = (tok.encode("Checking.") + [tok.special(SB), tok.special(B)] + tok.encode("functions.get_weather:0")
           + [tok.special(A)] + tok.encode('{"city": "Paris"}') + [tok.special(E), tok.special(SE)])
    reply = parse_tool_calls(ids, tok)
    assert reply.ok and reply.content == "Checking."
    assert _calls(reply) == [("functions.get_weather:0", "get_weather", {"city": "Paris"}, True)]
    assert parse_tool_calls(Completion(ids, "stop"), tok) == reply  # a Generator's output
    as_text = tok.encode(TWO_CALLS)  # marker names written as ordinary tokens are text, not markers
    assert parse_tool_calls(as_text, tok) == k2jax.ParsedReply(TWO_CALLS, ())
    with pytest.raises(ValueError, match="need the tokenizer"):
        parse_tool_calls(ids)
    with pytest.raises(ValueError, match="is not one of"):
        ToolCallParser().feed_marker("<|im_end|>")
