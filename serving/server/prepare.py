"""From a validated request body to what `engine.generate` takes: token ids and SamplingParams.

Everything here runs before the engine sees the request, so a bad request costs milliseconds and
no engine work: unknown model (404), prompt or token ids out of range, context overflow with the
numbers in the message, sampling values out of range (SamplingParams' own checks, plus `verify`
against the vocabulary and `--max-logprobs`) are all 400s with the offending `param`.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Optional, Sequence

from serving.sampling_params import SamplingParams, SamplingParamsError
from serving.server.args import ServerArgs
from serving.server.errors import APIError, clip
from serving.server.protocol import MAX_PROMPTS_PER_REQUEST

# Extra template variables a request may set through `chat_template_kwargs`. Anything else could
# shadow the variables the server itself controls (messages, special tokens) or a template's
# internals, so it is refused rather than passed through.
ALLOWED_CHAT_TEMPLATE_KWARGS = frozenset({
    "enable_thinking", "thinking", "reasoning_effort", "documents", "date_string",
    "custom_instructions", "xml_tools", "python_tools", "builtin_tools", "tools_in_user_message",
})

# Request fields copied one to one into SamplingParams when the client set them.
_PASSTHROUGH = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
                "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
                "allowed_token_ids", "truncate_prompt_tokens", "best_of")
# Generation-config defaults the model may supply (request values override them).
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "max_tokens")


@dataclasses.dataclass
class ServingState:
    """What the routes share: the engine and the facts about the model they check requests against."""
    engine: Any
    args: ServerArgs
    served_names: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    default_sampling: dict
    chat_template: Optional[str]
    metrics: Any = None
    lifecycle: Any = None          # serving.server.lifecycle.Lifecycle: admission, deadlines, drain

    @classmethod
    def from_engine(cls, engine, args: ServerArgs, metrics=None) -> "ServingState":
        engine_args = engine.engine_args
        names = tuple(args.served_model_names) or (engine_args.served_model_name or engine.model_name,)
        vocab = getattr(getattr(engine, "model_config", None), "vocab_size", None) or engine.tokenizer.vocab_size
        return cls(engine=engine, args=args, served_names=names, max_model_len=int(engine.max_model_len),
                   vocab_size=int(vocab), max_logprobs=int(engine_args.max_logprobs),
                   default_sampling=dict(getattr(engine, "default_sampling", None) or {}),
                   chat_template=args.chat_template, metrics=metrics)

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, name: Optional[str]) -> str:
        """The served name to report; 404 for a model this server does not serve."""
        if name is None or name == "" or name in self.served_names:
            return name or self.model_name
        raise APIError(f"The model `{clip(name, 100)}` does not exist.", 404, param="model")

    def check_alive(self) -> None:
        if getattr(self.engine, "is_dead", False):
            raise APIError("the engine has stopped; the server is shutting down", 503)


def make_request_id(prefix: str, client_id: Optional[str]) -> tuple[str, str]:
    """(id shown to the client, unique stem for engine request ids); `prefix` ends with its separator.

    A client-supplied id is echoed back but not trusted to be unique, so engine ids get a random tail.
    """
    rand = uuid.uuid4().hex
    if client_id:
        return client_id, f"{prefix}{client_id}-{rand[:8]}"
    return f"{prefix}{rand}", f"{prefix}{rand}"


def check_token_ids(state: ServingState, ids: Sequence[int], param: str) -> list[int]:
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= state.vocab_size]
    if bad:
        raise APIError(f"{param} contains token ids outside the vocabulary [0, {state.vocab_size}): "
                       f"{clip(bad[:8])}", 400, param=param)
    return list(ids)


def tokenize_completion_prompts(state: ServingState, prompt: Any, add_special_tokens: bool
                                ) -> list[tuple[Optional[str], list[int]]]:
    """Text, token ids, or lists of either -> [(text or None, token ids)]."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = list(prompt)
    else:
        raise APIError("prompt must be a string, a list of token ids, or a list of either", 400, param="prompt")
    if not prompts:
        raise APIError("prompt must not be empty", 400, param="prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}", 400,
                       param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise APIError("prompt must not be empty", 400, param="prompt")
            out.append((p, list(state.tokenizer.encode(p, add_special_tokens=add_special_tokens))))
        else:
            if not p:
                raise APIError("prompt must not be empty", 400, param="prompt")
            out.append((None, check_token_ids(state, p, "prompt")))
    return out


def render_chat(state: ServingState, messages: list, *, add_generation_prompt: bool, continue_final_message: bool,
                request_template: Optional[str] = None, template_kwargs: Optional[dict] = None,
                tools: Optional[list] = None) -> str:
    """Validate the conversation and render it with the chat template (sandboxed, time-bounded)."""
    from serving import chat_template as ct

    if request_template is not None and not state.args.trust_request_chat_template:
        raise APIError("chat_template in the request is not allowed on this server "
                       "(start it with --trust-request-chat-template)", 400, param="chat_template")
    kwargs = dict(template_kwargs or {})
    unknown = sorted(k for k in kwargs if k not in ALLOWED_CHAT_TEMPLATE_KWARGS)
    if unknown:
        raise APIError(f"chat_template_kwargs keys {clip(unknown)} are not allowed; allowed keys are "
                       f"{', '.join(sorted(ALLOWED_CHAT_TEMPLATE_KWARGS))}", 400, param="chat_template_kwargs")
    plain = [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m) for m in messages]
    try:
        ct.validate_messages(plain)
    except ValueError as e:
        raise APIError(str(e), 400, param="messages") from e
    fmt = state.args.chat_template_content_format
    if fmt != "auto":
        # An explicit format is applied here, so the result does not depend on the template's own detection.
        plain = ct.normalize_messages(plain, fmt)
    try:
        return state.tokenizer.apply_chat_template(
            plain, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            chat_template=request_template or state.chat_template, tools=tools, **kwargs)
    except ValueError as e:
        raise APIError(str(e), 400, param="messages") from e


