import pytest

from serving.sampling_params import (MAX_STOP_STRINGS, MIN_TEMPERATURE, SamplingParams, SamplingParamsError)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None and p.allowed_token_ids is None
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.greedy


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(temperature=-1), "temperature", "temperature must be non-negative, got -1.0."),
    (dict(top_p=0), "top_p", "top_p must be in (0, 1], got 0.0."),
    (dict(top_p=1.5), "top_p", "top_p must be in (0, 1], got 1.5."),
    (dict(top_k=-2), "top_k", "top_k must be 0 or -1 (disable), or at least 1, got -2."),
    (dict(min_p=1.1), "min_p", "min_p must be in [0, 1], got 1.1."),
    (dict(presence_penalty=2.5), "presence_penalty", "presence_penalty must be in [-2, 2], got 2.5."),
    (dict(frequency_penalty=-3), "frequency_penalty", "frequency_penalty must be in [-2, 2], got -3.0."),
    (dict(repetition_penalty=0), "repetition_penalty", "repetition_penalty must be greater than zero, got 0.0."),
    (dict(n=0), "n", "n must be at least 1, got 0."),
    (dict(n=3, best_of=2), "best_of", "best_of must be greater than or equal to n, got n=3 and best_of=2."),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1, got 0."),
    (dict(min_tokens=-1), "min_tokens", "min_tokens must be greater than or equal to 0, got -1."),
    (dict(min_tokens=5, max_tokens=4), "min_tokens",
     "min_tokens must be less than or equal to max_tokens=4, got 5."),
    (dict(logprobs=-1), "logprobs", "logprobs must be non-negative, got -1."),
    (dict(prompt_logprobs=-2), "prompt_logprobs", "prompt_logprobs must be non-negative, got -2."),
    (dict(stop=["a", ""]), "stop", "stop cannot contain an empty string."),
    (dict(stop="x", detokenize=False), "stop", "stop strings are only supported when detokenize is True"),
    (dict(allowed_token_ids=[]), "allowed_token_ids", "allowed_token_ids is not allowed to be empty."),
    (dict(logit_bias={5: 101}), "logit_bias", "logit_bias values must be in [-100, 100]"),
    (dict(logit_bias={"abc": 1}), "logit_bias", "logit_bias keys must be non-negative token ids"),
    (dict(seed=2 ** 64), "seed", "seed must fit in a signed 64-bit integer"),
    (dict(temperature="hot"), "temperature", "temperature must be a number"),
    (dict(max_tokens=2.5), "max_tokens", "max_tokens must be an integer or null"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens", "truncate_prompt_tokens must be >= 1 or -1"),
    (dict(temperature=0, best_of=2, n=1), "best_of", "best_of must be 1 when using greedy sampling"),
])
def test_validation_messages_and_param(kwargs, param, message):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.param == param
    assert message in str(info.value)


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(3, 4), logit_bias={"12": 5, 7: -100}, top_k=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4]
    assert p.logit_bias == {12: 5.0, 7: -100.0}
    assert p.top_k == 0
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2, repetition_penalty=1.3)
    assert g.greedy and (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert g.repetition_penalty == 1.3           # penalties still apply to greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert SamplingParams(temperature=1e-3).temperature == MIN_TEMPERATURE


def test_verify():
    ok = SamplingParams(logprobs=20, prompt_logprobs=3, logit_bias={99: 1.0}, allowed_token_ids=[0, 99],
                        stop_token_ids=[98])
    ok.verify(vocab_size=100, max_logprobs=20)
    cases = [
        (dict(logprobs=21), "logprobs", "Requested sample logprobs of 21, which is greater than max allowed: 20"),
        (dict(prompt_logprobs=30), "prompt_logprobs", "Requested prompt logprobs of 30"),
        (dict(logit_bias={100: 1.0, 3: 1.0}), "logit_bias", "token_id(s) [100] in logit_bias contain out-of-vocab"),
        (dict(allowed_token_ids=[5, 100]), "allowed_token_ids", "allowed_token_ids contains out-of-vocab"),
        (dict(stop_token_ids=[150]), "stop_token_ids", "stop_token_ids contains out-of-vocab"),
        (dict(stop=["s"] * (MAX_STOP_STRINGS + 1)), "stop", "stop strings are supported"),
        (dict(stop=["x" * 5000]), "stop", "stop strings must be at most"),
    ]
    for kwargs, param, message in cases:
        with pytest.raises(SamplingParamsError) as info:
            SamplingParams(**kwargs).verify(vocab_size=100, max_logprobs=20)
        assert info.value.param == param, kwargs
        assert message in str(info.value), (kwargs, str(info.value))


def test_clone_and_fan_out():
    p = SamplingParams(n=3, seed=7, stop=["a"], logit_bias={1: 2.0}, temperature=0.8)
    c = p.clone(max_tokens=5)
    assert c.max_tokens == 5 and c.temperature == 0.8 and c.stop == ["a"]
    assert c.stop is not p.stop and c.logit_bias is not p.logit_bias
    with pytest.raises(SamplingParamsError):
        p.clone(temperature=-1)
    kids = [p.for_sample(i) for i in range(3)]
    assert [k.seed for k in kids] == [7, 8, 9] and all(k.n == 1 for k in kids)
    assert SamplingParams(n=2).for_sample(1).seed is None
    assert SamplingParams(n=2, seed=2 ** 63 - 1).for_sample(1).seed == -(2 ** 63)
    with pytest.raises(ValueError):
        p.for_sample(3)


def test_all_stop_token_ids():
    p = SamplingParams(stop_token_ids=[5, 6])
    assert p.all_stop_token_ids([2, 5]) == [5, 6, 2]
    assert SamplingParams(stop_token_ids=[5], ignore_eos=True).all_stop_token_ids([2]) == [5]
