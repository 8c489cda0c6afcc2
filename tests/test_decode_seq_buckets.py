"""A finer sequence ladder for the decode-only executables (``decode_seq_buckets``) changes which
executables run, never the tokens: a tiny random Llama with the Pallas backend (interpreted on the
CPU, so the runner compiles decode-only executables), greedy, against the same engine without it."""

import numpy as np
import pytest

from serving import LLM, SamplingParams
from serving.config import EngineArgs
from tests.tiny_models import PALLAS_DECODE_ENGINE, make_tiny_pallas_llama

ENGINE = PALLAS_DECODE_ENGINE


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = make_tiny_pallas_llama(tmp_path_factory.mktemp("llama-decode-ladder"))
    return str(path)


def test_finer_decode_ladder_same_greedy_tokens_fewer_padded_rows(model_path):
    rng = np.random.RandomState(1)
    # Outputs of 2 to 14 tokens: the decode batch shrinks 5 -> 1 as requests finish.
    prompts = [{"prompt_token_ids": rng.randint(0, 256, size=n).tolist()} for n in (3, 9, 5, 12, 7)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (14, 2, 6, 10, 4)]

    outputs, tallies = [], []
    for extra in ({}, {"decode_seq_buckets": [1, 2, 4]}):
        llm = LLM(model_path, **ENGINE, **extra)
        runner = llm.engine.runner
        decode_seqs = sorted({s[1] for s in runner.all_shapes() if s[3]})
        mixed_seqs = sorted({s[1] for s in runner.all_shapes() if not s[3]})
        assert decode_seqs == ([1, 8] if not extra else [1, 2, 4, 8]) and mixed_seqs == [1, 8]
        outs = llm.generate(prompts, params)
        outputs.append([o.outputs[0].token_ids for o in outs])
        tallies.append({shape[1] for shape in llm.engine.step_tally.by_shape if shape[3]})
        assert llm.engine.scheduler.kv.num_free_pages == llm.engine.scheduler.kv.num_pages - 1
    assert outputs[0] == outputs[1]
    assert [len(t) for t in outputs[0]] == [14, 2, 6, 10, 4]
    coarse, fine = tallies                  # the sequence buckets the decode-only steps ran
    assert coarse <= {1, 8} and {2, 4} <= fine    # 2-4 sequences ran the 2 and 4 buckets


def test_decode_seq_buckets_is_validated():
    with pytest.raises(ValueError, match="decode_seq_buckets must be a comma-separated list"):
        EngineArgs(decode_seq_buckets="1,two")
    assert EngineArgs(decode_seq_buckets="4,1").decode_seq_buckets == (1, 4)