def truncate(ids: list[int], truncate_prompt_tokens: Optional[int]) -> list[int]:
    if truncate_prompt_tokens is not None and 0 < truncate_prompt_tokens < len(ids):
        return ids[-truncate_prompt_tokens:]
    return ids


def check_context(state: ServingState, num_prompt_tokens: int, max_tokens: Optional[int], *,
                  param: str = "max_tokens", prompt_param: str = "prompt") -> int:
    """The max_tokens to use (None -> what the context leaves); 400 when the request cannot fit."""
    limit = state.max_model_len
    if num_prompt_tokens >= limit:
        raise APIError(f"This model's maximum context length is {limit} tokens. However, your request has "
                       f"{num_prompt_tokens} input tokens, which leaves no room for output. Please reduce the "
                       f"length of the input.", 400, param=prompt_param)
    room = limit - num_prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the input, {max_tokens} "
                       f"in the output). Please reduce the length of the input or of {param}.", 400, param=param)
    return max_tokens


def build_sampling_params(state: ServingState, req: Any, *, max_tokens: Optional[int], logprobs: Optional[int],
                          prompt_logprobs: Optional[int] = None, default_max_tokens: Optional[int] = None,
                          max_tokens_param: str = "max_tokens") -> tuple[SamplingParams, Optional[int]]:
    """SamplingParams from a request; returns it with the max_tokens asked for (None: to the context limit).

    Precedence for each value: the request, then the model's generation config, then SamplingParams' default.
    """
    kwargs: dict[str, Any] = {}
    for name in _DEFAULTABLE:
        if name in state.default_sampling and state.default_sampling[name] is not None:
            kwargs[name] = state.default_sampling[name]
    for name in _PASSTHROUGH:
        value = getattr(req, name, None)
        if value is not None:
            kwargs[name] = value
    kwargs["n"] = req.n
    if getattr(req, "logit_bias", None):
        kwargs["logit_bias"] = dict(req.logit_bias)
    if max_tokens is None:
        max_tokens = kwargs.pop("max_tokens", default_max_tokens)
    else:
        kwargs.pop("max_tokens", None)
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
        raise APIError(f"{max_tokens_param} must be at least 1, got {max_tokens}", 400, param=max_tokens_param)
    kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = logprobs
    kwargs["prompt_logprobs"] = prompt_logprobs
    try:
        params = SamplingParams(**kwargs)
        params.verify(vocab_size=state.vocab_size, max_logprobs=state.max_logprobs)
    except SamplingParamsError as e:
        param = e.param
        if param == "max_tokens":
            param = max_tokens_param
        raise APIError(str(e), 400, param=param) from e
    return params, max_tokens


def with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return params if params.max_tokens == max_tokens else params.clone(max_tokens=max_tokens)
