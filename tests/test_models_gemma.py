"""Gemma 2 / Gemma 3 (text) match transformers (float32): dense forward, paged ragged forward with
sliding windows that prompts outgrow, a decode step over the cache, and greedy decoding through
the engine."""

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from model_zoo.attention import AttentionMetadata
from model_zoo.config import ModelConfig
from model_zoo.gemma import GemmaForCausalLM, layer_period
from model_zoo.llama import init_kv_cache, unrolled_layers
from model_zoo.loader import load_weights, resolve_model
from model_zoo.registry import build_model, get_model_class
from tests.tiny_models import make_tiny_hf_model

ARCHS = ["gemma2", "gemma3"]
LENGTHS = [1, 7, 16, 23]          # the tiny models' window is 8: 16 and 23 outgrow it
PAGE = 4


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path, hf = make_tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param),
                                  with_tokenizer=False)
    resolved = resolve_model(str(path))
    params = load_weights(resolved, "float32", progress=False)
    return resolved.config, build_model(resolved.config, params), hf, params


def _hf_logits(hf, toks):
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(toks))).logits.float().numpy()


def test_dense_matches_transformers(tiny):
    config, model, hf, params = tiny
    assert isinstance(model, GemmaForCausalLM)
    toks = np.random.RandomState(0).randint(0, config.vocab_size, size=(3, 23))
    ref = _hf_logits(hf, toks)
    assert _rel_err(np.asarray(model.forward_dense(jnp.asarray(toks))), ref) <= 1e-4
    # The window matters at this length: the same weights with full attention everywhere differ.
    no_window = dataclasses.replace(config, layer_types=("full_attention",) * config.num_layers)
    full = GemmaForCausalLM(no_window, params).forward_dense(jnp.asarray(toks))
    assert _rel_err(np.asarray(full), ref) > 1e-2


