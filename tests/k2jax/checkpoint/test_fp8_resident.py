"""weights="fp8": a converted --dtype fp8 checkpoint (load_checkpoint) and the release directory it came from
(load_hf_checkpoint, streamed) load with their routed experts FP8-resident (e4m3 weights and block scales on the
devices, never dequantised) and give the logits of the same checkpoint loaded dequantised (float32 compute,
within 1e-5 of max|logit|, same expert choices), unsharded and on 8 devices with expert parallelism; the same
loaded models generate the dequantised load's greedy tokens (Generator: prefill and decode steps over a batch of
prompts of different lengths) and give its reply in a greedy Chat turn. Expert dims (hidden 200, expert FFN 72)
are not multiples of 128: ragged edge blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax.checkpoint.orbax_checkpoint
from k2jax import Chat, Generator, Tokenizer, load_checkpoint
from k2jax.checkpoint.convert import convert_hf_to_orbax
from k2jax.checkpoint.hf_checkpoint import load_hf_checkpoint, write_hf_checkpoint
from k2jax.checkpoint.hf_mapping import hf_tensor_specs
from k2jax.checkpoint.orbax_checkpoint import CheckpointError, abstract_state
from k2jax.formats import quant
from k2jax.inference.tokenizer import special_tokens_for
from k2jax.model.config import tiny
from k2jax.model.transformer import param_info
from sharding.mesh import make_mesh
from sharding.rules import param_shardings
from tests.fp8_checks import assert_fp8_experts, assert_same_logits
from tests.oracle import random_release_tensors

CFG = tiny(hidden_size=200, moe_intermediate_size=72, vocab_size=512)  # the chat's 256 byte ranks + 256 specials
E, D, F, L = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size, CFG.num_moe_layers
stored_to_param, dequantize = k2jax.checkpoint.orbax_checkpoint._stored_to_param, quant.dequantize
F32 = {"param_dtype": "float32", "dtype": "float32"}
# greedy generation from two prompts of different lengths, 5 new tokens each (prefill + 4 decode steps), and one
# chat turn of 4 tokens: all batch 1, padded to 64 tokens, in a cache of 64 slots, so the Generator compiles one
# prefill and one decode per loaded model and the chat reuses them (CI time)
PROMPTS = [np.random.default_rng(5).integers(0, CFG.vocab_size, n).tolist() for n in (37, 50)]
NEW_TOKENS = 5
MAX_LEN = 64
CHAT = {"system": "Be brief.", "max_new_tokens": 4, "max_context": MAX_LEN}
MESSAGE = "What is MLA?"  # a 48-token prompt with the template and the system message (bytes-only tokenizer)
MIN_MARGIN = 1e-3  # each greedy step's top-1 minus top-2 logit over max|logit|: 100x the logits' tolerance


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("release") / "hf")
    write_hf_checkpoint(path, CFG, random_release_tensors(CFG, seed=23), dtype="fp8")
    return path


@pytest.fixture(scope="module")
def fp8_ckpt(release, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8ckpt") / "k2")
    convert_hf_to_orbax(release, path, dtype="fp8", show_progress=False)
    return path


def _load(source, **kwargs):
    return (load_hf_checkpoint if source.endswith("hf") else load_checkpoint)(source, **kwargs, **F32)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 24)))


@nnx.jit
def _forward(model, tokens_BT):
    return model(tokens_BT, return_aux=True)


@pytest.fixture(scope="module")
def dequantised_model(fp8_ckpt):
    return _load(fp8_ckpt)


@pytest.fixture(scope="module")
def want(dequantised_model, tokens):
    logits, aux = _forward(dequantised_model, tokens)
    return np.asarray(logits), np.asarray(aux["router_topk_ids"])


@pytest.fixture(scope="module")
def tokenizer():
    ranks = {bytes([b]): b for b in range(256)}  # bytes only: a 512-id vocabulary with the chat's special tokens
    return Tokenizer(ranks, special_tokens_for(len(ranks)))


def _greedy_steps(gen, prompt, new_tokens):
    """Greedy decoding of one prompt through gen.prefill / gen.decode (the shapes generate() and the chat use, so
    their compiled steps are reused) -> (new ids, the smallest step's top-1 minus top-2 logit over max|logit|)."""
    logits, cache = gen.prefill([prompt], gen.new_cache(1, MAX_LEN))
    ids, margin = [], np.inf
    for i in range(new_tokens):
        logits_V = np.asarray(logits)[0]
        top2 = np.sort(logits_V)[-2:]
        margin = min(margin, (top2[1] - top2[0]) / np.max(np.abs(logits_V)))
        ids.append(int(np.argmax(logits_V)))
        if i < new_tokens - 1:
            logits, cache = gen.decode(jnp.asarray(ids[-1:], jnp.int32), cache)
    return ids, margin


def _generate_and_chat(model, tokenizer):
    """A loaded model's greedy Generator.generate tokens for each prompt, its greedy chat turn's reply ids (the stop
    token included) and reply, and the Generator that ran them all."""
    gen = Generator(model)
    generated = [gen.generate([p], max_new_tokens=NEW_TOKENS, max_len=MAX_LEN)[0].tokens for p in PROMPTS]
    chat = Chat(model, tokenizer, **CHAT)
    chat.generator = gen  # the same jitted steps: compiled once per loaded model
    ids, stream = [], gen.stream

    def recording(*args, **kwargs):  # the ids the chat's generator yields in the turn
        for step_B in stream(*args, **kwargs):
            ids.append(int(step_B[0]))
            yield step_B
    gen.stream = recording
    reply = chat.send(MESSAGE, stream=False)
    return generated, ids, reply, gen


@pytest.fixture(scope="module")
def want_generated(dequantised_model, tokenizer):
    """The dequantised load's greedy tokens, chat reply ids and reply; each greedy step (the same steps again with
    their logits) clear of a near-tie, so a model whose logits are within the logits tolerance picks the same."""
    generated, ids, reply, gen = _generate_and_chat(dequantised_model, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": CHAT["system"]},
                                            {"role": "user", "content": MESSAGE}])
    assert all(MAX_LEN // 2 < len(p) <= MAX_LEN - NEW_TOKENS for p in PROMPTS + [prompt])  # one padded shape
    for p, want_ids, n in zip(PROMPTS + [prompt], generated + [ids], [NEW_TOKENS] * len(PROMPTS) + [len(ids)]):
        steps, margin = _greedy_steps(gen, p, n)
        assert want_ids == steps and margin > MIN_MARGIN, (want_ids, steps, margin)
    assert len(ids) > 1  # the turn ran decode steps after its prefill
    return generated, ids, reply


def _assert_generates_the_same(model, tokenizer, want_generated):
    generated, ids, reply, _ = _generate_and_chat(model, tokenizer)
    assert generated == want_generated[0]
    assert (ids, reply) == want_generated[1:]


@pytest.mark.parametrize("source", ["converted", "release"])
def test_fp8_resident_load_equals_the_dequantised_load(source, release, fp8_ckpt, tokens, want, tokenizer,
                                                       want_generated, monkeypatch):
    path = fp8_ckpt if source == "converted" else release
    dequantised = []  # every weight the load dequantises: its shape on the devices, its name on the host
    if source == "converted":
        def spy(w, scale, m, shape, dtype):
            dequantised.extend([shape] if scale is not None else [])
            return stored_to_param(w, scale, m, shape, dtype)
        monkeypatch.setattr(k2jax.checkpoint.orbax_checkpoint, "_stored_to_param", spy)
        experts = {(L, E, D, F), (L, E, F, D)}
    else:
        def spy(weight, scale, *args, name, **kwargs):
            dequantised.append(name)
            return dequantize(weight, scale, *args, name=name, **kwargs)
        monkeypatch.setattr(quant, "dequantize", spy)
        experts = {spec.name for spec in hf_tensor_specs(CFG) if ".mlp.experts." in spec.name}
    model = _load(path, weights="fp8")
    monkeypatch.undo()
    assert len(dequantised) > 3  # the attention matmuls are, the experts never
    assert not experts & set(dequantised)
    experts = assert_fp8_experts(model)
    # the release's e4m3 bytes and scales transposed to [.., in, out] / [.., Kb, Nb]: x scale is the dequantised W
    dequantised = _load(path).moe_blocks.mlp.experts
    for name, (K, N) in (("gate_proj", (D, F)), ("down_proj", (F, D))):
        w, s = getattr(experts, name)[...], getattr(experts, name + "_scale_inv")[...]
        blocks = np.repeat(np.repeat(np.asarray(s), 128, -2), 128, -1)[..., :K, :N]
        np.testing.assert_array_equal(np.asarray(w.astype(jnp.float32)) * blocks,
                                      np.asarray(getattr(dequantised, name)[...]))
    assert model.lm_head[...].dtype == jnp.float32  # the other weights as dequantised loads have them
    assert_same_logits(_forward(model, tokens), want)
    _assert_generates_the_same(model, tokenizer, want_generated)


@pytest.mark.parametrize("source", ["converted", "release"])
def test_fp8_resident_load_with_expert_parallelism(source, release, fp8_ckpt, tokens, want, tokenizer,
                                                    want_generated):
    """Shardings from sharding.rules on a mesh with an expert axis: each device holds its experts' e4m3 weights
    and their scales (whole along the blocks); the MoE runs inside expert parallelism's shard_map, in the forward
    and in generation's prefill and decode."""
    mesh = make_mesh({"expert": 4, "fsdp": 2})
    abstract = abstract_state(CFG.replace(**F32))
    shardings = param_shardings(param_info(nnx.merge(*abstract)), mesh, "ep_fsdp")
    model = _load(fp8_ckpt if source == "converted" else release, mesh=mesh, shardings=shardings, weights="fp8")
    experts = assert_fp8_experts(model)
    w, s = experts.gate_proj[...], experts.gate_proj_scale_inv[...]
    assert w.sharding.is_equivalent_to(shardings["moe_blocks.mlp.experts.gate_proj"], w.ndim)
    assert tuple(w.sharding.spec)[:2] == (None, "expert")
    assert tuple(s.sharding.spec) == tuple(w.sharding.spec)[:2] + (None, None)
    assert w.addressable_shards[0].data.shape[1] == E // 4
    with jax.set_mesh(mesh):
        got = _forward(model, tokens)
        hlo = _forward.lower(model, tokens).as_text()
        _assert_generates_the_same(model, tokenizer, want_generated)
    assert "all_to_all" in hlo or "all-to-all" in hlo  # the rows travelled to their experts
    assert_same_logits(got, want)


def test_weights_option_is_validated(release, fp8_ckpt, tmp_path):
    for load, path in ((load_checkpoint, fp8_ckpt), (load_hf_checkpoint, release)):
        with pytest.raises(ValueError, match="weights must be one of"):
            load(path, weights="e4m3")
    cfg = tiny()
    hf = str(tmp_path / "hf")
    write_hf_checkpoint(hf, cfg, random_release_tensors(cfg, seed=2), dtype="bfloat16")  # no FP8 anywhere
    convert_hf_to_orbax(hf, str(tmp_path / "bf16"), dtype="bfloat16", show_progress=False)
    with pytest.raises(CheckpointError, match="needs an fp8 checkpoint"):
        load_checkpoint(str(tmp_path / "bf16"), weights="fp8")
    with pytest.raises(CheckpointError, match="experts.0.gate_proj.weight is stored as bfloat16, not FP8"):
        load_hf_checkpoint(hf, weights="fp8")
    dense = cfg.replace(first_k_dense_replace=cfg.num_hidden_layers)  # FP8 matmuls, but no routed experts
    write_hf_checkpoint(str(tmp_path / "dense"), dense, random_release_tensors(dense, seed=2), dtype="fp8")
    convert_hf_to_orbax(str(tmp_path / "dense"), str(tmp_path / "dense-fp8"), dtype="fp8", show_progress=False)
    for load, path in ((load_checkpoint, "dense-fp8"), (load_hf_checkpoint, "dense")):
        with pytest.raises(CheckpointError, match="no FP8 routed experts"):
            load(str(tmp_path / path), weights="fp8")
