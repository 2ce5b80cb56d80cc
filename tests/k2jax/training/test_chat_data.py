"""Loss masks from the release's own chat templates (tests/k2jax/inference/chat_templates/, real copies): system +
multi-turn + tool declarations + tool calls + tool results, against hand-written expectations of what the
assistant produces; K2-Thinking's reasoning where its template renders it; templates whose prefixes do not line up
are refused in one line naming the turn."""

import json
import os
import re

import numpy as np
import pytest

from k2jax.inference.tokenizer import Tokenizer, train_bpe, write_bpe_ranks
from k2jax.training.chat_data import ChatMaskError, render_chat, show_trained

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "inference", "chat_templates")
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b"}}]
CALL = {"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3? Then 4+4?"},
                {"role": "assistant", "content": "Adding.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "functions.add:0", "name": "add", "content": "5"},
                {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 4+4?"},
                {"role": "assistant", "content": "8."}]
DECLARED = '[{"type": "function", "function": {"name": "add", "description": "a + b"}}]<|im_end|>'
ASKED = ("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>2+3? Then 4+4?<|im_end|>"
         "<|im_assistant|>assistant<|im_middle|>")
CALLED = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>"
          '{"a": 2, "b": 3}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
THEN = "<|im_user|>user<|im_middle|>And 4+4?<|im_end|><|im_assistant|>assistant<|im_middle|>"
REPLY = "<|im_assistant|>assistant<|im_middle|>"
# what each template renders, the trained text between ⟦ and ⟧: the assistant's content, tool calls and <|im_end|>
EXPECTED = {
    "k2_instruct_v1": (f"<|im_system|>tool_declare<|im_middle|>{DECLARED}{ASKED}⟦Adding.<|im_end|>⟧"  # no tool calls
                       f"<|im_system|>tool<|im_middle|>5<|im_end|>{REPLY}⟦5.<|im_end|>⟧{THEN}⟦8.<|im_end|>⟧"),
    "k2_instruct_v2": (f"<|im_system|>tool_declare<|im_middle|>{DECLARED}{ASKED}⟦Adding.{CALLED}⟧"
                       f"<|im_system|>tool<|im_middle|>## Return of functions.add:0\n    5<|im_end|>{REPLY}"
                       f"⟦5.<|im_end|>⟧{THEN}⟦8.<|im_end|>⟧"),
    "k2_instruct_0905": (f"<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  {DECLARED}{ASKED}⟦Adding.{CALLED}⟧"
                         f"<|im_system|>add<|im_middle|>## Return of functions.add:0\n    5<|im_end|>{REPLY}"
                         f"⟦5.<|im_end|>⟧{THEN}⟦8.<|im_end|>⟧"),
    "k2_thinking": (f"<|im_system|>tool_declare<|im_middle|>{DECLARED}{ASKED}⟦<think></think>Adding.{CALLED}⟧"
                    f"<|im_system|>add<|im_middle|>## Return of functions.add:0\n5<|im_end|>{REPLY}"
                    f"⟦<think></think>5.<|im_end|>⟧{THEN}⟦<think></think>8.<|im_end|>⟧"),
}
EXPECTED["builtin"] = EXPECTED["k2_instruct_0905"]  # k2jax's own, for a release directory without a template


def _template(name: str) -> str | None:
    if name == "builtin":
        return None
    if name == "k2_instruct_v2":  # shipped inside tokenizer_config.json
        with open(os.path.join(TEMPLATES, name, "tokenizer_config.json")) as f:
            return json.load(f)["chat_template"]
    with open(os.path.join(TEMPLATES, name, "chat_template.jinja")) as f:
        return f.read()


@pytest.fixture(scope="module")
def ranks():
    return train_bpe(["Be brief. What is 2+3? Then 4+4? Adding. The answer is 5. It is 8. functions add"] * 4, 300)


def _tokenizer(path, ranks, template: str | None) -> Tokenizer:
    os.makedirs(path, exist_ok=True)
    write_bpe_ranks(os.path.join(path, "tiktoken.model"), ranks)
    if template is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template)
    return Tokenizer.from_dir(path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_masks_on_the_release_templates(name, ranks, tmp_path):
    tok = _tokenizer(tmp_path, ranks, _template(name))
    chat = render_chat(tok, CONVERSATION, tools=TOOLS)
    assert show_trained(tok, chat.ids, chat.weights) == EXPECTED[name]
    np.testing.assert_array_equal(chat.ids, tok.apply_chat_template(CONVERSATION, tools=TOOLS,
                                                                     add_generation_prompt=False))
    assert [k for k, _, _ in chat.spans] == [2, 4, 6]
    assert set(np.unique(chat.weights)) == {0.0, 1.0}
    assert chat.weights.sum() == sum(end - start for _, start, end in chat.spans)
    assert all(chat.ids[end - 1] == tok.eos_id for _, _, end in chat.spans)  # each turn's end is trained


THINKING_TURN = [{"role": "user", "content": "2+3?"},
                 {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "use the tool"},
                 {"role": "tool", "tool_call_id": "functions.add:0", "name": "add", "content": "5"}]


def test_thinking_reasoning_is_trained_where_the_template_renders_it_and_refused_where_it_is_rewritten(
        ranks, tmp_path):
    """K2-Thinking keeps the reasoning of tool-call turns after the last plain reply: an agentic turn in progress
    trains on it. Once a plain reply follows, the template drops that reasoning from the whole conversation while
    the prompt of the reply still has it: the prefixes no longer line up, refused in one line naming the turn."""
    tok = _tokenizer(tmp_path, ranks, _template("k2_thinking"))
    chat = render_chat(tok, THINKING_TURN)
    assert show_trained(tok, chat.ids, chat.weights) == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        f"<|im_user|>user<|im_middle|>2+3?<|im_end|>{REPLY}⟦<think>use the tool</think>{CALLED}⟧"
        "<|im_system|>add<|im_middle|>## Return of functions.add:0\n5<|im_end|>")
    with pytest.raises(ChatMaskError) as e:
        render_chat(tok, THINKING_TURN + [{"role": "assistant", "content": "5."}])
    message = str(e.value)
    assert "\n" not in message and message.startswith("message 1 (assistant): the chat template renders the "
                                                      "conversation up to the end of this turn as ")
    assert "<think>use the tool</think>" in message and "its prefixes do not line up" in message


