"""POST /v1/responses: OpenAI's Responses API for text in and text out, with its streaming events."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from serving.server import prepare as prep
from serving.server.completions import start_jobs
from serving.server.errors import APIError, clip, from_exception
from serving.server.metrics import RequestTracker
from serving.server.protocol import ResponsesRequest
from serving.server.streaming import OutputAccumulator, final_outputs, sse

_TEXT_PART_TYPES = ("input_text", "output_text", "text")


def _messages(req: ResponsesRequest) -> list[dict]:
    """The Responses `input` (a string or message items) as chat messages, `instructions` first."""
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        if not req.input:
            raise APIError("input must not be empty", 400, param="input")
        messages.append({"role": "user", "content": req.input})
        return messages
    if not req.input:
        raise APIError("input must not be empty", 400, param="input")
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind != "message":
            raise APIError(f"input[{i}] has type {clip(kind, 50)!r}; only message items are supported", 400,
                           param="input")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _TEXT_PART_TYPES \
                        or not isinstance(part.get("text"), str):
                    raise APIError(f"input[{i}].content[{j}] must be a text part "
                                   f"({', '.join(_TEXT_PART_TYPES)})", 400, param="input")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise APIError(f"input[{i}].content must be a string or a list of text parts", 400, param="input")
        messages.append({"role": item.get("role"), "content": content})
    return messages


def _response_object(req: ResponsesRequest, response_id: str, created: int, model: str, status: str,
                     output: list, usage: Optional[dict], incomplete: Optional[dict] = None) -> dict:
    return {"id": response_id, "object": "response", "created_at": created, "model": model, "status": status,
            "output": output, "usage": usage, "incomplete_details": incomplete, "error": None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "metadata": req.metadata or {},
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
            "truncation": "disabled", "previous_response_id": None, "reasoning": None, "store": False,
            "user": req.user}


def _message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" or text else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _usage(num_prompt: int, num_output: int, cached: int) -> dict:
    return {"input_tokens": num_prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": num_output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": num_prompt + num_output}


async def create_response(state: prep.ServingState, req: ResponsesRequest, raw: Request):
    model = state.check_model(req.model)
    state.check_alive()
    if req.previous_response_id is not None:
        raise APIError("previous_response_id is not supported (responses are not stored)", 400,
                       param="previous_response_id")
    prompt_text = prep.render_chat(state, _messages(req), add_generation_prompt=True, continue_final_message=False)
    ids = list(state.tokenizer.encode(prompt_text, add_special_tokens=False))

    class _Fields:  # the subset of sampling fields the Responses API has
        n = 1
        temperature, top_p, top_k, seed = req.temperature, req.top_p, req.top_k, req.seed

    params, asked = prep.build_sampling_params(state, _Fields, max_tokens=req.max_output_tokens, logprobs=None,
                                               max_tokens_param="max_output_tokens")
    params = prep.with_max_tokens(params, prep.check_context(state, len(ids), asked, param="max_output_tokens",
                                                             prompt_param="input"))
    response_id, stem = prep.make_request_id("resp_", req.request_id or raw.headers.get("x-request-id"))
    item_id = f"msg_{uuid.uuid4().hex}"
    created = int(time.time())
    outputs = await start_jobs(state, raw, stem, [(prompt_text, ids)], [params], priority=req.priority,
                               cache_salt=None, trackers=[RequestTracker(state.metrics)], stream=req.stream)

    def finish(output) -> dict:
        c = output.outputs[0]
        incomplete = {"reason": "max_output_tokens"} if c.finish_reason == "length" else None
        return _response_object(req, response_id, created, model, "incomplete" if incomplete else "completed",
                                [_message_item(item_id, c.text, "completed")],
                                _usage(len(ids), len(c.token_ids), output.num_cached_tokens or 0), incomplete)

    if not req.stream:
        [final] = await final_outputs(outputs, 1)
        return JSONResponse(finish(final))

    async def events():
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            body = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return sse(body, event=kind)

        base = _response_object(req, response_id, created, model, "in_progress", [], None)
        yield event("response.created", response=base)
        yield event("response.in_progress", response=base)
        yield event("response.output_item.added", output_index=0, item=_message_item(item_id, "", "in_progress"))
        yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []})
        total = OutputAccumulator()
        try:
            async for _, output in outputs:     # DELTA outputs: each one's text is the next delta
                total.add(output)
                delta = output.outputs[0].text
                if delta:
                    yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                                delta=delta, logprobs=[])
        except Exception as exc:
            err = from_exception(exc)
            yield event("error", code=str(err.status), message=err.message, param=err.param)
            return
        final = total.result()
        text = final.outputs[0].text
        yield event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text,
                    logprobs=[])
        yield event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                    part={"type": "output_text", "text": text, "annotations": []})
        yield event("response.output_item.done", output_index=0, item=_message_item(item_id, text, "completed"))
        done = finish(final)
        yield event("response.completed" if done["status"] == "completed" else "response.incomplete", response=done)

    return StreamingResponse(events(), media_type="text/event-stream")
