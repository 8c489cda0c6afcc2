"""The embedded SmolLM2 end to end: greedy continuations equal transformers' own greedy decoding of
the same GGUF file, token for token, whatever the batching, chunking, preemption or prefix caching.

One engine (one small bucket ladder, compiled once) serves every test; the scheduler is swapped to
force chunked prefill, a tiny page pool or no prefix caching without recompiling.
"""

import os

import pytest
import torch

from serving import LLM, SamplingParams
from serving.compile_counter import compile_counter
from serving.scheduler import Scheduler

GGUF_DIR = None
MAX_TOKENS = 32

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Translate to German: Good morning, my friend.",
    "Les élèves ont étudié l'histoire de la Révolution française et",
    "日本の首都は",
    "Emoji test 🙂🚀: the rocket",
    "1, 1, 2, 3, 5, 8, 13,",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primes. ¿Sí?"}],
]


@pytest.fixture(scope="module")
def llm():
    return LLM(token_buckets=[16, 64], seq_buckets=[8, 32], max_num_batched_tokens=64, max_num_seqs=32,
               max_model_len=128, kv_cache_memory=96 * 2 ** 20)


@pytest.fixture(scope="module")
def hf_model(llm):
    from transformers import AutoModelForCausalLM

    from model_zoo.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _hf_greedy(hf_model, ids, max_tokens, eos_id):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def prompt_ids(llm):
    tok = llm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    for conv in CHATS:
        ids.append(tok.encode(tok.apply_chat_template(conv, add_generation_prompt=True), add_special_tokens=False))
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids, llm):
    return [_hf_greedy(hf_model, ids, MAX_TOKENS, llm.tokenizer.eos_token_id) for ids in prompt_ids]


@pytest.fixture
def engine_check(llm):
    """After each test: no compilation happened, every page is back in the pool."""
    before = compile_counter.count
    yield llm
    assert compile_counter.count == before, "the engine compiled after warm-up"
    stats = llm.engine.scheduler.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_pages == stats.num_usable_pages


def _generate(llm, prompt_ids, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _swap_scheduler(llm, **overrides):
    old = llm.engine.scheduler
    kw = dict(num_pages=old.kv.num_pages, page_size=old.page_size, max_model_len=old.max_model_len,
              max_num_seqs=old.max_num_seqs, max_num_batched_tokens=old.max_num_batched_tokens,
              enable_prefix_caching=True)
    kw.update(overrides)
    llm.engine.scheduler = Scheduler(**kw)
    return old


def test_greedy_matches_transformers_batched(engine_check, prompt_ids, reference):
    got = _generate(engine_check, prompt_ids)
    for ids, ref, out in zip(prompt_ids, reference, got):
        assert out == ref, f"prompt {ids[:8]}...: jaxllm {out} != transformers {ref}"


def test_each_prompt_alone_matches(engine_check, prompt_ids, reference):
    for ids, ref in list(zip(prompt_ids, reference))[:3]:
        assert _generate(engine_check, [ids]) == [ref]


def test_tokenizer_and_chat_template_match_transformers(llm, hf_model):
    from transformers import AutoTokenizer

    from model_zoo.loader import default_model_path

    path = default_model_path()
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for p in PROMPTS:
        assert llm.tokenizer.encode(p) == hf_tok(p).input_ids
    for conv in CHATS:
        assert llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True) == \
            hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


def test_32_concurrent_chunked_preempted_and_prefix_cached(engine_check, prompt_ids, reference, hf_model):
    """32 requests of mixed lengths (some past the 64-token step budget: chunked prefill), sharing
    prefixes (prefix-cache hits), under a page pool too small for all of them (preemption)."""
    llm = engine_check
    long_prefix = prompt_ids[-1]                       # a chat prompt, ~40 tokens
    batch, refs = [], []
    for i in range(32):
        base = prompt_ids[i % len(prompt_ids)]
        ids = (long_prefix + base) if i % 3 == 0 else list(base)
        batch.append(ids)
    cache = {}
    for ids in batch:
        key = tuple(ids)
        if key not in cache:
            cache[key] = _hf_greedy(hf_model, ids, 16, llm.tokenizer.eos_token_id)
        refs.append(cache[key])
    old = _swap_scheduler(llm, num_pages=40)           # 39 usable pages x 16 tokens for 32 requests
    try:
        got = _generate(llm, batch, max_tokens=16)
        stats = llm.engine.scheduler.get_stats()
        assert stats.num_preemptions > 0, "the tiny pool should force preemption"
        assert stats.prefix_cache_hits > 0
        assert got == refs
        assert stats.num_free_pages == stats.num_usable_pages
    finally:
        llm.engine.scheduler = old


def test_prefix_caching_off_gives_same_outputs(engine_check, prompt_ids, reference):
    old = _swap_scheduler(engine_check, enable_prefix_caching=False)
    try:
        assert _generate(engine_check, prompt_ids[:4]) == reference[:4]
    finally:
        engine_check.engine.scheduler = old
    # And twice with caching on: the second run hits the cache and changes nothing.
    first = _generate(engine_check, prompt_ids[:4])
    hits_before = engine_check.engine.scheduler.get_stats().prefix_cache_hits
    assert _generate(engine_check, prompt_ids[:4]) == first == reference[:4]
    assert engine_check.engine.scheduler.get_stats().prefix_cache_hits > hits_before
