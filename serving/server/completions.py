"""POST /v1/completions: text or token prompts (one or many), n, echo, logprobs, SSE streaming."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from serving.outputs import RequestOutput
from serving.server import prepare as prep
from serving.server.errors import APIError, from_exception
from serving.server.formatting import completion_logprobs, usage
from serving.server.metrics import RequestTracker
from serving.server.protocol import CompletionRequest
from serving.server.streaming import merged_outputs, sse, terminated_sse

logger = logging.getLogger("serving.server")


class _Choice:
    """Streaming cursor of one choice: how much text, how many tokens and logprob positions were sent."""
    __slots__ = ("text_len", "num_tokens", "offset", "started", "done")

    def __init__(self):
        self.text_len = 0
        self.num_tokens = 0
        self.offset = 0
        self.started = False
        self.done = False


async def start_jobs(state: prep.ServingState, raw: Request, stem: str, prompts, params_list, *,
                     priority: int, cache_salt: Optional[str], trackers):
    """Start the engine streams and wait for their first output, so that input errors the engine
    raises before yielding become a proper 400 response instead of a failed 200 stream."""
    engine = state.engine
    jobs = []
    for i, ((_, ids), params) in enumerate(zip(prompts, params_list)):
        rid = f"{stem}-{i}"
        if not state.args.disable_log_requests:
            logger.info("Received request %s: %d prompt tokens, %s", rid, len(ids), params)
        jobs.append((rid, lambda ids=ids, params=params, rid=rid: engine.generate(
            ids, params, rid, priority=priority, cache_salt=cache_salt)))
    lifecycle = state.lifecycle
    if lifecycle is None:
        stream = merged_outputs(engine, jobs, raw)
    else:
        # Admission (503 when the queue is full) and the deadline count from here, before the engine sees it.
        release = lifecycle.admit(len(jobs))
        stream = merged_outputs(engine, jobs, raw, deadline=lifecycle.deadline(),
                                timeout_error=lifecycle.timeout_error, on_job_started=lambda _: release())
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        await stream.aclose()
        if isinstance(exc, Exception):
            raise from_exception(exc) from exc
        raise
    if first is not None:
        trackers[first[0]].update(first[1])

    async def rest() -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            if first is not None:
                yield first
            async for index, output in stream:
                trackers[index].update(output)
                yield index, output
        finally:
            await stream.aclose()

    return rest()


def prepare_completion(state: prep.ServingState, req: CompletionRequest):
    model = state.check_model(req.model)
    state.check_alive()
    if req.suffix:
        raise APIError("suffix is not supported", 400, param="suffix")
    prompts = prep.tokenize_completion_prompts(state, req.prompt, req.add_special_tokens)
    prompts = [(text, prep.truncate(ids, req.truncate_prompt_tokens)) for text, ids in prompts]
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        # Echoed prompt tokens carry logprobs too, which the engine computes as prompt logprobs.
        prompt_logprobs = max(req.logprobs, prompt_logprobs or 0)
    params, asked = prep.build_sampling_params(state, req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                               prompt_logprobs=prompt_logprobs, default_max_tokens=16)
    params_list = [prep.with_max_tokens(params, prep.check_context(state, len(ids), asked))
                   for _, ids in prompts]
    return model, prompts, params_list


async def create_completion(state: prep.ServingState, req: CompletionRequest, raw: Request):
    model, prompts, params_list = prepare_completion(state, req)
    response_id, stem = prep.make_request_id("cmpl-", req.request_id or raw.headers.get("x-request-id"))
    created = int(time.time())
    trackers = [RequestTracker(state.metrics) for _ in prompts]
    outputs = await start_jobs(state, raw, stem, prompts, params_list, priority=req.priority,
                               cache_salt=req.cache_salt, trackers=trackers)
    tok = state.tokenizer
    num_top = req.logprobs

    def echo_text(i: int) -> str:
        text, ids = prompts[i]
        return text if text is not None else tok.decode(ids, skip_special_tokens=False)

    def echo_logprobs(i: int, output: RequestOutput):
        ids = prompts[i][1]
        positions = list(output.prompt_logprobs or [None] * len(ids))
        positions += [None] * (len(ids) - len(positions))
        return ids, positions[:len(ids)]

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        events = _stream(req, outputs, prompts, response_id, created, model, echo_text, echo_logprobs, num_top,
                         include_usage, continuous, tok)
        return StreamingResponse(terminated_sse(events), media_type="text/event-stream")

    final: dict[int, RequestOutput] = {}
    try:
        async for index, output in outputs:
            final[index] = output
    except Exception as exc:
        raise from_exception(exc) from exc
    choices = []
    num_generated = 0
    for i in range(len(prompts)):
        output = final[i]
        for c in output.outputs:
            text = c.text
            logprobs = None
            offset = 0
            if req.echo:
                text = echo_text(i) + text
            if num_top is not None:
                ids, positions = [], []
                if req.echo:
                    ids, positions = echo_logprobs(i, output)
                ids = list(ids) + list(c.token_ids)
                positions = list(positions) + list(c.logprobs or [None] * len(c.token_ids))
                logprobs, _ = completion_logprobs(tok, ids, positions, num_top, offset)
            num_generated += len(c.token_ids)
            choices.append({"index": i * len(output.outputs) + c.index, "text": text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            "prompt_logprobs": _prompt_logprobs_json(output, tok) if req.prompt_logprobs is not None
                            else None})
    num_prompt = sum(len(ids) for _, ids in prompts)
    cached = sum(final[i].num_cached_tokens or 0 for i in range(len(prompts)))
    return JSONResponse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(num_prompt, num_generated, cached),
                         "system_fingerprint": None})


def _prompt_logprobs_json(output: RequestOutput, tok):
    if output.prompt_logprobs is None:
        return None
    out = []
    for position in output.prompt_logprobs:
        if position is None:
            out.append(None)
        else:
            out.append({str(tid): {"logprob": lp.logprob, "rank": lp.rank,
                                   "decoded_token": lp.decoded_token if lp.decoded_token is not None
                                   else tok.decode([tid], skip_special_tokens=False)}
                        for tid, lp in position.items()})
    return out


async def _stream(req: CompletionRequest, outputs, prompts, response_id: str, created: int, model: str,
                  echo_text, echo_logprobs, num_top: Optional[int], include_usage: bool, continuous: bool, tok):
    n = req.n
    cursors: dict[int, _Choice] = {}
    generated = [0] * len(prompts)
    num_prompt = sum(len(ids) for _, ids in prompts)

    def chunk(choices, with_usage: bool) -> dict:
        body = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices}
        if with_usage:
            body["usage"] = usage(num_prompt, sum(generated))
        return body

    async for i, output in outputs:
        generated[i] = sum(len(c.token_ids) for c in output.outputs)
        for c in output.outputs:
            index = i * n + c.index
            cur = cursors.setdefault(index, _Choice())
            if cur.done:
                continue
            delta = c.text[cur.text_len:]
            new_ids = c.token_ids[cur.num_tokens:]
            ids, positions = list(new_ids), list((c.logprobs or [])[cur.num_tokens:])
            if not cur.started and req.echo:
                delta = echo_text(i) + delta
                if num_top is not None:
                    p_ids, p_pos = echo_logprobs(i, output)
                    ids, positions = list(p_ids) + ids, list(p_pos) + positions
            cur.started = True
            finished = c.finish_reason is not None
            if not delta and not new_ids and not finished:
                continue
            logprobs = None
            if num_top is not None:
                positions += [None] * (len(ids) - len(positions))
                logprobs, cur.offset = completion_logprobs(tok, ids, positions, num_top, cur.offset)
            cur.text_len, cur.num_tokens = len(c.text), len(c.token_ids)
            cur.done = finished
            choice = {"index": index, "text": delta, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            yield sse(chunk([choice], continuous))
    if include_usage:
        yield sse(chunk([], True))
