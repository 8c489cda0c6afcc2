"""Multi-host serving: process 0 schedules, every process runs the same compiled step.

JAX's multi-controller model needs every process to launch the same executable with the same
inputs, in the same order. Process 0 owns the scheduler (and the HTTP server); before it launches
a step it publishes the step plan, and every other process (a follower) replays the plan on its
own model runner. A runner's per-request state is a pure function of the plans it has seen, and the
step's outputs are replicated, so followers stay in lock-step without sending anything back.

    process 0:  plan = scheduler.schedule(); channel.publish(plan); runner.run(plan) ...
    process k:  while (plan := channel.receive()) is not STOP: runner.run(plan)

The channel is the coordination service that `jax.distributed.initialize` already started (a
key-value store on process 0's coordinator port), so no extra port or dependency is needed. Plans
are pickled: the processes of one job trust each other (they share a coordinator).

Followers cannot fall far behind: each step is a collective, so process 0's step N cannot finish
before every follower has launched it. Keys older than a small window are deleted.
"""

from __future__ import annotations

import atexit
import logging
import pickle
from typing import Any, Optional

import jax

logger = logging.getLogger("jaxllm")

_STOP = b"__jaxllm_stop__"
_WINDOW = 64          # keys kept behind the newest; far more than the possible follower lag


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("multi-host plan broadcast needs jax.distributed.initialize() first")
    return client


class PlanChannel:
    """An ordered stream of messages from process 0 to all others (one key per message)."""

    def __init__(self, prefix: str = "jaxllm/plan"):
        self.prefix = prefix
        self.seq = 0
        self.client = _client()

    def publish(self, message: Any) -> None:
        self._put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def publish_stop(self) -> None:
        self._put(_STOP)

    def _put(self, data: bytes) -> None:
        self.client.key_value_set_bytes(f"{self.prefix}/{self.seq}", data)
        old = self.seq - _WINDOW
        if old >= 0:
            try:
                self.client.key_value_delete(f"{self.prefix}/{old}")
            except Exception:  # noqa: BLE001 — already gone is fine
                pass
        self.seq += 1

    def receive(self, timeout_s: float = 3600.0) -> tuple[bool, Any]:
        """(True, message), or (False, None) once process 0 has stopped. Waits up to timeout_s
        for each message, repeatedly: an idle server publishes nothing for a long time."""
        key = f"{self.prefix}/{self.seq}"
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))
                break
            except Exception as e:  # noqa: BLE001 — the runtime raises a generic error on timeout
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self.seq += 1
        if data == _STOP:
            return False, None
        return True, pickle.loads(data)


class BroadcastingRunner:
    """Process 0's runner: publishes each plan, then runs it. Everything else is the runner's."""

    def __init__(self, runner, channel: Optional[PlanChannel] = None):
        self._runner = runner
        self._channel = channel or PlanChannel()
        self._closed = False
        atexit.register(self.close)

    def __getattr__(self, name):
        return getattr(self._runner, name)

    # Every plan is sent, even one with no scheduled requests: its finished ids free runner
    # state, and every runner must free the same sampler slots.
    def dispatch(self, plan):
        self._channel.publish(plan)
        return self._runner.dispatch(plan)

    def run(self, plan):
        self._channel.publish(plan)
        return self._runner.run(plan)

    def close(self) -> None:
        """Tell the followers to exit (idempotent; also runs at interpreter exit)."""
        if not self._closed:
            self._closed = True
            try:
                self._channel.publish_stop()
            except Exception as e:  # noqa: BLE001 — the coordinator may already be gone at exit
                logger.debug("could not tell followers to stop: %s", e)


def follow(runner, channel: Optional[PlanChannel] = None) -> int:
    """A follower's loop: replay process 0's plans on this process's runner until it stops.
    Returns the number of steps run."""
    channel = channel or PlanChannel()
    steps = 0
    logger.info("Process %d following process 0's step plans", jax.process_index())
    while True:
        ok, plan = channel.receive()
        if not ok:
            logger.info("Process 0 stopped after %d steps; follower exiting", steps)
            return steps
        runner.run(plan)
        steps += 1
