"""A circuit breaker for the LLM backend (seed 002's `/circuit-breaker/status` and `/reset`).

closed → (N consecutive failures) → open: calls fail fast with a 503 for `reset_timeout_s` →
half-open: one trial call goes through; success closes the breaker, failure opens it again.

Written here rather than taken from a library: pybreaker's async support needs Tornado, and
purgatory keeps its state behind a message bus with no reset; this is ~80 lines whose state is
exactly what the status endpoint and the `ml_inference_circuit_breaker_state` gauge report.
Per worker process, like the engine it protects.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class _Snapshot:
    state: State
    failures: int
    opened_at: float | None
    last_error: str | None


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Any = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0
        self._opened_at: float | None = None
        self._opened_wall: float | None = None
        self._last_error: str | None = None
        self._trial_in_flight = False
        self.total_failures = 0
        self.total_rejected = 0

    def _refresh(self) -> None:
        if (
            self._state == "open"
            and self._opened_at is not None
            and self._clock() - self._opened_at >= self.reset_timeout_s
        ):
            self._state = "half_open"
            self._trial_in_flight = False

    @property
    def state(self) -> State:
        with self._lock:
            self._refresh()
            return self._state

    def retry_after(self) -> float:
        with self._lock:
            self._refresh()
            if self._state != "open" or self._opened_at is None:
                return 0.0
            return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether a call may go to the backend now (reserves the half-open trial)."""
        with self._lock:
            self._refresh()
            if self._state == "closed":
                return True
            if self._state == "half_open" and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            self.total_rejected += 1
            return False

    def record_success(self) -> None:
        with self._lock:
            self._state = "closed"
            self._failures = 0
            self._opened_at = None
            self._opened_wall = None
            self._trial_in_flight = False

    def record_failure(self, error: str) -> None:
        with self._lock:
            self._refresh()
            self._failures += 1
            self.total_failures += 1
            self._last_error = error[:300]
            self._trial_in_flight = False
            if self._state == "half_open" or self._failures >= self.failure_threshold:
                self._state = "open"
                self._opened_at = self._clock()
                self._opened_wall = time.time()

    def release_trial(self) -> None:
        """A half-open trial ended without telling success or failure (e.g. a client error)."""
        with self._lock:
            self._trial_in_flight = False

    def reset(self) -> None:
        self.record_success()
        with self._lock:
            self._last_error = None

    def status(self) -> dict[str, Any]:
        with self._lock:
            self._refresh()
            retry = 0.0
            if self._state == "open" and self._opened_at is not None:
                retry = max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))
            return {
                "name": self.name,
                "state": self._state,
                "consecutive_failures": self._failures,
                "failure_threshold": self.failure_threshold,
                "reset_timeout_s": self.reset_timeout_s,
                "opened_at": self._opened_wall,
                "retry_after_s": round(retry, 3),
                "last_error": self._last_error,
                "total_failures": self.total_failures,
                "total_rejected": self.total_rejected,
            }
