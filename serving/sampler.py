"""The sampler that runs inside the compiled engine step: fixed shapes, per-request parameters as arrays.

Shapes: ``S`` rows (the step's sequences, padded to a bucket), ``V`` vocabulary entries, ``N`` slots.

Every request holds a *slot* in ``[0, N)`` for as long as it runs (the runner assigns it; a preempted
request gets one again when it resumes). Per-slot rows of ``SamplerState`` persist on device between
steps and are donated into the step:

    output_counts [N, V] int32    histogram of generated tokens    (presence/frequency/repetition penalties)
    prompt_mask   [N, V] bool     tokens present in the prompt     (repetition penalty)
    logit_bias    [N, V] float32  logit_bias, -inf outside allowed_token_ids
    stop_mask     [N, V] bool     EOS + stop_token_ids, suppressed while fewer than min_tokens are generated
    last_tokens   [N]    int32    the token the slot sampled last (async scheduling feeds it back as the
                                  next step's input before the host has seen it; see model_runner)

A slot's rows are only *read* for rows whose parameters need them (per-row flags below), so a request
with no penalties, no logit_bias/allowed_token_ids and no min_tokens does not need its rows written at
all: ``slot_rows_needed(params)`` tells the runner whether to call ``set_slot_rows`` (stale data left by
an earlier request in the slot is then never looked at). ``output_counts`` is updated every step for
every sampling row regardless; it is rewritten in full when a slot is (re)initialised.

Processing order (vLLM's): logit_bias / allowed_token_ids, min_tokens suppression, repetition penalty,
frequency and presence penalties -> greedy rows take the argmax here; then temperature, top_k, top_p,
min_p, and a Gumbel-max draw. Logprobs are those of the *raw* model distribution (vLLM's default).

Randomness is per row: a seeded row's key depends only on (seed, output_index), so a seeded request
gives the same tokens alone or in any batch at any row position; an unseeded row folds the step key
with its slot. Expensive stages (gathers of the [S, V] state rows, the sort for top_k/top_p, the
Gumbel noise, the top-k logprobs) sit behind ``lax.cond`` on whether any row of the batch needs them,
and the stages are exact identities for rows that do not, so a row's result never depends on its
neighbours.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serving.sampling_params import SAMPLING_EPS, SamplingParams

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------
# Persistent per-slot state
# ---------------------------------------------------------------------------------------------------

@partial(jax.tree_util.register_dataclass,
         data_fields=["output_counts", "prompt_mask", "logit_bias", "stop_mask", "last_tokens"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplerState:
    output_counts: jax.Array   # [N, V] int32
    prompt_mask: jax.Array     # [N, V] bool
    logit_bias: jax.Array      # [N, V] float32
    stop_mask: jax.Array       # [N, V] bool
    last_tokens: jax.Array     # [N] int32

    @property
    def num_slots(self) -> int:
        return self.output_counts.shape[0]


def init_sampler_state(num_slots: int, vocab_size: int) -> SamplerState:
    """Zeroed state for ``num_slots`` slots (the runner uses ``max_num_seqs``; see ``set_slot_rows``)."""
    if num_slots < 1 or vocab_size < 1:
        raise ValueError(f"num_slots and vocab_size must be positive, got {num_slots} and {vocab_size}")
    return SamplerState(
        output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
        prompt_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
        logit_bias=jnp.zeros((num_slots, vocab_size), jnp.float32),
        stop_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
        last_tokens=jnp.zeros((num_slots,), jnp.int32),
    )


class SlotRows(NamedTuple):
    counts: np.ndarray      # [V] int32
    prompt_mask: np.ndarray  # [V] bool
    bias: np.ndarray        # [V] float32
    stop_mask: np.ndarray   # [V] bool


def slot_rows_needed(params: SamplingParams) -> bool:
    """Whether the sampler will read this request's slot rows (so the runner must write them)."""
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
            or bool(params.logit_bias) or params.allowed_token_ids is not None or params.min_tokens > 0)


