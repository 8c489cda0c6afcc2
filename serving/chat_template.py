"""Hugging Face Jinja chat templates, rendered by jaxllm itself in a bounded sandbox.

Chat templates ship with model files (the Hub, GGUF metadata) or come from the ``--chat-template``
flag, so they are untrusted code. They run in jinja2's ``ImmutableSandboxedEnvironment`` (no dunder
access, no mutation of lists/dicts), with the globals and filters transformers provides
(``raise_exception``, ``strftime_now``, ``tojson`` without HTML escaping, a dunder-proof
``namespace``), and with a wall-clock deadline so a template that loops forever fails cleanly
instead of stalling the server. The rendered text is meant to equal transformers'
``apply_chat_template(..., tokenize=False)`` for the same inputs.

This module imports no transformers: the server renders templates without the Python tokenizer.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "developer")
CONTENT_FORMATS = ("auto", "string", "openai")

# How long one render may take. Real templates render in well under a millisecond per message.
DEFAULT_RENDER_TIMEOUT_S = 5.0
# Caps on what `*` / `**` may build inside a template (`"x" * 10**12` would otherwise exhaust memory).
MAX_SEQUENCE_PRODUCT = 1_000_000
MAX_POWER_EXPONENT = 4096
# Cap on the rendered prompt's size in characters: far above any context length, far below a runaway.
MAX_RENDERED_CHARS = 64 * 1024 * 1024

# transformers marks the final message with a tag, renders, then cuts the text at the tag; doing the
# same keeps `continue_final_message` identical to it, including templates that strip content.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """A chat template failed to render (template bug, raise_exception, sandbox refusal, timeout)."""


# The deadline of the render running in this thread/task. A contextvar, because compiled templates
# (and so the environment) are shared by every thread that renders.
_deadline: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("chat_template_deadline",
                                                                           default=None)


def _check_deadline() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError("chat template rendering exceeded its time limit "
                                "(the template loops too long); check the template")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus a deadline checked at every call, attribute and item access."""

    # Route `*` and `**` through call_binop so their results can be size-checked.
    intercepted_binops = frozenset(["*", "**"])

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_deadline()
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj, attribute):
        # Jinja returns a silent Undefined for e.g. `''.__class__`; refusing loudly is clearer and
        # leaves no half-rendered prompt that hides the attempt.
        raise SecurityError(f"chat template tried to access attribute {attribute!r} of a "
                            f"{type(obj).__name__!r} object, which the sandbox does not allow")

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * max(count, 0) > MAX_SEQUENCE_PRODUCT:
                        raise SecurityError("chat template tried to build a sequence longer than "
                                            f"{MAX_SEQUENCE_PRODUCT} items with '*'")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
                raise SecurityError(f"chat template used an exponent above {MAX_POWER_EXPONENT}")
        return super().call_binop(context, operator, left, right)


class _BoundedRange:
    """range() for templates: jinja's sandbox length cap, plus the deadline checked while iterating,
    so that nested loops with empty bodies (which call nothing) still stop. Supports what templates
    do with ranges: iterate, len/|length, index, `in`, reverse."""

    def __init__(self, *args):
        self._range = range(*args)
        if len(self._range) > jinja2.sandbox.MAX_RANGE:
            raise SecurityError(f"chat template range() is too big (more than {jinja2.sandbox.MAX_RANGE} items)")

    def __iter__(self):
        return _checked(self._range)

    def __reversed__(self):
        return _checked(reversed(self._range))

    def __len__(self):
        return len(self._range)

    def __getitem__(self, index):
        return self._range[index]

    def __contains__(self, value):
        return value in self._range


def _checked(values):
    for i, value in enumerate(values):
        if i % 1024 == 0:
            _check_deadline()
        yield value


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which changes prompts; transformers
    # uses plain json.dumps with these options, and so do we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` in templates without exposing the dict type itself (and its class attributes).
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names (no route to CPython internals)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


