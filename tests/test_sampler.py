"""The in-step sampler against numpy references of the processed distribution (CPU, tiny vocabularies)."""

from functools import partial

import jax
import numpy as np
import pytest

from serving.sampler import (RowInfo, build_sampling_metadata, build_slot_rows, init_sampler_state, row_constants,
                             sample, set_slot_rows, slot_rows_needed)
from serving.sampling_params import SamplingParams

sample_jit = jax.jit(sample, static_argnames="num_logprobs")


@partial(jax.jit, static_argnames="num_draws")
def draw_many(logits, md, state, key, num_draws):
    """[num_draws, S] tokens, each draw with its own step key (unseeded rows are then independent)."""
    keys = jax.random.split(key, num_draws)
    return jax.vmap(lambda k: sample(logits, md, state, k, num_logprobs=0)[0].token_ids)(keys)


def metadata(params, *, slots=None, output_index=None, sample_mask=None, pad_to=None):
    n = len(params)
    slots = list(range(n)) if slots is None else slots
    output_index = [0] * n if output_index is None else output_index
    sample_mask = [True] * n if sample_mask is None else sample_mask
    rows = [RowInfo(s, o, m, row_constants(p)) for p, s, o, m in zip(params, slots, output_index, sample_mask)]
    return build_sampling_metadata(rows, pad_to or n)


def state_for(params, prompts, outputs, vocab_size, *, eos=(), num_slots=None):
    """A state whose slot i holds request i's rows."""
    state = init_sampler_state(num_slots or len(params), vocab_size)
    rows = [build_slot_rows(p, pr, out, vocab_size, eos_token_ids=eos) for p, pr, out in zip(params, prompts, outputs)]
    stacked = [np.stack(col) for col in zip(*rows)]
    return set_slot_rows(state, np.arange(len(params), dtype=np.int32), *stacked)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def reference_probs(logits, p: SamplingParams, prompt=(), output=(), eos=(), output_index=None):
    """The processed distribution, written the slow obvious way (vLLM's order)."""
    x = np.asarray(logits, np.float64).copy()
    v = x.shape[0]
    if p.allowed_token_ids is not None:
        allowed = np.zeros(v, bool)
        allowed[p.allowed_token_ids] = True
        x[~allowed] = -np.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if (len(output) if output_index is None else output_index) < p.min_tokens:
        x[p.all_stop_token_ids(eos)] = -np.inf
    counts = np.bincount(np.asarray(output, int), minlength=v).astype(np.float64)
    seen = counts > 0
    seen[list(prompt)] = True
    x = np.where(seen, np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    if p.greedy:
        return np.eye(v)[np.argmax(x)]
    x = x / p.temperature
    if p.top_k > 0:
        x[x < np.sort(x)[::-1][p.top_k - 1]] = -np.inf
    if p.top_p < 1:
        probs = softmax(x)
        order = np.argsort(-x, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        drop = order[mass_before >= p.top_p]
        x[drop] = -np.inf
    if p.min_p > 0:
        probs = softmax(x)
        x[probs < p.min_p * probs.max()] = -np.inf
    return softmax(x)


def frequencies_match(samples, probs, *, z=5.0):
    n = samples.shape[0]
    freq = np.bincount(samples, minlength=probs.shape[0]) / n
    if freq[probs == 0].sum() > 0:
        return False
    return bool(np.all(np.abs(freq - probs) <= z * np.sqrt(probs * (1 - probs) / n) + 2.0 / n))


V = 32


def test_distributions_match_reference():
    rng = np.random.default_rng(0)
    prompt = [1, 2, 3, 17]
    output = [3, 3, 5, 8, 8, 8, 20]
    configs = [
        SamplingParams(),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.7),
        SamplingParams(temperature=0.7, top_k=8, top_p=0.8),
        SamplingParams(min_p=0.1),
        SamplingParams(temperature=1.3, top_p=0.9, min_p=0.05),
        SamplingParams(repetition_penalty=1.8),
        SamplingParams(frequency_penalty=0.8),
        SamplingParams(presence_penalty=-1.5),
        SamplingParams(temperature=0.8, top_k=10, repetition_penalty=0.7, frequency_penalty=0.3, presence_penalty=0.5),
        SamplingParams(allowed_token_ids=[1, 4, 9, 20], logit_bias={4: 2.0, 9: -1.0}),
        SamplingParams(temperature=0, repetition_penalty=3.0, frequency_penalty=1.0),
        SamplingParams(repetition_penalty=1.8),          # on all-negative logits: multiplies, not divides
        SamplingParams(repetition_penalty=0.6),          # < 1 favours repeats
    ]
    logits = (rng.standard_normal((len(configs), V)) * 2.0).astype(np.float32)
    # Penalised tokens need to be competitive for the penalties to show: lift the seen ones.
    logits[:, [3, 8, 17]] += 2.0
    logits[-2] -= logits[-2].max() + 0.5
    state = state_for(configs, [prompt] * len(configs), [output] * len(configs), V)
    md = metadata(configs, output_index=[len(output)] * len(configs))
    n = 4000
    draws = np.asarray(draw_many(logits, md, state, jax.random.PRNGKey(1), n))            # [n, S]
    for i, p in enumerate(configs):
        ref = reference_probs(logits[i], p, prompt, output)
        assert frequencies_match(draws[:, i], ref), (i, p)
        if i > 0:
            # The check is discriminating: the unprocessed softmax does not pass for processed rows.
            assert not frequencies_match(draws[:, i], softmax(logits[i])), (i, p)


def test_greedy_is_argmax_of_processed_logits():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 100)).astype(np.float32)
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(temperature=1.0, top_p=0.5)] * 3
    state = init_sampler_state(6, 100)
    out, _ = sample_jit(logits, metadata(params), state, jax.random.PRNGKey(0), num_logprobs=0)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:3], logits[:3].argmax(-1))
    # An all-greedy batch takes the no-noise path: same answer.
    out, _ = sample_jit(logits[:3], metadata(params[:3]), init_sampler_state(3, 100), jax.random.PRNGKey(0),
                        num_logprobs=0)
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits[:3].argmax(-1))


