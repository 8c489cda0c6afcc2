"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams`` (same names, same defaults).

Validation happens in two places, both before a request enters the engine:

* ``__post_init__`` checks what the values alone decide (ranges, types, consistency);
* ``verify(vocab_size=..., max_logprobs=...)`` checks what depends on the model and the engine
  (token ids inside the vocabulary, logprobs within ``--max-logprobs``, bounded stop strings).

Every error is a ``SamplingParamsError`` (a ``ValueError``) whose ``.param`` names the OpenAI request
field at fault, so the HTTP layer can fill the error envelope's ``param``.

The object is frozen: the engine changes a request's parameters with ``clone(**changes)`` (which
validates again) instead of mutating a value the caller may share between requests.
No jax here: this module is host bookkeeping.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Union

logger = logging.getLogger(__name__)

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS); top_p/top_k/min_p are then moot.
SAMPLING_EPS = 1e-5
# Temperatures in (0, MIN_TEMPERATURE) overflow the scaled logits; vLLM raises them to this value.
MIN_TEMPERATURE = 1e-2
# OpenAI's documented range for logit_bias values.
MAX_ABS_LOGIT_BIAS = 100.0
# Bounds on stop strings: the detokenizer scans a window of the text for each of them every step.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; ``param`` is the OpenAI request field it came from."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                                   # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None         # normalised to a list
    stop_token_ids: Optional[list[int]] = None       # normalised to a list
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16                   # None: up to the context limit
    min_tokens: int = 0
    logprobs: Optional[int] = None                   # top alternatives per token; 0: chosen token only
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    truncate_prompt_tokens: Optional[int] = None     # keep the last k prompt tokens; -1: up to max_model_len

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)

        def check(cond, msg, param):
            if not cond:
                raise SamplingParamsError(msg, param)

        # --- types and normalisation -----------------------------------------------------------
        for name in ("n", "top_k", "min_tokens"):
            check(_is_int(getattr(self, name)), f"{name} must be an integer, got {getattr(self, name)!r}.", name)
        for name in ("best_of", "seed", "max_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            value = getattr(self, name)
            check(value is None or _is_int(value), f"{name} must be an integer or null, got {value!r}.", name)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            value = getattr(self, name)
            check(_is_number(value), f"{name} must be a number, got {value!r}.", name)
            set_(name, float(value))

        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        else:
            stop = list(stop)
        check(all(isinstance(s, str) for s in stop), f"stop must be a string or a list of strings, got {self.stop!r}.",
              "stop")
        set_("stop", stop)

        stop_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        check(all(_is_int(t) and t >= 0 for t in stop_ids),
              f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}.", "stop_token_ids")
        set_("stop_token_ids", stop_ids)

        if self.logit_bias is not None:
            bias = {}
            for token, value in dict(self.logit_bias).items():
                # JSON object keys are strings ("50256": -100); accept their integer spelling.
                try:
                    token_id = int(token) if isinstance(token, str) else token
                except ValueError:
                    token_id = None
                check(_is_int(token_id) and token_id >= 0,
                      f"logit_bias keys must be non-negative token ids, got {token!r}.", "logit_bias")
                check(_is_number(value), f"logit_bias values must be numbers, got {value!r} for token {token_id}.",
                      "logit_bias")
                check(-MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS,
                      f"logit_bias values must be in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}], "
                      f"got {value} for token {token_id}.", "logit_bias")
                bias[token_id] = float(value)
            set_("logit_bias", bias or None)

        if self.allowed_token_ids is not None:
            allowed = list(self.allowed_token_ids)
            check(len(allowed) > 0, "allowed_token_ids is not allowed to be empty.", "allowed_token_ids")
            check(all(_is_int(t) and t >= 0 for t in allowed),
                  f"allowed_token_ids must be a list of non-negative integers, got {self.allowed_token_ids!r}.",
                  "allowed_token_ids")
            set_("allowed_token_ids", allowed)

        # --- ranges (messages follow vLLM's) -------------------------------------------------------
        check(self.n >= 1, f"n must be at least 1, got {self.n}.", "n")
        if self.best_of is not None:
            check(self.best_of >= self.n,
                  f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.", "best_of")
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.", "presence_penalty")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.", "frequency_penalty")
        check(self.repetition_penalty > 0.0,
              f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.", "repetition_penalty")
        check(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}.", "temperature")
        check(self.temperature != float("inf"), "temperature must be finite, got inf.", "temperature")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        check(self.top_k >= -1, f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.", "top_k")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.", "min_p")
        if self.seed is not None:
            check(_INT64_MIN <= self.seed <= _INT64_MAX, f"seed must fit in a signed 64-bit integer, got {self.seed}.",
                  "seed")
        if self.max_tokens is not None:
            check(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        check(self.min_tokens >= 0, f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.",
              "min_tokens")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens,
                  f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.",
                  "min_tokens")
        if self.logprobs is not None:
            check(self.logprobs >= 0, f"logprobs must be non-negative, got {self.logprobs}.", "logprobs")
        if self.prompt_logprobs is not None:
            check(self.prompt_logprobs >= 0, f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.",
                  "prompt_logprobs")
        if self.truncate_prompt_tokens is not None:
            check(self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1,
                  f"truncate_prompt_tokens must be >= 1 or -1, got {self.truncate_prompt_tokens}.",
                  "truncate_prompt_tokens")
        check(all(len(s) > 0 for s in stop), "stop cannot contain an empty string.", "stop")
        check(not stop or self.detokenize,
              "stop strings are only supported when detokenize is True. Set detokenize=True to use stop.", "stop")

        # --- greedy normalisation ---------------------------------------------------------------
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation parameters change nothing; reset them so that the sampler's
            # "does any row need a sort" test is not tripped by a greedy request.
            check(self.best_of is None or self.best_of == 1,
                  f"best_of must be 1 when using greedy sampling, got {self.best_of}.", "best_of")
            set_("top_p", 1.0)
            set_("top_k", 0)
            set_("min_p", 0.0)
        elif self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is less than %s, which may cause numerical errors nan or inf in "
                           "tensors. It has been raised to %s.", self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            set_("temperature", MIN_TEMPERATURE)
        if self.top_k == -1:
            set_("top_k", 0)

    # ------------------------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """Greedy decoding (argmax of the penalised logits): temperature below ``SAMPLING_EPS``."""
        return self.temperature < SAMPLING_EPS

    def all_stop_token_ids(self, eos_token_ids=()) -> list[int]:
        """Token ids that end the request: ``stop_token_ids`` plus the model's EOS ids unless ``ignore_eos``.

        These are also the ids the sampler suppresses until ``min_tokens`` tokens are generated.
        """
        ids = list(self.stop_token_ids)
        if not self.ignore_eos:
            ids += [int(t) for t in eos_token_ids if int(t) not in ids]
        return ids

    def verify(self, *, vocab_size: int, max_logprobs: int,
               max_stop_strings: int = MAX_STOP_STRINGS, max_stop_string_len: int = MAX_STOP_STRING_LEN) -> None:
        """Checks that depend on the model and the engine; raises ``SamplingParamsError``."""
        def check(cond, msg, param):
            if not cond:
                raise SamplingParamsError(msg, param)

        if self.logprobs is not None:
            check(self.logprobs <= max_logprobs,
                  f"Requested sample logprobs of {self.logprobs}, which is greater than max allowed: {max_logprobs}",
                  "logprobs")
        if self.prompt_logprobs is not None:
            check(self.prompt_logprobs <= max_logprobs,
                  f"Requested prompt logprobs of {self.prompt_logprobs}, which is greater than max allowed: "
                  f"{max_logprobs}", "prompt_logprobs")
        if self.logit_bias:
            bad = sorted(t for t in self.logit_bias if t >= vocab_size)
            check(not bad, f"token_id(s) {bad} in logit_bias contain out-of-vocab token ids. "
                           f"Vocabulary size: {vocab_size}", "logit_bias")
        if self.allowed_token_ids is not None:
            bad = sorted(t for t in self.allowed_token_ids if t >= vocab_size)
            check(not bad, f"allowed_token_ids contains out-of-vocab token id(s) {bad}. Vocabulary size: {vocab_size}",
                  "allowed_token_ids")
        bad = sorted(t for t in self.stop_token_ids if t >= vocab_size)
        check(not bad, f"stop_token_ids contains out-of-vocab token id(s) {bad}. Vocabulary size: {vocab_size}",
              "stop_token_ids")
        check(len(self.stop) <= max_stop_strings,
              f"at most {max_stop_strings} stop strings are supported, got {len(self.stop)}.", "stop")
        long = [s for s in self.stop if len(s) > max_stop_string_len]
        check(not long, f"stop strings must be at most {max_stop_string_len} characters long, "
                        f"got one of {len(long[0]) if long else 0}.", "stop")

    def clone(self, **changes) -> "SamplingParams":
        """A copy with ``changes`` applied (validated again). Lists and dicts are copied, not shared.

        For ``n > 1`` fan-out use ``for_sample(index)``.
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("stop", "stop_token_ids", "allowed_token_ids"):
            if fields[name] is not None:
                fields[name] = list(fields[name])
        if fields["logit_bias"] is not None:
            fields["logit_bias"] = dict(fields["logit_bias"])
        fields.update(changes)
        return SamplingParams(**fields)

    def for_sample(self, index: int) -> "SamplingParams":
        """The parameters of sample ``index`` of an ``n``-way request: one sample each (``n=1``).

        As in vLLM, a seeded parent gives sample ``i`` the seed ``seed + i`` so that the samples
        differ from each other yet stay reproducible.
        """
        if not 0 <= index < max(self.n, self.best_of or 0):
            raise ValueError(f"sample index must be in [0, {max(self.n, self.best_of or 0)}), got {index}")
        seed = None
        if self.seed is not None:
            # Wrap inside int64 so that seed + index stays a valid seed.
            seed = (self.seed + index - _INT64_MIN) % 2 ** 64 + _INT64_MIN
        return self.clone(n=1, best_of=None, seed=seed)
