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
from serving.server.streaming import final_outputs, merged_outputs, output_kind, sse, terminated_sse

logger = logging.getLogger("serving.server")


class _Choice:
    """Streaming state of one choice: the text offset its logprobs reached, whether it has begun, ended."""
    __slots__ = ("offset", "started", "done")

    def __init__(self):
        self.offset = 0
        self.started = False
        self.done = False


async def start_jobs(state: prep.ServingState, raw: Request, stem: str, prompts, params_list, *,
                     priority: int, cache_salt: Optional[str], trackers, stream: bool):
    """Start the engine streams and wait for their first output, so that input errors the engine
    raises before yielding become a proper 400 response instead of a failed 200 stream.

    The outputs are deltas (see streaming.output_kind): a stream's since the previous output, a whole
    response's one final output (or, under a bounded queue, deltas to add up with OutputAccumulator).
    """
    engine = state.engine
    lifecycle = state.lifecycle
    kind = output_kind(stream, lifecycle is not None and lifecycle.max_queued is not None)
    jobs = []
    for i, ((_, ids), params) in enumerate(zip(prompts, params_list)):
        rid = f"{stem}-{i}"
        if not state.args.disable_log_requests:
            logger.info("Received request %s: %d prompt tokens, %s", rid, len(ids), params)
        jobs.append((rid, lambda ids=ids, params=params, rid=rid: engine.generate(
            ids, params, rid, priority=priority, cache_salt=cache_salt, output_kind=kind)))
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
                               cache_salt=req.cache_salt, trackers=trackers, stream=req.stream)
    tok = state.tokenizer
    num_top = req.logprobs

    def echo_text(i: int) -> str:
        text, ids = prompts[i]
        return text if text is not None else tok.decode(ids, skip_special_tokens=False)

    def echo_logprobs(i: int, prompt_logprobs):
        ids = prompts[i][1]
        positions = list(prompt_logprobs or [None] * len(ids))
        positions += [None] * (len(ids) - len(positions))
        return ids, positions[:len(ids)]

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        events = _stream(req, outputs, prompts, response_id, created, model, echo_text, echo_logprobs, num_top,
                         include_usage, continuous, tok)
        return StreamingResponse(terminated_sse(events), media_type="text/event-stream")

    final = await final_outputs(outputs, len(prompts))
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
                    ids, positions = echo_logprobs(i, output.prompt_logprobs)
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
    """SSE chunks from DELTA outputs: each output's new text, tokens and logprobs are a chunk as they are."""
    n = req.n
    cursors: dict[int, _Choice] = {}
    generated = [0] * len(prompts)
    num_prompt = sum(len(ids) for _, ids in prompts)
    # Echo with logprobs: the prompt's logprobs come with the prefill's chunks, a DELTA output carrying
    # the positions computed since the previous one. The echo waits until they cover the prompt (at the
    # latest, the choice's first token), so that it never shows a position without its logprob.
    echo_positions = [[] for _ in prompts] if req.echo and num_top is not None else None

    def chunk(choices, with_usage: bool) -> dict:
        body = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices}
        if with_usage:
            body["usage"] = usage(num_prompt, sum(generated))
        return body

    async for i, output in outputs:
        generated[i] += sum(len(c.token_ids) for c in output.outputs)
        if echo_positions is not None and output.prompt_logprobs:
            echo_positions[i] += output.prompt_logprobs
        for c in output.outputs:
            index = i * n + c.index
            cur = cursors.get(index)
            if cur is None:
                cur = cursors[index] = _Choice()
            elif cur.done:
                continue
            delta, new_ids = c.text, c.token_ids
            finished = c.finish_reason is not None
            ids, positions = new_ids, c.logprobs or []
            if not cur.started and req.echo:
                if echo_positions is not None:
                    if not new_ids and not finished and len(echo_positions[i]) < len(prompts[i][1]):
                        continue
                    p_ids, p_pos = echo_logprobs(i, echo_positions[i])
                    ids, positions = list(p_ids) + list(ids), list(p_pos) + list(positions)
                delta = echo_text(i) + delta
            cur.started = True
            if not delta and not new_ids and not finished:
                continue
            logprobs = None
            if num_top is not None:
                if len(positions) < len(ids):
                    positions = list(positions) + [None] * (len(ids) - len(positions))
                logprobs, cur.offset = completion_logprobs(tok, ids, positions, num_top, cur.offset)
            cur.done = finished
            choice = {"index": index, "text": delta, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            yield sse(chunk([choice], continuous))
    if include_usage:
        yield sse(chunk([], True))
