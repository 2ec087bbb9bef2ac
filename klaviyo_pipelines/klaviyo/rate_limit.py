"""Client-side pacing for Klaviyo's per-account rate limits.

Klaviyo counts requests per account and endpoint class in fixed windows: a 1 s burst window
and a 60 s steady window, and answers 429 when either is exceeded. Relying on 429s wastes a
round trip and a Retry-After sleep per rejection, so the limiter keeps a sliding log of our
own sends per class and never lets more than the limit into any window of that length (a
sliding window is at least as strict as any fixed window, whatever its alignment).

Other integrations on the same account draw from the same quota; we only learn of them
through the `RateLimit-*` headers. `observe()` compares the server's `RateLimit-Remaining`
with our own estimate and, when the server says fewer are left, spreads the remaining
requests evenly over `RateLimit-Reset` seconds. `penalize()` honours a 429's Retry-After for
every thread using that class, so one throttled request does not become a stampede.

`time_scale` shortens the windows (a 60 s window lasts 60/time_scale real seconds) to match
a sandbox running fast time. Durations the server reports (Retry-After, RateLimit-Reset) are
taken as sent, in real seconds: Klaviyo runs at scale 1 and the sandbox reports real seconds.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from klaviyo_pipelines import interrupt
from klaviyo_pipelines.klaviyo.endpoints import EndpointClass

BURST_WINDOW = 1.0
STEADY_WINDOW = 60.0
_MIN_SLEEP = 1e-6
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class _ClassState:
    """Send log and server hints for one endpoint class. Guarded by the limiter's lock."""

    burst_limit: int
    steady_limit: int
    burst_log: deque[float] = field(default_factory=deque)
    steady_log: deque[float] = field(default_factory=deque)
    blocked_until: float = float("-inf")
    # Server-driven pacing, active while now < paced_until.
    paced_until: float = float("-inf")
    paced_budget: int = 0
    paced_interval: float = 0.0
    last_sent: float = float("-inf")


