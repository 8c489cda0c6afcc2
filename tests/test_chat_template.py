"""serving.chat_template: our sandboxed renderer against transformers' apply_chat_template."""

import copy
import datetime
import time

import pytest

from serving.chat_template import (
    ChatTemplateError,
    compile_chat_template,
    detect_content_format,
    normalize_messages,
    render_chat_template,
    resolve_chat_template,
    validate_messages,
)
from serving.tokenizer import _gguf_chat_template
from tests.test_tokenizer import find_smollm2_gguf

# Llama-3-Instruct's template (bos, header ids, trimmed content).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5-Instruct's template: default system prompt, tools as JSON, tool calls and tool responses.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-Instruct style: strict role alternation via raise_exception, content given as parts.
MISTRAL = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' }}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}
        {%- endfor %}
        {{- ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- for part in message['content'] %}{{- ' ' + part['text'] }}{%- endfor %}
        {%- if not loop.last %}{{- eos_token }}{%- endif %}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

SPECIALS = {
    "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    "qwen": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "mistral": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    "smollm2": dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                    pad_token="<|im_end|>"),
}


def _hf_tokenizer(specials):
    """A transformers tokenizer carrying only the special tokens (all apply_chat_template reads)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk0>": 0}, unk_token="<unk0>")),
                                   **specials)


@pytest.fixture(scope="module")
def templates():
    return {"llama3": LLAMA3, "qwen": QWEN25, "mistral": MISTRAL, "smollm2": _gguf_chat_template(find_smollm2_gguf())}


@pytest.fixture(scope="module")
def hf_tokenizers():
    return {name: _hf_tokenizer(sp) for name, sp in SPECIALS.items()}


def _flatten(messages):
    """What the string content format sends the template: text parts joined by newlines."""
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
    return out


def _as_parts(messages):
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m.get("content"), str):
            m["content"] = [{"type": "text", "text": m["content"]}]
    return out


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  and 3+3, naïve café 你好 🎉?  "}],
    [{"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]}],
    [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn moonlight -"}],
]


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen", "mistral"])
def test_matches_transformers(name, templates, hf_tokenizers):
    template, hf = templates[name], hf_tokenizers[name]
    fmt = detect_content_format(template)
    assert fmt == ("openai" if name == "mistral" else "string")
    checked = 0
    for conv in CONVERSATIONS:
        if name == "mistral" and conv[0]["role"] == "system":
            continue  # this template rejects system messages (tested below)
        reference_input = _as_parts(conv) if fmt == "openai" else _flatten(conv)
        modes = [dict(add_generation_prompt=True), dict(add_generation_prompt=False)]
        if conv[-1]["role"] == "assistant":
            modes.append(dict(add_generation_prompt=False, continue_final_message=True))
        for mode in modes:
            ours = render_chat_template(template, conv, special_tokens=hf.special_tokens_map, **mode)
            ref = hf.apply_chat_template(reference_input, chat_template=template, tokenize=False, **mode)
            assert ours == ref, (name, conv, mode)
            checked += 1
    assert checked >= 9


def test_continue_final_message_leaves_message_open(templates, hf_tokenizers):
    conv = CONVERSATIONS[4]
    for name in ("smollm2", "llama3", "qwen"):
        text = render_chat_template(templates[name], conv, add_generation_prompt=False, continue_final_message=True,
                                    special_tokens=hf_tokenizers[name].special_tokens_map)
        assert text.endswith("Autumn moonlight -"), name
    with pytest.raises(ValueError, match="cannot both"):
        render_chat_template(LLAMA3, conv, add_generation_prompt=True, continue_final_message=True)


def test_qwen_tools_and_tool_calls(hf_tokenizers):
    hf = hf_tokenizers["qwen"]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city <b>now</b> & later",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich"}},
                       "required": ["city"]}}}]
    conv = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
    ]
    for use_tools in (tools, None):
        ours = render_chat_template(QWEN25, conv, tools=use_tools, special_tokens=hf.special_tokens_map)
        ref = hf.apply_chat_template(conv, tools=use_tools, chat_template=QWEN25, tokenize=False,
                                     add_generation_prompt=True)
        assert ours == ref
    assert '"description": "Weather in a city <b>now</b> & later"' in ours or use_tools is None
    # OpenAI clients send arguments as a JSON string; templates get the parsed object (as vLLM does).
    as_string = copy.deepcopy(conv)
    as_string[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Zürich"}'
    assert render_chat_template(QWEN25, as_string, tools=tools, special_tokens=hf.special_tokens_map) == \
        render_chat_template(QWEN25, conv, tools=tools, special_tokens=hf.special_tokens_map)


def test_mistral_raise_exception_for_role_alternation():
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat_template(MISTRAL, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat_template(MISTRAL, [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}])


def test_filters_and_globals(hf_tokenizers):
    template = ("{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ tools | tojson(separators=(',', ':')) }}|"
                "{{ strftime_now('%Y') }}|{% set ns = namespace(n=0) %}{% for m in messages %}"
                "{% set ns.n = ns.n + 1 %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}|"
                "{{ dict(a=1) | tojson }}|{{ extra }}")
    tools = [{"name": "f", "d": "<é & ü>"}]
    msgs = [{"role": "user", "content": "x"}] * 3
    hf = hf_tokenizers["llama3"]
    ours = render_chat_template(template, msgs, tools=tools, extra="kw")
    assert ours == hf.apply_chat_template(msgs, tools=tools, chat_template=template, tokenize=False, extra="kw")
    assert f"|{datetime.datetime.now().year}|" in ours and '"<é & ü>"' in ours
    # template kwargs override the tokenizer's special-token variables, as in transformers
    assert render_chat_template("{{ bos_token }}", msgs, special_tokens={"bos_token": "<s>"}) == "<s>"
    assert render_chat_template("{{ bos_token }}", msgs, special_tokens={"bos_token": "<s>"}, bos_token="B") == "B"


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__ }}", "__class__"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "__class__"),
    ("{{ raise_exception.__globals__ }}", "__globals__"),
    ("{{ cycler.__init__.__globals__.os }}", "__init__"),
    ("{% set x = [] %}{{ x.append(1) }}", "append"),
    ("{% set d = {} %}{{ d.update({'a': 1}) }}", "update"),
    ("{{ messages.pop() }}", "pop"),
    ("{% set ns = namespace() %}{% set ns._secret = 1 %}", "underscore"),
    ("{{ 'x' * 100000000 }}", "longer than"),
    ("{{ 2 ** 100000000 }}", "exponent"),
    ("{{ range(10**9) | length }}", "too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
])
def test_sandbox_refuses_malicious_templates(template, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set k = messages[0] %}{% endfor %}{% endfor %}",
])
def test_render_deadline(template):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="time limit"):
        render_chat_template(template, [{"role": "user", "content": "x"}], timeout_s=0.3)
    assert time.monotonic() - start < 5


def test_errors_and_validation(tmp_path):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, msgs)
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat_template("{% for m in messages %}", msgs)
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        render_chat_template("{{ messages[0].content + 1 }}", msgs)
    for bad, match in [([], "at least one"), ("hello", "list"), ([{"role": "wizard", "content": "x"}], "wizard"),
                       ([{"content": "x"}], "role None"), (["x"], "object"),
                       ([{"role": "user", "content": 5}], "string or a list"),
                       ([{"role": "user"}], "no 'content'"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url")]:
        with pytest.raises(ValueError, match=match):
            validate_messages(bad)
        with pytest.raises(ValueError, match=match):
            render_chat_template(LLAMA3, bad)
    for role in ("system", "user", "assistant", "tool", "developer"):
        validate_messages([{"role": role, "content": "ok"}])
    validate_messages([{"role": "assistant", "content": None, "tool_calls": []}])
    with pytest.raises(ValueError, match="content format"):
        render_chat_template(LLAMA3, msgs, content_format="xml")


def test_content_format_detection_and_normalization():
    assert detect_content_format(LLAMA3) == "string"
    assert detect_content_format(MISTRAL) == "openai"
    assert detect_content_format("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}"
                                 "{% endfor %}") == "openai"
    assert detect_content_format("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p.text }}"
                                 "{% endfor %}{% endfor %}") == "openai"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert normalize_messages(parts, "string")[0]["content"] == "a\nb"
    assert normalize_messages([{"role": "user", "content": "a"}], "openai")[0]["content"] == \
        [{"type": "text", "text": "a"}]
    # a forced format wins over detection
    assert render_chat_template("{{ messages[0].content }}", parts, content_format="openai") == \
        str([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])


def test_resolve_chat_template_and_cache(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages | length }}")
    assert resolve_chat_template(str(f)) == "{{ messages | length }}"
    assert resolve_chat_template("{{ 1 }}") == "{{ 1 }}"
    assert resolve_chat_template(None) is None
    with pytest.raises(ValueError, match="file path"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError):
        resolve_chat_template("  ")
    assert compile_chat_template(LLAMA3) is compile_chat_template(LLAMA3)


def test_pydantic_messages_render_like_dicts():
    import pydantic

    class Message(pydantic.BaseModel):
        role: str
        content: str | None = None

    as_models = [Message(role="user", content="hi"), Message(role="assistant", content="yo")]
    as_dicts = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_chat_template(LLAMA3, as_models, special_tokens=SPECIALS["llama3"]) == \
        render_chat_template(LLAMA3, as_dicts, special_tokens=SPECIALS["llama3"])
    with pytest.raises(ValueError, match="wizard"):
        render_chat_template(LLAMA3, [Message(role="wizard", content="x")])