def build_slot_rows(params: SamplingParams, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                    vocab_size: int, *, eos_token_ids: Sequence[int] = ()) -> SlotRows:
    """Host-side rows for a request taking a slot (also on resume, with its output tokens so far).

    ``eos_token_ids`` are the model's EOS ids (tokenizer + generation config); with ``stop_token_ids``
    (and unless ``ignore_eos``) they form ``stop_mask``, suppressed until ``min_tokens`` are generated.
    Token ids must lie in ``[0, vocab_size)`` (``SamplingParams.verify`` checks the user's).
    """
    counts = np.bincount(np.asarray(output_token_ids, np.int64), minlength=vocab_size).astype(np.int32)
    if counts.shape[0] != vocab_size:
        raise ValueError(f"output token id out of range for vocab_size {vocab_size}")
    mask = np.zeros(vocab_size, np.bool_)
    mask[np.asarray(prompt_token_ids, np.int64)] = True
    bias = np.zeros(vocab_size, np.float32)
    if params.allowed_token_ids is not None:
        bias[:] = _NEG_INF
        bias[np.asarray(params.allowed_token_ids, np.int64)] = 0.0
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias.keys(), np.int64, len(params.logit_bias))
        bias[ids] += np.fromiter(params.logit_bias.values(), np.float32, len(params.logit_bias))
    stop = np.zeros(vocab_size, np.bool_)
    stop_ids = [t for t in params.all_stop_token_ids(eos_token_ids) if t < vocab_size]
    stop[np.asarray(stop_ids, np.int64)] = True
    return SlotRows(counts, mask, bias, stop)


@partial(jax.jit, donate_argnums=(0,))
def set_slot_rows(state: SamplerState, slots, counts, prompt_mask, bias, stop_mask) -> SamplerState:
    """Write K slots' rows: ``slots [K] int32``, ``counts [K, V]``, ``prompt_mask [K, V]``, ``bias [K, V]``,
    ``stop_mask [K, V]`` (stack ``build_slot_rows`` results). The state is donated.

    Padding: call with K padded to a small fixed size (one compile per K) and give padding entries the
    slot index ``state.num_slots`` (out of range): their writes are dropped. Real slots must be distinct.
    """
    def put(dst, rows):
        return dst.at[slots].set(rows.astype(dst.dtype), mode="drop")

    return SamplerState(put(state.output_counts, counts), put(state.prompt_mask, prompt_mask),
                        put(state.logit_bias, bias), put(state.stop_mask, stop_mask), state.last_tokens)


# ---------------------------------------------------------------------------------------------------
# Per-step metadata
# ---------------------------------------------------------------------------------------------------

