"""Pure-ASGI middleware that runs before any route: API key, body size and shape, request ids.

Kept out of FastAPI's dependency system on purpose: it sees every path (including unknown routes and
/docs), it runs before the body is parsed, and it decides on the routed path (`scope["path"]` minus
the root path), never on the Host header or the raw URL a client claims.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Optional

from serving.server.args import ServerArgs
from serving.server.errors import error_bytes
from serving.server.http_protocol import header_bytes

# Deeper JSON than this is refused before parsing: real requests nest a handful of levels, and a
# deeply nested body would otherwise exhaust the JSON parser's recursion.
MAX_JSON_DEPTH = 64
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
# Probes: answered during a drain (health says 503 itself) and not waited for by it.
_UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})


def routed_path(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):] or "/"
    return path


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `body` nests arrays/objects deeper than `limit` (brackets inside strings don't count)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:   # backslash
                escaped = True
            elif byte == 0x22:   # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class GuardMiddleware:
    def __init__(self, app, args: ServerArgs, lifecycle=None):
        self.app = app
        self.args = args
        self.lifecycle = lifecycle   # serving.server.lifecycle.Lifecycle: drain state, in-flight count
        self.max_body = args.max_request_body_bytes
        # Digests of equal length, so the comparison time reveals neither the key nor its length.
        self.expected_auth = hashlib.sha256(f"Bearer {args.api_key}".encode()).digest() if args.api_key else None
        self.open_paths = {"/health"} | ({"/metrics"} if args.metrics_without_auth else set())

    async def _reply(self, send, status: int, message: str, headers: Optional[list] = None) -> None:
        body = error_bytes(message, status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
        if given[:7].lower() == b"bearer ":
            given = b"Bearer " + given[7:].strip()
        return hmac.compare_digest(hashlib.sha256(given).digest(), self.expected_auth)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if header_bytes(scope) > self.args.max_header_bytes:
            return await self._reply(send, 431, f"request line and headers exceed {self.args.max_header_bytes} bytes")
        if self.expected_auth is not None and scope.get("method") != "OPTIONS" \
                and routed_path(scope) not in self.open_paths and not self._authorized(scope):
            return await self._reply(send, 401, "invalid or missing API key",
                                     [(b"www-authenticate", b"Bearer")])

        lifecycle = self.lifecycle
        path = routed_path(scope)
        if lifecycle is None or path in _UNCOUNTED_PATHS:
            return await self._dispatch(scope, receive, send)
        if lifecycle.draining:
            err = lifecycle.draining_error()
            return await self._reply(send, err.status, err.message,
                                     [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()])
        # Counted until the response is complete (a stream until its last chunk): what a drain waits for.
        lifecycle.in_flight += 1
        try:
            return await self._dispatch(scope, receive, send)
        finally:
            lifecycle.in_flight -= 1

    async def _dispatch(self, scope, receive, send):
        if self.args.enable_request_id_headers:
            request_id = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
            request_id = (request_id or uuid.uuid4().hex.encode())[:256]
            inner_send = send

            async def send(message):  # noqa: F811 (wraps the server's send)
                if message["type"] == "http.response.start":
                    message = dict(message)
                    message["headers"] = list(message.get("headers", ())) + [(b"x-request-id", request_id)]
                await inner_send(message)

        if scope.get("method", "").encode() not in _BODY_METHODS:
            return await self.app(scope, receive, send)

        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await self._reply(send, 400, "invalid Content-Length header")
                if declared > self.max_body:
                    return await self._reply(send, 413, f"request body of {declared} bytes exceeds the limit of "
                                                        f"{self.max_body} bytes")
        # Read the whole body (bounded) so it can be size- and depth-checked before any parsing.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self._reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth_exceeds(body):
            return await self._reply(send, 400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
