"""Server-only options (everything `jaxllm serve` takes that is not an engine argument)."""

from __future__ import annotations

import dataclasses
from typing import Optional

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
CHAT_TEMPLATE_CONTENT_FORMATS = ("auto", "string", "openai")
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024
# Request line + headers; larger get 431. h11's own default, and what nginx's large_client_header_buffers allows.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: Optional[str] = None                # also JAXLLM_API_KEY; None: no authentication
    served_model_names: tuple[str, ...] = ()     # names clients may use; () -> the engine's served name
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""
    ssl_keyfile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    disable_fastapi_docs: bool = False
    enable_request_id_headers: bool = False
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_queued_requests: Optional[int] = None    # admitted but not yet started; None: unbounded
    request_timeout: Optional[float] = None       # seconds from arrival to the last token; None: no deadline
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S   # SIGTERM: how long in-flight requests may finish
    uvicorn_log_level: str = "info"
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    chat_template: Optional[str] = None          # template text (already resolved from a file or string)
    chat_template_content_format: str = "auto"
    trust_request_chat_template: bool = False     # let a request carry its own `chat_template`
    metrics_without_auth: bool = False            # serve /metrics without the API key
    response_role: str = "assistant"

    def __post_init__(self):
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be in 0..65535; got {self.port}")
        if self.max_request_body_bytes < 1024:
            raise ValueError(f"max_request_body_bytes must be at least 1024; got {self.max_request_body_bytes}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024; got {self.max_header_bytes}")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be at least 1; got {self.max_queued_requests}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive; got {self.request_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be at least 0; got {self.shutdown_timeout}")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(UVICORN_LOG_LEVELS)}; "
                             f"got {self.uvicorn_log_level!r}")
        if self.chat_template_content_format not in CHAT_TEMPLATE_CONTENT_FORMATS:
            raise ValueError("chat_template_content_format must be one of "
                             f"{', '.join(CHAT_TEMPLATE_CONTENT_FORMATS)}; got {self.chat_template_content_format!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile must be given together")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"root_path must start with '/' and not end with one; got {self.root_path!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        for name in ("allowed_origins", "allowed_methods", "allowed_headers", "served_model_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
