"""The OpenAI-compatible HTTP server: `build_app(engine, ServerArgs(...))` -> a FastAPI app."""

from serving.server.app import build_app
from serving.server.args import ServerArgs

__all__ = ["ServerArgs", "build_app"]
