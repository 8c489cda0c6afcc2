"""The engine with attention_backend="pallas" (the GPU kernels, interpreted on CPU) gives the same
greedy outputs as "xla", through chunked prefill and decode, on a tiny random Llama."""

import functools

import numpy as np
import pytest

from serving import LLM, SamplingParams
from tests.tiny_models import make_tiny_hf_model

ENGINE = dict(dtype="float32", token_buckets=[32], seq_buckets=[1, 8], max_num_batched_tokens=32,
              max_num_seqs=8, max_model_len=96, block_size=16, kv_cache_memory=8 * 2 ** 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_tiny_hf_model("llama", tmp_path_factory.mktemp("llama64"), hidden_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    return str(path)


def _greedy(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_pallas_backend_matches_xla(model_dir):
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 256, size=n).tolist() for n in (1, 15, 16, 40, 7)]
    xla = _greedy(LLM(model_dir, attention_backend="xla", **ENGINE), prompts)
    pallas_llm = LLM(model_dir, attention_backend="pallas", **ENGINE)
    assert pallas_llm.engine.runner.decode_buckets          # decode-only steps use the decode kernel
    assert _greedy(pallas_llm, prompts) == xla
    # Alone, a request decodes in the one-sequence executable, padded to two token rows
    # (ModelRunner.min_decode_tokens) and with the branch-free sampler: same tokens.
    runner = pallas_llm.engine.runner
    assert any(shape[:2] == (2, 1) and shape[3] and shape[4] for shape in runner.all_shapes())
    assert [_greedy(pallas_llm, [p])[0] for p in prompts[:2]] == xla[:2]


def test_pallas_mosaic_backend_matches_pallas_in_bf16(model_dir, monkeypatch):
    """attention_backend="pallas-mosaic": decode and prefill steps on the Mosaic GPU kernels
    (interpreted on the CPU); bf16 (they take no fp32) greedy tokens equal the Triton-only
    backend's, and both Mosaic kernels really are in the executables."""
    from pallas_kernels import mosaic_attention, mosaic_prefill

    traced = []
    real = mosaic_attention.decode_call
    monkeypatch.setattr(mosaic_attention, "decode_call", lambda *a, **k: traced.append(1) or real(*a, **k))
    real_prefill = mosaic_prefill.prefill_call
    monkeypatch.setattr(mosaic_prefill, "prefill_call",
                        lambda *a, **k: traced.append(2) or real_prefill(*a, **k))
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 256, size=n).tolist() for n in (1, 17, 33)]
    bf16 = {**ENGINE, "dtype": "bfloat16", "token_buckets": [32], "seq_buckets": [4]}
    triton = _greedy(LLM(model_dir, attention_backend="pallas-triton", **bf16), prompts)
    assert not traced
    mosaic_llm = LLM(model_dir, attention_backend="pallas-mosaic", **bf16)
    assert 1 in traced and 2 in traced and mosaic_llm.engine.runner.decode_buckets
    assert _greedy(mosaic_llm, prompts) == triton