def _paged_batch(rng, lengths, vocab):
    """A flat prefill batch whose pages are handed out in random order (page 0 stays null)."""
    max_pages = -(-(max(lengths) + 1) // PAGE)
    num_pages = 1 + max_pages * len(lengths)
    perm = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((len(lengths), max_pages), np.int32)
    prompts = [rng.randint(0, vocab, size=n) for n in lengths]
    used = 0
    for i, n in enumerate(lengths):
        need = -(-(n + 1) // PAGE)             # room for one decode token
        block_tables[i, :need] = perm[used:used + need]
        used += need
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    sid = np.concatenate([[i] * n for i, n in enumerate(lengths)]).astype(np.int32)
    slots = block_tables[sid, pos // PAGE] * PAGE + pos % PAGE
    md = AttentionMetadata(jnp.asarray(pos), jnp.asarray(sid), jnp.asarray(slots, jnp.int32),
                           jnp.asarray(block_tables), jnp.asarray(lengths, jnp.int32),
                           jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32))
    return prompts, np.concatenate(prompts).astype(np.int32), md, block_tables, num_pages


def _decode_md(lengths, block_tables):
    pos = np.asarray(lengths, np.int32)
    rows = np.arange(len(lengths))
    slots = block_tables[rows, pos // PAGE] * PAGE + pos % PAGE
    return AttentionMetadata(jnp.asarray(pos), jnp.asarray(rows, jnp.int32),
                             jnp.asarray(slots, jnp.int32), jnp.asarray(block_tables),
                             jnp.asarray(pos + 1), jnp.arange(len(lengths) + 1, dtype=jnp.int32))


def _jitted(model):
    """model(tokens, kv, md, logits_indices) as one compiled program (eager dispatch is slow)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, *args: nnx.merge(graphdef, st)(*args))
    return lambda *args: forward(state, *args)


@pytest.mark.parametrize("stack", ["scan", "unrolled"])
def test_paged_matches_transformers(tiny, stack):
    """Ragged prefill over shuffled pages, then one decode token per sequence reading the cache."""
    config, model, hf, _ = tiny
    model.layer_stack = unrolled_layers if stack == "unrolled" else None
    try:
        rng = np.random.RandomState(1)
        prompts, toks, md, block_tables, num_pages = _paged_batch(rng, LENGTHS, config.vocab_size)
        kv = init_kv_cache(config, num_pages, PAGE, jnp.float32)
        forward = _jitted(model)
        logits, kv = forward(jnp.asarray(toks), kv, md, jnp.arange(len(toks)))
        logits = np.asarray(logits)
        off = 0
        for p in prompts:
            assert _rel_err(logits[off:off + len(p)], _hf_logits(hf, p[None])[0]) <= 1e-4
            off += len(p)
        nxt = rng.randint(0, config.vocab_size, size=len(prompts)).astype(np.int32)
        logits2, _ = forward(jnp.asarray(nxt), kv, _decode_md(LENGTHS, block_tables),
                             jnp.arange(len(prompts)))
        for i, p in enumerate(prompts):
            ref = _hf_logits(hf, np.concatenate([p, [nxt[i]]])[None])[0, -1]
            assert _rel_err(np.asarray(logits2[i]), ref) <= 1e-4
    finally:
        model.layer_stack = None


def test_return_hidden_feeds_logits_from_hidden(tiny):
    config, model, _, _ = tiny
    _, toks, md, _, num_pages = _paged_batch(np.random.RandomState(4), [3, 9], config.vocab_size)
    kv = init_kv_cache(config, num_pages, PAGE, jnp.float32)
    logits, _, hidden = model(jnp.asarray(toks), kv, md, jnp.asarray([2, 11]), return_hidden=True)
    assert hidden.shape == (len(toks), config.hidden_size)
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(hidden[jnp.asarray([2, 11])])),
                               np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_param_tree_and_registry(tiny):
    config, model, _, params = tiny
    assert get_model_class(config.architecture) is GemmaForCausalLM
    assert {"layers/post_attn_norm", "layers/post_mlp_norm"} <= set(params)
    assert "lm_head" not in params                       # tied embeddings
    assert sum(int(np.prod(v.shape)) for v in params.values()) == config.num_params
    bad = dict(params)
    del bad["layers/post_mlp_norm"]
    with pytest.raises(ValueError, match="post_mlp_norm"):
        GemmaForCausalLM(config, bad)


def test_layer_period():
    assert layer_period(("sliding_attention", "full_attention") * 3) == 2
    gemma3_1b = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26))
    assert layer_period(gemma3_1b) == 6
    assert layer_period(("full_attention",) * 4) == 1


_GEMMA3_HF4 = {   # a transformers-4 style Gemma 3 config.json (the Hub's 1B/4B spelling)
    "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144, "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "eos_token_id": [1, 106], "bos_token_id": 2,
}


def test_config_from_transformers4_gemma3_json():
    c = ModelConfig.from_hf_dict(_GEMMA3_HF4)
    assert c.tie_word_embeddings and c.qk_norm and c.is_gemma
    assert c.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert [c.layer_window(i) for i in (0, 5, 24)] == [512, None, 512]
    assert c.rope_theta == 1e6 and c.rope_local_theta == 1e4
    assert dict(c.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    assert c.attention_scale == 256 ** -0.5 and c.eos_token_ids == (1, 106)


def test_config_rejects_what_gemma_does_not_implement():
    with pytest.raises(ValueError, match="hidden_activation"):
        ModelConfig.from_hf_dict({**_GEMMA3_HF4, "hidden_activation": "silu"})
    with pytest.raises(ValueError, match="bidirectional"):
        ModelConfig.from_hf_dict({**_GEMMA3_HF4, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        ModelConfig.from_hf_dict({**_GEMMA3_HF4, "layer_types": ["full_attention"] * 3})
    with pytest.raises(ValueError, match="sliding_window is not set"):
        ModelConfig.from_hf_dict({**_GEMMA3_HF4, "sliding_window": None})
    with pytest.raises(ValueError, match="attn_logit_softcap"):
        ModelConfig.from_hf_dict({**_GEMMA3_HF4, "attn_logit_softcapping": -1.0})


# --- the engine -------------------------------------------------------------------------------

ENGINE = dict(dtype="float32", token_buckets=[32], seq_buckets=[8], max_num_batched_tokens=32,
              max_num_seqs=8, max_model_len=96, kv_cache_memory=8 * 2 ** 20)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_greedy_matches_transformers_generate(arch, tmp_path):
    """Chunked prefill (a 40-token prompt over a 32-token budget) and decode past the window."""
    from serving import LLM, SamplingParams

    path, hf = make_tiny_hf_model(arch, tmp_path / arch)
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, 256, size=n).tolist() for n in (3, 12, 40)]
    max_tokens = 12
    llm = LLM(str(path), **ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, pad_token_id=257)[0, len(p):].tolist()
        assert list(out.outputs[0].token_ids) == ref


def test_pallas_kernels_match_xla(tiny):
    """The Pallas kernels (interpreted on CPU) with soft-capping and windows, prefill then decode."""
    import functools

    from pallas_kernels import paged_attention

    config, model, _, params = tiny
    if config.attn_logit_softcap is None:
        pytest.skip("one architecture with soft-capping and windows covers the kernels' options")
    kernel = functools.partial(paged_attention, interpret=True)
    prefill = _jitted(GemmaForCausalLM(config, params, attention_fn=kernel))
    decode = _jitted(GemmaForCausalLM(config, params,      # max_query_len=1: the decode kernel
                                      attention_fn=functools.partial(kernel, max_query_len=1)))
    xla = _jitted(model)
    rng = np.random.RandomState(3)
    lengths = [5, 19]
    _, toks, md, block_tables, num_pages = _paged_batch(rng, lengths, config.vocab_size)
    nxt = jnp.asarray(rng.randint(0, config.vocab_size, size=len(lengths)), jnp.int32)
    results = []
    for first, second in ((xla, xla), (prefill, decode)):
        kv = init_kv_cache(config, num_pages, PAGE, jnp.float32)
        logits, kv = first(jnp.asarray(toks), kv, md, jnp.arange(len(toks)))
        logits2, _ = second(nxt, kv, _decode_md(lengths, block_tables), jnp.arange(len(lengths)))
        results.append((np.asarray(logits), np.asarray(logits2)))
    for xla_out, pallas_out in zip(*results):
        assert _rel_err(pallas_out, xla_out) <= 1e-4
