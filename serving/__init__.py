"""jaxllm's host side: engine, scheduler, sampling parameters, OpenAI server.

``from serving import LLM, SamplingParams`` (vLLM's shape). Heavy modules load lazily.
"""

from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs", "AsyncLLM"]


def __getattr__(name):
    if name == "LLM":
        from serving.llm import LLM
        return LLM
    if name == "SamplingParams":
        from serving.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from serving import outputs
        return getattr(outputs, name)
    if name == "EngineArgs":
        from serving.config import EngineArgs
        return EngineArgs
    if name == "AsyncLLM":
        from serving.async_llm import AsyncLLM
        return AsyncLLM
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