def test_auto_kernel_choice():
    """kernel="auto" (the "pallas" backend): the Mosaic kernels only on Hopper, decode for calls
    with enough token x kv-head programs, prefill for buckets of one (or few) sequences; mixed
    buckets of many sequences, small decode buckets and other GPUs run Triton."""
    from pallas_kernels.paged_attention import (
        _AUTO_MOSAIC_DECODE_MIN_PROGRAMS, _AUTO_MOSAIC_PREFILL_MIN_TOKENS_PER_SEQ, auto_kernel)

    need = _AUTO_MOSAIC_DECODE_MIN_PROGRAMS["H100"]
    per_seq = _AUTO_MOSAIC_PREFILL_MIN_TOKENS_PER_SEQ["H100"]
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB"):
        choose = functools.partial(auto_kernel, kind, num_kv_heads=8)
        assert choose(decode=True, num_tokens=need // 8, num_seqs=need // 8) == "mosaic"
        assert choose(decode=True, num_tokens=need // 8 - 1, num_seqs=need // 8) == "triton"
        assert choose(decode=False, num_tokens=2048, num_seqs=1) == "mosaic"
        assert choose(decode=False, num_tokens=512, num_seqs=1) == "mosaic"
        assert choose(decode=False, num_tokens=per_seq * 4, num_seqs=4) == "mosaic"
        assert choose(decode=False, num_tokens=per_seq * 4 - 1, num_seqs=4) == "triton"
        assert choose(decode=False, num_tokens=2048, num_seqs=64) == "triton"
    for kind in ("NVIDIA A100-SXM4-80GB", "NVIDIA L4", "interpret", "cpu"):
        assert auto_kernel(kind, decode=True, num_tokens=4096, num_kv_heads=8, num_seqs=4096) == "triton"
        assert auto_kernel(kind, decode=False, num_tokens=4096, num_kv_heads=8, num_seqs=1) == "triton"


def test_pallas_auto_mixes_kernels_per_bucket(model_dir, monkeypatch, request):
    """With the thresholds lowered for the interpreter, the "pallas" backend compiles the large
    decode bucket with the Mosaic kernel, the one-sequence decode bucket with Triton (fused write),
    the one-sequence mixed bucket with the Mosaic prefill kernel and the 8-sequence one with
    Triton's, and greedy tokens equal the Triton-only backend's (bf16: Mosaic takes no fp32)."""
    import importlib

    from pallas_kernels import mosaic_attention, mosaic_prefill, triton_attention
    dispatch = importlib.import_module("pallas_kernels.paged_attention")   # the module, not the function

    traced = []
    real = mosaic_attention.decode_call
    monkeypatch.setattr(mosaic_attention, "decode_call", lambda *a, **k: traced.append(a[0].shape) or real(*a, **k))
    # Decode bucket 8 (hkv 2): 16 programs -> Mosaic; bucket 1 (two token rows): 4 -> Triton.
    monkeypatch.setitem(dispatch._AUTO_MOSAIC_DECODE_MIN_PROGRAMS, "interpret", 16)
    # Mixed buckets: 32 tokens x 1 sequence -> Mosaic prefill; 32 x 8 (4 a sequence) -> Triton.
    monkeypatch.setitem(dispatch._AUTO_MOSAIC_PREFILL_MIN_TOKENS_PER_SEQ, "interpret", 32)
    prefills = []
    real_p = mosaic_prefill.prefill_call
    monkeypatch.setattr(mosaic_prefill, "prefill_call", lambda *a, **k: prefills.append(1) or real_p(*a, **k))
    # The choice is made at trace time: no trace from before (or for after) this threshold.
    dispatch.paged_attention.clear_cache()
    request.addfinalizer(dispatch.paged_attention.clear_cache)
    triton_decode = []
    real_t = triton_attention.decode_pallas_call
    monkeypatch.setattr(triton_attention, "decode_pallas_call",
                        lambda *a, **k: triton_decode.append(1) or real_t(*a, **k))
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, 256, size=n).tolist() for n in (3, 20, 9)]
    bf16 = {**ENGINE, "dtype": "bfloat16"}
    triton = _greedy_top2(LLM(model_dir, attention_backend="pallas-triton", **bf16), prompts)
    assert not (traced or prefills)
    triton_decode.clear()
    auto_llm = LLM(model_dir, attention_backend="pallas", **bf16)
    assert traced and triton_decode and prefills
    _assert_same_greedy_up_to_ties(_greedy_top2(auto_llm, prompts), triton)
    _assert_same_greedy_up_to_ties(_greedy_top2(auto_llm, prompts[:1]), triton[:1])


def _greedy_top2(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _assert_same_greedy_up_to_ties(got, want, tie=0.1):
    """Token for token, except that two bf16 kernels (different summation orders, both within
    bf16 rounding of the exact result) may pick different tokens at a near-tie: there both runs
    must rank the two tokens within ``tie`` nats of each other; the sequences may then differ.
    (bf16 logits of magnitude 2-8 are spaced 1/64-1/16 apart, and the two backends' logprobs of
    one token differ by up to ~0.025 here before any divergence: 0.1 is a few such steps.)"""
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want, strict=True):
        i = next((i for i, (a, b) in enumerate(zip(g_ids, w_ids)) if a != b), None)
        if i is None:
            assert g_ids == w_ids
            continue
        a, b = g_ids[i], w_ids[i]
        for lp in (g_lp[i], w_lp[i]):
            assert a in lp and b in lp, (i, g_ids, w_ids)
            assert abs(lp[a].logprob - lp[b].logprob) < tie, (i, g_ids, w_ids, lp)
