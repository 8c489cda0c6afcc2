"""The OpenAI error envelope, used by every route and middleware of the server.

Every failure a client can see is ``{"error": {"message", "type", "param", "code"}}`` with vLLM's
status codes. Messages never echo more than a bounded slice of client input, so a huge request
cannot make the error response huge (or leak it back in full into logs and proxies).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

# The longest slice of client-supplied text an error message may quote.
MAX_ECHO_CHARS = 200

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "BadRequestError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def clip(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """`str(value)` cut to `limit` characters, marking the cut."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more chars]"


class APIError(Exception):
    """An error the server reports to the client with a status, a message and the offending param."""

    def __init__(self, message: str, status: int = 400, *, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers


def error_body(message: str, status: int, param: Optional[str] = None) -> dict:
    return {"error": {"message": clip(message, 4 * MAX_ECHO_CHARS), "type": _TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(message: str, status: int = 400, param: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


def error_bytes(message: str, status: int, param: Optional[str] = None) -> bytes:
    """The envelope as bytes, for pure-ASGI middleware that answers before FastAPI runs."""
    return json.dumps(error_body(message, status, param)).encode()


def from_exception(exc: BaseException) -> APIError:
    """Map an exception from the engine or from request preparation onto the envelope.

    ValueError (and SamplingParamsError, its subclass carrying `.param`) is the engine's contract
    for invalid input: 400. Anything else is a server fault: 500 with its class name only.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError(str(exc), 400, param=getattr(exc, "param", None))
    return APIError(f"internal server error ({type(exc).__name__})", 500)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # A value matching no member of a union fails once per member, each loc ending in the member's
    # type ("prompt.str", "prompt.list[int]"); the field the client got wrong is their common prefix.
    others = [[str(p) for p in e.get("loc", ()) if p not in ("body",)] for e in errors[1:]]
    if others:
        common = loc
        for other in others:
            n = 0
            while n < min(len(common), len(other)) and common[n] == other[n]:
                n += 1
            common = common[:n]
        loc = common or loc
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "model_attributes_type" or (not loc and "dict" in msg.lower()):
        return "request body must be a JSON object", None
    shown = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        shown += f" (and {len(errors) - 1} more errors)"
    return shown, param


def install_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.message, exc.status, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if status == 404:
            message = f"no route for {clip(request.url.path, 100)}"
        return error_response(message, status, None, getattr(exc, "headers", None))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        err = from_exception(exc)
        return error_response(err.message, err.status, err.param)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        err = from_exception(exc)
        return error_response(err.message, err.status, err.param)
