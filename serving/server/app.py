"""The FastAPI application: `build_app(engine, server_args)`.

The engine is created (weights loaded, buckets compiled) before the app; the app owns its shutdown.
Routes are thin: each validates its body (pydantic), prepares engine inputs (prepare.py) and
formats engine outputs (completions.py, chat.py, responses.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response

from serving.server import prepare as prep
from serving.server.args import ServerArgs
from serving.server.chat import create_chat_completion
from serving.server.completions import create_completion
from serving.server.errors import APIError, error_response, install_handlers
from serving.server.guard import GuardMiddleware
from serving.server.lifecycle import Lifecycle
from serving.server.metrics import CONTENT_TYPE, ServerMetrics
from serving.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ResponsesRequest,
                                     TokenizeRequest)
from serving.server.responses import create_response

logger = logging.getLogger("serving.server")

STATS_LOG_INTERVAL_S = 10.0


def jaxllm_version() -> str:
    try:
        return importlib.metadata.version("jaxllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _log_stats(engine, interval: float) -> None:
    """Every `interval` seconds: throughput since the last line and the engine's load (like vLLM's logger)."""
    last = engine.get_stats()
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        stats, now = engine.get_stats(), time.monotonic()
        dt = max(now - last_t, 1e-9)
        prompt_tps = (stats.prompt_tokens - last.prompt_tokens) / dt
        gen_tps = (stats.generation_tokens - last.generation_tokens) / dt
        if prompt_tps or gen_tps or stats.num_requests_running or stats.num_requests_waiting:
            logger.info("prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                        "KV cache usage %.1f%%", prompt_tps, gen_tps, stats.num_requests_running,
                        stats.num_requests_waiting, 100.0 * stats.kv_cache_usage)
        last, last_t = stats, now


async def _watch_engine(app: FastAPI, engine, interval: float = 0.5) -> None:
    """Once the engine's device loop dies, ask the server to stop (the CLI then exits non-zero)."""
    while not getattr(engine, "is_dead", False):
        await asyncio.sleep(interval)
    logger.error("the engine has died; shutting the server down")
    request_shutdown = getattr(app.state, "request_shutdown", None)
    if request_shutdown is not None:
        request_shutdown()


async def _watch_drain(app: FastAPI, lifecycle: Lifecycle) -> None:
    """Once a drain begins (SIGTERM), wait for in-flight requests (bounded), then ask the server to stop."""
    await lifecycle.wait_drained()
    request_shutdown = getattr(app.state, "request_shutdown", None)
    if request_shutdown is not None:
        request_shutdown()


def build_app(engine, args: ServerArgs = ServerArgs()) -> FastAPI:
    state = prep.ServingState.from_engine(engine, args)
    metrics = ServerMetrics(engine, state.model_name)
    state.metrics = metrics
    lifecycle = Lifecycle(args)
    state.lifecycle = lifecycle
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(_watch_engine(app, engine)), asyncio.create_task(_watch_drain(app, lifecycle))]
        if not args.disable_log_stats:
            tasks.append(asyncio.create_task(_log_stats(engine, STATS_LOG_INTERVAL_S)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await engine.shutdown()

    docs = {} if not args.disable_fastapi_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="jaxllm OpenAI-compatible server", version=jaxllm_version(), lifespan=lifespan, **docs)
    app.state.serving = state
    app.state.lifecycle = lifecycle
    install_handlers(app)
    # Added last = outermost: CORS answers browser preflights before the key check sees them.
    app.add_middleware(GuardMiddleware, args=args, lifecycle=lifecycle)
    app.add_middleware(CORSMiddleware, allow_origins=list(args.allowed_origins),
                       allow_methods=list(args.allowed_methods), allow_headers=list(args.allowed_headers),
                       allow_credentials=args.allow_credentials)

    @app.get("/health")
    async def health() -> Response:
        if getattr(engine, "is_dead", False):
            return error_response("the engine has stopped; the server is shutting down", 503)
        if lifecycle.draining:
            err = lifecycle.draining_error()
            return error_response(err.message, err.status, headers=err.headers)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": jaxllm_version()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "jaxllm", "root": engine.model_name,
             "parent": None, "max_model_len": state.max_model_len,
             "permission": []} for name in state.served_names]}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(state, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request):
        return await create_response(state, req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of prompt and messages", 400, param="prompt")
        if req.prompt is not None:
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            text = prep.render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                                    continue_final_message=req.continue_final_message,
                                    template_kwargs=req.chat_template_kwargs)
            ids = state.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        ids = list(ids)
        strs = list(state.tokenizer.convert_ids_to_tokens(ids)) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        ids = prep.check_token_ids(state, req.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(ids)}

    return app