def test_seeded_rows_reproducible_in_any_batch():
    rng = np.random.default_rng(2)
    vocab = 64
    target_logits = rng.standard_normal(vocab).astype(np.float32)
    seeded = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)

    def run_alone(step, index):
        md = metadata([seeded], slots=[0], output_index=[index])
        out, _ = sample_jit(target_logits[None], md, init_sampler_state(1, vocab), jax.random.PRNGKey(step),
                            num_logprobs=0)
        return int(out.token_ids[0])

    others = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(repetition_penalty=1.3, min_p=0.2),
              SamplingParams(temperature=0), SamplingParams(seed=99, logit_bias={1: 5.0}, min_tokens=3),
              SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)]

    def run_batched(step, index):
        # The seeded request sits at row 3 of 8 (two padding rows), in slot 5 of 8.
        params = others[:3] + [seeded] + others[3:]
        logits = rng.standard_normal((8, vocab)).astype(np.float32)
        logits[3] = target_logits
        state = state_for(params, [[1, 2]] * 6, [[3, 4, 4]] * 6, vocab, eos=[0], num_slots=8)
        md = metadata(params, slots=[0, 1, 2, 5, 3, 4], output_index=[3, 3, 3, index, 3, 3], pad_to=8)
        out, _ = sample_jit(logits, md, state, jax.random.PRNGKey(1000 + step), num_logprobs=2)
        return int(out.token_ids[3])

    alone = [run_alone(step, index) for step, index in enumerate(range(12))]
    batched = [run_batched(step, index) for step, index in enumerate(range(12))]
    assert alone == batched
    assert len(set(alone)) > 1                      # it really samples
    other_seed = SamplingParams(seed=4321, temperature=0.9, top_p=0.95)
    md = metadata([other_seed] * 12, output_index=list(range(12)))
    out, _ = sample_jit(np.tile(target_logits, (12, 1)), md, init_sampler_state(12, vocab), jax.random.PRNGKey(0),
                        num_logprobs=0)
    assert list(np.asarray(out.token_ids)) != alone


def test_unseeded_rows_are_independent_within_a_step():
    params = [SamplingParams()] * 16
    out, _ = sample_jit(np.zeros((16, V), np.float32), metadata(params), init_sampler_state(16, V),
                        jax.random.PRNGKey(0), num_logprobs=0)
    assert len(set(np.asarray(out.token_ids).tolist())) > 4


def test_logit_bias_and_allowed_token_ids():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, V)).astype(np.float32)
    top = int(logits[1].argmax())
    params = [SamplingParams(logit_bias={7: 100.0}),
              SamplingParams(temperature=0, logit_bias={top: -100.0}),
              SamplingParams(allowed_token_ids=[2, 5, 11]),
              SamplingParams()]                                   # shares the batch, no bias
    state = state_for(params, [[]] * 4, [[]] * 4, V)
    draws = np.asarray(draw_many(logits, metadata(params), state, jax.random.PRNGKey(3), 500))
    assert np.all(draws[:, 0] == 7)
    masked = logits[1].copy()
    masked[top] -= 100
    assert np.all(draws[:, 1] == masked.argmax())
    assert set(np.unique(draws[:, 2])) <= {2, 5, 11}
    assert len(np.unique(draws[:, 3])) > 10


