"""POST /v1/chat/completions: chat template -> one engine request with n samples; SSE streaming."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from serving.server import prepare as prep
from serving.server.completions import start_jobs
from serving.server.errors import APIError
from serving.server.formatting import chat_logprobs, usage
from serving.server.metrics import RequestTracker
from serving.server.protocol import ChatCompletionRequest
from serving.server.streaming import final_outputs, sse, terminated_sse


def prepare_chat(state: prep.ServingState, req: ChatCompletionRequest):
    model = state.check_model(req.model)
    state.check_alive()
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError("only response_format {\"type\": \"text\"} is supported", 400, param="response_format")
    if isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "none", "auto"):
        raise APIError("tool_choice other than \"none\" or \"auto\" is not supported", 400, param="tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", 400, param="top_logprobs")
    prompt_text = prep.render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                                   continue_final_message=req.continue_final_message,
                                   request_template=req.chat_template, template_kwargs=req.chat_template_kwargs,
                                   tools=req.tools)
    ids = list(state.tokenizer.encode(prompt_text, add_special_tokens=req.add_special_tokens))
    ids = prep.truncate(ids, req.truncate_prompt_tokens)
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = req.max_tokens, "max_tokens"
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params, asked = prep.build_sampling_params(state, req, max_tokens=max_tokens, logprobs=logprobs,
                                               prompt_logprobs=req.prompt_logprobs, max_tokens_param=param)
    params = prep.with_max_tokens(params, prep.check_context(state, len(ids), asked, param=param,
                                                             prompt_param="messages"))
    return model, prompt_text, ids, params


def _echo_prefix(req: ChatCompletionRequest, role: str) -> str:
    """With `echo`, the reply starts with the final message's text when that message is the assistant's."""
    if not req.echo or not req.messages or req.messages[-1].role != role:
        return ""
    content = req.messages[-1].content
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


async def create_chat_completion(state: prep.ServingState, req: ChatCompletionRequest, raw: Request):
    # Rendering (up to the template's time limit) and tokenizing run off the event loop, so a slow
    # template or a huge conversation delays only this request, not every other client.
    model, prompt_text, ids, params = await run_in_threadpool(prepare_chat, state, req)
    response_id, stem = prep.make_request_id("chatcmpl-", req.request_id or raw.headers.get("x-request-id"))
    created = int(time.time())
    role = state.args.response_role
    trackers = [RequestTracker(state.metrics)]
    outputs = await start_jobs(state, raw, stem, [(prompt_text, ids)], [params], priority=req.priority,
                               cache_salt=req.cache_salt, trackers=trackers, stream=req.stream)
    num_top = req.top_logprobs or 0
    echo = _echo_prefix(req, role)
    tok = state.tokenizer

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        events = _stream(req, outputs, len(ids), response_id, created, model, role, echo, include_usage,
                         continuous, tok, num_top)
        return StreamingResponse(terminated_sse(events), media_type="text/event-stream")

    [final] = await final_outputs(outputs, 1)
    choices = []
    for c in final.outputs:
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(tok, c.token_ids, c.logprobs or [None] * len(c.token_ids), num_top)
        choices.append({"index": c.index,
                        "message": {"role": role, "content": echo + c.text, "tool_calls": []},
                        "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    num_generated = sum(len(c.token_ids) for c in final.outputs)
    return JSONResponse({"id": response_id, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(len(ids), num_generated, final.num_cached_tokens),
                         "system_fingerprint": None})


async def _stream(req: ChatCompletionRequest, outputs, num_prompt: int, response_id: str, created: int, model: str,
                  role: str, echo: str, include_usage: bool, continuous: bool, tok, num_top: int):
    """SSE chunks from DELTA outputs: each output's new text, tokens and logprobs are a chunk as they are."""
    started: set[int] = set()
    done: set[int] = set()
    generated = 0

    def chunk(choices, with_usage: bool) -> dict:
        body = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
        if with_usage:
            body["usage"] = usage(num_prompt, generated)
        return body

    async for _, output in outputs:
        generated += sum(len(c.token_ids) for c in output.outputs)
        for c in output.outputs:
            i = c.index
            if i in done:
                continue
            if i not in started:
                # The first chunk of each choice carries the role (and the echoed text), as OpenAI's does.
                started.add(i)
                first = {"index": i, "delta": {"role": role, "content": echo}, "logprobs": None,
                         "finish_reason": None}
                yield sse(chunk([first], continuous))
            delta, new_ids = c.text, c.token_ids
            finished = c.finish_reason is not None
            if not delta and not new_ids and not finished:
                continue
            logprobs = None
            if req.logprobs and new_ids:
                positions = c.logprobs or []
                if len(positions) < len(new_ids):
                    positions = list(positions) + [None] * (len(new_ids) - len(positions))
                logprobs = chat_logprobs(tok, new_ids, positions, num_top)
            if finished:
                done.add(i)
            body = {"index": i, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                    "finish_reason": c.finish_reason}
            if finished:
                body["stop_reason"] = c.stop_reason
            yield sse(chunk([body], continuous))
    if include_usage:
        yield sse(chunk([], True))
