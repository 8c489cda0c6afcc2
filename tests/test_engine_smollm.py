"""The embedded SmolLM2 end to end: greedy continuations equal transformers' own greedy decoding of
the same GGUF file, token for token, whatever the batching, chunking, preemption or prefix caching.

One engine (one small bucket ladder, compiled once) serves every test; the scheduler is swapped to
force chunked prefill, a tiny page pool or no prefix caching without recompiling.
"""

import contextlib

import pytest
import torch

from serving import LLM, SamplingParams
from serving.compile_counter import compile_counter
from serving.scheduler import Scheduler
from tests.tiny_models import load_hf_gguf_reference

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
    return load_hf_gguf_reference()


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


@contextlib.contextmanager
def swapped_scheduler(llm, **overrides):
    """Run with another scheduler over the same runner and KV cache. The engine is drained first
    (so the runner sees every finished id), and afterwards the old scheduler's prefix cache is
    reset: the pages it remembers were overwritten meanwhile."""
    engine = llm.engine
    engine.step()                                     # hands the last finished ids to the runner
    old = engine.scheduler
    kw = dict(num_pages=old.kv.num_pages, page_size=old.page_size, max_model_len=old.max_model_len,
              max_num_seqs=old.max_num_seqs, max_num_batched_tokens=old.max_num_batched_tokens,
              enable_prefix_caching=True)
    kw.update(overrides)
    engine.scheduler = Scheduler(**kw)
    try:
        yield engine.scheduler
    finally:
        engine.step()
        engine.scheduler = old
        assert old.reset_prefix_cache()


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
    with swapped_scheduler(llm, num_pages=40) as sched:   # 39 usable pages x 16 tokens for 32 requests
        got = _generate(llm, batch, max_tokens=16)
        stats = sched.get_stats()
        assert stats.num_preemptions > 0, "the tiny pool should force preemption"
        assert stats.prefix_cache_hits > 0
        assert got == refs
        assert stats.num_free_pages == stats.num_usable_pages


def test_prefix_caching_off_gives_same_outputs(engine_check, prompt_ids, reference):
    picks = [8, 9, 0]                                   # the chat prompts span full pages (> 16 tokens)
    ids = [prompt_ids[i] for i in picks]
    refs = [reference[i] for i in picks]
    with swapped_scheduler(engine_check, enable_prefix_caching=False):
        assert _generate(engine_check, ids) == refs
    # And twice with caching on: the second run hits the cache and changes nothing.
    first = _generate(engine_check, ids)
    hits_before = engine_check.engine.scheduler.get_stats().prefix_cache_hits
    assert _generate(engine_check, ids) == first == refs
    assert engine_check.engine.scheduler.get_stats().prefix_cache_hits > hits_before


def test_logprobs_and_prompt_logprobs_match_transformers(engine_check, hf_model, prompt_ids):
    """Chunked (a prompt longer than the 64-token step budget) prompt logprobs and sampled-token
    logprobs equal transformers' log-softmax at the same positions."""
    ids = prompt_ids[8] + prompt_ids[9] + prompt_ids[0] + prompt_ids[1]   # > 64 tokens: prefilled in chunks
    assert 64 < len(ids) < 120
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    out = engine_check.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    gen = out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids + gen])).logits[0].float(), -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for j in range(1, len(ids)):
        entry = out.prompt_logprobs[j]
        assert ids[j] in entry
        assert abs(entry[ids[j]].logprob - ref[j - 1, ids[j]]) < 1e-3
        top = sorted(range(ref.shape[1]), key=lambda t: -ref[j - 1, t])[:2]
        assert all(t in entry for t in top)
    for i, (tok, entry) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = ref[len(ids) + i - 1]
        assert entry[tok].rank == 1 and abs(entry[tok].logprob - row[tok]) < 1e-3
        assert len(entry) == 3
    assert abs(out.outputs[0].cumulative_logprob - sum(ref[len(ids) + i - 1, t] for i, t in enumerate(gen))) < 1e-2


def test_seeded_sampling_same_alone_and_in_batch(engine_check, prompt_ids):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12)
    alone = engine_check.generate([{"prompt_token_ids": prompt_ids[2]}], seeded, use_tqdm=False)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=12), SamplingParams(temperature=0.0, max_tokens=5)]
    batch = engine_check.generate(
        [{"prompt_token_ids": prompt_ids[0]}, {"prompt_token_ids": prompt_ids[2]}, {"prompt_token_ids": prompt_ids[5]}],
        [others[0], seeded, others[1]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_n_samples_stop_strings_and_abort(engine_check, prompt_ids, reference):
    llm = engine_check
    outs = llm.generate([{"prompt_token_ids": prompt_ids[0]}],
                        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8), use_tqdm=False)
    assert len(outs[0].outputs) == 3 and [o.index for o in outs[0].outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs[0].outputs}) > 1
    # A stop string cut out of the greedy continuation of prompt 0.
    full = llm.tokenizer.decode(reference[0])
    stop = full[5:9]
    out = llm.generate([{"prompt_token_ids": prompt_ids[0]}], SamplingParams(temperature=0, max_tokens=32, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == full[:full.index(stop)]
    # Abort mid-generation frees every page.
    llm.engine.add_request("abort-me", {"prompt_token_ids": prompt_ids[1]}, SamplingParams(max_tokens=30))
    for _ in range(3):
        llm.engine.step()
    llm.engine.abort_request("abort-me")
    while llm.engine.scheduler.has_requests():
        llm.engine.step()
    assert not llm.engine.has_unfinished_requests()


def test_mixed_200_request_workload_never_compiles(engine_check, prompt_ids):
    """Every sampling feature at once, 200 requests: the compile counter (checked by engine_check)
    must not move, every request finishes, every page comes back."""
    import random

    rng = random.Random(0)
    variants = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9, seed=3),
        dict(temperature=1.0, top_k=20, min_p=0.05),
        dict(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
        dict(temperature=0.0, logprobs=5, prompt_logprobs=1),
        dict(temperature=1.0, logit_bias={42: 5.0}, min_tokens=2, stop=["."]),
        dict(temperature=0.0, allowed_token_ids=list(range(100, 300))),
        dict(temperature=0.9, n=2),
    ]
    prompts, params = [], []
    for i in range(200):
        ids = prompt_ids[rng.randrange(len(prompt_ids))][: rng.randint(1, 40)]
        prompts.append({"prompt_token_ids": ids})
        params.append(SamplingParams(max_tokens=rng.randint(2, 6), **variants[i % len(variants)]))
    outs = engine_check.generate(prompts, params, use_tqdm=False)
    assert len(outs) == 200 and all(o.finished for o in outs)
    for o, p in zip(outs, params):
        assert len(o.outputs) == p.n
        assert all(1 <= len(c.token_ids) <= p.max_tokens for c in o.outputs)
