"""Incremental detokenization with stop strings, for streaming.

Decoding each new token on its own is wrong (byte-level BPE splits UTF-8 characters across tokens;
SentencePiece decoders drop the leading space of the first token they see), and decoding the whole
output every step is quadratic. Like vLLM's ``detokenize_incrementally`` we decode a small window:

    ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                 '---- already emitted ---'  '--- new tokens ---'
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]

Both decodes start at the same token, so whatever the decoder does at a window's start (strip a
leading space) it does to both, and the difference is exactly what the new tokens add in context.
A window whose text ends in U+FFFD is an incomplete UTF-8 character: it is held until the next token
completes it (or until the request finishes, when the replacement character is what decode gives
too). The window starts on the last few prompt tokens, so the first output token keeps its leading
space after a prompt, as in vLLM.

Stop strings are searched in the decoded text as it grows, across token boundaries. Text that could
still be the beginning of a stop string is held back while streaming, so nothing emitted ever has to
be retracted; it is released when it can no longer match or when the request finishes.

Invariant: the concatenation of all deltas (``output_text``) equals
``tokenizer.decode(prompt_tail + output_ids)`` minus the prompt tail's text, which for an empty
prompt (and always for byte-level BPE) is ``tokenizer.decode(output_ids)``; truncated at the stop
string when one matched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

# Prompt tokens the first window starts with (vLLM uses 5): enough context for the decoder's
# start-of-text rules and for a multi-byte character split at the prompt's end.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclasses.dataclass(frozen=True)
class DetokenizerDelta:
    text_delta: str                    # new text to stream (may be empty)
    stop_string: Optional[str] = None  # the stop string that ended the output, if one matched


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class IncrementalDetokenizer:
    """Turns one request's output tokens into streamed text deltas, honouring stop strings.

    Call ``add_tokens`` with each step's new token ids (the engine leaves out a stop/EOS token it
    does not want in the text). Pass ``finished=True`` with the last call (or call ``finish()``) to
    release text held back for stop strings or an incomplete character. After a stop string
    matched, the detokenizer is finished and tokens after the one that completed the stop string
    are ignored.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False):
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        # Tokens after which the window stays open even if its text looks complete (see _decode_step).
        self._hold_ids = frozenset(getattr(tokenizer, "byte_fallback_ids", ()))
        if skip_special_tokens:
            self._hold_ids |= frozenset(getattr(tokenizer, "special_ids", ()))
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self._include_stop = include_stop_str_in_output

        # Window state over self._ids = the tokens from the window's start on (at first the prompt tail).
        tail = [int(t) for t in list(prompt_token_ids)[-_PROMPT_CONTEXT_TOKENS:]]
        self._ids: list[int] = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)
        self._num_output_tokens = 0

        # Decoded output text (complete characters only); its first `_emitted` characters were streamed.
        self._text = ""
        self._emitted = 0
        self._stop_string: Optional[str] = None
        self._finished = False

    # ---- public -------------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        return self._text[:self._emitted]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens consumed (tokens after a matched stop string are not counted)."""
        return self._num_output_tokens

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def stop_string(self) -> Optional[str]:
        return self._stop_string

    def add_tokens(self, new_ids: Sequence[int], *, finished: bool = False) -> DetokenizerDelta:
        if self._finished:
            if new_ids:
                raise ValueError("detokenizer already finished (stop string matched or finish() called)")
            return DetokenizerDelta("", None)
        for token_id in new_ids:
            self._ids.append(int(token_id))
            self._num_output_tokens += 1
            before = len(self._text)
            self._text += self._decode_step()
            if self._stop and len(self._text) > before and self._check_stop(before):
                break
        if finished and self._stop_string is None:
            before = len(self._text)
            self._text += self._flush_window()
            if self._stop and len(self._text) > before:
                self._check_stop(before)
            self._finished = True
        return self._emit()

    def finish(self) -> DetokenizerDelta:
        """The request ended (EOS, length, abort): release everything held back."""
        return self.add_tokens((), finished=True)

    # ---- internals ----------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens,
                                      spaces_between_special_tokens=self._spaces_between_special_tokens)

    def _decode_step(self) -> str:
        """Text the latest token adds (empty while it ends in an incomplete character)."""
        if self._ids[-1] in self._hold_ids:
            # A byte-fallback run decodes as text only if the whole run is valid UTF-8: a later byte
            # can turn already-valid bytes of the run into U+FFFD, so the run is decoded once it has
            # ended. Skipped special tokens do not end a run (the decoder never sees them), and they
            # add no text, so holding after them costs nothing.
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Nothing yet (a skipped special token) or a character still incomplete: keep the window
            # open so the next decode sees these tokens in context.
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:
            # Only when the prefix window itself ended mid-character (a prompt ending in a partial
            # UTF-8 sequence): the replacement char there was the prompt's, the completed one is new.
            delta = new_text[_common_prefix_len(prefix_text, new_text):]
        # The window moves on; tokens before it are never decoded again, so they are dropped: the
        # list stays a few tokens long instead of holding the whole output (which every full
        # garbage collection would walk).
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta

    def _flush_window(self) -> str:
        """At the end, the pending window's text as decode gives it (U+FFFD for a broken character)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        if new_text.startswith(prefix_text):
            return new_text[len(prefix_text):]
        return new_text[_common_prefix_len(prefix_text, new_text):]

    def _check_stop(self, new_from: int) -> bool:
        """Look for a stop string that ends in text[new_from:]; truncate and finish if one does.

        Several may match in the same text: the one that completes first wins (ties: the longer),
        which is what a character-by-character stream would see.
        """
        best = None  # (end, -len, start, stop)
        for s in self._stop:
            start = self._text.find(s, max(0, new_from - len(s) + 1))
            if start < 0:
                continue
            cand = (start + len(s), -len(s), start, s)
            if best is None or cand < best:
                best = cand
        if best is None:
            return False
        end, _, start, s = best
        self._text = self._text[:end] if self._include_stop else self._text[:start]
        self._emitted = min(self._emitted, len(self._text))  # never more than was truncated to
        self._stop_string = s
        self._finished = True
        return True

    def _holdback(self) -> int:
        """How many trailing characters could be the start of a stop string (so must wait)."""
        if not self._stop or self._finished:
            return 0
        text = self._text
        longest = min(self._max_stop_len - 1, len(text) - self._emitted)
        for k in range(longest, 0, -1):
            suffix = text[len(text) - k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0

    def _emit(self) -> DetokenizerDelta:
        end = len(self._text) - self._holdback()
        delta = self._text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return DetokenizerDelta(delta, self._stop_string)
