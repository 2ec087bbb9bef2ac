"""A background scheduler that advances asynchronous Klaviyo jobs step by step.

Why: Klaviyo answers a bulk import with 202 and does the work later, so clients must poll
(``queued`` -> ``processing`` -> ``complete``). One daemon thread runs timed steps from a heap:
a step may ask to run again after a delay, so many jobs progress concurrently without one
sleeping job blocking the others.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

Step = Callable[[], float | None]  # returns the delay before its next run, or None when done

log = logging.getLogger(__name__)


class JobWorker:
    """Runs scheduled steps on one daemon thread, in due-time order."""

    def __init__(self, name: str = "klaviyo-sandbox-jobs") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Step]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._running = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def schedule(self, delay: float, step: Step) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._seq), step))
            self._cond.notify_all()

    def clear(self) -> None:
        """Forget every pending step (used when the account is reset)."""
        with self._cond:
            self._heap.clear()
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until no step is pending or running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, step = heapq.heappop(self._heap)
                self._running += 1
            try:
                again = step()
            except Exception:  # a buggy step must not kill the worker
                log.exception("sandbox job step failed")
                again = None
            with self._cond:
                self._running -= 1
                if again is not None:
                    heapq.heappush(
                        self._heap, (time.monotonic() + max(0.0, again), next(self._seq), step)
                    )
                self._cond.notify_all()
