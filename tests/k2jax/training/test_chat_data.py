"""Loss masks from the release's own chat templates (tests/k2jax/inference/chat_templates/, real copies): system +
multi-turn + tool declarations + tool calls + tool results, against hand-written expectations of what the
assistant produces; K2-Thinking's agentic conversations and named assistant turns split into sequences, each turn
trained on the tokens the model saw when it produced it; templates whose turns cannot be told from their prompts
are refused in one line naming the turn."""

import json
import os
import re

import numpy as np
import pytest

from k2jax.inference.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe, write_bpe_ranks
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


def _tokenizer(path, ranks, template: str | None, think_tokens: bool = False) -> Tokenizer:
    """think_tokens: <think> and </think> are special tokens too (named in tokenizer_config.json)."""
    os.makedirs(path, exist_ok=True)
    write_bpe_ranks(os.path.join(path, "tiktoken.model"), ranks)
    if think_tokens:
        names = {**SPECIAL_TOKENS, 22: "<think>", 23: "</think>"}
        added = {str(len(ranks) + offset): {"content": name, "special": True} for offset, name in names.items()}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"added_tokens_decoder": added}, f)
    if template is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template)
    return Tokenizer.from_dir(path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_masks_on_the_release_templates(name, ranks, tmp_path):
    tok = _tokenizer(tmp_path, ranks, _template(name))
    [chat] = render_chat(tok, CONVERSATION, tools=TOOLS)  # one sequence: the whole conversation
    assert show_trained(tok, chat.ids, chat.weights) == EXPECTED[name]
    np.testing.assert_array_equal(chat.ids, tok.apply_chat_template(CONVERSATION, tools=TOOLS,
                                                                     add_generation_prompt=False))
    assert [k for k, _, _ in chat.spans] == [2, 4, 6]
    assert set(np.unique(chat.weights)) == {0.0, 1.0}
    assert chat.weights.sum() == sum(end - start for _, start, end in chat.spans)
    assert all(chat.ids[end - 1] == tok.eos_id for _, _, end in chat.spans)  # each turn's end is trained


def _call(n: int, a: int, b: int) -> dict:
    return {"id": f"functions.add:{n}", "type": "function",
            "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}


def _called(n: int, a: int, b: int) -> str:
    return (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.add:{n}<|tool_call_argument_begin|>"
            f'{{"a": {a}, "b": {b}}}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


def _result(n: int, text: str) -> str:
    return f"<|im_system|>add<|im_middle|>## Return of functions.add:{n}\n{text}<|im_end|>"


# an agentic conversation: reasoning, two tool calls with their results and an answer; a second user turn, another
# episode (a tool call, its result, an answer)
AGENTIC = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3? Then 4+4?"},
    {"role": "assistant", "content": None, "reasoning_content": "use the tool", "tool_calls": [_call(0, 2, 3)]},
    {"role": "tool", "tool_call_id": "functions.add:0", "name": "add", "content": "5"},
    {"role": "assistant", "content": "Adding.", "reasoning_content": "check it", "tool_calls": [_call(1, 5, 0)]},
    {"role": "tool", "tool_call_id": "functions.add:1", "name": "add", "content": "5"},
    {"role": "assistant", "content": "5.", "reasoning_content": "it is 5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": None, "reasoning_content": "add again", "tool_calls": [_call(2, 4, 4)]},
    {"role": "tool", "tool_call_id": "functions.add:2", "name": "add", "content": "8"},
    {"role": "assistant", "content": "8.", "reasoning_content": "it is 8"}]
THINKING_ASKED = (f"<|im_system|>tool_declare<|im_middle|>{DECLARED}<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                  f"<|im_user|>user<|im_middle|>2+3? Then 4+4?<|im_end|>{REPLY}")
# the first episode as later prompts have it: K2-Thinking drops its reasoning once its plain reply is there
FIRST_EPISODE_AS_HISTORY = (f"{THINKING_ASKED}<think></think>{_called(0, 2, 3)}{_result(0, '5')}{REPLY}"
                            f"<think></think>Adding.{_called(1, 5, 0)}{_result(1, '5')}{REPLY}"
                            f"<think></think>5.<|im_end|><|im_user|>user<|im_middle|>And 4+4?<|im_end|>{REPLY}")


def _shown(tok, chat) -> str:
    return show_trained(tok, chat.ids, chat.weights, max_run_chars=1 << 20)


def _reply_ids(tok, reasoning: str, content: str) -> list[int]:
    """A plain reply as K2-Thinking produces it: <think>, its reasoning, </think>, the content, <|im_end|>."""
    if "<think>" in tok.special_tokens:
        return ([tok.special("<think>")] + tok.encode(reasoning) + [tok.special("</think>")] + tok.encode(content)
                + [tok.eos_id])
    return tok.encode(f"<think>{reasoning}</think>{content}") + [tok.eos_id]


def _check_spans(tok, sequences, messages, tools, produced):
    """Every assistant turn is trained in exactly one sequence, on the tokens of its prompt (the conversation before
    it with the generation prompt) followed by the turn as the model produced it; nothing else is trained."""
    placed = sorted(k for chat in sequences for k, _, _ in chat.spans)
    assert placed == [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for chat in sequences:
        assert chat.weights.sum() == sum(end - start for _, start, end in chat.spans)
        for k, start, end in chat.spans:
            prompt = tok.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=True)
            np.testing.assert_array_equal(chat.ids[:start], prompt)
            np.testing.assert_array_equal(chat.ids[start:end], produced(k))
            assert (chat.weights[start:end] == 1).all()


@pytest.mark.parametrize("think_tokens", [False, True])
def test_k2_thinking_agentic_conversations_train_each_turn_on_what_the_model_saw(think_tokens, ranks, tmp_path):
    """K2-Thinking renders the reasoning of the tool-call turns of an episode in progress and drops it once the
    episode's plain reply is there; every plain reply renders as <think></think> and its content. Each episode
    becomes one sequence: its prompt as the model saw it (earlier episodes without their reasoning) and its turns
    with their reasoning, the reply's in the block the template leaves empty."""
    tok = _tokenizer(tmp_path, ranks, _template("k2_thinking"), think_tokens)
    assert ("<think>" in tok.special_tokens) == think_tokens
    sequences = render_chat(tok, AGENTIC, tools=TOOLS)
    assert [_shown(tok, c) for c in sequences] == [
        (f"{THINKING_ASKED}⟦<think>use the tool</think>{_called(0, 2, 3)}⟧{_result(0, '5')}{REPLY}"
         f"⟦<think>check it</think>Adding.{_called(1, 5, 0)}⟧{_result(1, '5')}{REPLY}"
         "⟦<think>it is 5</think>5.<|im_end|>⟧"),
        (f"{FIRST_EPISODE_AS_HISTORY}⟦<think>add again</think>{_called(2, 4, 4)}⟧{_result(2, '8')}{REPLY}"
         "⟦<think>it is 8</think>8.<|im_end|>⟧")]
    assert [[k for k, _, _ in c.spans] for c in sequences] == [[2, 4, 6], [8, 10]]

    def produced(k):  # a tool-call turn: as the template renders it in progress; a reply: written out here
        if k in (6, 10):
            return _reply_ids(tok, AGENTIC[k]["reasoning_content"], AGENTIC[k]["content"])
        before = len(tok.apply_chat_template(AGENTIC[:k], tools=TOOLS, add_generation_prompt=True))
        return tok.apply_chat_template(AGENTIC[:k + 1], tools=TOOLS, add_generation_prompt=False)[before:]

    _check_spans(tok, sequences, AGENTIC, TOOLS, produced)

    # an episode still in progress (the conversation ends at a tool result) trains in the whole conversation
    *done, open_ = render_chat(tok, AGENTIC[:10], tools=TOOLS)
    assert [[k for k, _, _ in c.spans] for c in done + [open_]] == [[2, 4, 6], [8]]
    np.testing.assert_array_equal(open_.ids, tok.apply_chat_template(AGENTIC[:10], tools=TOOLS,
                                                                     add_generation_prompt=False))
    assert _shown(tok, open_) == (
        f"{FIRST_EPISODE_AS_HISTORY}⟦<think>add again</think>{_called(2, 4, 4)}⟧{_result(2, '8')}")

    # without reasoning nothing renders differently later: one sequence, the whole conversation
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in AGENTIC]
    [chat] = render_chat(tok, plain, tools=TOOLS)
    np.testing.assert_array_equal(chat.ids, tok.apply_chat_template(plain, tools=TOOLS, add_generation_prompt=False))
    assert _shown(tok, chat) == (
        f"{THINKING_ASKED}⟦<think></think>{_called(0, 2, 3)}⟧{_result(0, '5')}{REPLY}"
        f"⟦<think></think>Adding.{_called(1, 5, 0)}⟧{_result(1, '5')}{REPLY}⟦<think></think>5.<|im_end|>⟧"
        f"<|im_user|>user<|im_middle|>And 4+4?<|im_end|>{REPLY}⟦<think></think>{_called(2, 4, 4)}⟧{_result(2, '8')}"
        f"{REPLY}⟦<think></think>8.<|im_end|>⟧")


@pytest.mark.parametrize("name", ["k2_instruct_0905", "k2_thinking", "builtin"])
def test_a_named_assistant_turn_trains_after_the_generation_prompt(name, ranks, tmp_path):
    """The assistant's `name` goes in its role line (<|im_assistant|>Kimi), which later turns see; the model produced
    the turn after the generation prompt's <|im_assistant|>assistant: the turn trains in a sequence of its own."""
    tok = _tokenizer(tmp_path, ranks, _template(name))
    messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "name": "Kimi", "content": "5."},
                {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "8."}]
    sequences = render_chat(tok, messages)
    think = "<think></think>" if name == "k2_thinking" else ""
    asked = ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
             "<|im_user|>user<|im_middle|>2+3?<|im_end|>")
    assert [_shown(tok, c) for c in sequences] == [
        f"{asked}{REPLY}⟦{think}5.<|im_end|>⟧",
        f"{asked}<|im_assistant|>Kimi<|im_middle|>{think}5.<|im_end|>{THEN}⟦{think}8.<|im_end|>⟧"]
    np.testing.assert_array_equal(sequences[1].ids, tok.apply_chat_template(messages, add_generation_prompt=False))
    _check_spans(tok, sequences, messages, None, lambda k: (_reply_ids(tok, "", messages[k]["content"]) if think
                                                            else tok.encode(messages[k]["content"]) + [tok.eos_id]))


@pytest.mark.parametrize("template, messages, match", [
    # renders only the last message: every earlier turn is rewritten
    ("{{ messages[-1].content }}<|im_end|>{% if add_generation_prompt %}<|im_assistant|>{% endif %}",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     "message 1 (assistant): the chat template renders the conversation up to this turn with the generation "
     "prompt as 'hi<|im_end|><|im_assistant|>' where the conversation up to the end of this turn has "
     "'yo<|im_end|>' (character 0): the turn's rendering does not follow its prompt"),
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
    [chat] = render_chat(tok, [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "It is 5."}])
    assert show_trained(tok, chat.ids, chat.weights) == "user: 2+3?<|im_end|>assistant:⟦ It is 5.<|im_end|>⟧"
