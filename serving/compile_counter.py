"""A process-wide count of XLA compilation requests (``jaxllm:compilations_total``).

Every jit/AOT compile in the process passes through JAX's compile path, which emits a monitoring
event per request whether or not the persistent compilation cache then serves it. After warm-up the
engine must never compile: tests assert this counter does not move.
"""

from __future__ import annotations

import threading

import jax.monitoring

_EVENT = "/jax/compilation_cache/compile_requests_use_cache"


class _CompileCounter:
    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, name: str, **kwargs):
        if name == _EVENT:
            with self._lock:
                self.count += 1


compile_counter = _CompileCounter()