class RateLimiter:
    """Thread-safe pacing of requests, one burst + steady bucket pair per endpoint class.

    `window_margin` lengthens every window by that fraction (default 2%), and `jitter` adds a
    fixed number of real seconds, to absorb the gap between our send time and Klaviyo's
    arrival time. The result is a long-run rate just under the steady limit.
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        window_margin: float = 0.02,
        jitter: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = interrupt.sleep,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = time_scale
        self._burst_window = BURST_WINDOW / time_scale * (1 + window_margin) + jitter
        self._steady_window = STEADY_WINDOW / time_scale * (1 + window_margin) + jitter
        self._jitter = jitter
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._states: dict[str, _ClassState] = {}

    def __repr__(self) -> str:
        return f"RateLimiter(time_scale={self.time_scale}, classes={sorted(self._states)})"

    def now(self) -> float:
        """The limiter's clock; pass a reading as `sent_at` to `observe()`."""
        return self._clock()

    def _state(self, cls: EndpointClass) -> _ClassState:
        state = self._states.get(cls.name)
        if state is None:
            state = _ClassState(cls.burst_per_second, cls.steady_per_minute)
            self._states[cls.name] = state
        return state

    def _prune(self, state: _ClassState, now: float) -> None:
        while state.burst_log and state.burst_log[0] <= now - self._burst_window:
            state.burst_log.popleft()
        # The steady log keeps two windows so observe() can line our sends up with the
        # server's window even when a response arrives late.
        while state.steady_log and state.steady_log[0] <= now - 2 * self._steady_window:
            state.steady_log.popleft()

    def _steady_used(self, state: _ClassState, now: float) -> int:
        return len(state.steady_log) - bisect_right(state.steady_log, now - self._steady_window)

    def _wait_needed(self, state: _ClassState, now: float) -> float:
        wait = state.blocked_until - now
        if len(state.burst_log) >= state.burst_limit:
            index = len(state.burst_log) - state.burst_limit
            wait = max(wait, state.burst_log[index] + self._burst_window - now)
        if self._steady_used(state, now) >= state.steady_limit:
            index = len(state.steady_log) - state.steady_limit
            wait = max(wait, state.steady_log[index] + self._steady_window - now)
        if now < state.paced_until:
            if state.paced_budget <= 0:
                wait = max(wait, state.paced_until - now)
            else:
                wait = max(wait, state.last_sent + state.paced_interval - now)
        return wait

    def acquire(self, endpoint_class: EndpointClass) -> float:
        """Block until a request of this class may be sent; return the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                state = self._state(endpoint_class)
                self._prune(state, now)
                wait = self._wait_needed(state, now)
                if wait <= 0:
                    state.burst_log.append(now)
                    state.steady_log.append(now)
                    state.last_sent = now
                    if now < state.paced_until:
                        state.paced_budget -= 1
                    return waited
            wait = max(wait, _MIN_SLEEP)
            self._sleep(wait)
            waited += wait
            if interrupt.requested():  # the caller sends nothing more: stop waiting
                return waited

    def observe(
        self,
        endpoint_class: EndpointClass,
        headers: Mapping[str, str],
        *,
        sent_at: float | None = None,
    ) -> None:
        """Learn from a response's `RateLimit-Limit/Remaining/Reset` (steady window) headers.

        The server's count minus our own sends in its current window is what other
        integrations on the account used. When that leaves us fewer requests than our own
        log allows, the rest are spread evenly until the server's window resets.

        `sent_at` (a `now()` reading taken right after `acquire`) lines the headers up with
        our log and lets the limiter subtract requests sent after this one, which the server
        had not counted yet. Without it the response is assumed to be instantaneous.
        """
        limit = _header_number(headers, "RateLimit-Limit")
        remaining = _header_number(headers, "RateLimit-Remaining")
        reset = _header_number(headers, "RateLimit-Reset")
        with self._lock:
            now = self._clock()
            state = self._state(endpoint_class)
            if sent_at is not None:
                self._restamp(state.burst_log, sent_at, now)
            self._prune(state, now)
            if limit is not None and limit >= 1:
                state.steady_limit = min(endpoint_class.steady_per_minute, int(limit))
            if remaining is None:
                return
            at = now if sent_at is None else min(sent_at, now)
            window = STEADY_WINDOW / self.time_scale
            reset_real = window if reset is None else min(max(reset, 0.0), window)
            # Our sends the server has counted: those in its window, up to this request.
            window_start = at + reset_real - window
            log = state.steady_log
            ours_counted = bisect_right(log, at + self._jitter) - bisect_right(
                log, window_start - self._jitter
            )
            server_limit = int(limit) if limit is not None else state.steady_limit
            others = (server_limit - int(remaining)) - ours_counted
            in_flight = len(log) - bisect_right(log, at + self._jitter)
            server_left = int(remaining) - in_flight
            ours_left = state.steady_limit - self._steady_used(state, now)
            if others <= 0 or server_left >= ours_left:
                state.paced_until = float("-inf")
                return
            state.paced_until = at + reset_real
            state.paced_budget = max(server_left, 0)
            span = max(state.paced_until - now, 0.0)
            state.paced_interval = span / server_left if server_left > 0 else span

    @staticmethod
    def _restamp(log: deque[float], sent_at: float, answered_at: float) -> None:
        """Count a request in the burst window from when it was answered, not sent.

        Klaviyo stamps a request on arrival, somewhere between the two; the burst window
        (1 s) is too short for a fixed margin to cover a slow connect or a loaded machine, so
        the answer time, the latest the server can have stamped it, is the safe one.
        """
        # Our entry is the last one logged by then (another thread's, if they interleaved:
        # moving any entry later only makes the pacing more careful).
        index = bisect_right(log, sent_at) - 1
        if index >= 0:
            del log[index]
            insort(log, max(answered_at, sent_at))

    def penalize(self, endpoint_class: EndpointClass, retry_after: float) -> None:
        """After a 429, hold every request of this class for `retry_after` (real) seconds."""
        if retry_after <= 0:
            return
        with self._lock:
            state = self._state(endpoint_class)
            until = self._clock() + retry_after
            state.blocked_until = max(state.blocked_until, until)


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    """First number of a header (tolerates `750`, `750.0` and `750, 75;w=1` forms)."""
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        return None
    match = _NUMBER.search(str(value))
    return float(match.group()) if match else None
