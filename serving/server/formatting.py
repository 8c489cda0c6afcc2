"""Engine outputs -> OpenAI response pieces: logprobs in both API dialects, usage, finish reasons."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from serving.outputs import Logprob

# JSON has no -inf; vLLM reports it as this number.
_NEG_INF_LOGPROB = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _NEG_INF_LOGPROB


def token_text(tokenizer, token_id: int, entry: Optional[Logprob]) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _ranked(position: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    # Rank 1 is the most likely token; entries without a rank (the chosen token when it is outside the
    # top-k, in some engines) sort by logprob after the ranked ones.
    return sorted(position.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))


def completion_logprobs(tokenizer, token_ids: Sequence[int], positions: Sequence[Optional[dict[int, Logprob]]],
                        num_top: int, text_offset: int) -> tuple[dict, int]:
    """The completions API's logprobs object for `token_ids`, and the text offset after them.

    `positions[i]` is None for a position without logprobs (the first prompt token under echo).
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, position in zip(token_ids, positions):
        chosen = position.get(token_id) if position else None
        text = token_text(tokenizer, token_id, chosen)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if position is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
        top: dict[str, float] = {}
        for rank_index, (tid, entry) in enumerate(_ranked(position)):
            if rank_index < num_top or tid == token_id:
                top[token_text(tokenizer, tid, entry)] = _finite(entry.logprob)
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}, text_offset


def chat_logprobs(tokenizer, token_ids: Sequence[int], positions: Sequence[Optional[dict[int, Logprob]]],
                  num_top: int) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for token_id, position in zip(token_ids, positions):
        position = position or {}
        chosen = position.get(token_id)
        text = token_text(tokenizer, token_id, chosen)
        top = []
        for tid, entry in _ranked(position)[:num_top]:
            t = token_text(tokenizer, tid, entry)
            top.append({"token": t, "logprob": _finite(entry.logprob), "bytes": list(t.encode("utf-8"))})
        content.append({"token": text, "logprob": _finite(chosen.logprob) if chosen is not None else _NEG_INF_LOGPROB,
                        "bytes": list(text.encode("utf-8")), "top_logprobs": top})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> dict:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out

