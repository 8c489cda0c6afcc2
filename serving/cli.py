"""`jaxllm serve [MODEL] [flags]` and `jaxllm convert ...` (also `python -m serving`).

Flags keep vLLM's names where the meaning is the same. Precedence: command line > `--config FILE.yaml`
> defaults. The YAML file maps flag names (dashes or underscores) to values, e.g.

    max-model-len: 4096
    enable-prefix-caching: false
    served-model-name: [smol, default]

A bad value anywhere is reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Optional, Sequence

from serving.config import ATTENTION_BACKENDS, DTYPES, LOAD_FORMATS, SCHEDULING_POLICIES, EngineArgs
from serving.server.args import (CHAT_TEMPLATE_CONTENT_FORMATS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_REQUEST_BODY_BYTES,
                                 DEFAULT_SHUTDOWN_TIMEOUT_S, UVICORN_LOG_LEVELS, ServerArgs)

logger = logging.getLogger("serving.cli")

API_KEY_ENV = "JAXLLM_API_KEY"
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class UsageError(Exception):
    """A bad flag or config value; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits; one line says it better for a bad value.
    def error(self, message):
        raise UsageError(message)


def _bytes(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 512MiB or 2GiB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _tokens(value: str) -> int:
    # vLLM accepts 32k / 1M style context lengths.
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(value))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a positive integer like 4096 or 32k, got {value!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def _string_list(value: str) -> list[str]:
    """A JSON list (vLLM's spelling: '["*"]') or comma-separated values."""
    value = str(value).strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {value!r} ({e.msg})")
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
        return items
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog="jaxllm", description="jaxllm: an OpenAI-compatible LLM server on JAX/XLA",
                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{serve,bench,convert}", parser_class=_Parser)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API", formatter_class=fmt,
                           description="Serve MODEL (default: the embedded SmolLM2-135M-Instruct) over HTTP.")
    sub.add_parser("convert", help="convert a checkpoint (see `jaxllm convert --help`)", add_help=False)
    sub.add_parser("bench", help="benchmarks: serve | throughput | buckets (see `jaxllm bench --help`)",
                   add_help=False)

    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="model path, Hugging Face id or GGUF file; none: the embedded default")
    serve.add_argument("--config", default=None, help="YAML file of flag values (command line wins)")

    e = serve.add_argument_group("model and engine")
    e.add_argument("--model", default=None, help="same as the positional MODEL")
    e.add_argument("--tokenizer", default=None, help="tokenizer path or id (default: the model's)")
    e.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    e.add_argument("--download-dir", default=None, help="where Hub downloads are cached")
    e.add_argument("--load-format", default="auto", choices=LOAD_FORMATS, help="weights format")
    e.add_argument("--dtype", default="auto", choices=DTYPES, help="weights and activations dtype")
    e.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    e.add_argument("--max-model-len", type=_tokens, default=None,
                   help="context length (prompt + output); default: the model's")
    e.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in `model`; the first is reported (default: the model path)")
    e.add_argument("--generation-config", default="auto",
                   help="'auto' (sampling defaults from the model), 'vllm' (ignore them) or a directory")
    e.add_argument("--max-logprobs", type=int, default=20, help="most logprobs a request may ask for")
    e.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS,
                   help="attention implementation (default: pallas on GPU, xla elsewhere)")

    c = serve.add_argument_group("KV cache and scheduling")
    c.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32, 64, 128), help="tokens per KV page")
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of accelerator memory for weights, activations and KV cache")
    c.add_argument("--num-gpu-blocks-override", type=int, default=None, help="number of KV pages, overriding sizing")
    c.add_argument("--kv-cache-memory", type=_bytes, default=None,
                   help="KV cache size in bytes (e.g. 2GiB), overriding --gpu-memory-utilization")
    c.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests in one batch (default: 256 on a GPU, 32 on a CPU)")
    c.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    c.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV pages of shared prompt prefixes")
    c.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES,
                   help="order of waiting requests ('priority' uses the request's priority)")
    c.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule and launch step N+1 before collecting step N, hiding the host's work "
                        "(default; --no-async-scheduling steps synchronously)")
    c.add_argument("--token-buckets", default=None, help="comma-separated token-count buckets compiled ahead")
    c.add_argument("--seq-buckets", default=None, help="comma-separated batch-size buckets compiled ahead")
    c.add_argument("--decode-seq-buckets", default=None,
                   help="batch-size buckets of the decode-only executables (Pallas attention); default: --seq-buckets")
    c.add_argument("--compilation-cache-dir", default=None, help="persistent XLA compilation cache directory")

    p = serve.add_argument_group("parallelism")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="devices per tensor-parallel group")
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1, help="pipeline stages")
    p.add_argument("--sharding-rules", default=None, help="sharding preset name or rules file")
    p.add_argument("--coordinator-address", default=None,
                   help="multi-host: host:port of process 0 (default: $JAXLLM_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes (default: $JAXLLM_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's rank; 0 serves HTTP, the others follow its steps "
                        "(default: $JAXLLM_PROCESS_ID)")

    s = serve.add_argument_group("HTTP server")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY) on every route but /health; "
                        f"default: ${API_KEY_ENV} if set")
    s.add_argument("--allowed-origins", type=_string_list, default=["*"], help="CORS origins (JSON list or a,b)")
    s.add_argument("--allowed-methods", type=_string_list, default=["*"], help="CORS methods")
    s.add_argument("--allowed-headers", type=_string_list, default=["*"], help="CORS headers")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    s.add_argument("--root-path", default="", help="path prefix when behind a proxy that strips it")
    s.add_argument("--ssl-keyfile", default=None, help="TLS private key file")
    s.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    s.add_argument("--disable-fastapi-docs", action="store_true", help="serve no /docs, /redoc, /openapi.json")
    s.add_argument("--enable-request-id-headers", action="store_true", help="send X-Request-Id on every response")
    s.add_argument("--max-request-body-bytes", type=_bytes, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                   help="larger request bodies get 413")
    s.add_argument("--max-header-bytes", type=_bytes, default=DEFAULT_MAX_HEADER_BYTES,
                   help="larger request lines + headers get 431")
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests admitted but not yet started beyond which new ones get 503 with Retry-After "
                        "(default: unbounded)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take from arrival to its last token; then it is aborted and "
                        "the client gets 504 (or an error event in a stream) (default: no deadline)")
    s.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM, seconds in-flight requests may take to finish while new ones get 503")
    s.add_argument("--metrics-without-auth", action="store_true", help="serve /metrics without the API key")
    s.add_argument("--uvicorn-log-level", default="info", choices=UVICORN_LOG_LEVELS, help="uvicorn's log level")
    s.add_argument("--disable-log-requests", action="store_true", help="do not log each request")
    s.add_argument("--disable-log-stats", action="store_true", help="do not log throughput every 10 s")

    t = serve.add_argument_group("chat")
    t.add_argument("--chat-template", default=None, help="chat template file or text (default: the tokenizer's)")
    t.add_argument("--chat-template-content-format", default="auto", choices=CHAT_TEMPLATE_CONTENT_FORMATS,
                   help="message content as a string or as OpenAI parts ('auto': detect from the template)")
    t.add_argument("--trust-request-chat-template", action="store_true",
                   help="allow requests to carry their own chat_template")
    t.add_argument("--response-role", default="assistant", help="role of generated chat messages")
    return parser


