"""Every architecture's logits match transformers' (float32), through the dense and the paged forward."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from model_zoo.attention import AttentionMetadata
from model_zoo.config import ModelConfig, UnsupportedArchitectureError
from model_zoo.llama import init_kv_cache
from model_zoo.loader import load_weights, resolve_model
from model_zoo.registry import build_model, get_model_class
from tests.tiny_models import make_tiny_hf_model

ARCHS = ["llama", "llama_tied", "llama3_rope", "mistral", "qwen2", "qwen3"]
LENGTHS = [1, 7, 16, 23]          # ragged: a single token, page multiples, odd lengths
PAGE = 4


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path, hf = make_tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param), with_tokenizer=False)
    resolved = resolve_model(str(path))
    model = build_model(resolved.config, load_weights(resolved, "float32", progress=False))
    return resolved.config, model, hf


def _hf_logits(hf, toks):
    with torch.no_grad():
        return hf(torch.tensor(toks)).logits.float().numpy()


def test_dense_matches_transformers(tiny):
    config, model, hf = tiny
    toks = np.random.RandomState(0).randint(0, config.vocab_size, size=(3, 23))
    ref = _hf_logits(hf, toks)
    out = np.asarray(model.forward_dense(jnp.asarray(toks)))
    assert _rel_err(out, ref) <= 1e-4


def test_paged_matches_transformers_and_dense(tiny):
    """A flat ragged batch over pages in random order equals per-prompt transformers logits."""
    config, model, hf = tiny
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, config.vocab_size, size=n) for n in LENGTHS]
    max_pages = -(-max(LENGTHS) // PAGE)
    num_pages = 1 + max_pages * len(LENGTHS)
    perm = rng.permutation(np.arange(1, num_pages))           # page 0 is the null page
    block_tables = np.zeros((len(LENGTHS), max_pages), np.int32)
    toks, pos, sid = [], [], []
    used = 0
    for i, p in enumerate(prompts):
        need = -(-len(p) // PAGE)
        block_tables[i, :need] = perm[used:used + need]
        used += need
        toks += list(p)
        pos += list(range(len(p)))
        sid += [i] * len(p)
    pos, sid = np.array(pos, np.int32), np.array(sid, np.int32)
    slots = block_tables[sid, pos // PAGE] * PAGE + pos % PAGE
    md = AttentionMetadata(jnp.asarray(pos), jnp.asarray(sid), jnp.asarray(slots, jnp.int32),
                           jnp.asarray(block_tables), jnp.asarray(LENGTHS, jnp.int32),
                           jnp.asarray(np.concatenate([[0], np.cumsum(LENGTHS)]), jnp.int32))
    kv = init_kv_cache(config, num_pages, PAGE, jnp.float32)
    logits, kv = model(jnp.asarray(toks, jnp.int32), kv, md, jnp.arange(len(toks)))
    logits = np.asarray(logits)
    off = 0
    for p in prompts:
        ref = _hf_logits(hf, p[None])[0]
        assert _rel_err(logits[off:off + len(p)], ref) <= 1e-4
        off += len(p)
    # The cache now holds every prompt: a one-token decode step per sequence reads it back.
    nxt = rng.randint(0, config.vocab_size, size=len(prompts))
    pos2 = np.array(LENGTHS, np.int32)
    need = pos2 // PAGE
    for i, n in enumerate(need):
        if block_tables[i, n] == 0:
            block_tables[i, n] = perm[used]
            used += 1
    slots2 = block_tables[np.arange(len(prompts)), need] * PAGE + pos2 % PAGE
    md2 = AttentionMetadata(jnp.asarray(pos2), jnp.arange(len(prompts), dtype=jnp.int32),
                            jnp.asarray(slots2, jnp.int32), jnp.asarray(block_tables),
                            jnp.asarray(pos2 + 1), jnp.arange(len(prompts) + 1, dtype=jnp.int32))
    logits2, _ = model(jnp.asarray(nxt, jnp.int32), kv, md2, jnp.arange(len(prompts)))
    for i, p in enumerate(prompts):
        ref = _hf_logits(hf, np.concatenate([p, [nxt[i]]])[None])[0, -1]
        assert _rel_err(np.asarray(logits2[i]), ref) <= 1e-4


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        get_model_class("GPTNeoXForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["FalconForCausalLM"]})
