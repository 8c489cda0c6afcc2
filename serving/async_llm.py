"""The asyncio face of the engine, for the HTTP layer.

A dedicated thread runs ``engine.step()`` in a loop (the device loop runs off the event loop);
each step's outputs are handed to their requests' asyncio queues in one ``call_soon_threadsafe``
per event loop, while the device computes the next step (the consumers then run on the event loop
during the device's step, not while the device waits for the host). ``generate`` is an async
iterator of RequestOutputs (cumulative unless another RequestOutputKind is asked for); leaving it
early (client gone, task cancelled) aborts the request, which frees its pages at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import os
import threading
from typing import AsyncIterator, Optional

from serving.config import EngineArgs
from serving.engine import LLMEngine, PromptType, parse_prompt
from serving.outputs import RequestOutput, RequestOutputKind
from serving.sampling_params import SamplingParams

logger = logging.getLogger("jaxllm")


# Test-only fault injection: with this set to N, the N-th non-empty engine step raises inside the
# runner (after scheduling, so the requests in that step hold pages), as a device fault would.
FAIL_AT_STEP_ENV = "JAXLLM_TEST_FAIL_AT_STEP"


class EngineDeadError(RuntimeError):
    pass


class InjectedStepFailure(RuntimeError):
    """Raised by the test-only fault hook (JAXLLM_TEST_FAIL_AT_STEP)."""


def _install_fault_hook(engine: LLMEngine, fail_at_step: int) -> None:
    runner = engine.runner
    dispatch = runner.dispatch
    count = 0

    def failing_dispatch(plan):
        nonlocal count
        if not plan.is_empty:
            count += 1
            if count >= fail_at_step:
                raise InjectedStepFailure(f"injected failure in engine step {count} ({FAIL_AT_STEP_ENV})")
        return dispatch(plan)

    runner.dispatch = failing_dispatch
    logger.warning("%s=%d: the engine will fail on purpose (test hook)", FAIL_AT_STEP_ENV, fail_at_step)


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncLLM:
    """Requests reach the engine through an inbox the device thread drains before each step, so the
    event loop never waits for a step: ``generate`` validates on the caller's thread (errors raise
    before anything is yielded) and only enqueues; ``abort`` only enqueues."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_args = engine.engine_args
        self.max_model_len = engine.max_model_len
        self.model_name = engine.model_name
        self.default_sampling = dict(engine.default_sampling)
        self.is_dead = False
        self.dead_error: Optional[BaseException] = None
        self._lock = threading.Lock()           # guards _queues, _inbox, _closed (never held for a step)
        self._inbox: collections.deque = collections.deque()
        self._wakeup = threading.Event()
        self._stopping = False
        self._closed = False                    # the device loop has ended (failed or shut down)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        fail_at = os.environ.get(FAIL_AT_STEP_ENV)
        if fail_at:
            _install_fault_hook(engine, int(fail_at))
        # Everything alive now (weights' pytrees, jax, the tokenizer, executables: hundreds of
        # thousands of objects) lives as long as the server: frozen, it is no longer walked by every
        # full garbage collection, which then takes milliseconds instead of ~0.2 s and stalls the
        # step loop far less (benchmarks/host_overhead.py; vLLM's engine core freezes it too).
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._run_loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(args, server=True))

    # ------------------------------------------------------------------ device loop
    def _push(self, request_id: str, item) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:      # that request's event loop is closed: nobody is waiting
                pass

    def _drain_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, request_id, payload = self._inbox.popleft()
            if kind == "abort":
                self.engine.abort_request(request_id)
                continue
            text, ids, params, priority, cache_salt, output_kind = payload
            try:
                self.engine.add_validated_request(request_id, text, ids, params, priority=priority,
                                                  cache_salt=cache_salt, output_kind=output_kind)
            except ValueError as e:   # e.g. a request id already in use
                with self._lock:
                    self._push(request_id, e)
                    self._queues.pop(request_id, None)

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                busy = self.engine.has_unfinished_requests()
                if not busy:
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                self.engine.step(on_outputs=self._deliver)
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine, loudly
            logger.exception("Engine loop died")
            self._fail_all(EngineDeadError(f"The engine failed: {type(e).__name__}: {e}"), e)
        else:
            # Stopped by shutdown(): anything still waiting would otherwise wait forever.
            self._fail_all(EngineDeadError("The engine was shut down."), None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their queues, from inside the step while the device computes (see
        LLMEngine.step), with one call_soon_threadsafe per event loop, not per request: each call
        is a self-pipe write, a syscall that gives the GIL up to the event loop."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                entry = self._queues.get(out.request_id)
                if entry is not None:
                    batches.setdefault(entry[0], []).append((entry[1], out))
                    if out.finished:
                        del self._queues[out.request_id]
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:      # that event loop is closed: nobody is waiting
                pass

    def _fail_all(self, err: EngineDeadError, cause: Optional[BaseException]) -> None:
        # Under the lock, so a generate() racing with this either registers its queue before (and gets
        # the error here) or sees the loop closed after (and raises at once): no request waits forever.
        with self._lock:
            self._closed = True
            if cause is not None:
                self.is_dead = True
                self.dead_error = cause
            for request_id in list(self._queues):
                self._push(request_id, err)
            self._queues.clear()
            self._inbox.clear()

    # ------------------------------------------------------------------ API
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, *,
                       priority: int = 0, cache_salt: Optional[str] = None,
                       output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
                       ) -> AsyncIterator[RequestOutput]:
        if self.is_dead:
            raise EngineDeadError("The engine is dead; restart the server.")
        if not isinstance(output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {output_kind!r}")
        text, ids = parse_prompt(prompt, self.tokenizer, sampling_params, self.max_model_len)
        self.engine.validate_request(ids, sampling_params)     # reads only the engine's fixed config
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed:
                raise EngineDeadError("The engine is dead or shut down; restart the server.")
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queues[request_id] = (loop, q)
            self._inbox.append(("add", request_id,
                                (text, ids, sampling_params, priority, cache_salt, output_kind)))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)
            if not self._closed:
                self._inbox.append(("abort", request_id, None))
        self._wakeup.set()

    def get_stats(self):
        """A snapshot of the engine's counters (copied without waiting for the step in flight)."""
        return dataclasses.replace(self.engine.stats)

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