@functools.lru_cache(maxsize=1)
def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["range"] = _BoundedRange
    return env


@functools.lru_cache(maxsize=64)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile once per template source (the server renders the same template for every request)."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def resolve_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template`` accepts a file path or the template itself (as vLLM does)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("chat template must be a non-empty string (a file path or a Jinja template)")
    looks_like_template = any(c in value for c in "{}\n")
    if not looks_like_template or os.path.isfile(value):
        try:
            with open(os.path.expanduser(value), encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            if not looks_like_template:
                raise ValueError(f"chat template {value!r} looks like a file path but could not be read: {e}") from e
    return value


# --------------------------------------------------------------------------------------------
# Content format: does the template want `content` as a string, or iterate over OpenAI parts?
# --------------------------------------------------------------------------------------------

def _is_content_access(node: jinja2.nodes.Node) -> bool:
    # message['content'] / message.content (optionally through a filter, e.g. `message.content | list`)
    while isinstance(node, jinja2.nodes.Filter) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return False


@functools.lru_cache(maxsize=64)
def detect_content_format(source: str) -> str:
    """"openai" if the template loops over a message's content (parts), else "string".

    A loop target can be the content itself (`for part in message['content']`) or a variable that
    was set from it (`{% set content = message.content %}...{% for part in content %}`).
    """
    try:
        ast = _environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e
    content_vars = set()
    for assign in ast.find_all(jinja2.nodes.Assign):
        if isinstance(assign.target, jinja2.nodes.Name) and _is_content_access(assign.node):
            content_vars.add(assign.target.name)
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if _is_content_access(it):
            return "openai"
        if isinstance(it, jinja2.nodes.Name) and it.name in content_vars:
            return "openai"
    return "string"


# --------------------------------------------------------------------------------------------
# Messages: validation and normalization
# --------------------------------------------------------------------------------------------

def _text_of_parts(parts: Sequence[Any], where: str) -> list[str]:
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):  # tolerated: a bare string part is its own text
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ValueError(f"{where}: content part {j} must be an object with 'type' and 'text', got {part!r}")
        ptype = part.get("type", "text")
        if ptype != "text":
            raise ValueError(f"{where}: content part {j} has type {ptype!r}; only 'text' parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: content part {j} of type 'text' needs a string 'text' field")
        texts.append(text)
    return texts