@partial(jax.tree_util.register_dataclass,
         data_fields=["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty", "seeds", "has_seed", "output_index", "suppress_stop", "has_bias",
                      "wants_logprobs", "slots", "sample_mask"],
         meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    temperature: jax.Array         # [S] float32; < SAMPLING_EPS: greedy
    top_p: jax.Array               # [S] float32; 1: off
    top_k: jax.Array               # [S] int32; <= 0 (or >= V): off
    min_p: jax.Array               # [S] float32; 0: off
    presence_penalty: jax.Array    # [S] float32
    frequency_penalty: jax.Array   # [S] float32
    repetition_penalty: jax.Array  # [S] float32
    seeds: jax.Array               # [S, 2] uint32: low and high 32 bits of the seed
    has_seed: jax.Array            # [S] bool
    output_index: jax.Array        # [S] int32: tokens generated before this step (the new token's index)
    suppress_stop: jax.Array       # [S] bool: output_index < min_tokens, so stop_mask tokens are banned
    has_bias: jax.Array            # [S] bool: the slot's logit_bias row applies
    wants_logprobs: jax.Array      # [S] bool: top-k logprobs are wanted (gates the top-k)
    slots: jax.Array               # [S] int32
    sample_mask: jax.Array         # [S] bool: the row samples this step (not padding, not mid-prompt)


class RowConstants(NamedTuple):
    """The per-request part of a metadata row, computed once per request by ``row_constants``."""
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed_lo: int
    seed_hi: int
    has_seed: bool
    min_tokens: int
    has_bias: bool
    wants_logprobs: bool


def row_constants(params: SamplingParams) -> RowConstants:
    greedy = params.greedy
    seed = 0 if params.seed is None else params.seed % 2 ** 64
    return RowConstants(
        temperature=0.0 if greedy else params.temperature,
        top_p=params.top_p, top_k=max(params.top_k, 0), min_p=params.min_p,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        seed_lo=seed & 0xFFFFFFFF, seed_hi=seed >> 32, has_seed=params.seed is not None,
        min_tokens=params.min_tokens,
        has_bias=bool(params.logit_bias) or params.allowed_token_ids is not None,
        wants_logprobs=bool(params.logprobs),
    )


class RowInfo(NamedTuple):
    """One real row of a step, built by the runner each step."""
    slot: int
    output_index: int        # tokens generated so far (index of the token this step samples)
    sample: bool             # False while the request is still prefilling its prompt
    consts: RowConstants     # row_constants(params), cached with the request


# A padding row: greedy, no penalties, slot 0 (any valid slot: padding rows never write state).
_PAD_ROW = (0, 0, 0) + tuple(RowConstants(0.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, 0, 0, False, 0, False, False))


def build_sampling_metadata(rows: Sequence[RowInfo], num_rows_padded: int) -> SamplingMetadata:
    """Numpy ``SamplingMetadata`` for ``rows`` padded to ``num_rows_padded``."""
    if len(rows) > num_rows_padded:
        raise ValueError(f"{len(rows)} rows do not fit in a bucket of {num_rows_padded}")
    consts = np.array([tuple(r.consts) for r in rows], np.float64).reshape(len(rows), NUM_ROW_CONSTANTS)
    return sampling_metadata_from_columns([r.slot for r in rows], [r.output_index for r in rows],
                                          [r.sample for r in rows], consts, num_rows_padded)


# Columns of a metadata row: slot, output_index, sample, then the RowConstants fields.
NUM_ROW_CONSTANTS = len(RowConstants._fields)


def sampling_metadata_from_columns(slots, output_index, sample, consts: np.ndarray,
                                   num_rows_padded: int) -> SamplingMetadata:
    """``build_sampling_metadata`` from per-row columns ([n] each; ``consts`` [n, NUM_ROW_CONSTANTS],
    rows of ``tuple(row_constants(params))``), with no Python work per row: runs every step."""
    n = len(slots)
    if n > num_rows_padded:
        raise ValueError(f"{n} rows do not fit in a bucket of {num_rows_padded}")
    # One float64 table, one column per field: float64 holds every int32/uint32 value exactly.
    table = np.empty((num_rows_padded, len(_PAD_ROW)), np.float64)
    table[:n, 0], table[:n, 1], table[:n, 2], table[:n, 3:] = slots, output_index, sample, consts
    table[n:] = _PAD_ROW
    (slot, output_index, sample, temperature, top_p, top_k, min_p, presence, frequency, repetition,
     seed_lo, seed_hi, has_seed, min_tokens, has_bias, wants_logprobs) = table.T
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    return SamplingMetadata(
        temperature=f32(temperature), top_p=f32(top_p), top_k=top_k.astype(np.int32), min_p=f32(min_p),
        presence_penalty=f32(presence), frequency_penalty=f32(frequency), repetition_penalty=f32(repetition),
        seeds=np.stack([seed_lo, seed_hi], axis=-1).astype(np.uint32), has_seed=has_seed != 0,
        output_index=output_index.astype(np.int32), suppress_stop=(output_index < min_tokens) & (sample != 0),
        has_bias=has_bias != 0, wants_logprobs=wants_logprobs != 0,
        slots=slot.astype(np.int32), sample_mask=sample != 0,
    )


# ---------------------------------------------------------------------------------------------------
# The device side
# ---------------------------------------------------------------------------------------------------

@partial(jax.tree_util.register_dataclass,
         data_fields=["token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array      # [S] int32
    logprobs: jax.Array       # [S] float32: raw-distribution logprob of the sampled token
    ranks: jax.Array          # [S] int32: 1 = most likely
    top_ids: jax.Array        # [S, num_logprobs] int32
    top_logprobs: jax.Array   # [S, num_logprobs] float32


def token_logprobs(logits, token_ids, wants_top, *, num_logprobs: int):
    """Raw-distribution logprobs of ``token_ids`` and the top ``num_logprobs`` alternatives.

    ``logits [R, V]``, ``token_ids [R]``, ``wants_top [R] bool`` (the top-k runs only if any row wants it).
    Returns ``(logprobs [R], ranks [R], top_ids [R, k], top_logprobs [R, k])``. The rank counts tokens at
    least as likely as the chosen one (vLLM's convention), so the argmax has rank 1. Usable for prompt
    logprobs too.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                               # [R]
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0]              # [R]
    ranks = jnp.sum(logits >= chosen[:, None], axis=-1, dtype=jnp.int32)                 # [R]
    r = logits.shape[0]
    if num_logprobs == 0:
        top_ids = jnp.zeros((r, 0), jnp.int32)
        top_lp = jnp.zeros((r, 0), jnp.float32)
    else:
        def top(x):
            values, ids = jax.lax.top_k(x, num_logprobs)
            return ids.astype(jnp.int32), values - lse[:, None]

        def none(x):
            return jnp.zeros((r, num_logprobs), jnp.int32), jnp.zeros((r, num_logprobs), jnp.float32)

        top_ids, top_lp = jax.lax.cond(jnp.any(wants_top), top, none, logits)
    return chosen - lse, jnp.maximum(ranks, 1), top_ids, top_lp


def is_plain_batch(md: SamplingMetadata, vocab_size: int) -> bool:
    """Host side, on the step's numpy metadata: whether every row needs nothing beyond temperature
    and the Gumbel draw (no penalties, bias, min_tokens suppression, truncation or top logprobs), so
    ``sample(..., plain=True)`` gives the same tokens as the full sampler with no data-dependent
    branch in the compiled step. Padding rows are plain."""
    return bool(np.all((md.repetition_penalty == 1.0) & (md.frequency_penalty == 0.0)
                       & (md.presence_penalty == 0.0) & ~md.has_bias & ~md.suppress_stop & ~md.wants_logprobs
                       & ((md.top_k <= 0) | (md.top_k >= vocab_size)) & (md.top_p >= 1.0) & (md.min_p <= 0.0)))


def _needs_penalties(md: SamplingMetadata):
    return jnp.any((md.repetition_penalty != 1.0) | (md.frequency_penalty != 0.0) | (md.presence_penalty != 0.0))


def _needs_processing(md: SamplingMetadata):
    """Whether any row's logits change before the greedy argmax (bias, min_tokens, penalties)."""
    return jnp.any(md.has_bias) | jnp.any(md.suppress_stop) | _needs_penalties(md)


def _apply_penalties(logits, md: SamplingMetadata, state: SamplerState):
    """logit_bias, min_tokens suppression, repetition / frequency / presence penalties ([S, V] -> [S, V])."""
    slots = md.slots

    def bias(x):
        return jnp.where(md.has_bias[:, None], x + state.logit_bias[slots], x)

    x = jax.lax.cond(jnp.any(md.has_bias), bias, lambda x: x, logits)

    def suppress(x):
        return jnp.where(md.suppress_stop[:, None] & state.stop_mask[slots], _NEG_INF, x)

    x = jax.lax.cond(jnp.any(md.suppress_stop), suppress, lambda x: x, x)

    rep = md.repetition_penalty[:, None]
    freq = md.frequency_penalty[:, None]
    pres = md.presence_penalty[:, None]

    def penalise(x):
        counts = state.output_counts[slots]                                             # [S, V]
        # Identity for rows with default values (x / 1, x - 0 * c), so neighbours never leak in.
        seen = (counts > 0) | state.prompt_mask[slots]
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        x = x - freq * counts.astype(jnp.float32)
        return x - pres * (counts > 0).astype(jnp.float32)

    return jax.lax.cond(_needs_penalties(md), penalise, lambda x: x, x)


def _truncate(x, md: SamplingMetadata, random_rows):
    """top_k, then top_p, then min_p on temperature-scaled logits: masked entries become -inf.

    top_k and top_p keep every token whose logit reaches a per-row threshold read off one descending
    sort (ties at the threshold are kept); min_p keeps tokens with p >= min_p * p_max, i.e. logits
    >= max + log(min_p), which needs no sort.
    """
    v = x.shape[-1]
    k = jnp.where((md.top_k <= 0) | (md.top_k > v), v, md.top_k)                         # [S]
    p = md.top_p
    needs_sort = jnp.any(random_rows & ((k < v) | (p < 1.0)))

    def sort_threshold(x):
        desc = -jnp.sort(-x, axis=-1)                                                     # [S, V]
        pos = jnp.arange(v)[None, :]
        desc = jnp.where(pos < k[:, None], desc, _NEG_INF)                                # top_k
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs                                  # exclusive cumsum
        # Keep the prefix whose mass before it is < p; the first token always stays.
        # p = 1 keeps everything even when rounding makes the mass before the last token reach 1.
        keep = (mass_before < p[:, None]) | (pos == 0) | (p[:, None] >= 1.0)
        n_keep = jnp.minimum(jnp.sum(keep & (pos < k[:, None]), axis=-1), k)               # [S] in [1, k]
        threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)             # [S, 1]
        return jnp.where(random_rows[:, None], threshold, _NEG_INF)

    threshold = jax.lax.cond(needs_sort, sort_threshold,
                             lambda x: jnp.full((x.shape[0], 1), _NEG_INF, x.dtype), x)
    x = jnp.where(x < threshold, _NEG_INF, x)

    def min_p(x):
        floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(md.min_p)[:, None]          # log(0) = -inf: off
        return jnp.where(x < floor, _NEG_INF, x)

    return jax.lax.cond(jnp.any(random_rows & (md.min_p > 0.0)), min_p, lambda x: x, x)


def _row_keys(md: SamplingMetadata, step_key):
    """[S] raw threefry keys: (seed, output_index) for seeded rows, (step_key, slot) otherwise."""
    if jax.dtypes.issubdtype(step_key.dtype, jax.dtypes.prng_key):
        step_key = jax.random.key_data(step_key)
    base = jax.random.PRNGKey(0)

    def seeded(seed, index):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, seed[0]), seed[1]), index)

    seeded_keys = jax.vmap(seeded)(md.seeds, md.output_index.astype(jnp.uint32))        # [S, 2]
    step_keys = jax.vmap(lambda s: jax.random.fold_in(step_key, s))(md.slots.astype(jnp.uint32))
    return jnp.where(md.has_seed[:, None], seeded_keys, step_keys)


