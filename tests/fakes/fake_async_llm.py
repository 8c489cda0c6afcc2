"""A hand-computable stand-in for serving.async_llm.AsyncLLM, for the HTTP server's tests.

Tokenizer: one token per UTF-8 byte, id = 3 + byte; 0 = <pad>, 1 = <s> (BOS, added when
add_special_tokens), 2 = </s> (EOS). So "ab" encodes to [1, 100, 101] and decodes back to "ab".

Model: sample j of a request emits the prompt's non-special tokens cyclically, starting at offset j:
prompt "abc" -> sample 0 generates "abcabc...", sample 1 "bcabca...". One token per sample per step.
Logprobs: the chosen token has logprob -0.5 (rank 1); alternative r (r = 1..k) is the next byte
value r places on, with logprob -0.5 - r (rank r + 1). Prompt logprobs: None, then -1.0 (rank 1).

Stops follow SamplingParams (max_tokens -> "length"; stop strings and stop/EOS ids -> "stop"), so
the server's formatting can be checked against numbers computed by hand. Like the engine's
detokenizer, text that could still become a stop string is held back until it cannot (or the sample
ends), so text once given out is never taken back.

Outputs follow ``output_kind`` (serving.outputs.RequestOutputKind) as the engine's do: CUMULATIVE
(everything so far, every step), DELTA (what each step added; prompt logprobs in the first output)
or FINAL_ONLY (one output at the end). ``output_kinds`` records what each request asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import types
from typing import AsyncIterator, Optional

from serving.config import EngineArgs
from serving.engine import EngineStats
from serving.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RequestOutputKind
from serving.sampling_params import SamplingParams

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
_OFFSET = 3

DEFAULT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class FakeTokenizer:
    vocab_size = 256 + _OFFSET
    eos_token_id = EOS
    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> str:
        parts, buf = [], bytearray()
        for t in ids:
            if t in _SPECIALS:
                if skip_special_tokens:
                    continue
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                parts.append(_SPECIALS[t])
            else:
                buf.append(t - _OFFSET)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [_SPECIALS.get(t) or chr(t - _OFFSET) for t in ids]

    def apply_chat_template(self, messages, *, add_generation_prompt=True, continue_final_message=False,
                            chat_template=None, tools=None, **template_kwargs) -> str:
        from serving.chat_template import render_chat_template
        return render_chat_template(chat_template or DEFAULT_TEMPLATE, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, tools=tools, **template_kwargs)


def _held_back(text: str, stops) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class FakeAsyncLLM:
    def __init__(self, *, max_model_len: int = 128, max_logprobs: int = 5, served_model_name: Optional[str] = None,
                 default_sampling: Optional[dict] = None, step_delay: float = 0.0):
        self.tokenizer = FakeTokenizer()
        self.model_config = types.SimpleNamespace(vocab_size=FakeTokenizer.vocab_size)
        self.engine_args = EngineArgs(max_logprobs=max_logprobs, served_model_name=served_model_name)
        self.max_model_len = max_model_len
        self.model_name = "fake-model"
        self.default_sampling = dict(default_sampling or {})
        self.step_delay = step_delay
        self.is_dead = False
        self.fail_after_steps: Optional[int] = None   # test hook: raise inside generate after this many steps
        self.stats = EngineStats(compilations=3, bucket_padding_ratio=0.25)   # the engine's own counters
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.requests: list[tuple[list[int], SamplingParams, str, dict]] = []
        self.output_kinds: dict[str, RequestOutputKind] = {}
        self.shut_down = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "FakeAsyncLLM":
        return cls(max_model_len=args.max_model_len or 128, max_logprobs=args.max_logprobs,
                   served_model_name=args.served_model_name)

    def get_stats(self) -> EngineStats:
        self.stats.num_requests_running = len(self.running)
        return dataclasses.replace(self.stats)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    async def shutdown(self) -> None:
        self.shut_down = True

    # ------------------------------------------------------------------------------------------
    def _logprobs(self, token: int, k: int) -> dict[int, Logprob]:
        out = {token: Logprob(-0.5, 1, self.tokenizer.decode([token], skip_special_tokens=False))}
        for r in range(1, k + 1):
            alt = _OFFSET + (token - _OFFSET + r) % 256
            out.setdefault(alt, Logprob(-0.5 - r, r + 1, self.tokenizer.decode([alt])))
        return out

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str, *, priority: int = 0,
                       cache_salt: Optional[str] = None,
                       output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        if not isinstance(output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {output_kind!r}")
        params = sampling_params
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_model_len={self.max_model_len}")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} is too large for a prompt of {len(ids)} tokens "
                             f"(max_model_len={self.max_model_len})")
        self.requests.append((ids, params, request_id, {"priority": priority, "cache_salt": cache_salt}))
        self.output_kinds[request_id] = output_kind
        max_tokens = params.max_tokens or (self.max_model_len - len(ids))
        content = [t for t in ids if t >= _OFFSET] or [_OFFSET + ord("x")]
        stop_ids = params.all_stop_token_ids([EOS])
        metrics = RequestMetrics(arrival_time=time.time())
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [{t: Logprob(-1.0, 1, self.tokenizer.decode([t], skip_special_tokens=False))}
                                   for t in ids[1:]]
        samples = [CompletionOutput(index=j, text="", token_ids=[],
                                    logprobs=[] if params.logprobs is not None else None) for j in range(params.n)]
        sent = [(0, 0)] * params.n                     # DELTA: (text, tokens) earlier outputs carried
        self.running.add(request_id)
        self.stats.prompt_tokens += len(ids)
        step = 0
        try:
            while True:
                await asyncio.sleep(self.step_delay)
                if self.fail_after_steps is not None and step >= self.fail_after_steps:
                    raise RuntimeError("injected engine failure")
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = time.time()
                for j, s in enumerate(samples):
                    if s.finish_reason is not None:
                        continue
                    token = content[(len(s.token_ids) + j) % len(content)]
                    s.token_ids.append(token)
                    self.stats.generation_tokens += 1
                    if s.logprobs is not None:
                        s.logprobs.append(self._logprobs(token, params.logprobs))
                    text = self.tokenizer.decode(s.token_ids, skip_special_tokens=params.skip_special_tokens)
                    if token in stop_ids and len(s.token_ids) >= params.min_tokens:
                        s.finish_reason, s.stop_reason = "stop", (None if token == EOS else token)
                        text = self.tokenizer.decode(s.token_ids[:-1], skip_special_tokens=params.skip_special_tokens)
                    for stop in params.stop:
                        at = text.find(stop)
                        if at >= 0 and s.finish_reason is None:
                            text = text[:at + len(stop)] if params.include_stop_str_in_output else text[:at]
                            s.finish_reason, s.stop_reason = "stop", stop
                    if s.finish_reason is None and len(s.token_ids) >= max_tokens:
                        s.finish_reason = "length"
                    if s.finish_reason is None:
                        text = text[:len(text) - _held_back(text, params.stop)]
                    s.text = text
                step += 1
                now = time.time()
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
                finished = all(s.finish_reason is not None for s in samples)
                if finished:
                    metrics.finished_time = now
                    self.running.discard(request_id)
                    self.finished.append(request_id)
                if output_kind is RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                if output_kind is RequestOutputKind.DELTA:
                    outputs = [dataclasses.replace(s, text=s.text[t:], token_ids=s.token_ids[k:],
                                                   logprobs=None if s.logprobs is None else s.logprobs[k:])
                               for s, (t, k) in zip(samples, sent)]
                    sent = [(len(s.text), len(s.token_ids)) for s in samples]
                    prompt_out = None if prompt_lps is None else (prompt_lps if step == 1 else [])
                else:
                    outputs = [dataclasses.replace(s, token_ids=list(s.token_ids),
                                                   logprobs=list(s.logprobs) if s.logprobs is not None else None)
                               for s in samples]
                    prompt_out = prompt_lps
                yield RequestOutput(
                    request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=list(ids), outputs=outputs, finished=finished, prompt_logprobs=prompt_out,
                    metrics=dataclasses.replace(metrics))
                if finished:
                    return
        finally:
            # Closed or cancelled before finishing: the consumer left, so the request is aborted.
            if request_id in self.running:
                self.running.discard(request_id)
                self.aborted.append(request_id)
