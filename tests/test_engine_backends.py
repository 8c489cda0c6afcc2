"""The engine with attention_backend="pallas" (the GPU kernels, interpreted on CPU) gives the same
greedy outputs as "xla", through chunked prefill and decode, on a tiny random Llama."""

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
    triton = _greedy(LLM(model_dir, attention_backend="pallas", **bf16), prompts)
    assert not traced
    mosaic_llm = LLM(model_dir, attention_backend="pallas-mosaic", **bf16)
    assert 1 in traced and 2 in traced and mosaic_llm.engine.runner.decode_buckets
    assert _greedy(mosaic_llm, prompts) == triton
