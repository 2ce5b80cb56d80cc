"""k2jax-demo: write a small K2 checkpoint in the release's FP8 layout, load it, run it, and report.

    k2jax-demo                            # tiny preset, random weights, 2 x 48 tokens
    k2jax-demo --preset=tiny --batch=4 --seq_len=64 --seed=1
    k2jax-demo --keep_dir=tiny-release    # keep the checkpoint it writes (to convert, or run again with --hf_dir)
    k2jax-demo --hf_dir=DIR               # run a (small) release-layout checkpoint of your own instead

It exercises the public API end to end (Transformer, to_hf_tensors, write_hf_checkpoint: FP8 e4m3 shards with
128x128 scales, config.json and index; load_hf_checkpoint; aux outputs) and prints the exact parameter counts
of the full Kimi K2 configuration from `jax.eval_shape` (no memory used). A bad --hf_dir or flag is one line on
stderr (exit 1 / 2, k2jax/tools/commands.py).

`write_tiny_release(path)` writes a random tiny K2 *with a tokenizer* (tiktoken.model, tokenizer_config.json,
chat_template.jinja) in the release layout: what notebooks/inference.ipynb and the tests convert, load and chat with
when the 1 TB release is not at hand.
"""

from __future__ import annotations

from k2jax.tools import startup

startup.quiet()  # before jax is imported: no CUDA / libtpu start-up lines on a machine without those devices

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

import k2jax  # noqa: E402
from k2jax.checkpoint.format import local_path  # noqa: E402
from k2jax.checkpoint.hf_checkpoint import load_hf_checkpoint, write_hf_checkpoint  # noqa: E402
from k2jax.checkpoint.orbax_checkpoint import CheckpointError  # noqa: E402
from k2jax.inference.chat_template import TEMPLATE_FILE  # noqa: E402
from k2jax.inference.tokenizer import SPECIAL_TOKENS, train_bpe, write_bpe_ranks  # noqa: E402
from k2jax.model import config as k2config  # noqa: E402
from k2jax.model.config import ConfigError  # noqa: E402
from k2jax.model.placement import abstract_model  # noqa: E402
from k2jax.tools import commands  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
# the tokenizer's own fixed English text (k2jax's prose can change without changing the demo's tokenizer)
_CORPUS = os.path.join(_HERE, "demo_corpus.txt")
# Kimi-K2-Instruct-0905's chat_template.jinja, which k2jax's built-in template renders exactly as (so a tiny release
# loads with a template of its own, as the releases do, and without the "no chat template" warning)
_CHAT_TEMPLATE = os.path.join(_HERE, "k2_instruct_0905_chat_template.jinja")


def write_tiny_release(path: str | os.PathLike, *, vocab_size: int = 1024, seed: int = 0) -> k2config.K2Config:
    """A random `tiny` K2 in the release's directory layout, tokenizer included: FP8 shards with 128x128 scales,
    index, config.json, tiktoken.model (a byte-level BPE trained on the fixed English text of
    k2jax/demo_corpus.txt, so English text takes few tokens), tokenizer_config.json naming the special tokens and
    chat_template.jinja (Kimi-K2-Instruct-0905's, as k2jax's built-in template renders). For notebooks and tests
    without the 1 TB release; the weights are random, so replies are gibberish."""
    path = local_path(path)
    num_ranks = vocab_size - 256
    with open(_CORPUS, encoding="utf-8") as f:
        ranks = train_bpe([f.read()], num_ranks)
    if len(ranks) != num_ranks:
        raise RuntimeError(f"the BPE corpus gave {len(ranks)} ranks, {num_ranks} were asked for")
    cfg = k2config.tiny(vocab_size=vocab_size, max_position_embeddings=1024, bos_token_id=num_ranks,
                        eos_token_id=num_ranks + 1)
    model = k2jax.Transformer(cfg, rngs=nnx.Rngs(seed))
    write_hf_checkpoint(path, cfg, k2jax.to_hf_tensors(model), dtype="fp8")
    write_bpe_ranks(os.path.join(path, "tiktoken.model"), ranks)
    added = {str(num_ranks + off): {"content": name, "special": True} for off, name in SPECIAL_TOKENS.items()}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]"}, f, indent=1)
    shutil.copyfile(_CHAT_TEMPLATE, os.path.join(path, TEMPLATE_FILE))
    return cfg


