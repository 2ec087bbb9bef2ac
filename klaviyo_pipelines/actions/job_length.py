"""How long a run's bulk jobs take, learned as they end, so that each job is polled about once.

Why: jobs are polled at the poll endpoint's own quota (150 a minute for profile imports, as
many as the imports themselves), so a poll one job did not need delays another's. Until a job
of the run has ended nobody knows their length: one job (the scout) polls with a doubling
backoff and the others, opened meanwhile, wait for what it learns instead of each polling.
"""

from __future__ import annotations

import threading
import time


class JobLength:
    """The moving average of how long this run's jobs took, and who is scouting for it."""

    def __init__(self) -> None:
        self._seconds = 0.0  # 0 until a job ended
        self._scout: str | None = None  # the job polling for the first length
        self._changed = threading.Condition()

    def wait_to_poll(self, job: str, started: float, backoff: float, deadline: float) -> None:
        """Sleep until `job`, accepted at `started`, is worth polling: once it is as old as
        jobs are when they end, or `backoff` after its last poll, whichever is later (or its
        deadline)."""
        with self._changed:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return
                if self._seconds:
                    delay = max(backoff, started + self._seconds - now)
                    break
                if self._scout in (None, job):
                    self._scout, delay = job, backoff
                    break
                self._changed.wait(deadline - now)  # until a length is known or the scout ends
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))

    def ended(self, job: str, took: float | None) -> None:
        """`job` ended after `took` seconds, or with its outcome unknown (None)."""
        with self._changed:
            if took is not None:
                self._seconds = 0.8 * self._seconds + 0.2 * took if self._seconds else took
            if self._scout == job:
                self._scout = None
            self._changed.notify_all()