def validate_messages(messages: Any) -> None:
    """Raise ValueError for what no chat template can render: no messages, unknown roles, bad content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message objects")
    if len(messages) == 0:
        raise ValueError("messages must contain at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; allowed roles are {', '.join(ALLOWED_ROLES)}")
        content = msg.get("content")
        if content is None:
            if role != "assistant":  # an assistant turn may carry only tool_calls
                raise ValueError(f"messages[{i}] ({role}) has no 'content'")
        elif isinstance(content, str):
            pass
        elif isinstance(content, Sequence):
            _text_of_parts(content, f"messages[{i}]")
        else:
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")


def _plain(value: Any) -> Any:
    # The template sees only JSON-shaped data: pydantic models are dumped, subclasses of str/int
    # (enums, numpy scalars) lose their extra methods, unknown objects become inert placeholders.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any, content_format: str) -> list[dict]:
    """Validated, plain copies of the messages in the shape the template expects.

    "string": a list of text parts becomes their texts joined by newlines (vLLM's rule).
    "openai": string content becomes one text part, parts stay a list of {"type": "text", "text"}.
    Keys whose value is None are dropped (transformers does the same, so `message.content is
    defined` tests behave alike). Tool-call arguments given as JSON strings are parsed, since
    templates render them with `tojson`.
    """
    if content_format not in ("string", "openai"):
        raise ValueError(f"content format must be 'string' or 'openai', got {content_format!r}")
    if isinstance(messages, (list, tuple)):
        messages = [_plain(m) if not isinstance(m, (str, bytes)) else m for m in messages]
    validate_messages(messages)
    out = []
    for i, msg in enumerate(messages):
        msg = {k: v for k, v in msg.items() if v is not None}
        content = msg.get("content")
        if isinstance(content, list):
            texts = _text_of_parts(content, f"messages[{i}]")
            if content_format == "string":
                msg["content"] = "\n".join(texts)
            else:
                msg["content"] = [{"type": "text", "text": t} for t in texts]
        elif isinstance(content, str) and content_format == "openai":
            msg["content"] = [{"type": "text", "text": content}]
        tool_calls = msg.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass  # not JSON: the template gets the string as the client sent it
        out.append(msg)
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def render_chat_template(
    template: Optional[str],
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: Optional[list] = None,
    documents: Optional[list] = None,
    special_tokens: Optional[Mapping[str, str]] = None,
    content_format: str = "auto",
    timeout_s: float = DEFAULT_RENDER_TIMEOUT_S,
    **template_kwargs: Any,
) -> str:
    """Render a conversation to prompt text, as transformers' ``apply_chat_template(tokenize=False)``.

    ``special_tokens`` are the variables transformers passes from the tokenizer (bos_token,
    eos_token, ...); ``template_kwargs`` are extra template variables and override them.
    ``continue_final_message`` leaves the final (assistant) message open so that generation
    continues it; it cannot be combined with ``add_generation_prompt``.
    """
    if template is None:
        raise ChatTemplateError("this model has no chat template; pass one with --chat-template "
                                "(a file path or the template text) or use the completions API")
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat template content format must be one of {', '.join(CONTENT_FORMATS)}, "
                         f"got {content_format!r}")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the first "
                         "continues the last message, the second starts a new assistant message")
    compiled = compile_chat_template(template)
    if content_format == "auto":
        content_format = detect_content_format(template)
    chat = normalize_messages(messages, content_format)
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be a list of JSON-schema objects")
    if documents is not None:
        if not isinstance(documents, list) or not all(isinstance(d, Mapping) for d in documents):
            raise ValueError("documents must be a list of objects (e.g. with 'title' and 'text')")

    continued_text = None
    if continue_final_message:
        last = chat[-1]
        content = last.get("content")
        if isinstance(content, str):
            continued_text = content
            last["content"] = content + _CONTINUE_TAG
        elif isinstance(content, list) and content:
            continued_text = content[-1]["text"]
            content[-1]["text"] = continued_text + _CONTINUE_TAG
        else:
            raise ValueError("continue_final_message is set but the final message has no text content to continue")

    variables = dict(_plain(dict(special_tokens or {})))
    variables.update(_plain(template_kwargs))
    variables.update(messages=chat, tools=_plain(tools), documents=_plain(documents),
                     add_generation_prompt=bool(add_generation_prompt))
    text = _render_bounded(compiled, variables, timeout_s)

    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if tag not in text or continued_text.strip() not in text:
            raise ChatTemplateError("continue_final_message is set but the chat template does not render the "
                                    "final message's content verbatim, so it cannot be continued")
        at = text.rindex(tag)
        if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            text = text[:at]            # the template kept the message's spacing as is
        else:
            text = text[:at].rstrip()   # the template trimmed the content, and with it our tag's space
    return text


def _render_bounded(compiled: jinja2.Template, variables: dict, timeout_s: float) -> str:
    token = _deadline.set(time.monotonic() + timeout_s)
    try:
        chunks, size = [], 0
        # generate() yields output as it is produced, so a loop that only prints is stopped too.
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise ChatTemplateError(f"chat template output exceeds {MAX_RENDERED_CHARS} characters")
            chunks.append(chunk)
            _check_deadline()
        return "".join(chunks)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from e
    except jinja2.TemplateError as e:  # raise_exception(...) and template runtime errors
        raise ChatTemplateError(f"chat template error: {e.message or e}") from e
    except RecursionError as e:
        raise ChatTemplateError("chat template recursed too deeply") from e
    except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
            ValueError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _deadline.reset(token)
