"""Where an engine's wall time goes, by executable shape: steps, real tokens, real sequences and
wall seconds per (tokens, seqs, pages, decode_only, plain) key (ModelRunner.all_shapes).

Host bookkeeping only (no jax): ``LLMEngine`` records each collected step with one dict update.

Which wall seconds a step is charged. With async scheduling step N+1 is launched before step N is
collected, so the dispatch -> collect intervals of consecutive steps (StepStats.seconds) overlap
and their sum exceeds the wall time. Each step is charged instead the engine's time inside
``step()`` calls since the previous step was recorded (the engine records a step right after
collecting it and updating the scheduler):

    call k      [schedule, dispatch N+1 | collect N, update, record N | N's outputs]
                (the caller's own work between calls: not charged)
    call k+1    [schedule, dispatch N+2 | collect N+1, update, record N+1 | N+1's outputs]
    charge(N+1) = the rest of call k after record N + call k+1 up to record N+1

A busy engine is inside a call all the time but for the caller's work between calls (the
benchmark's bookkeeping of each output), so the charges sum to about the run's wall time. When a
call ends with nothing in flight (every call of the synchronous engine, the last of a run) the
time not yet charged is dropped: a step then is charged from the start of the call that
dispatched it, and idle time, or a caller's pause with a step in flight, is charged to no shape.

``wait_seconds``: of a step's charge, the time the engine sat in collecting the step's results,
i.e. waiting for the device to finish it. Near the whole charge when the device bounds the step,
near zero when the host does (the device then finished before the host asked).

A dispatch that blocks moves time between shapes: on a GPU the general (mixed) executables' full
sampler has ``lax.cond``s whose predicates the host waits for (serving.sampler.sample), so
"dispatch N+1" returns only when step N+1's forward pass is done, and that time is charged to step
N (a decode step before a mixed one looks as slow as the mixed step). Such a charge is mostly not
wait: a large charge with a small wait marks it.
"""

from __future__ import annotations

import dataclasses

# (tokens, seqs, pages, decode_only, plain): the key of a step executable (ModelRunner.all_shapes).
ShapeKey = tuple[int, int, int, bool, bool]


@dataclasses.dataclass
class StepTotals:
    steps: int = 0
    real_tokens: int = 0
    real_seqs: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0

    def add(self, steps: int, real_tokens: int, real_seqs: int, seconds: float, wait_seconds: float = 0.0) -> None:
        self.steps += steps
        self.real_tokens += real_tokens
        self.real_seqs += real_seqs
        self.seconds += seconds
        self.wait_seconds += wait_seconds

    def minus(self, other: "StepTotals") -> "StepTotals":
        return StepTotals(self.steps - other.steps, self.real_tokens - other.real_tokens,
                          self.real_seqs - other.real_seqs, self.seconds - other.seconds,
                          self.wait_seconds - other.wait_seconds)


class StepTally:
    def __init__(self):
        self.by_shape: dict[ShapeKey, StepTotals] = {}
        # Steps that computed one token for each sequence (decode steps; with decode buckets these are
        # exactly the decode_only executables), by their real number of sequences.
        self.decode_batches: dict[int, StepTotals] = {}
        self._mark = 0.0          # start of the current call, or its last record
        self._carried = 0.0       # uncharged time inside earlier calls (a step was in flight)

    def begin_call(self, now: float) -> None:
        """The engine's ``step()`` begins (time.perf_counter)."""
        self._mark = now

    def end_call(self, now: float, *, in_flight: bool) -> None:
        """The engine's ``step()`` returns; ``in_flight``: a dispatched step is not collected yet."""
        self._carried = self._carried + now - self._mark if in_flight else 0.0

    def record(self, shape: ShapeKey, num_tokens: int, num_seqs: int, now: float, wait: float = 0.0) -> float:
        """Count one collected step of executable ``shape`` (``wait``: seconds spent collecting it);
        returns the seconds charged to it."""
        seconds = self._carried + now - self._mark
        self._carried, self._mark = 0.0, now
        t = self.by_shape.get(shape)
        if t is None:
            t = self.by_shape[shape] = StepTotals()
        t.add(1, num_tokens, num_seqs, seconds, wait)
        if num_tokens == num_seqs:
            d = self.decode_batches.get(num_seqs)
            if d is None:
                d = self.decode_batches[num_seqs] = StepTotals()
            d.add(1, num_tokens, num_seqs, seconds, wait)
        return seconds

    def copy(self) -> "StepTally":
        out = StepTally()
        out.by_shape = {k: dataclasses.replace(v) for k, v in self.by_shape.items()}
        out.decode_batches = {k: dataclasses.replace(v) for k, v in self.decode_batches.items()}
        return out

    def since(self, before: "StepTally") -> "StepTally":
        """The steps recorded after ``before`` (a ``copy()`` taken earlier)."""
        out = StepTally()
        for mine, theirs, into in ((self.by_shape, before.by_shape, out.by_shape),
                                   (self.decode_batches, before.decode_batches, out.decode_batches)):
            for k, v in mine.items():
                d = v.minus(theirs[k]) if k in theirs else dataclasses.replace(v)
                if d.steps:
                    into[k] = d
        return out
