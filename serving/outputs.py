"""What the engine hands back to callers, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional


class RequestOutputKind(enum.Enum):
    """Which RequestOutputs a request gets (vLLM's ``RequestOutputKind``).

    CUMULATIVE: after every step that touched it, everything so far (text, token ids, logprobs).
    DELTA: after every step that touched it, only what is new since its previous output: each
      completion's text, token_ids and logprobs, and the prompt_logprobs positions computed since
      (an empty list when none). Nothing that came before is copied again: what a streaming
      consumer wants. cumulative_logprob, finish_reason and the metrics stay cumulative.
    FINAL_ONLY: one output, when the request has finished, with everything (what ``LLM.generate``
      uses: no RequestOutput is built while the request runs).
    """
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (the chosen token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[PositionLogprobs]] = None
    finish_reason: Optional[str] = None        # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None       # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclasses.dataclass
class RequestOutput:
    """One request's state after a step: cumulative (all text and tokens so far) or, for a request
    added with RequestOutputKind.DELTA, only what that step added (see RequestOutputKind)."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None
