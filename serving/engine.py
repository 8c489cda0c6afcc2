"""The synchronous engine: requests in, RequestOutputs out, one ``step()`` at a time.

    plan    = scheduler.schedule()
    result  = runner.run(plan)
    outputs = scheduler.update(plan, result)

around which this module does the per-request host work: n-way fan-out into child requests,
incremental detokenizing, stop strings, logprob dicts, and RequestOutputs (cumulative, delta or
final only: see RequestOutputKind).

With ``EngineArgs.async_scheduling`` (vLLM's ``--async-scheduling``) one step stays in flight: step
N+1 is scheduled and launched before step N's results are collected, its decode inputs naming the
tokens step N samples by placeholder (see serving.model_runner), so the device never waits for the
host's collect/update/schedule/dispatch between two steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Callable, Iterable, Optional, Union

from serving.compile_counter import compile_counter
from serving.config import EngineArgs
from serving.detokenizer import IncrementalDetokenizer
from serving.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RequestOutputKind
from serving.plan import Logprobs
from serving.request import Request
from serving.sampling_params import SamplingParams
from serving.step_tally import StepTally

logger = logging.getLogger("jaxllm")

PromptType = Union[str, list[int], dict]


@dataclasses.dataclass
class EngineStats:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    compilations: int = 0
    bucket_padding_ratio: float = 0.0       # last step: padded tokens / real tokens
    padded_tokens: int = 0                  # cumulative
    scheduled_tokens: int = 0               # cumulative
    num_steps: int = 0


@dataclasses.dataclass
class _Child:
    req_id: str
    index: int
    detok: Optional[IncrementalDetokenizer]
    output: CompletionOutput
    # DELTA outputs: how much of output.text / output.token_ids earlier outputs carried.
    sent_text: int = 0
    sent_tokens: int = 0


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child]
    metrics: RequestMetrics
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    sent_prompt_logprobs: int = 0     # DELTA: prompt logprob positions earlier outputs carried

    @property
    def finished(self) -> bool:
        children = self.children
        if len(children) == 1:
            return children[0].output.finish_reason is not None
        return all(c.output.finish_reason is not None for c in children)


def parse_prompt(prompt: PromptType, tokenizer, params: SamplingParams, max_model_len: int,
                 *, add_special_tokens: bool = True) -> tuple[Optional[str], list[int]]:
    """Text or {"prompt_token_ids": [...]} / {"prompt": str} -> (text, ids), truncated if asked."""
    text = None
    if isinstance(prompt, str):
        text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    elif isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            text = prompt.get("prompt")
        elif "prompt" in prompt:
            text = prompt["prompt"]
            ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        else:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise ValueError(f"a prompt is a string, a list of token ids or a dict; got {type(prompt).__name__}")
    k = params.truncate_prompt_tokens
    if k is not None:
        k = max_model_len if k == -1 else k
        if len(ids) > k:
            ids, text = ids[-k:], None
    return text, ids


class LLMEngine:
    def __init__(self, *, engine_args: EngineArgs, model_config, tokenizer, scheduler, runner,
                 max_model_len: int, eos_token_ids: tuple[int, ...], default_sampling: dict,
                 model_name: str):
        self.engine_args = engine_args
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.default_sampling = default_sampling
        self.model_name = model_name
        self.vocab_size = model_config.vocab_size
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Child]] = {}     # child req_id -> its parent and itself
        self._ids = itertools.count()
        self.stats = EngineStats()
        self.step_tally = StepTally()       # steps and wall seconds per executable shape
        self._pending_core: list = []       # step N's scheduler outputs, processed during step N+1
        self._token_texts: dict[int, str] = {}     # token id -> its text (logprobs' decoded_token)
        self.async_scheduling = engine_args.async_scheduling
        self._in_flight = None              # async scheduling: (plan, flight) dispatched, not collected

    @classmethod
    def from_engine_args(cls, args: EngineArgs, *, server: bool = False, **overrides) -> "LLMEngine":
        """``server``: the OpenAI server's engine (its own default limits, see engine_builder)."""
        from serving.engine_builder import build_engine_parts

        return cls(engine_args=args, **build_engine_parts(args, server=server), **overrides)

    # ------------------------------------------------------------------ requests
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Everything checkable before the request enters the engine; raises ValueError."""
        params.verify(vocab_size=self.vocab_size, max_logprobs=self.engine_args.max_logprobs)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("The prompt is empty: at least one token is needed.")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:8]} out of range [0, {self.vocab_size})")
        if n >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {n} input tokens, which leaves no room for output. Please reduce the length "
                "of the input messages.")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"'max_tokens' is too large: {params.max_tokens}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {n} input tokens "
                f"({params.max_tokens} > {self.max_model_len} - {n}).")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, *,
                    priority: int = 0, cache_salt: Optional[str] = None,
                    arrival_time: Optional[float] = None,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        text, ids = parse_prompt(prompt, self.tokenizer, params, self.max_model_len)
        self.validate_request(ids, params)
        self.add_validated_request(request_id, text, ids, params, priority=priority, cache_salt=cache_salt,
                                   arrival_time=arrival_time, output_kind=output_kind)

    def add_validated_request(self, request_id: str, text: Optional[str], ids: list[int], params: SamplingParams,
                              *, priority: int = 0, cache_salt: Optional[str] = None,
                              arrival_time: Optional[float] = None,
                              output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        """``add_request`` for a prompt already parsed and passed through ``validate_request``
        (AsyncLLM does both on the caller's thread, off the device loop)."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {output_kind!r}")
        now = time.time() if arrival_time is None else arrival_time
        n = params.n
        children = []
        for i in range(n):
            child_params = params if n == 1 else params.for_sample(i)
            child_id = request_id if n == 1 else f"{request_id}#{i}"
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            out = CompletionOutput(index=i, text="", token_ids=[],
                                   cumulative_logprob=0.0 if params.logprobs is not None else None,
                                   logprobs=[] if params.logprobs is not None else None)
            children.append((_Child(child_id, i, detok, out), child_params))
        parent = _Parent(request_id, text, ids, params, [c for c, _ in children], RequestMetrics(now),
                         prompt_logprobs=[] if params.prompt_logprobs is not None else None,
                         output_kind=output_kind)
        self._parents[request_id] = parent
        for child, child_params in children:
            self._children[child.req_id] = (parent, child)
            self.scheduler.add_request(Request(child.req_id, ids, child_params, priority=priority,
                                               cache_salt=cache_salt, eos_token_ids=self.eos_token_ids))
        self.stats.prompt_tokens += len(ids)
        self._refresh_scheduler_stats()

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        child_ids = []
        for rid in request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            for c in parent.children:
                self._children.pop(c.req_id, None)
                if c.output.finish_reason is None:
                    child_ids.append(c.req_id)
        if child_ids:
            self.scheduler.abort_requests(child_ids)
        self._refresh_scheduler_stats()

    def has_unfinished_requests(self) -> bool:
        # A step in flight counts: one more step collects it, so the runner ends up holding nothing.
        return bool(self._parents) or self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ------------------------------------------------------------------ the step
    def step(self, on_outputs: Optional[Callable[[list[RequestOutput]], None]] = None) -> list[RequestOutput]:
        """One engine step. The host work on step N's outputs (detokenizing, stop strings, building
        RequestOutputs) runs while the device computes step N+1, so outputs trail by one step.

        ``on_outputs``: called with the outputs as soon as they are built, while the device is still
        busy, instead of returning them. AsyncLLM hands them to the event loop there, so that its
        consumers run (holding the GIL) while the device computes, not during the host work between
        two device steps (collect, update, schedule, dispatch) that the device waits for."""
        tally = self.step_tally
        tally.begin_call(time.perf_counter())
        try:
            return self._step_async(on_outputs) if self.async_scheduling else self._step_sync(on_outputs)
        finally:
            tally.end_call(time.perf_counter(), in_flight=self._in_flight is not None)

    def _step_sync(self, on_outputs) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        flight = self.runner.dispatch(plan)
        pending, self._pending_core = self._pending_core, []
        outputs = self._process_outputs(pending) if pending else []
        if on_outputs is not None and outputs:
            on_outputs(outputs)
            outputs = []
        result, wait = self._collect(flight)
        self._pending_core = self.scheduler.update(plan, result)
        self._record_step_stats(plan, wait)
        if plan.is_empty and self._pending_core:
            outputs += self._process_outputs(self._pending_core)
            self._pending_core = []
            if on_outputs is not None and outputs:
                on_outputs(outputs)
                outputs = []
        return outputs

    def _step_async(self, on_outputs) -> list[RequestOutput]:
        """Async scheduling: launch step N+1, then collect step N and do its host work while the
        device runs N+1. Outputs do not trail: step N's are returned by the call that launched N+1.

        A request that step N finishes (EOS, length, a stop string, an abort) may be in step N+1
        too: update() skips requests that are gone, so that result is dropped; its K/V writes land
        in pages it freed, before any later step (the device runs steps in order) and past every
        position anyone reads as that request's, and the prefix cache hashes only known tokens.
        """
        plan = self.scheduler.schedule()
        flight = self.runner.dispatch(plan)
        previous = self._in_flight
        self._in_flight = None if plan.is_empty else (plan, flight)
        if previous is None:
            self._refresh_scheduler_stats()
            return []
        prev_plan, prev_flight = previous
        result, wait = self._collect(prev_flight)
        core = self.scheduler.update(prev_plan, result)
        self._record_step_stats(prev_plan, wait)
        outputs = self._process_outputs(core) if core else []
        if on_outputs is not None and outputs:
            on_outputs(outputs)
            outputs = []
        return outputs

    def _collect(self, flight):
        """The runner's result of ``flight`` and the seconds spent waiting for it (the step tally's wait)."""
        t = time.perf_counter()
        result = self.runner.collect(flight)
        return result, time.perf_counter() - t

    def _record_step_stats(self, plan, collect_wait: float) -> None:
        st = self._refresh_scheduler_stats()
        last = self.runner.last_step
        if last is not None and not plan.is_empty:
            st.num_steps += 1
            st.bucket_padding_ratio = last.padding_ratio
            st.padded_tokens += last.padded_tokens
            st.scheduled_tokens += last.num_tokens
            self.step_tally.record(last.shape, last.num_tokens, last.num_seqs, time.perf_counter(), collect_wait)

    def _refresh_scheduler_stats(self) -> EngineStats:
        """Gauges from the scheduler: refreshed after every step, add and abort (metrics read them)."""
        st = self.stats
        sched = self.scheduler.get_stats()
        st.num_requests_running = sched.num_running
        st.num_requests_waiting = sched.num_waiting
        st.kv_cache_usage = sched.kv_cache_usage
        st.prefix_cache_queries = sched.prefix_cache_queries
        st.prefix_cache_hits = sched.prefix_cache_hits
        st.num_preemptions = sched.num_preemptions
        st.compilations = compile_counter.count
        return st

    def _decoded_token(self, token_id: int) -> Optional[str]:
        """A token's own text, as logprobs show it; cached, since the same ids recur in every
        position's top-k (None without a tokenizer)."""
        text = self._token_texts.get(token_id)
        if text is None and self.tokenizer is not None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprob_dict(self, lp: Logprobs) -> dict[int, Logprob]:
        dec = self._decoded_token
        d = {tid: Logprob(float(v), rank=r + 1, decoded_token=dec(tid))
             for r, (tid, v) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        if lp.token_id not in d:
            d = {lp.token_id: Logprob(lp.logprob, rank=lp.rank, decoded_token=dec(lp.token_id)), **d}
        return d

    def _process_outputs(self, core_outputs) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Parent] = {}
        to_finish: list[tuple[str, str]] = []
        children = self._children
        stats = self.stats
        for co in core_outputs:
            entry = children.get(co.req_id)
            if entry is None:
                continue   # aborted by the caller meanwhile
            parent, child = entry
            out = child.output
            m = parent.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
            if co.num_cached_tokens and co.num_cached_tokens > parent.num_cached_tokens:
                parent.num_cached_tokens = co.num_cached_tokens
            if co.new_prompt_logprobs and parent.prompt_logprobs is not None and child.index == 0:
                for lp in co.new_prompt_logprobs:
                    parent.prompt_logprobs.append(None if lp is None else self._logprob_dict(lp))
            new_token_ids = co.new_token_ids
            if new_token_ids:
                if m.first_token_time is None:
                    m.first_token_time = now
                m.last_token_time = now
                stats.generation_tokens += len(new_token_ids)
                out.token_ids.extend(new_token_ids)
                for lp in co.new_logprobs:
                    out.logprobs.append(self._logprob_dict(lp))
                    out.cumulative_logprob += lp.logprob
            detok = child.detok
            if detok is not None and not detok.finished:
                text_ids = new_token_ids
                token_stop = co.finish_reason == "stop" and not isinstance(co.stop_reason, str)
                if token_stop and text_ids and not parent.params.include_stop_str_in_output:
                    text_ids = text_ids[:-1]      # EOS / stop_token_ids stay out of the text
                delta = detok.add_tokens(text_ids, finished=co.finish_reason is not None)
                if delta.text_delta or delta.stop_string is not None:
                    out.text = detok.output_text
                if delta.stop_string is not None and out.finish_reason is None:
                    out.finish_reason, out.stop_reason = "stop", delta.stop_string
                    if co.finish_reason is None:
                        to_finish.append((co.req_id, delta.stop_string))
            if co.finish_reason is not None and out.finish_reason is None:
                out.finish_reason, out.stop_reason = co.finish_reason, co.stop_reason
            touched[parent.request_id] = parent
        if to_finish:
            self.scheduler.finish_requests([rid for rid, _ in to_finish], "stop")
        results = []
        for parent in touched.values():
            finished = parent.finished
            if finished:
                parent.metrics.finished_time = now
                self._parents.pop(parent.request_id, None)
                for c in parent.children:
                    children.pop(c.req_id, None)
            kind = parent.output_kind
            if kind is RequestOutputKind.FINAL_ONLY and not finished:
                continue
            if kind is RequestOutputKind.DELTA:
                completions = [self._delta_completion(c) for c in parent.children]
                prompt_logprobs = parent.prompt_logprobs
                if prompt_logprobs is not None:
                    sent, parent.sent_prompt_logprobs = parent.sent_prompt_logprobs, len(prompt_logprobs)
                    prompt_logprobs = prompt_logprobs[sent:]
            else:
                # Copies: the engine keeps appending to its own lists, and the caller may keep this
                # output. (FINAL_ONLY's only output could share them; one copy per request is cheap.)
                completions = [CompletionOutput(
                    c.index, c.output.text, list(c.output.token_ids), c.output.cumulative_logprob,
                    None if c.output.logprobs is None else list(c.output.logprobs),
                    c.output.finish_reason, c.output.stop_reason) for c in parent.children]
                prompt_logprobs = parent.prompt_logprobs
                if prompt_logprobs is not None and len(prompt_logprobs) < len(parent.prompt_token_ids):
                    # Still growing (a chunked prefill): a snapshot, or a consumer on another
                    # thread would see positions of later steps. Complete lists are never changed.
                    prompt_logprobs = list(prompt_logprobs)
            # metrics stays the live object (as vLLM's): its times are filled in as the request runs.
            results.append(RequestOutput(
                request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
                outputs=completions, finished=finished, prompt_logprobs=prompt_logprobs,
                num_cached_tokens=parent.num_cached_tokens, metrics=parent.metrics))
        return results

    @staticmethod
    def _delta_completion(child: _Child) -> CompletionOutput:
        """What the child added since its previous output (RequestOutputKind.DELTA)."""
        out = child.output
        sent_tokens, child.sent_tokens = child.sent_tokens, len(out.token_ids)
        sent_text, child.sent_text = child.sent_text, len(out.text)
        return CompletionOutput(
            child.index, out.text[sent_text:], out.token_ids[sent_tokens:], out.cumulative_logprob,
            None if out.logprobs is None else out.logprobs[sent_tokens:], out.finish_reason, out.stop_reason)
