"""Admission and shutdown: the bounded waiting queue, per-request deadlines and the SIGTERM drain.

    arrive ──> GuardMiddleware ──(draining? 503)──> route ──> admit() ──(queue full? 503)──> engine
                 in_flight += 1                                queued += jobs
                                                               queued -= 1 at each job's first output / end

`queued` counts engine jobs the server has handed over that have produced nothing yet: waiting in
the scheduler, or still in their first prefill. It is kept here rather than read from the engine's
stats because those are refreshed only by the device loop, so a burst of arrivals would all read the
same stale count; check-and-increment here happens with no await in between, so it is exact.

Drain (SIGTERM): new requests get 503 (and /health turns 503 so load balancers stop sending), the
in-flight ones may finish until `shutdown_timeout`, then the server is asked to stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from serving.server.args import ServerArgs
from serving.server.errors import APIError

logger = logging.getLogger("serving.server")

# What a 503 tells the client to wait before retrying: a queue drains within a few steps; a draining
# server will be gone, so the retry should go elsewhere (a load balancer) after its health check fails.
OVERLOAD_RETRY_AFTER_S = 1
DRAIN_RETRY_AFTER_S = 5


class RequestTimeout(APIError):
    def __init__(self, timeout_s: float):
        super().__init__(f"the request did not finish within the server's request timeout of {timeout_s:g} s "
                         "and was aborted", 504)


class Lifecycle:
    def __init__(self, args: ServerArgs):
        self.max_queued = args.max_queued_requests
        self.request_timeout = args.request_timeout
        self.shutdown_timeout = args.shutdown_timeout
        self.queued = 0              # engine jobs admitted that have produced no output yet
        self.in_flight = 0           # HTTP requests being served (not counting /health, /metrics)
        self.rejected = 0            # requests refused with 503 because the queue was full
        self.draining = False
        self.drain_deadline: Optional[float] = None

    # ------------------------------------------------------------------ admission
    def admit(self, num_jobs: int) -> Callable[[], None]:
        """Count `num_jobs` engine jobs as queued, or raise 503; returns the release for one job.

        Every admitted job must be released exactly once (first output, failure or abort).
        """
        if self.draining:
            raise self.draining_error()
        if self.max_queued is not None and self.queued >= self.max_queued:
            self.rejected += 1
            raise APIError(f"the server is overloaded: {self.queued} requests are waiting to start (limit "
                           f"{self.max_queued}); retry later", 503,
                           headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_S)})
        self.queued += num_jobs

        def release() -> None:
            self.queued -= 1

        return release

    def deadline(self) -> Optional[float]:
        """The monotonic time by which a request arriving now must finish (None: no deadline)."""
        return None if self.request_timeout is None else time.monotonic() + self.request_timeout

    def timeout_error(self) -> RequestTimeout:
        return RequestTimeout(self.request_timeout or 0.0)

    # ------------------------------------------------------------------ drain
    def draining_error(self) -> APIError:
        return APIError("the server is shutting down and accepts no new requests", 503,
                        headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})

    def begin_drain(self) -> bool:
        """Stop admitting; in-flight requests get `shutdown_timeout` seconds. False if already draining.

        Safe to call from a signal handler: it only sets two attributes.
        """
        if self.draining:
            return False
        self.drain_deadline = time.monotonic() + self.shutdown_timeout
        self.draining = True
        return True

    async def wait_drained(self, poll_s: float = 0.05) -> bool:
        """After begin_drain: wait until nothing is in flight or the deadline passes; True if drained."""
        while not self.draining:
            await asyncio.sleep(poll_s)
        logger.info("draining: %d request(s) in flight, up to %.1f s to finish", self.in_flight,
                    self.shutdown_timeout)
        while self.in_flight > 0 and time.monotonic() < self.drain_deadline:
            await asyncio.sleep(poll_s)
        if self.in_flight > 0:
            logger.warning("shutdown timeout: %d request(s) still in flight are cut off", self.in_flight)
            return False
        logger.info("drained: no requests in flight")
        return True
