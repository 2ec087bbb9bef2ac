"""Fault injection: make the sandbox fail the way a real network and a real Klaviyo fail.

Why: a reverse-ETL client is only trustworthy if it survives 5xx answers, throttling, hung requests
and dropped connections without losing or duplicating rows. Tests queue exact faults
("the next 2 bulk-import POSTs get a 503"); soak tests switch on seeded random faults. Faults are
decided before authentication, as a load balancer in front of Klaviyo would fail:

- ``status``: answer ``status`` and do not apply the request.
- ``applied_status``: apply the request, then answer ``status`` (the client cannot know it worked).
- ``timeout``: hold the request ``delay`` seconds, then close the connection unapplied.
- ``reset``: close the TCP connection with RST (SO_LINGER 0), no response, unapplied.
- ``rate_limit``: 429 with Klaviyo's throttled body and ``Retry-After: retry_after``.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

FAULT_KINDS: tuple[str, ...] = ("status", "applied_status", "timeout", "reset", "rate_limit")


@dataclass(frozen=True)
class Fault:
    """One fault rule. ``count`` faults the next N matching requests (None: every one)."""

    kind: str
    status: int = 503
    count: int | None = 1
    method: str | None = None
    path_prefix: str | None = None
    delay: float = 10.0
    retry_after: float = 1.0
    body: str | None = None  # raw body to send instead of a JSON:API error (e.g. an HTML 502)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1 or None")
        if self.kind in ("status", "applied_status") and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.method is not None:
            object.__setattr__(self, "method", self.method.upper())

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method.upper():
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)


@dataclass
class _Queued:
    fault: Fault
    remaining: int | None


@dataclass
class _RandomMode:
    rates: dict[str, float]
    rng: random.Random
    statuses: tuple[int, ...]
    delay: float
    retry_after: float
    method: str | None
    path_prefix: str | None


class FaultInjector:
    """Queued faults (first match wins, consumed by count) plus an optional random mode."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Queued] = []
        self._random: _RandomMode | None = None
        self.fired: Counter[str] = Counter()  # kind -> how many requests were faulted

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._queue.append(_Queued(fault, fault.count))
        return fault

    def clear(self) -> None:
        """Drop queued faults and switch random mode off (``fired`` counts are kept)."""
        with self._lock:
            self._queue.clear()
            self._random = None

    @property
    def pending(self) -> list[Fault]:
        with self._lock:
            return [entry.fault for entry in self._queue]

    def random(
        self,
        rates: Mapping[str, float],
        seed: int | None = None,
        statuses: Iterable[int] = (500, 502, 503, 504),
        delay: float = 5.0,
        retry_after: float = 1.0,
        method: str | None = None,
        path_prefix: str | None = "/api/",
    ) -> None:
        """Fault each matching request with probability ``rates[kind]`` (seeded, reproducible
        for a single client thread)."""
        unknown = set(rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        if sum(rates.values()) > 1.0 or any(r < 0 for r in rates.values()):
            raise ValueError("fault rates must be >= 0 and sum to at most 1")
        with self._lock:
            self._random = _RandomMode(
                rates=dict(rates),
                rng=random.Random(seed),
                statuses=tuple(statuses),
                delay=delay,
                retry_after=retry_after,
                method=method.upper() if method else None,
                path_prefix=path_prefix,
            )

    def pick(self, method: str, path: str) -> Fault | None:
        """The fault to apply to this request, if any (consumes one use of a counted fault)."""
        with self._lock:
            for entry in self._queue:
                if entry.fault.matches(method, path):
                    if entry.remaining is not None:
                        entry.remaining -= 1
                        if entry.remaining <= 0:
                            self._queue.remove(entry)
                    self.fired[entry.fault.kind] += 1
                    return entry.fault
            chosen = self._roll(method, path)
            if chosen is not None:
                self.fired[chosen.kind] += 1
            return chosen

    def _roll(self, method: str, path: str) -> Fault | None:
        mode = self._random
        if mode is None:
            return None
        if mode.method is not None and mode.method != method.upper():
            return None
        if mode.path_prefix is not None and not path.startswith(mode.path_prefix):
            return None
        draw = mode.rng.random()
        cumulative = 0.0
        for kind in FAULT_KINDS:  # fixed order keeps a seed reproducible
            cumulative += mode.rates.get(kind, 0.0)
            if draw < cumulative:
                template = Fault(
                    kind=kind, delay=mode.delay, retry_after=mode.retry_after, count=None
                )
                if kind in ("status", "applied_status"):
                    return replace(template, status=mode.rng.choice(mode.statuses))
                return template
        return None