@pytest.mark.parametrize("template, messages, match", [
    # renders only the last message: every earlier turn is rewritten
    ("{{ messages[-1].content }}<|im_end|>{% if add_generation_prompt %}<|im_assistant|>{% endif %}",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     "message 1 (assistant): the chat template renders the conversation up to this turn with the generation "
     "prompt as 'hi<|im_end|><|im_assistant|>' where the whole conversation has 'yo<|im_end|>'"),
    # a generation prompt that ends in a space the reply's first word takes: the text lines up, the tokens do not
    ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}",
     [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "Adding."}],
     "message 1 (assistant): the chat template's tokens of the conversation up to this turn with the generation "
     "prompt are not a prefix"),
    ("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}", [{"role": "assistant", "content": "yo"}],
     "message 0 (assistant): the conversation starts with the assistant"),
])
def test_templates_whose_prefixes_do_not_line_up_are_refused(template, messages, match, ranks, tmp_path):
    tok = _tokenizer(tmp_path, ranks, template)
    with pytest.raises(ChatMaskError, match="^" + re.escape(match)):
        render_chat(tok, messages)


def test_a_cut_inside_text_that_tokenises_alike_is_accepted(ranks, tmp_path):
    """A prompt that ends in plain text (no special token at the cut): the prefix's own tokens are compared."""
    tok = _tokenizer(tmp_path, ranks, "{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
                                      "{% if add_generation_prompt %}assistant:{% endif %}")
    chat = render_chat(tok, [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "It is 5."}])
    assert show_trained(tok, chat.ids, chat.weights) == "user: 2+3?<|im_end|>assistant:⟦ It is 5.<|im_end|>⟧"
