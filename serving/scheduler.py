"""The continuous-batching scheduler (vLLM v1 semantics). Host bookkeeping only: no jax.

One engine step::

    plan    = scheduler.schedule()             # serving.plan.StepPlan
    result  = runner.run(plan)                 # serving.plan.RunnerOutput
    outputs = scheduler.update(plan, result)   # list[EngineCoreOutput]

There are no prefill and decode phases. Every request has ``num_tokens`` (prompt + output) and
``num_computed_tokens`` (KV in the cache); each step gives requests tokens to catch up, within a
budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` running requests:

1. running requests first, in order (by priority under the "priority" policy), each getting
   ``min(num_tokens - num_computed_tokens, budget left)`` tokens: a decode is 1 token, a long
   prompt is prefilled in chunks mixed with other requests' decodes. When the pool cannot hold a
   request's new tokens, the newest (fcfs) or lowest-priority (priority) running request is
   preempted by recompute until it can, possibly the request itself;
2. then, unless that happened, waiting requests: prefix-cache lookup, then allocation. Under the
   "priority" policy a waiting request may preempt a lower-priority running one when pages run out.

A preempted request frees its pages and returns to the front of the waiting queue with
``num_computed_tokens = 0``; its output tokens so far are kept and recomputed as context when it
resumes (sent to the runner again as a new request), so its output is the same as without the
preemption. The scheduler is not thread-safe: the engine calls it from one thread.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from typing import Iterable, Optional, Union

from serving.kv_cache_manager import KVCacheManager, cdiv
from serving.plan import CachedRequestData, NewRequestData, RunnerOutput, StepPlan
from serving.request import FINISH_REASON_TO_STATUS, EngineCoreOutput, Request, RequestStatus

SCHEDULING_POLICIES = ("fcfs", "priority")
# Token budget of a step when none is given (vLLM's default with chunked prefill).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics. The prefix-cache and preemption counters are totals since start."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float            # fraction of usable pages held by requests
    num_free_pages: int
    num_usable_pages: int            # total pages minus the null page
    prefix_cache_queries: int        # tokens looked up
    prefix_cache_hits: int           # tokens found cached
    num_preemptions: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _FCFSQueue:
    """Arrival order; preempted requests go back to the front."""

    def __init__(self):
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self):
        return iter(self._queue)


class _PriorityQueue:
    """Lowest (priority, arrival_time) first; a preempted request keeps its place by its key."""

    def __init__(self):
        self._heap: list[tuple[tuple, Request]] = []

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority_key, request))

    prepend = add

    def peek(self) -> Request:
        return self._heap[0][1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1]

    def remove(self, request: Request) -> None:
        self._heap = [entry for entry in self._heap if entry[1] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self):
        return (request for _, request in sorted(self._heap, key=lambda e: e[0]))


class Scheduler:
    def __init__(
        self,
        *,
        num_pages: int,                                  # including the null page 0
        page_size: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: Optional[int] = None,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fcfs",
        long_prefill_token_threshold: int = 0,           # > 0: at most this many tokens a request a step
    ):
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                             f"got {scheduling_policy!r}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1; got {max_model_len}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1; got {max_num_seqs}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1; got {max_num_batched_tokens}")
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be non-negative; got {long_prefill_token_threshold}")
        self.kv = KVCacheManager(num_pages, page_size, enable_prefix_caching)
        # Preemption guarantees progress only if the oldest request fits the cache on its own.
        needed = cdiv(max_model_len, page_size)
        if needed > num_pages - 1:
            raise ValueError(
                f"max_model_len={max_model_len} needs {needed} pages of {page_size} tokens, but the KV cache "
                f"has {num_pages - 1} usable pages ({(num_pages - 1) * page_size} tokens); lower max_model_len "
                f"or give the KV cache more memory")
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.scheduling_policy = scheduling_policy
        self.long_prefill_token_threshold = long_prefill_token_threshold

        self.requests: dict[str, Request] = {}           # every unfinished request
        self.waiting = _PriorityQueue() if scheduling_policy == "priority" else _FCFSQueue()
        self.running: list[Request] = []
        # Finished, aborted or preempted since the last plan: the runner drops their state.
        self._finished_req_ids: set[str] = set()
        self._seq_nos = itertools.count()
        self.num_preemptions = 0

    # --- requests in and out ----------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.req_id!r}: the prompt is empty")
        if request.num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.req_id!r}: the prompt (length {request.num_prompt_tokens}) is longer than "
                f"the maximum model length of {self.max_model_len}")
        if request.status != RequestStatus.WAITING or request.output_token_ids or request.num_computed_tokens:
            raise ValueError(f"request {request.req_id!r} was already scheduled once; create a new Request")
        request.seq_no = next(self._seq_nos)
        params = request.sampling_params
        room = self.max_model_len - request.num_prompt_tokens
        request.max_output_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request.stop_ids = frozenset(params.stop_token_ids or ()).union(
            () if params.ignore_eos else request.eos_token_ids)
        self.requests[request.req_id] = request
        self.waiting.add(request)

    def abort_requests(self, req_ids: Union[str, Iterable[str]]) -> list[EngineCoreOutput]:
        """Abort requests now: their pages go back at once. Unknown or finished ids are ignored."""
        return self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, req_ids: Union[str, Iterable[str]],
                        finish_status: Union[str, RequestStatus],
                        stop_reason: Union[int, str, None] = None) -> list[EngineCoreOutput]:
        """Finish requests from outside (e.g. a stop string matched, or an abort).

        ``finish_status``: a finished RequestStatus or its finish reason ("stop", "length", "abort").
        Returns a final EngineCoreOutput (no new tokens) for each request that was still unfinished.
        """
        if isinstance(finish_status, str):
            if finish_status not in FINISH_REASON_TO_STATUS:
                raise ValueError(f"finish reason must be one of {', '.join(FINISH_REASON_TO_STATUS)}; "
                                 f"got {finish_status!r}")
            finish_status = FINISH_REASON_TO_STATUS[finish_status]
        if not RequestStatus(finish_status).is_finished:
            raise ValueError(f"{finish_status!r} is not a finished status")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        outputs = []
        finished_running = set()
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                finished_running.add(req_id)
            else:
                self.waiting.remove(request)
            request.status = finish_status
            request.stop_reason = stop_reason
            self._free_request(request)
            outputs.append(self._make_output(request, finish_reason=request.finish_reason))
        if finished_running:
            self.running = [r for r in self.running if r.req_id not in finished_running]
        return outputs

    def _free_request(self, request: Request) -> None:
        self.kv.free(request)
        del self.requests[request.req_id]
        self._finished_req_ids.add(request.req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def has_requests(self) -> bool:
        """Unfinished requests, or finished ids the runner has not been told about yet (schedule()
        once more, even with nothing to run, so the runner drops their state)."""
        return self.has_unfinished_requests() or bool(self._finished_req_ids)

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), kv_cache_usage=self.kv.usage,
            num_free_pages=self.kv.num_free_pages, num_usable_pages=self.kv.num_pages - 1,
            prefix_cache_queries=self.kv.prefix_cache_queries, prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    # --- schedule ---------------------------------------------------------------------------------
    def _cap_new_tokens(self, num_new_tokens: int, budget: int) -> int:
        if 0 < self.long_prefill_token_threshold < num_new_tokens:
            num_new_tokens = self.long_prefill_token_threshold
        return min(num_new_tokens, budget)

    def _preempt(self, request: Request, *, undo_step: bool = False) -> None:
        """Preempt by recompute: free the pages and queue the request again, computed nothing.

        ``undo_step``: the request was already scheduled in this step; the pages hashed for KV this
        step would have written are dropped from the prefix cache (see KVCacheManager.free).
        """
        self.kv.free(request, num_valid_tokens=request.num_computed_tokens if undo_step else None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0   # a token in flight is dropped; recompute samples it again
        request.num_prompt_logprobs_since_start = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_pages: dict[str, list[int]] = {}
        scheduled_running: list[Request] = []
        scheduled_new: list[Request] = []
        preempted: list[Request] = []

        if self.scheduling_policy == "priority":
            # Highest priority first, so the lowest-priority request is always the last: it gets
            # the budget last and is the first to yield pages.
            self.running.sort(key=lambda r: r.priority_key)

        # 1. Running requests.
        i = 0
        long_prefill = self.long_prefill_token_threshold
        allocate_slots = self.kv.allocate_slots
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            # _cap_new_tokens, inlined: this loop runs for every running request every step.
            # Placeholders: tokens that a step in flight samples (async scheduling) count as known.
            num_output = len(request.output_token_ids)
            placeholders = request.num_output_placeholders
            if placeholders and num_output + placeholders >= request.max_output_tokens:
                i += 1
                continue                     # the step in flight samples its last possible token
            num_new = len(request.prompt_token_ids) + num_output + placeholders - request.num_computed_tokens
            if 0 < long_prefill < num_new:
                num_new = long_prefill
            if num_new > budget:
                num_new = budget
            if num_new <= 0:
                i += 1
                continue
            while True:
                pages = allocate_slots(request, num_new)
                if pages is not None:
                    break
                # The newest (fcfs) / lowest-priority (priority, running is sorted) request yields.
                # It is at or after position i, so it has not been scheduled in this step.
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if pages is None:
                break
            num_scheduled[request.req_id] = num_new
            new_pages[request.req_id] = pages
            scheduled_running.append(request)
            budget -= num_new
            i += 1

        # 2. Waiting requests, unless running ones just had to yield pages (vLLM does the same:
        # admitting new work now would only thrash).
        preempted_ids = {r.req_id for r in preempted}
        while not preempted and budget > 0 and len(self.waiting) > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            if request.req_id in preempted_ids:
                break                        # yielded in this step; the runner must drop it first
            while True:
                hits, num_hit_tokens = self.kv.get_computed_pages(request)
                num_new = self._cap_new_tokens(request.num_tokens - num_hit_tokens, budget)
                pages = self.kv.allocate_slots(request, num_new, hits)
                if pages is not None:
                    break
                victim = self._waiting_preemption_victim(request, num_scheduled, scheduled_new)
                if victim is None:
                    break
                was_scheduled = victim.req_id in num_scheduled
                if was_scheduled:
                    # Undo its part of this step: the budget comes back, the plan forgets it.
                    budget += num_scheduled.pop(victim.req_id)
                    del new_pages[victim.req_id]
                    scheduled_running.remove(victim)
                self.running.remove(victim)
                self._preempt(victim, undo_step=was_scheduled)
                preempted_ids.add(victim.req_id)
                # Look up again: the victim's freed pages may have changed what is cached.
            if pages is None:
                break
            popped = self.waiting.pop()
            assert popped is request
            self.kv.record_prefix_lookup(request, num_hit_tokens)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            scheduled_new.append(request)
            num_scheduled[request.req_id] = num_new
            new_pages[request.req_id] = pages
            budget -= num_new

        plan = StepPlan(
            new_requests=tuple(
                NewRequestData(req_id=r.req_id, prompt_token_ids=r.prompt_token_ids, sampling_params=r.sampling_params,
                               page_ids=tuple(self.kv.get_page_ids(r.req_id)), num_computed_tokens=r.num_computed_tokens,
                               output_token_ids=tuple(r.output_token_ids))
                for r in scheduled_new),
            cached_requests=tuple(
                CachedRequestData(r.req_id, tuple(new_pages[r.req_id]), r.num_computed_tokens)
                for r in scheduled_running),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=frozenset(self._finished_req_ids | preempted_ids),
        )
        self._finished_req_ids.clear()
        # Like vLLM, count the scheduled tokens as computed now: the KV is written by the time the
        # next plan runs, and the plan above already carries the pre-step values.
        for request in itertools.chain(scheduled_running, scheduled_new):
            computed = request.num_computed_tokens = request.num_computed_tokens + num_scheduled[request.req_id]
            if computed >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1    # it samples this step
        return plan

    def _waiting_preemption_victim(self, request: Request, num_scheduled: dict[str, int],
                                   scheduled_new: list[Request]) -> Optional[Request]:
        """Under the priority policy: the lowest-priority running request, if strictly lower than
        ``request`` and safe to take back.

        Taking back a request already scheduled in this step is unsafe when a page it was to fill
        this step is already shared (a request admitted earlier in this step hit it in the prefix
        cache and would read KV that is never written); then nothing is preempted.
        """
        if self.scheduling_policy != "priority" or not self.running:
            return None
        victim = max(self.running, key=lambda r: r.priority_key)
        if victim.priority_key <= request.priority_key:
            return None
        if any(victim is r for r in scheduled_new):
            return None                      # admitted in this very step (cannot happen: keys are ordered)
        if victim.req_id in num_scheduled and self.kv.has_shared_pages_from(victim, victim.num_computed_tokens):
            return None
        return victim

    # --- update -----------------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Apply one step's results: append sampled tokens, check stops, free finished requests.

        Returns an EngineCoreOutput for every request that produced tokens, logprobs or prompt
        logprobs, or finished. Requests aborted or finished since the plan was made are skipped.
        """
        outputs = []
        finished: set[str] = set()
        requests, running = self.requests, RequestStatus.RUNNING
        all_sampled, all_logprobs, all_prompt_logprobs = \
            result.sampled_token_ids, result.logprobs, result.prompt_logprobs
        # This loop runs for every scheduled request every step: the common case (one token, no
        # logprobs, no stop) takes no more than a few dict lookups and one output.
        for req_id in plan.num_scheduled_tokens:
            request = requests.get(req_id)
            if request is None or request.status is not running:
                continue
            sampled = all_sampled.get(req_id, ())
            new_token_ids: tuple[int, ...] = ()
            if sampled:
                request.num_output_placeholders -= 1
                output_token_ids = request.output_token_ids
                if request.num_computed_tokens < len(request.prompt_token_ids) + len(output_token_ids):
                    raise RuntimeError(
                        f"runner sampled tokens for {req_id!r} whose prefill is not complete "
                        f"({request.num_computed_tokens} of {request.num_tokens} tokens computed)")
                for n, token_id in enumerate(sampled, 1):
                    output_token_ids.append(int(token_id))
                    if self._check_stop(request):
                        break
                new_token_ids = tuple(output_token_ids[-n:])
            new_logprobs = tuple(all_logprobs[req_id])[:len(new_token_ids)] if req_id in all_logprobs else ()
            new_prompt_logprobs = self._new_prompt_logprobs(request, all_prompt_logprobs[req_id]) \
                if req_id in all_prompt_logprobs else ()
            status = request.status
            if status is not running:
                finished.add(req_id)
                self._free_request(request)
                outputs.append(EngineCoreOutput(req_id, new_token_ids, new_logprobs, new_prompt_logprobs,
                                                status.finish_reason, request.stop_reason,
                                                request.num_cached_tokens or 0))
            elif new_token_ids or new_logprobs or new_prompt_logprobs:
                outputs.append(EngineCoreOutput(req_id, new_token_ids, new_logprobs, new_prompt_logprobs,
                                                None, None, request.num_cached_tokens or 0))
        if finished:
            self.running = [r for r in self.running if r.req_id not in finished]
        return outputs

    @staticmethod
    def _check_stop(request: Request) -> bool:
        """vLLM's check_stop: length limits (max_tokens, max_model_len) first, then (once min_tokens
        is reached) EOS and stop ids. Runs for every sampled token: the rules were put in their
        cheapest form at add_request (Request.max_output_tokens, Request.stop_ids)."""
        output = request.output_token_ids
        if len(output) >= request.max_output_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        last = output[-1]
        if last not in request.stop_ids or len(output) < (request.sampling_params.min_tokens or 0):
            return False
        request.status = RequestStatus.FINISHED_STOPPED
        if request.sampling_params.ignore_eos or last not in request.eos_token_ids:
            request.stop_reason = last        # a stop_token_id; EOS leaves it None
        return True

    @staticmethod
    def _new_prompt_logprobs(request: Request, entries) -> tuple:
        """Drop prompt logprobs the engine already has (a resumed request recomputes its prompt)."""
        entries = tuple(entries)
        if not entries:
            return ()
        already = request.num_prompt_logprobs_emitted - request.num_prompt_logprobs_since_start
        request.num_prompt_logprobs_since_start += len(entries)
        new = entries[max(0, already):]
        request.num_prompt_logprobs_emitted += len(new)
        return new

    @staticmethod
    def _make_output(request: Request, new_token_ids=(), new_logprobs=(), new_prompt_logprobs=(),
                     finish_reason=None) -> EngineCoreOutput:
        return EngineCoreOutput(
            req_id=request.req_id, new_token_ids=new_token_ids, new_logprobs=new_logprobs,
            new_prompt_logprobs=new_prompt_logprobs, finish_reason=finish_reason,
            stop_reason=request.stop_reason if finish_reason is not None else None,
            num_cached_tokens=request.num_cached_tokens or 0)
