"""Klaviyo-style fixed-window rate limiting (burst per second, steady per minute), with a time scale.

Why: the client's pacing and 429 handling can only be tested against a server that throttles the
way Klaviyo does: per account and endpoint class, fixed 1 s and 60 s windows, 429 with
``Retry-After`` when either is exhausted, ``RateLimit-*`` headers describing the steady window on
every other response. ``time_scale`` shrinks the windows (a 60 s window lasts 60/scale real
seconds) so a benchmark can exercise minutes of limits in seconds. Rejected requests do not count.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A limit of ``limit`` requests per ``seconds`` of sandbox time, counted under ``key``."""

    key: str
    limit: int
    seconds: float
    steady: bool = False


@dataclass(frozen=True)
class Decision:
    """Outcome of one :meth:`RateLimiter.acquire`; times are in real seconds."""

    allowed: bool
    retry_after: float
    limit: int
    remaining: int
    reset: float


class RateLimiter:
    """Thread-safe fixed windows; each window starts with the first request after the last one ended."""

    def __init__(
        self, time_scale: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = float(time_scale)
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (real start, count)

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()

    def acquire(self, windows: list[Window]) -> Decision:
        """Count one request against every window, or refuse it if any window is full."""
        now = self._clock()
        with self._lock:
            state: list[tuple[Window, float, int]] = []
            wait = 0.0
            for window in windows:
                length = window.seconds / self.time_scale
                start, count = self._windows.get(window.key, (now, 0))
                if now - start >= length:
                    start, count = now, 0
                state.append((window, start, count))
                if count >= window.limit:
                    wait = max(wait, start + length - now)
            steady = next((s for s in state if s[0].steady), state[-1] if state else None)
            if wait > 0:
                return Decision(False, wait, steady[0].limit if steady else 0, 0, wait)
            for window, start, count in state:
                self._windows[window.key] = (start, count + 1)
            if steady is None:
                return Decision(True, 0.0, 0, 0, 0.0)
            window, start, count = steady
            reset = start + window.seconds / self.time_scale - now
            return Decision(True, 0.0, window.limit, max(0, window.limit - count - 1), reset)

    def format_seconds(self, seconds: float, at_least_a_tick: bool = False) -> str:
        """Integer seconds (rounded up) at time scale 1; seconds with 3 decimals when scaled.

        ``at_least_a_tick`` makes the result positive (1 s, or 0.001 s when scaled), as a
        ``Retry-After`` of 0 would invite an immediate retry into the same full window."""
        if self.time_scale == 1.0:
            return str(max(1 if at_least_a_tick else 0, math.ceil(seconds - 1e-9)))
        return f"{max(0.001 if at_least_a_tick else 0.0, seconds):.3f}"