def test_min_tokens_suppresses_eos_and_stop_ids():
    vocab, eos, stop = 20, 19, 18
    logits = np.zeros((3, vocab), np.float32)
    logits[:, eos], logits[:, stop], logits[:, 4] = 9.0, 8.0, 7.0
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop]),
              SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop]),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True)]
    state = state_for(params, [[]] * 3, [[]] * 3, vocab, eos=[eos])
    for index in range(5):
        md = metadata(params, output_index=[index] * 3)
        draws = np.asarray(draw_many(logits, md, state, jax.random.PRNGKey(index), 300))
        if index < 3:
            assert np.all(draws[:, 0] == 4)
            assert not np.isin(draws[:, 1], [eos, stop]).any()
            assert np.all(draws[:, 2] == eos)           # ignore_eos: EOS is an ordinary token
        else:
            assert np.all(draws[:, 0] == eos)
            assert np.isin(draws[:, 1], [eos, stop]).mean() > 0.8   # p = 0.91


@pytest.mark.parametrize("num_logprobs", [0, 5])
def test_logprobs_ranks_and_top_k_are_raw(num_logprobs):
    rng = np.random.default_rng(4)
    vocab = 50
    logits = (rng.standard_normal((4, vocab)) * 3).astype(np.float32)
    params = [SamplingParams(logprobs=5, repetition_penalty=2.0), SamplingParams(logprobs=0, temperature=0),
              SamplingParams(logprobs=3, top_k=2), SamplingParams()]
    state = state_for(params, [[1, 2, 3]] * 4, [[4]] * 4, vocab)
    out, _ = sample_jit(logits, metadata(params), state, jax.random.PRNGKey(5), num_logprobs=num_logprobs)
    tokens = np.asarray(out.token_ids)
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.logprobs), ref[np.arange(4), tokens], atol=1e-5)
    ranks = 1 + np.array([(ref[i] > ref[i, t]).sum() for i, t in enumerate(tokens)])
    np.testing.assert_array_equal(np.asarray(out.ranks), ranks)
    assert out.top_ids.shape == (4, num_logprobs) and out.top_logprobs.shape == (4, num_logprobs)
    if num_logprobs:
        order = np.argsort(-ref, axis=-1)[:, :num_logprobs]
        np.testing.assert_array_equal(np.asarray(out.top_ids), order)
        np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(ref, order, -1), atol=1e-5)


def test_counts_update_only_for_sampling_rows():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((6, V)).astype(np.float32)
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0), SamplingParams()]
    state = init_sampler_state(8, V)
    md = metadata(params, slots=[5, 1, 6, 2], sample_mask=[True, False, True, True], pad_to=6)
    out, new_state = sample_jit(logits, md, state, jax.random.PRNGKey(0), num_logprobs=0)
    tokens = np.asarray(out.token_ids)
    expected = np.zeros((8, V), np.int32)
    for row, slot in ((0, 5), (2, 6), (3, 2)):
        expected[slot, tokens[row]] += 1
    np.testing.assert_array_equal(np.asarray(new_state.output_counts), expected)
    # A second step accumulates on top.
    _, newer = sample_jit(logits, md, new_state, jax.random.PRNGKey(1), num_logprobs=0)
    assert int(np.asarray(newer.output_counts).sum()) == 6


