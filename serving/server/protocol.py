"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extra parameters.

Only requests are models: FastAPI validates them and publishes their schema in /openapi.json.
Responses are built as plain dicts in the route modules, in exactly the shape the OpenAI API
documents, because every field there is computed and nothing is parsed.

Unset optional fields stay ``None`` so the server can tell "not given" (fall back to the model's
generation config, then to SamplingParams' defaults) from an explicit value.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# Bounds checked before the engine sees a request (huge `n` or stop lists are cheap to send and
# expensive to serve).
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_PROMPTS_PER_REQUEST = 256


class _Request(BaseModel):
    # Unknown fields are ignored as the OpenAI API does; clients send vendor fields freely.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = False


class _SamplingFields(_Request):
    """Sampling parameters shared by completions and chat (OpenAI's plus vLLM's extras)."""
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = None
    min_tokens: int = 0
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Optional[int] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    priority: int = 0
    request_id: Optional[str] = Field(None, max_length=256)
    cache_salt: Optional[str] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0)
    suffix: Optional[str] = None
    add_special_tokens: bool = True


class ChatMessage(_Request):
    role: str
    # A string, a list of content parts ({"type": "text", "text": ...}), or null (assistant turns).
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class ResponsesRequest(_Request):
    model: Optional[str] = None
    # A string, or a list of messages ({"role", "content"} with content a string or
    # input_text parts; "type": "message" optional).
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stream: bool = False
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    previous_response_id: Optional[str] = None
    request_id: Optional[str] = Field(None, max_length=256)
    priority: int = 0


class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None   # default True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]
