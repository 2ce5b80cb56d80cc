"""Fine-tuning on conversations end to end: train.py with data.source chat:..., the tokenizer and chat template of a
release directory (k2jax.tools.demo.write_tiny_release + Kimi-K2-Instruct-0905's template) and init_from its
FP8 conversion: it prints a sample with its trained tokens marked before compiling, step 0's loss is the
converted checkpoint's weighted loss on the first batch, the loss on the assistant's tokens falls, and the metrics
count trained tokens and the conversations truncated to a row. A second run fine-tunes on K2-Thinking's agentic
conversations (reasoning, tool calls and results, answers, two episodes each) through Kimi-K2-Thinking's template:
each conversation trains as two sequences, counted in the metrics. Two train.py runs (8 fake CPU devices)."""

import json
import os
import random
import shutil
import subprocess
import sys

import jax
import ml_collections
import pytest
from flax import nnx

from k2jax.training.metrics import read_metrics
from tests.k2jax.training.test_train import ROOT, _env

TEMPLATES = os.path.join(ROOT, "tests", "k2jax", "inference", "chat_templates")
TEMPLATE = os.path.join(TEMPLATES, "k2_instruct_0905", "chat_template.jinja")
ADD = {"type": "function", "function": {"name": "add"}}


def _conversation(rng: random.Random, i: int) -> dict:
    a, b = rng.randrange(10, 99), rng.randrange(10, 99)
    ask = {"role": "user", "content": f"What is {a} plus {b}?" + " Please tell me." * (60 if i == 0 else 0)}
    if i % 3 == 1:  # a tool call, its result, the answer
        call = {"id": "functions.add:0", "type": "function",
                "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}
        return {"tools": [ADD], "messages": [
            {"role": "system", "content": "You are a calculator."}, ask,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "functions.add:0", "name": "add", "content": str(a + b)},
            {"role": "assistant", "content": f"The answer is {a + b}."}]}
    return {"messages": [{"role": "system", "content": "You are a calculator."}, ask,
                         {"role": "assistant", "content": f"The answer is {a + b}."},
                         {"role": "user", "content": "Thank you!"},
                         {"role": "assistant", "content": "You are welcome."}]}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from k2jax.checkpoint.convert import convert_hf_to_orbax
    from k2jax.tools.demo import write_tiny_release
    root = tmp_path_factory.mktemp("sft")
    release, converted = str(root / "release"), str(root / "k2-fp8")
    write_tiny_release(release)  # FP8 shards, tiktoken.model, tokenizer_config.json (vocabulary 1024)
    shutil.copy(TEMPLATE, release)
    convert_hf_to_orbax(release, converted, dtype="fp8", show_progress=False)
    rng = random.Random(0)
    data = root / "conversations.jsonl"
    data.write_text("".join(json.dumps(_conversation(rng, i)) + "\n" for i in range(48)))
    workdir = str(root / "run")
    stdout = _train(release, converted, release, data, workdir)
    return {"release": release, "converted": converted, "data": str(data), "workdir": workdir, "stdout": stdout}


