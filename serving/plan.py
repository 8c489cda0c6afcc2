"""The contract between the scheduler (host bookkeeping, no jax) and the model runner (device).

One engine step::

    plan    = scheduler.schedule()              # StepPlan
    result  = runner.run(plan)                  # RunnerOutput
    outputs = scheduler.update(plan, result)    # token appends, stop checks, page frees

New requests travel in full, running ones as deltas (vLLM v1's SchedulerOutput). The runner keeps
its own per-request state (token ids, pages, sampling parameters) keyed by ``req_id`` and drops it
when the id appears in ``finished_req_ids``. A request preempted by recompute is finished for the
runner; when it resumes it is sent again as a NewRequestData carrying its output tokens so far.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class NewRequestData:
    req_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: Any                      # serving.sampling_params.SamplingParams
    page_ids: tuple[int, ...]                 # all pages allocated so far, in order
    num_computed_tokens: int                  # tokens already in the cache (prefix-cache hits)
    output_token_ids: tuple[int, ...] = ()    # non-empty when resuming after preemption


@dataclasses.dataclass(frozen=True)
class CachedRequestData:
    req_id: str
    new_page_ids: tuple[int, ...]             # pages appended to the request's block table this step
    num_computed_tokens: int                  # tokens in the cache before this step


@dataclasses.dataclass(frozen=True)
class StepPlan:
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    num_scheduled_tokens: Mapping[str, int]   # req_id -> tokens computed this step (>= 1)
    total_num_scheduled_tokens: int
    finished_req_ids: frozenset[str]          # finished, aborted or preempted since the last plan

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Logprobs of one sampled (or prompt) position: the chosen token and the top-k alternatives."""
    token_id: int
    logprob: float
    rank: int                                  # 1 = most likely
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    req_ids: tuple[str, ...]                              # the step's requests, in plan order
    sampled_token_ids: Mapping[str, tuple[int, ...]]      # empty tuple while a prompt is still prefilling
    logprobs: Mapping[str, tuple[Logprobs, ...]]          # only for requests that asked (logprobs is not None)
    prompt_logprobs: Mapping[str, tuple[Logprobs | None, ...]]  # prompt positions computed this step