def test_set_slot_rows_writes_only_its_rows():
    n, vocab = 6, 10
    state = init_sampler_state(n, vocab)
    state = set_slot_rows(state, np.arange(n, dtype=np.int32), np.full((n, vocab), 7, np.int32),
                          np.ones((n, vocab), bool), np.full((n, vocab), 0.5, np.float32), np.ones((n, vocab), bool))
    p = SamplingParams(allowed_token_ids=[2, 3], logit_bias={3: 1.5}, repetition_penalty=1.2, min_tokens=1,
                       stop_token_ids=[9])
    rows_a = build_slot_rows(p, [1, 1, 4], [2, 2, 3], vocab, eos_token_ids=[0])
    rows_b = build_slot_rows(SamplingParams(), [5], [], vocab)
    # K = 4: two real slots (4, 1) and two padding entries pointing past the end (dropped).
    stacked = [np.stack([a, b, a, a]) for a, b in zip(rows_a, rows_b)]
    new = set_slot_rows(state, np.array([4, 1, n, n], np.int32), *stacked)
    counts = np.asarray(new.output_counts)
    np.testing.assert_array_equal(counts[4], [0, 0, 2, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(counts[1], np.zeros(vocab))
    for untouched in (0, 2, 3, 5):
        assert np.all(counts[untouched] == 7) and np.all(np.asarray(new.logit_bias)[untouched] == 0.5)
        assert np.all(np.asarray(new.prompt_mask)[untouched]) and np.all(np.asarray(new.stop_mask)[untouched])
    np.testing.assert_array_equal(np.nonzero(np.asarray(new.prompt_mask)[4])[0], [1, 4])
    np.testing.assert_array_equal(np.nonzero(np.asarray(new.stop_mask)[4])[0], [0, 9])
    bias = np.asarray(new.logit_bias)[4]
    assert bias[2] == 0.0 and bias[3] == 1.5 and np.all(np.isneginf(np.delete(bias, [2, 3])))
    assert slot_rows_needed(p) and not slot_rows_needed(SamplingParams(temperature=0.3, top_p=0.5, seed=3))


def test_build_sampling_metadata_fields_and_padding():
    params = [SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.1, seed=2 ** 40 + 5, min_tokens=2,
                             presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1, logprobs=2),
              SamplingParams(temperature=0, logit_bias={1: 1.0}, seed=-1)]
    md = metadata(params, slots=[3, 7], output_index=[1, 9], sample_mask=[True, False], pad_to=4)
    assert md.temperature.dtype == np.float32 and md.top_k.dtype == np.int32 and md.seeds.dtype == np.uint32
    np.testing.assert_allclose(md.temperature, [0.7, 0.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(md.top_k, [4, 0, 0, 0])
    np.testing.assert_allclose(md.top_p, [0.9, 1, 1, 1], rtol=1e-6)
    np.testing.assert_array_equal(md.seeds, [[5, 2 ** 8], [2 ** 32 - 1, 2 ** 32 - 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(md.has_seed, [True, True, False, False])
    np.testing.assert_array_equal(md.suppress_stop, [True, False, False, False])
    np.testing.assert_array_equal(md.has_bias, [False, True, False, False])
    np.testing.assert_array_equal(md.wants_logprobs, [True, False, False, False])
    np.testing.assert_array_equal(md.slots, [3, 7, 0, 0])
    np.testing.assert_array_equal(md.sample_mask, [True, False, False, False])
    np.testing.assert_array_equal(md.output_index, [1, 9, 0, 0])
    np.testing.assert_allclose(md.repetition_penalty, [1.1, 1, 1, 1], rtol=1e-6)
    with pytest.raises(ValueError):
        metadata(params, pad_to=1)


def test_plain_sampler_equals_full_on_plain_batches():
    """The branch-free variant (decode executables of plain batches) gives the full sampler's tokens,
    logprobs and ranks row for row: greedy, seeded and unseeded temperature rows, and padding."""
    from serving.sampler import is_plain_batch

    rng = np.random.RandomState(3)
    v = 97
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=11),
              SamplingParams(temperature=1.3), SamplingParams(temperature=1.0, top_p=1.0, top_k=0, logprobs=0)]
    md = metadata(params, output_index=[0, 4, 9, 2], sample_mask=[True, True, True, False], pad_to=6)
    assert is_plain_batch(md, v)
    state = init_sampler_state(6, v)
    plain_jit = jax.jit(partial(sample, plain=True), static_argnames="num_logprobs")
    for i in range(5):
        logits = rng.standard_normal((6, v)).astype(np.float32) * 3
        key = jax.random.PRNGKey(i)
        full, full_state = sample_jit(logits, md, state, key, num_logprobs=2)
        plain, plain_state = plain_jit(logits, md, state, key, num_logprobs=2)
        np.testing.assert_array_equal(plain.token_ids, full.token_ids)
        np.testing.assert_array_equal(plain.ranks, full.ranks)
        np.testing.assert_allclose(plain.logprobs, full.logprobs, rtol=1e-6)
        np.testing.assert_array_equal(plain_state.output_counts, full_state.output_counts)
        assert plain.top_ids.shape == (6, 2) and plain.top_logprobs.shape == (6, 2)


@pytest.mark.parametrize("extra", [dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1), dict(presence_penalty=0.5),
                                   dict(frequency_penalty=0.1), dict(repetition_penalty=1.2), dict(logprobs=1),
                                   dict(logit_bias={3: 1.0}), dict(allowed_token_ids=[1, 2]), dict(min_tokens=5)])
def test_is_plain_batch_rejects_any_processing(extra):
    from serving.sampler import is_plain_batch

    base = SamplingParams(temperature=0.8)
    assert is_plain_batch(metadata([base, SamplingParams(temperature=0.0, top_k=500)]), 97)
    assert not is_plain_batch(metadata([base, SamplingParams(temperature=0.8, **extra)]), 97)