def sample(logits, md: SamplingMetadata, state: SamplerState, step_key, *,
           num_logprobs: int, plain: bool = False) -> tuple[SamplerOutput, SamplerState]:
    """Sample one token per row. ``logits [S, V]``; ``step_key`` a fresh PRNG key each step.

    ``num_logprobs`` (static) is the width of the top-k alternatives (the engine's max over requests,
    or a fixed ``max_logprobs``; 0 allowed). Returns the output and the state with ``output_counts``
    incremented at (slot, token) and ``last_tokens[slot] = token`` for rows in ``sample_mask``.

    ``plain`` (static) promises ``is_plain_batch``: the step then has no ``lax.cond`` at all.
    On a GPU each cond makes the host wait for the predicate (a device-to-host round trip that
    blocks the dispatching thread until the forward pass is done) and launches its branch outside
    the step's CUDA graph; a decode step of a plain batch avoids both. The top-logprob columns are
    zeros then (no row asked for them).
    """
    logits = logits.astype(jnp.float32)
    greedy_rows = md.temperature < SAMPLING_EPS
    random_rows = md.sample_mask & ~greedy_rows
    any_random = jnp.any(random_rows)

    def draw(x, greedy_tokens, truncate=True):
        temperature = jnp.where(greedy_rows, 1.0, md.temperature)[:, None]
        x = x / temperature
        if truncate:
            x = _truncate(x, md, random_rows)
        keys = _row_keys(md, step_key)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (x.shape[-1],), jnp.float32))(keys)
        sampled = jnp.argmax(x + noise, axis=-1).astype(jnp.int32)                      # Gumbel-max
        return jnp.where(greedy_rows, greedy_tokens, sampled)

    if plain:
        # The Gumbel draw runs for every row (a select, not a branch), even in an all-greedy batch:
        # [S, V] random numbers on the device instead of a host round trip for a predicate.
        tokens = draw(logits, jnp.argmax(logits, axis=-1).astype(jnp.int32), truncate=False)
        lp, ranks, _, _ = token_logprobs(logits, tokens, md.wants_logprobs, num_logprobs=0)
        s = logits.shape[0]
        top_ids, top_lp = jnp.zeros((s, num_logprobs), jnp.int32), jnp.zeros((s, num_logprobs), jnp.float32)
    else:
        tokens, lp, ranks, top_ids, top_lp = _sample_full(logits, md, state, any_random, greedy_rows, draw,
                                                          num_logprobs)
    counts = state.output_counts.at[md.slots, tokens].add(md.sample_mask.astype(jnp.int32), mode="drop")
    # Rows that do not sample (mid-prompt chunks, padding) point past the last slot: dropped, so a
    # slot's last token is only ever the one its own request sampled.
    writers = jnp.where(md.sample_mask, md.slots, state.num_slots)
    last_tokens = state.last_tokens.at[writers].set(tokens, mode="drop")
    new_state = dataclasses.replace(state, output_counts=counts, last_tokens=last_tokens)
    return SamplerOutput(tokens, lp, ranks, top_ids, top_lp), new_state


def _sample_full(logits, md, state, any_random, greedy_rows, draw, num_logprobs):
    """Every sampling feature, its expensive stages behind ``lax.cond``s on whether any row needs them."""

    def full(x):
        processed = _apply_penalties(x, md, state)
        greedy_tokens = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        return jax.lax.cond(any_random, draw, lambda x, g: g, processed, greedy_tokens)

    # The common all-greedy, unpenalised batch takes a path whose only [S, V] work is one argmax: a
    # cond branch returning [S, V] (even unchanged) costs a copy of the logits on GPU. The argmax of
    # unprocessed logits is what `full` computes for such a batch, so results do not depend on the path.
    tokens = jax.lax.cond(any_random | _needs_processing(md), full,
                          lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)
    lp, ranks, top_ids, top_lp = token_logprobs(logits, tokens, md.wants_logprobs & md.sample_mask,
                                                num_logprobs=num_logprobs)
    return tokens, lp, ranks, top_ids, top_lp
