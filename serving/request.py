"""A request as the scheduler sees it, and the per-step delta the scheduler hands back to the engine.

Host bookkeeping only (no jax). Shaped like vLLM v1's ``Request`` / ``EngineCoreOutput``: the
scheduler owns the token counters, the page pool owns the pages (keyed by ``req_id``).

Token accounting (all positions are absolute, 0-based)::

    all_token_ids  = prompt_token_ids + output_token_ids          (num_tokens of them)
    [0, num_computed_tokens)          KV already in the cache (computed, or prefix-cache hits)
    [num_computed_tokens, num_tokens) still to be computed; when the step that computes the last of
                                      them runs, the runner samples the next token
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from serving.plan import Logprobs


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2          # waiting again after a preemption by recompute
    # Everything from here on is finished (is_finished relies on the order).
    FINISHED_STOPPED = 3   # EOS or a stop token id (or a stop string, via finish_requests)
    FINISHED_LENGTH = 4    # max_tokens or max_model_len reached
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
FINISH_REASON_TO_STATUS = {reason: status for status, reason in _FINISH_REASONS.items()}


class Request:
    """One sequence being generated (an ``n > 1`` request is fanned out into n of these one level up)."""

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: Any,                  # serving.sampling_params.SamplingParams (attributes only read)
        *,
        arrival_time: Optional[float] = None,
        priority: int = 0,                     # lower is served first under the "priority" policy
        cache_salt: Optional[str] = None,      # isolates this request's prefix-cache entries
        eos_token_ids: Iterable[int] = (),     # tokenizer EOS + generation config EOS ids
    ):
        self.req_id = req_id
        self.prompt_token_ids: tuple[int, ...] = tuple(int(t) for t in prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else float(arrival_time)
        self.priority = int(priority)
        self.cache_salt = cache_salt
        self.eos_token_ids: frozenset[int] = frozenset(int(t) for t in eos_token_ids)

        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        # Tokens that steps already scheduled will sample but whose results update() has not
        # applied yet (async scheduling keeps one step in flight); 0 between steps otherwise.
        # Positions [num_tokens, num_tokens + num_output_placeholders) are scheduled but unknown.
        self.num_output_placeholders = 0
        # Prefix-cache hits (tokens) at the first schedule; None until then (vLLM reports it once).
        self.num_cached_tokens: Optional[int] = None
        self.num_preemptions = 0
        # Hash of each full page of all_token_ids, chained (see serving.page_pool.hash_page). Tokens
        # are append-only, so the list stays valid across preemptions; it only ever grows.
        self.page_hashes: list[bytes] = []
        # Prompt logprobs already handed to the engine, and how many the runner has sent since the
        # request last (re)started from position 0: a resumed request recomputes its prompt and the
        # runner emits those positions again, which update() drops.
        self.num_prompt_logprobs_emitted = 0
        self.num_prompt_logprobs_since_start = 0
        # Tie-breaker for equal (priority, arrival_time); assigned by the scheduler.
        self.seq_no = 0
        # Stop rules in the form the per-token check wants, set by the scheduler on arrival:
        # the output length that ends the request (max_tokens or max_model_len, whichever comes
        # first), and the ids that may stop it once min_tokens are out (EOS unless ignore_eos,
        # and stop_token_ids).
        self.max_output_tokens: Optional[int] = None
        self.stop_ids: frozenset[int] = frozenset()

    # --- derived quantities -------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without materialising the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return list(self.prompt_token_ids[start:stop])
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return [*self.prompt_token_ids[start:], *self.output_token_ids[:stop - p]]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> Optional[str]:
        return self.status.finish_reason

    @property
    def priority_key(self) -> tuple[int, float, int]:
        """Sort key under the priority policy: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time, self.seq_no)

    @property
    def skip_prefix_cache_lookup(self) -> bool:
        # Prompt logprobs need every prompt position computed, so such a request reads no cached
        # pages (vLLM does the same). Its full pages are still cached for others.
        return getattr(self.sampling_params, "prompt_logprobs", None) is not None

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request (a delta, vLLM v1's EngineCoreOutput).

    Treated as immutable, but not frozen: one is built per running request per step, and a frozen
    dataclass's __init__ costs ~4x as much (vLLM's is a mutable msgspec struct for the same reason).
    """
    req_id: str
    new_token_ids: tuple[int, ...] = ()
    new_logprobs: tuple[Logprobs, ...] = ()
    new_prompt_logprobs: tuple[Optional[Logprobs], ...] = ()
    finish_reason: Optional[str] = None     # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None    # the stop token id that ended it (None for EOS)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