def _serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices["serve"]


def _yaml_to_argv(path: str, serve: argparse.ArgumentParser) -> list[str]:
    """The YAML config as command-line tokens, placed before the real ones so those win."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must be a mapping of flag names to values")
    actions = {opt: a for a in serve._actions for opt in a.option_strings}
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--config":
            raise UsageError("--config files cannot include another --config")
        action = actions.get(flag)
        if action is None:
            raise UsageError(f"--config {path}: unknown option {key!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
            if value:
                argv.append(flag)
        elif action.nargs == "+":
            values = value if isinstance(value, list) else [value]
            argv += [flag] + [str(v) for v in values]
        else:
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            argv += [flag, str(value)]
    return argv


def parse_serve_args(argv: Sequence[str]) -> tuple[EngineArgs, ServerArgs]:
    """`serve` flags (without the subcommand) -> (EngineArgs, ServerArgs); raises UsageError."""
    parser = build_parser()
    serve = _serve_parser(parser)
    argv = list(argv)
    first = serve.parse_args(argv)
    if first.config:
        argv = _yaml_to_argv(first.config, serve) + argv
    ns = vars(serve.parse_args(argv))
    if ns["model_tag"] is not None and ns["model"] is not None and ns["model_tag"] != ns["model"]:
        raise UsageError(f"model given twice: {ns['model_tag']!r} and --model {ns['model']!r}")
    ns["model"] = ns.pop("model_tag") or ns["model"]
    if ns["api_key"] is None:
        ns["api_key"] = os.environ.get(API_KEY_ENV) or None
    names = ns.pop("served_model_name") or []
    ns["served_model_name"] = names[0] if names else None
    ns["served_model_names"] = tuple(names)
    if ns["chat_template"] is not None:
        from serving.chat_template import resolve_chat_template
        try:
            ns["chat_template"] = resolve_chat_template(ns["chat_template"])
        except ValueError as e:
            raise UsageError(f"--chat-template: {e}")
    try:
        engine_args = EngineArgs(**{k: ns[k] for k in EngineArgs.field_names() if k in ns})
        server_args = ServerArgs(**{k: ns[k] for k in ServerArgs.field_names() if k in ns})
    except ValueError as e:
        raise UsageError(str(e))
    return engine_args, server_args


# After a drain (or an engine failure) uvicorn waits this long for connections still open, then cancels
# their handlers, which aborts their engine requests. Idle keep-alive connections close at once.
GRACEFUL_CLOSE_S = 2


def _make_uvicorn_server(config, begin_drain=None):
    """uvicorn.Server whose first SIGTERM calls `begin_drain()` (503 for new requests, in-flight ones
    finish, then the app stops the server); SIGINT or a second SIGTERM stops at once."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig == signal.SIGTERM and begin_drain is not None and not self.should_exit and begin_drain():
                logger.info("SIGTERM: draining (send it again to stop now)")
                return
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would end
            # "killed by signal"; a server that drained cleanly exits 0 instead (orchestrators read
            # a non-zero status as a crash).
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server(config)


