"""A fake model runner whose outputs can be computed by hand, and which really goes through the pages.

``FakeRunner.run(plan) -> RunnerOutput`` follows the runner side of serving/plan.py:

* per-request state (token ids, block table, sampling params) keyed by req_id: created from
  ``plan.new_requests``, extended by the deltas in ``plan.cached_requests``, dropped when the id is
  in ``plan.finished_req_ids`` (processed first). Mismatches with the plan raise AssertionError, so
  the fake also checks the scheduler's side of the contract.
* its "KV cache" is a numpy array ``[num_pages, page_size]`` of token ids. Every scheduled token is
  written to its slot (page = block_table[pos // page_size], offset = pos % page_size) before
  anything is read (a real runner also writes a step's KV before the step's attention reads it),
  and the next token is computed only from what is read back through the block table::

      next_token(t_0 .. t_{n-1}) = (31 * sum((i + 1) * t_i) + n) % vocab_size

  so sharing the wrong page, overwriting a cached page or a wrong block table changes the tokens.
* a token is sampled only when the step reaches the end of the request's known tokens; a partial
  prefill chunk yields an empty tuple.
* like vLLM's sampler, while a request has fewer than ``min_tokens`` outputs its stop tokens
  (``stop_token_ids``, and ``eos_token_id`` unless ignore_eos) are masked: the next-best token,
  ``(t + 1) % vocab_size`` skipping stop tokens, is sampled instead. ``reference_generate``
  applies the same rule.
* logprobs: the fake distribution puts logprob ``-j`` on token ``(next + j) % vocab_size``; the chosen
  token has rank 1 and logprob 0.0, the top-k alternatives are ``j = 0 .. k-1``. Prompt logprobs
  (position 0: None; position p: the prompt token scored against next_token(t_0 .. t_{p-1})) are
  emitted for the prompt positions computed in the step, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from serving.plan import Logprobs, RunnerOutput, StepPlan

EMPTY_SLOT = -1


def next_token(token_ids: Sequence[int], vocab_size: int) -> int:
    """The fake model's greedy next token after ``token_ids`` (the whole sequence so far)."""
    weighted = sum((i + 1) * int(t) for i, t in enumerate(token_ids))
    return (31 * weighted + len(token_ids)) % vocab_size


def _stop_ids(params, eos_token_id: Optional[int]) -> set[int]:
    stop = set(getattr(params, "stop_token_ids", None) or ())
    if eos_token_id is not None and not getattr(params, "ignore_eos", False):
        stop.add(eos_token_id)
    return stop


def _mask_stops(token: int, num_outputs: int, params, eos_token_id: Optional[int], vocab_size: int) -> int:
    if num_outputs >= (getattr(params, "min_tokens", 0) or 0):
        return token
    stop = _stop_ids(params, eos_token_id)
    for _ in range(vocab_size):
        if token not in stop:
            return token
        token = (token + 1) % vocab_size
    raise AssertionError("every token of the vocabulary is a stop token")


def reference_generate(prompt: Sequence[int], params, *, vocab_size: int, max_model_len: int,
                       eos_token_id: Optional[int] = None) -> tuple[list[int], str]:
    """What a request must produce, computed directly (no pages, no scheduler): (tokens, finish reason).

    Mirrors vLLM's stop rules: length (max_tokens or max_model_len) first, then after min_tokens
    EOS (unless ignore_eos) and stop_token_ids.
    """
    tokens, out = list(prompt), []
    while True:
        tok = _mask_stops(next_token(tokens, vocab_size), len(out), params, eos_token_id, vocab_size)
        tokens.append(tok)
        out.append(tok)
        if len(tokens) >= max_model_len or (params.max_tokens is not None and len(out) >= params.max_tokens):
            return out, "length"
        if len(out) < (params.min_tokens or 0):
            continue
        if not params.ignore_eos and eos_token_id is not None and tok == eos_token_id:
            return out, "stop"
        if tok in (params.stop_token_ids or ()):
            return out, "stop"


@dataclass
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    page_ids: list[int]
    sampling_params: Any
    num_computed_tokens: int
    num_outputs: int = 0                 # outputs known to this runner (resumed ones included)
    reads: list[int] = field(default_factory=list)


