"""Bucket ladders: every shape that reaches the device is one of a few compiled sizes.

A step is padded to (tokens, sequences, pages-per-sequence). The token and sequence ladders are
configurable (``--token-buckets``, ``--seq-buckets``); the page ladder only matters for the XLA
attention backend, whose gather cost grows with the block-table width (the Pallas kernels loop over
each sequence's real pages, so they use one width: the maximum).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools


def _pow2_ladder(lo: int, hi: int, step: int = 2) -> tuple[int, ...]:
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= step
    out.append(hi)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class BucketLadder:
    token_buckets: tuple[int, ...]
    seq_buckets: tuple[int, ...]
    page_buckets: tuple[int, ...]
    # Sequence buckets of the decode-only executables (one token per sequence; the runner's
    # ``decode_buckets``); empty: ``seq_buckets``. Decode-only steps are most steps and compile
    # cheaply (tokens == seqs), so they can have a finer ladder than the mixed steps: on sharegpt-
    # synthetic most decode steps run 2-63 sequences, padded to 64 by the former GPU ladder (1, 64,
    # 256) (benchmarks/schedule_bound.py: 765 of 1995 steps, 30% of the predicted time); the GPU
    # default is a decode ladder of its own since (serving/engine_builder.py).
    decode_seq_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.decode_seq_buckets:
            object.__setattr__(self, "decode_seq_buckets", self.seq_buckets)
        for name in ("token_buckets", "seq_buckets", "page_buckets", "decode_seq_buckets"):
            ladder = getattr(self, name)
            if not ladder or list(ladder) != sorted(set(ladder)) or ladder[0] <= 0:
                raise ValueError(f"{name} must be a strictly increasing list of positive integers, got {ladder}")
        if self.decode_seq_buckets[-1] != self.seq_buckets[-1]:
            raise ValueError(f"decode_seq_buckets must end at the largest seq bucket {self.seq_buckets[-1]}, "
                             f"got {self.decode_seq_buckets}")

    @classmethod
    def build(cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_pages_per_seq: int,
              token_buckets=None, seq_buckets=None, decode_seq_buckets=None,
              paged_width_buckets: bool = True) -> "BucketLadder":
        """Default ladders, or the user's with their top raised/lowered to the engine limits."""
        if token_buckets is None:
            token_buckets = _pow2_ladder(16, max_num_batched_tokens, 4)
        if seq_buckets is None:
            seq_buckets = _pow2_ladder(min(8, max_num_seqs), max_num_seqs, 4)
        token_buckets = tuple(b for b in token_buckets if b < max_num_batched_tokens) + (max_num_batched_tokens,)
        seq_buckets = tuple(b for b in seq_buckets if b < max_num_seqs) + (max_num_seqs,)
        decode_seq_buckets = () if decode_seq_buckets is None else (
            tuple(b for b in decode_seq_buckets if b < max_num_seqs) + (max_num_seqs,))
        if paged_width_buckets:
            page_buckets = _pow2_ladder(min(8, max_pages_per_seq), max_pages_per_seq, 4)
        else:
            page_buckets = (max_pages_per_seq,)
        return cls(tuple(sorted(set(token_buckets))), tuple(sorted(set(seq_buckets))), page_buckets,
                   tuple(sorted(set(decode_seq_buckets))))

    @staticmethod
    def _fit(ladder, n: int, what: str) -> int:
        i = bisect.bisect_left(ladder, n)
        if i == len(ladder):
            raise ValueError(f"{what}={n} exceeds the largest bucket {ladder[-1]}")
        return ladder[i]

    def select(self, num_tokens: int, num_seqs: int, max_pages: int) -> tuple[int, int, int]:
        return (self._fit(self.token_buckets, num_tokens, "num_tokens"),
                self._fit(self.seq_buckets, num_seqs, "num_seqs"),
                self._fit(self.page_buckets, max_pages, "pages_per_seq"))

    def decode_seqs(self, num_seqs: int) -> int:
        """The sequence bucket of a decode-only step of ``num_seqs`` sequences."""
        return self._fit(self.decode_seq_buckets, num_seqs, "num_seqs")

    def all_shapes(self) -> list[tuple[int, int, int]]:
        """Every (tokens, seqs, pages) a step can select: a step never has more sequences than tokens,
        so with t tokens the seq bucket is at most the one that fits min(t, max_num_seqs)."""
        shapes = []
        for t, p in itertools.product(self.token_buckets, self.page_buckets):
            s_max = self._fit(self.seq_buckets, min(t, self.seq_buckets[-1]), "num_seqs")
            shapes += [(t, s, p) for s in self.seq_buckets if s <= s_max]
        return sorted(shapes)