def uvicorn_config(app, server_args: ServerArgs):
    """uvicorn's settings for `app`: the h11 protocol with the envelope and the header limit (431)."""
    import uvicorn

    from serving.server.http_protocol import EnvelopeH11Protocol

    return uvicorn.Config(app, host=server_args.host, port=server_args.port, log_level=server_args.uvicorn_log_level,
                          root_path=server_args.root_path, ssl_keyfile=server_args.ssl_keyfile,
                          ssl_certfile=server_args.ssl_certfile, access_log=not server_args.disable_log_requests,
                          http=EnvelopeH11Protocol, h11_max_incomplete_event_size=server_args.max_header_bytes,
                          timeout_graceful_shutdown=GRACEFUL_CLOSE_S)


def run_server(engine_args: EngineArgs, server_args: ServerArgs) -> int:
    """Load the engine (blocking: weights, KV cache, compilation), then serve until stopped."""
    from serving.async_llm import AsyncLLM
    from serving.server.app import build_app

    process_id = engine_args.process_id
    if process_id is None and os.environ.get("JAXLLM_PROCESS_ID"):
        process_id = int(os.environ["JAXLLM_PROCESS_ID"])
    if process_id:
        # A multi-host follower: no HTTP server; it replays every step plan process 0 publishes.
        from serving.engine_builder import run_follower

        steps = run_follower(engine_args)
        logger.info("follower %d stopped after %d steps", process_id, steps)
        return 0
    engine = AsyncLLM.from_engine_args(engine_args)
    app = build_app(engine, server_args)
    server = _make_uvicorn_server(uvicorn_config(app, server_args), begin_drain=app.state.lifecycle.begin_drain)
    # The app asks uvicorn to stop when the engine's device loop dies, so an orchestrator restarts us.
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    asyncio.run(server.serve())
    if getattr(engine, "is_dead", False):
        logger.error("the engine died; exiting with status 1")
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from model_zoo.convert import main as convert_main
        return convert_main(argv[1:]) or 0
    if argv and argv[0] == "bench":
        from serving.bench.cli import main as bench_main
        return bench_main(argv[1:]) or 0
    parser = build_parser()
    try:
        if not argv or argv[0] != "serve":
            parser.parse_args(argv)  # --help, or an error for an unknown command
            parser.print_help()
            return 2
        engine_args, server_args = parse_serve_args(argv[1:])
    except UsageError as e:
        print(f"jaxllm {argv[0] if argv else ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    return run_server(engine_args, server_args)