def _train(release: str, converted: str, tokenizer_dir: str, data, workdir: str) -> str:
    """train.py, 10 steps of 8 rows of 256 tokens on chat data from init_from the conversion: its stdout."""
    args = [f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", f"--config.model.hf_config={release}",
            f"--config.init_from={converted}", f"--config.data.source=chat:{data}",
            f"--config.data.tokenizer_dir={tokenizer_dir}", "--config.seq_len=256", "--config.global_batch=8",
            "--config.steps=10", "--config.optimizer.warmup_steps=2", "--config.metrics.every=1",
            "--config.metrics.tensorboard=False", "--config.checkpoint.every=100",
            "--config.checkpoint.async_save=False"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=_env(8), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _agentic(rng: random.Random) -> dict:
    """Two episodes: a question, reasoning and a tool call, its result, reasoning and the answer; a second question,
    the same. K2-Thinking's template drops an episode's reasoning once its answer is there: two sequences (each
    under a row of 257 tokens with the tiny release's tokenizer)."""
    a, b, c = (rng.randrange(10, 99) for _ in range(3))
    messages = [{"role": "system", "content": "Add."}]
    for n, (x, y) in enumerate([(a, b), (a + b, c)]):
        call = {"id": f"functions.add:{n}", "type": "function", "function": {"name": "add", "arguments": f"[{x}, {y}]"}}
        messages += [{"role": "user", "content": f"What is {x} plus {y}?"},
                     {"role": "assistant", "content": None, "tool_calls": [call],
                      "reasoning_content": f"Add {x} and {y}."},
                     {"role": "tool", "tool_call_id": call["id"], "name": "add", "content": str(x + y)},
                     {"role": "assistant", "content": f"It is {x + y}.",
                      "reasoning_content": f"The tool says {x + y}."}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def thinking_run(sft_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-thinking")
    tokenizer_dir = root / "tokenizer"  # the release's tokenizer with Kimi-K2-Thinking's template
    tokenizer_dir.mkdir()
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(sft_run["release"], name), tokenizer_dir)
    shutil.copy(os.path.join(TEMPLATES, "k2_thinking", "chat_template.jinja"), tokenizer_dir)
    rng = random.Random(1)
    data = root / "agentic.jsonl"
    data.write_text("".join(json.dumps(_agentic(rng)) + "\n" for _ in range(24)))
    workdir = str(root / "run")
    stdout = _train(sft_run["release"], sft_run["converted"], str(tokenizer_dir), data, workdir)
    return {"workdir": workdir, "stdout": stdout}


def test_it_prints_a_sample_with_its_trained_tokens_before_compiling(sft_run):
    out = sft_run["stdout"]
    assert out.index("batch: ") < out.index("sample conversation (") < out.index("compiling the train step")
    sample = out[out.index("sample conversation ("):out.index("compiling the train step")]
    assert f"({sft_run['data']}:1): " in sample and "longer than a row of seq_len + 1 = 257 tokens: truncate" in sample
    assert "<|im_assistant|>assistant<|im_middle|>⟦The answer is " in sample
    assert "<|im_user|>user<|im_middle|>Thank you!<|im_end|>" in sample  # a user turn: not marked
    assert "⟦You are welcome.<|im_end|>⟧" in sample
    assert " tok/s (" in out and " trained)" in out  # the step lines: all targets and the trained ones


def test_the_loss_on_the_assistants_tokens_falls_and_the_metrics_count_them(sft_run):
    rows = read_metrics(sft_run["workdir"])
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(10))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert all(0 < r["trained_tokens"] < r["tokens"] <= 8 * 256 for r in rows)
    timed = [r for r in rows if "tokens_per_s" in r]
    assert len(timed) >= 6 and all(r["trained_tokens_per_s"] < r["tokens_per_s"] for r in timed)
    assert sum(r["conversations_truncated"] for r in rows) >= 1  # conversation 0 is longer than a row
    assert sum(r["conversations_dropped"] for r in rows) == 0


def test_init_from_the_fp8_conversion_starts_from_its_weights(sft_run):
    """Step 0's loss is the weighted loss of the converted FP8 checkpoint (dequantised to float32) on the first
    batch of the same data, computed here on one device."""
    from k2jax.checkpoint.orbax_checkpoint import load_checkpoint
    from k2jax.training.data import make_iterator
    from k2jax.job_config import base_config
    from k2jax.training.step import next_token_loss
    model = load_checkpoint(sft_run["converted"], param_dtype="float32")
    data = ml_collections.ConfigDict(base_config().data)
    data.source, data.tokenizer_dir = f"chat:{sft_run['data']}", sft_run["release"]
    batch = next(make_iterator(data, seq_len=256, global_batch=8, vocab_size=model.cfg.vocab_size, seed=0,
                               process_index=0, process_count=1))
    loss_sum, (weight, _) = nnx.jit(next_token_loss)(model, {k: jax.numpy.asarray(v) for k, v in batch.items()
                                                             if not k.startswith("conversations_")})
    want = float(loss_sum / weight)
    got = read_metrics(sft_run["workdir"])[0]["loss"]
    assert abs(got - want) <= 1e-5 * want, (got, want)


def test_k2_thinking_agentic_conversations_train_as_their_sequences(thinking_run):
    out = thinking_run["stdout"]
    sample = out[out.index("sample conversation ("):out.index("compiling the train step")]
    assert "split into 2 sequences" in sample and "\nsequence 2 of 2: " in sample
    assert "⟦<think>Add " in sample and "⟦<think>The tool says " in sample  # reasoning trained where produced
    rows = read_metrics(thinking_run["workdir"])
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert all(0 < r["trained_tokens"] < r["tokens"] <= 8 * 256 for r in rows)
    assert sum(r["conversations_truncated"] + r["conversations_dropped"] for r in rows) == 0  # rows hold them whole
    split = sum(r["conversations_split"] for r in rows)
    assert split >= 8 and sum(r["split_sequences"] for r in rows) == 2 * split  # every conversation: two sequences
    assert "conversations split into " in out  # the step lines say so
