"""Batches in flight: several batches sent at once, each outcome handed back once Klaviyo answered.

Why: one batch at a time leaves the rate budget unused while we wait for a response, a bulk
job or another endpoint class (Remove Profile looks profiles up in one class and removes them
in another). The rate limiter, not this window, decides how fast requests go; the window only
keeps enough requests ready that the limiter is never idle while rows are waiting.

A stop (`interrupt.requested()`, set by SIGINT / SIGTERM) is checked as each batch starts: a
batch not yet started comes back unsent, and `make_room` stops waiting for room.

Guarantee kept: nothing here writes state. An outcome is returned to the caller, who commits
it, only after its batch finished; a crash with batches in flight leaves their rows
unconfirmed, so the next run's change set has them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Self

from klaviyo_pipelines import interrupt
from klaviyo_pipelines.actions.base import BatchResult, Prepared

MAX_BATCHES_IN_FLIGHT = 8
# Bounds memory: three 10,000-profile imports, or eight 1,000-event batches.
MAX_ROWS_IN_FLIGHT = 30_000
STOP_CHECK_SECONDS = 0.1  # how soon a wait for room notices a stop

SendBatch = Callable[[Sequence[Prepared]], BatchResult]
BeforeWaiting = Callable[[], None]


def in_flight_width(batch_size: int) -> int:
    """How many batches of this size may be in flight: at least two, so one is always queued."""
    return max(2, min(MAX_BATCHES_IN_FLIGHT, MAX_ROWS_IN_FLIGHT // max(batch_size, 1)))


class InFlight:
    """A bounded window of batches being sent by worker threads.

    `make_room` blocks while the window is full and returns the outcomes that finished
    meanwhile, `submit` sends a batch, `drain` waits for the rest. Outcomes come back in the order batches finish, which is free
    to differ from the order they were sent: every row's outcome is its own.

    The window starts at one batch and doubles with each batch that succeeds (a slow start):
    against a dead API or a refused key the run fails after one batch's attempts, as it did
    when batches went one by one, instead of a whole window of them.

    `before_waiting` is called before each wait for a batch, so the caller can let go of what
    others may use meanwhile (the warehouse file).
    """

    def __init__(
        self, send: SendBatch, width: int, before_waiting: BeforeWaiting | None = None
    ) -> None:
        if width < 1:
            raise ValueError("width must be at least 1")
        self._send = send
        self._before_waiting = before_waiting
        self._width = width
        self._open = 1  # batches allowed in flight now, up to width
        self._pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="klaviyo-batch")
        self._pending: set[Future[BatchResult]] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On an error in the caller, batches already sent still finish (their outcome is lost
        # to this run and they are sent again by the next): never abandon a half-sent request.
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def make_room(self) -> list[BatchResult]:
        """Wait until another batch may be sent, or a stop was asked for; return the outcomes
        that finished meanwhile."""
        finished = self._collect(block=False)
        while len(self._pending) >= self._open and not interrupt.requested():
            finished += self._collect(block=True, timeout=STOP_CHECK_SECONDS)
        return finished

    def submit(self, batch: Sequence[Prepared]) -> None:
        """Send a batch; call `make_room` first (and send nothing more after a failure)."""
        self._pending.add(self._pool.submit(self._start, batch))

    def _start(self, batch: Sequence[Prepared]) -> BatchResult:
        if interrupt.requested():
            return BatchResult(unsent=list(batch))
        return self._send(batch)

    def drain(self) -> Iterator[BatchResult]:
        """Every outcome still in flight, as each finishes."""
        while self._pending:
            yield from self._collect(block=True)

    def _collect(self, block: bool, timeout: float | None = None) -> list[BatchResult]:
        if not self._pending:
            return []
        if block and self._before_waiting:
            self._before_waiting()
        done, self._pending = wait(
            self._pending, timeout=timeout if block else 0, return_when=FIRST_COMPLETED
        )
        results = [future.result() for future in done]
        for result in results:
            if result.error is None:
                self._open = min(self._width, self._open * 2)
        return results
