"""Consume engine streams for one HTTP request: merge several prompts, stop when the client leaves.

One HTTP request may carry several prompts (a completions `prompt` list); each is one engine request
whose `generate()` stream yields DELTA RequestOutputs (a stream) or one FINAL_ONLY output (a whole
response): see :func:`output_kind`. :func:`merged_outputs` runs one pump task per stream plus a
watcher on the ASGI `receive` channel; whichever side ends first wins:

    pump_0 ─┐
    pump_1 ─┼─> queue ─> caller           watcher (http.disconnect) ─> cancel pumps, abort requests
    ...    ─┘

Cancelling a pump raises CancelledError inside the engine's generator, which is the engine's
signal to abort the request and free its pages; `engine.abort` is called as well so a request that
was still queued is dropped even if its generator never started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from starlette.requests import Request

from serving.outputs import RequestOutput, RequestOutputKind
from serving.server.errors import error_body, from_exception

_END = object()


class ClientDisconnected(Exception):
    """The client went away before the response was complete."""


def output_kind(stream: bool, bounded_queue: bool) -> RequestOutputKind:
    """What the server asks the engine for. A stream gets DELTA outputs: each carries only the text,
    tokens and logprobs new since the previous one, which is what an SSE chunk sends, so neither the
    engine (full lists copied per step) nor the server (slicing them again) does per-step work that
    grows with the output. A whole response gets FINAL_ONLY: no output is built until the request
    finishes. Except under a bounded waiting queue (--max-queued-requests): a job leaves that queue
    at its first output (serving/server/lifecycle.py), so it needs one per step, DELTA."""
    if stream or bounded_queue:
        return RequestOutputKind.DELTA
    return RequestOutputKind.FINAL_ONLY


class OutputAccumulator:
    """Adds one engine request's DELTA outputs up to the RequestOutput it finished with (a FINAL_ONLY
    output is a delta from nothing, so its one output adds up to itself): text, token ids, logprobs
    and prompt logprobs append; finish and stop reasons, cumulative logprob, cached-token count and
    metrics are cumulative in every kind, so the latest output's are kept."""

    def __init__(self):
        self.last: Optional[RequestOutput] = None
        self.num_outputs = 0
        self._texts: list[list[str]] = []          # per choice, its text pieces (joined once, at the end)
        self._token_ids: list[list[int]] = []
        self._logprobs: list[Optional[list]] = []
        self._prompt_logprobs: Optional[list] = None

    def add(self, output: RequestOutput) -> None:
        if self.num_outputs == 1:
            # A second output: start the running lists from the first (copies: ours to extend).
            first = self.last.outputs
            self._texts = [[c.text] for c in first]
            self._token_ids = [list(c.token_ids) for c in first]
            self._logprobs = [None if c.logprobs is None else list(c.logprobs) for c in first]
            first_prompt = self.last.prompt_logprobs
            self._prompt_logprobs = None if first_prompt is None else list(first_prompt)
        if self.num_outputs:
            for j, c in enumerate(output.outputs):
                if c.text:
                    self._texts[j].append(c.text)
                self._token_ids[j] += c.token_ids
                if c.logprobs:
                    self._logprobs[j] += c.logprobs
            if output.prompt_logprobs:
                self._prompt_logprobs += output.prompt_logprobs
        self.last = output
        self.num_outputs += 1

    def result(self) -> RequestOutput:
        last = self.last
        if self.num_outputs == 1:
            return last
        outputs = [dataclasses.replace(c, text="".join(self._texts[j]), token_ids=self._token_ids[j],
                                       logprobs=self._logprobs[j]) for j, c in enumerate(last.outputs)]
        return dataclasses.replace(last, outputs=outputs, prompt_logprobs=self._prompt_logprobs)


async def final_outputs(outputs: AsyncIterator[tuple[int, RequestOutput]], num_jobs: int) -> list[RequestOutput]:
    """A whole response's outputs: each job's added up; an engine failure raises as an APIError."""
    totals = [OutputAccumulator() for _ in range(num_jobs)]
    try:
        async for index, output in outputs:
            totals[index].add(output)
    except Exception as exc:
        raise from_exception(exc) from exc
    return [total.result() for total in totals]


async def _wait_for_disconnect(request: Request) -> None:
    # After FastAPI has read the body, the next ASGI message on this connection is http.disconnect
    # (uvicorn sends it when the socket closes or once the response is complete).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merged_outputs(engine, jobs: Sequence[tuple[str, Callable[[], AsyncIterator[RequestOutput]]]],
                         request: Optional[Request], *, deadline: Optional[float] = None,
                         timeout_error: Optional[Callable[[], BaseException]] = None,
                         on_job_started: Optional[Callable[[int], None]] = None
                         ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield `(job_index, output)` from all jobs' streams as they arrive.

    `jobs` are `(engine_request_id, start)` pairs, `start()` returning the engine's generate stream.
    Raises the first exception a stream raises, ClientDisconnected, or `timeout_error()` once the
    monotonic `deadline` passes; either way every stream that has not finished is cancelled and
    aborted before this generator ends. `on_job_started(i)` is called exactly once per job: at its
    first output, its failure, or (at the latest) when this generator ends.
    """
    queue: asyncio.Queue = asyncio.Queue()
    finished: set[int] = set()
    started: set[int] = set()

    def mark_started(index: int) -> None:
        if on_job_started is not None and index >= 0 and index not in started:
            started.add(index)
            on_job_started(index)

    async def pump(index: int, start) -> None:
        stream = start()
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()

    async def watch() -> None:
        await _wait_for_disconnect(request)
        queue.put_nowait((-1, ClientDisconnected()))

    tasks = [asyncio.create_task(pump(i, start)) for i, (_, start) in enumerate(jobs)]
    watcher = asyncio.create_task(watch()) if request is not None else None
    try:
        while len(finished) < len(jobs):
            if deadline is None:
                index, item = await queue.get()
            else:
                try:
                    index, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise (timeout_error() if timeout_error is not None else TimeoutError("request deadline passed"))
            mark_started(index)
            if item is _END:
                finished.add(index)
            elif isinstance(item, BaseException):
                raise item
            else:
                if item.finished:
                    finished.add(index)
                yield index, item
    finally:
        for index in range(len(jobs)):
            mark_started(index)
        if watcher is not None:
            watcher.cancel()
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for index, (request_id, _) in enumerate(jobs):
            if index not in finished:
                try:
                    await engine.abort(request_id)
                except Exception:  # the request may already be gone; nothing left to free
                    pass


def sse(data: Any, event: Optional[str] = None) -> str:
    """One server-sent event: `data: <json>` (optionally preceded by `event: <name>`)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def terminated_sse(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Relay an OpenAI SSE stream: a failure mid-stream becomes one error event in the envelope,
    and the stream always ends with ``data: [DONE]`` (completions and chat share this)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        err = from_exception(exc)
        yield sse(error_body(err.message, err.status, err.param))
    yield SSE_DONE