class FakeRunner:
    """The runner side of the step contract over a numpy token-id "KV cache" (see module doc)."""

    def __init__(self, num_pages: int, page_size: int, vocab_size: int, eos_token_id: Optional[int] = None):
        self.num_pages = num_pages
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.kv = np.full((num_pages, page_size), EMPTY_SLOT, dtype=np.int64)
        self.requests: dict[str, _RequestState] = {}
        self.num_steps = 0
        self.num_tokens_computed = 0

    # --- helpers ----------------------------------------------------------------------------------
    def _slot(self, state: _RequestState, pos: int) -> tuple[int, int]:
        idx = pos // self.page_size
        assert idx < len(state.page_ids), f"position {pos} beyond the block table ({len(state.page_ids)} pages)"
        page = state.page_ids[idx]
        assert page != 0, "the null page 0 must never be in a request's block table"
        return page, pos % self.page_size

    def read_tokens(self, req_id: str, num: int) -> list[int]:
        """Token ids at positions 0..num-1 of a request, as read back from the cache."""
        state = self.requests[req_id]
        return [int(self.kv[self._slot(state, p)]) for p in range(num)]

    def _logprobs(self, predicted: int, actual: int, k: int) -> Logprobs:
        j = (actual - predicted) % self.vocab_size
        top = tuple((predicted + i) % self.vocab_size for i in range(k))
        return Logprobs(token_id=actual, logprob=-float(j), rank=j + 1,
                        top_ids=top, top_logprobs=tuple(-float(i) for i in range(k)))

    # --- the contract -----------------------------------------------------------------------------
    def run(self, plan: StepPlan) -> RunnerOutput:
        self.num_steps += 1
        for req_id in plan.finished_req_ids:
            self.requests.pop(req_id, None)

        ids_new = [r.req_id for r in plan.new_requests]
        ids_cached = [r.req_id for r in plan.cached_requests]
        assert len(set(ids_new) | set(ids_cached)) == len(ids_new) + len(ids_cached), "a request appears twice"
        assert set(plan.num_scheduled_tokens) == set(ids_new) | set(ids_cached), "num_scheduled_tokens keys"
        assert plan.total_num_scheduled_tokens == sum(plan.num_scheduled_tokens.values())

        for new in plan.new_requests:
            assert new.req_id not in self.requests, f"{new.req_id} sent as new while the runner holds it"
            self.requests[new.req_id] = _RequestState(
                token_ids=[*new.prompt_token_ids, *new.output_token_ids], num_prompt_tokens=len(new.prompt_token_ids),
                page_ids=list(new.page_ids), sampling_params=new.sampling_params,
                num_computed_tokens=new.num_computed_tokens, num_outputs=len(new.output_token_ids))
        for cached in plan.cached_requests:
            assert cached.req_id in self.requests, f"delta for unknown request {cached.req_id}"
            state = self.requests[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens, (
                f"{cached.req_id}: runner has {state.num_computed_tokens} computed, plan says {cached.num_computed_tokens}")
            state.page_ids.extend(cached.new_page_ids)

        # Write phase: every scheduled token of every request lands in the cache first.
        for req_id, n in plan.num_scheduled_tokens.items():
            state = self.requests[req_id]
            assert n >= 1, f"{req_id}: scheduled {n} tokens"
            start = state.num_computed_tokens
            assert start + n <= len(state.token_ids), f"{req_id}: scheduled past its known tokens"
            for pos in range(start, start + n):
                self.kv[self._slot(state, pos)] = state.token_ids[pos]
            self.num_tokens_computed += n

        # Read phase: compute outputs from what the cache holds.
        sampled, logprobs, prompt_logprobs = {}, {}, {}
        for req_id, n in plan.num_scheduled_tokens.items():
            state = self.requests[req_id]
            params = state.sampling_params
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            context = self.read_tokens(req_id, end)
            k_prompt = getattr(params, "prompt_logprobs", None)
            if k_prompt is not None and start < state.num_prompt_tokens:
                entries = []
                for p in range(start, min(end, state.num_prompt_tokens)):
                    entries.append(None if p == 0 else self._logprobs(
                        next_token(context[:p], self.vocab_size), context[p], k_prompt))
                prompt_logprobs[req_id] = tuple(entries)
            state.num_computed_tokens = end
            if end < len(state.token_ids):
                sampled[req_id] = ()             # still prefilling
                continue
            predicted = next_token(context, self.vocab_size)
            token = _mask_stops(predicted, state.num_outputs, params, self.eos_token_id, self.vocab_size)
            state.token_ids.append(token)
            state.num_outputs += 1
            sampled[req_id] = (token,)
            k = getattr(params, "logprobs", None)
            if k is not None:
                logprobs[req_id] = (self._logprobs(predicted, token, k),)
        return RunnerOutput(req_ids=tuple(plan.num_scheduled_tokens), sampled_token_ids=sampled,
                            logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def assert_no_state(self) -> None:
        """After the engine drained and the last finished ids reached the runner: nothing held."""
        assert not self.requests, f"runner still holds {sorted(self.requests)}"


def drive(scheduler, runner: FakeRunner, *, max_steps: int = 100_000,
          on_step=None) -> dict[str, list]:
    """Run schedule -> run -> update until nothing is left; returns req_id -> its EngineCoreOutputs.

    ``on_step(step_index, plan, outputs)`` is called after every step (tests inject aborts there).
    """
    per_request: dict[str, list] = {}
    for step in range(max_steps):
        if not scheduler.has_requests():
            return per_request
        plan = scheduler.schedule()
        result = runner.run(plan)
        outputs = scheduler.update(plan, result)
        for out in outputs:
            per_request.setdefault(out.req_id, []).append(out)
        if on_step is not None:
            on_step(step, plan, outputs)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def collect(outputs: Iterable) -> tuple[list[int], Optional[str]]:
    """(all new tokens, final finish reason) from one request's EngineCoreOutputs."""
    tokens, reason = [], None
    for out in outputs:
        tokens.extend(out.new_token_ids)
        if out.finish_reason is not None:
            reason = out.finish_reason
    return tokens, reason