def _define_flags() -> None:
    """Flags exist only for the command line (defining them at import would clash with other entry points)."""
    flags.DEFINE_enum("preset", "tiny", ["tiny"], "Model preset to instantiate (CPU-sized presets only).")
    flags.DEFINE_integer("batch", 2, "Number of sequences.", lower_bound=1)
    flags.DEFINE_integer("seq_len", 48, "Tokens per sequence.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed for weights and tokens.")
    flags.DEFINE_string("hf_dir", None, "A release-layout checkpoint directory to run instead of a generated one "
                        "(it is read whole into memory: small models only).")
    flags.DEFINE_string("keep_dir", None, "Write the generated checkpoint here (a new directory) and keep it, e.g. to "
                        "convert it with k2jax-convert or run it again with --hf_dir; by default it goes to a "
                        "temporary directory that is deleted.")


def run(preset: str, batch: int, seq_len: int, seed: int, hf_dir: str | None = None,
        keep_dir: str | None = None) -> dict:
    """Writes (unless hf_dir is given) and loads the checkpoint, runs it. keep_dir: where to write it and keep it
    (must not exist)."""
    if hf_dir is not None and keep_dir is not None:
        raise commands.UsageError("--keep_dir keeps the checkpoint the demo generates; with --hf_dir there is none")
    hf_dir, keep_dir = (local_path(p) if p is not None else None for p in (hf_dir, keep_dir))
    if keep_dir is not None and os.path.exists(keep_dir):
        raise commands.UsageError(f"--keep_dir={keep_dir} already exists; pass a new directory")
    with tempfile.TemporaryDirectory() as tmp:
        if hf_dir is None:
            cfg = k2config.preset(preset)
            hf_dir = keep_dir or os.path.join(tmp, f"{preset}-fp8")
            random_model = k2jax.Transformer(cfg, rngs=nnx.Rngs(seed))
            write_hf_checkpoint(hf_dir, cfg, k2jax.to_hf_tensors(random_model), dtype="fp8")
        model = load_hf_checkpoint(hf_dir)
    cfg = model.cfg
    if seq_len > cfg.max_position_embeddings:
        raise commands.UsageError(f"--seq_len={seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len), 0, cfg.vocab_size)

    forward = nnx.jit(lambda m, t: m(t, return_aux=True))
    start = time.perf_counter()
    logits, aux = jax.block_until_ready(forward(model, tokens))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(forward(model, tokens))
    again = time.perf_counter() - start
    return dict(cfg=cfg, logits=logits, aux=aux, compile_s=first, step_s=again,
                next_tokens=np.asarray(jnp.argmax(logits[:, -1], axis=-1)))


def main(argv=None):
    FLAGS = flags.FLAGS
    if argv is not None and len(argv) > 1:
        raise commands.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    r = run(FLAGS.preset, FLAGS.batch, FLAGS.seq_len, FLAGS.seed, FLAGS.hf_dir, FLAGS.keep_dir)
    cfg, aux = r["cfg"], r["aux"]
    source = FLAGS.hf_dir or f"preset {FLAGS.preset} written as an FP8 release-layout checkpoint and loaded"
    print(f"k2jax demo: {source}; {cfg.num_params():,} parameters "
          f"({cfg.num_active_params():,} active per token), {jax.devices()[0].platform} backend")
    print(f"forward of {FLAGS.batch} x {FLAGS.seq_len} tokens: logits {tuple(r['logits'].shape)} "
          f"{r['logits'].dtype}, compile+run {r['compile_s']:.2f}s, run {r['step_s'] * 1e3:.1f} ms")
    print(f"greedy next token per sequence: {r['next_tokens'].tolist()}")
    print("max pre-softmax logit per layer (over heads):",
          " ".join(f"{v:.3f}" for v in np.asarray(aux["attn_max_logits"]).max(axis=1)))
    load = np.asarray(aux["expert_load"])
    print(f"expert load per MoE layer (tokens per expert): min {load.min(axis=1).tolist()} "
          f"max {load.max(axis=1).tolist()}")
    k2 = k2config.kimi_k2()
    abstract = nnx.state(abstract_model(k2))
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract))
    print(f"Kimi K2 (jax.eval_shape): {total:,} parameters, {k2.num_active_params():,} active per token, "
          f"{k2.flops_per_token(4096) / 1e9:.1f} GFLOP per training token at 4K context")
    if FLAGS.keep_dir:
        kept = local_path(FLAGS.keep_dir)
        print(f"kept the checkpoint in {kept}: run it again with k2jax-demo --hf_dir={kept}, or convert it with "
              f"k2jax-convert --hf_dir={kept} --out_dir=DIR")


def cli():
    _define_flags()
    for name in ["preset", "batch", "seq_len", "seed", "hf_dir", "keep_dir"]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])  # --help lists it
    commands.run(main, errors={CheckpointError: commands.FAILED, ConfigError: commands.FAILED,
                               OSError: commands.FAILED}, prog="k2jax-demo", doc=__doc__)


if __name__ == "__main__":
    cli()
