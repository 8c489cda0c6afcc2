"""uvicorn's h11 protocol, answering malformed requests with the OpenAI envelope and 431 for huge headers.

h11 buffers at most `max_incomplete_event_size` bytes of an unfinished request line + headers and then
raises `RemoteProtocolError(error_status_hint=431)`; stock uvicorn turns every protocol error into a
plain-text 400. Here the status hint is kept (431 for oversized headers, 400 otherwise) and the body
is the same JSON envelope every other error has. Headers that arrive complete in one read never hit
h11's limit, so GuardMiddleware checks their total size again (see `header_bytes`).
"""

from __future__ import annotations

import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.server.errors import error_bytes


class EnvelopeH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from inside `except h11.RemoteProtocolError`, so the error is at hand.
        exc = sys.exc_info()[1]
        status = 400
        if isinstance(exc, h11.RemoteProtocolError) and exc.error_status_hint == 431:
            status, msg = 431, "request line and headers are too large"
        body = error_bytes(msg, status)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers)))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass  # the connection is past the point where a response can be sent; just close it
        self.transport.close()


def header_bytes(scope) -> int:
    """Approximate wire size of the request line and headers (name: value CRLF each)."""
    size = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b"")) + 16
    for name, value in scope.get("headers", ()):
        size += len(name) + len(value) + 4
    return size
