"""Batches in flight: several batches sent at once, each outcome handed back once Klaviyo answered.

Why: one batch at a time leaves the rate budget unused while we wait for a response, a bulk
job or another endpoint class (Remove Profile looks profiles up in one class and removes them
in another). The rate limiter, not this window, decides how fast requests go; the window only
keeps enough requests ready that the limiter is never idle while rows are waiting.

A stop (`interrupt.requested()`, set by SIGINT / SIGTERM) is checked as each batch starts: a
batch not yet started comes back unsent, and `make_room` stops waiting for room.

A bulk job Klaviyo accepted (`BatchResult.opened`) no longer holds a sending slot: it is awaited
by a thread of its own (`settle`), so imports keep going out at their endpoint's rate however
long Klaviyo takes to process them. Its rows, packed by the action, count against
`MAX_OPEN_JOB_ROWS` until it settles.

Guarantee kept: nothing here writes state. An outcome is returned to the caller, who commits
it, only after its batch finished; a crash with batches in flight leaves their rows
unconfirmed, so the next run's change set has them again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Self

from klaviyo_pipelines import interrupt
from klaviyo_pipelines.actions.base import BatchResult, Prepared
from klaviyo_pipelines.actions.open_job import OpenJob

MAX_BATCHES_IN_FLIGHT = 8
# Bounds memory: three 10,000-profile imports, or eight 1,000-event batches.
MAX_ROWS_IN_FLIGHT = 30_000
# Rows of accepted jobs still processing, packed (`actions/open_job.py`, about 0.07 KB each
# once compressed, 70 MB in all): 40 s of imports at 25,000 profiles/s, so that jobs taking
# 30 s hold the ceiling with room for the time each takes to be seen ended and committed
# (a cap of exactly 750,000 stalled the sending whenever a job was seen late).
MAX_OPEN_JOB_ROWS = 1_000_000
MAX_OPEN_JOBS = 100  # each awaited by a thread, mostly asleep until its next poll
# Before anything is confirmed, the run waits this long for its first job to end before sending
# more: where Klaviyo is quick it learns that jobs succeed first; under load (jobs of half a
# minute) it does not pay a job's whole latency at its start.
FIRST_JOB_WAIT_SECONDS = 2.0
STOP_CHECK_SECONDS = 0.1  # how soon a wait for room notices a stop
# A wait for a batch shorter than this keeps what `before_waiting` would let go of (the
# DuckDB file): closing it checkpoints and opening it again takes ~18 ms, more than most
# waits for a sending slot; another process waits at most this much longer for its turn.
LET_GO_AFTER_SECONDS = 0.05

SendBatch = Callable[[Sequence[Prepared]], BatchResult]
SettleJob = Callable[[OpenJob], BatchResult]
BeforeWaiting = Callable[[], None]


def in_flight_width(batch_size: int) -> int:
    """How many batches of this size may be in flight: at least two, so one is always queued."""
    return max(2, min(MAX_BATCHES_IN_FLIGHT, MAX_ROWS_IN_FLIGHT // max(batch_size, 1)))


class InFlight:
    """A bounded window of batches being sent by worker threads, and of the jobs they opened.

    `make_room` blocks while the window is full and returns the outcomes that finished
    meanwhile, `submit` sends a batch, `drain` waits for the rest. Outcomes come back in the
    order batches (or their jobs) finish, which is free to differ from the order they were
    sent: every row's outcome is its own.

    The window starts at one batch and doubles with each batch that succeeds (a slow start):
    against a dead API or a refused key the run fails after one batch's attempts, as it did
    when batches went one by one, instead of a whole window of them. A job Klaviyo accepted
    counts as a success and holds no place in the window. Only the run's first job is waited
    for, `FIRST_JOB_WAIT_SECONDS` at most: waiting until it ends would cost every run one job's
    latency (half a minute under load).

    `before_waiting` is called once a wait for a batch outlasts `LET_GO_AFTER_SECONDS`, so the
    caller can let go of what others may use meanwhile (the warehouse file).
    """

    def __init__(
        self,
        send: SendBatch,
        width: int,
        settle: SettleJob | None = None,
        before_waiting: BeforeWaiting | None = None,
    ) -> None:
        if width < 1:
            raise ValueError("width must be at least 1")
        self._send = send
        self._settle = settle
        self._before_waiting = before_waiting
        self._width = width
        self._open = 1  # batches allowed in flight now, up to width
        self._confirmed = False  # whether a batch's rows were confirmed yet
        self._first_job_wait_ends: float | None = None
        self._pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="klaviyo-batch")
        self._jobs = ThreadPoolExecutor(max_workers=MAX_OPEN_JOBS, thread_name_prefix="klaviyo-job")
        self._sending: set[Future[BatchResult]] = set()
        self._settling: dict[Future[BatchResult], int] = {}  # an open job -> its rows

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
        self._jobs.shutdown(wait=True, cancel_futures=True)

    @property
    def pending(self) -> int:
        """Batches being sent and jobs being awaited."""
        return len(self._sending) + len(self._settling)

    def make_room(self, unless_awaiting_first_job: bool = False) -> list[BatchResult]:
        """Wait until another batch may be sent, or a stop was asked for, or (if asked) the run's
        first job is being awaited; return the outcomes that finished meanwhile."""
        finished = self._collect(block=False)
        while self._full() and not interrupt.requested():
            if unless_awaiting_first_job and self.awaiting_first_job:
                break
            finished += self._collect(block=True, timeout=STOP_CHECK_SECONDS)
        return finished

    def _full(self) -> bool:
        return (
            len(self._sending) >= self._open
            or self.awaiting_first_job
            or len(self._settling) >= MAX_OPEN_JOBS
            or sum(self._settling.values()) >= MAX_OPEN_JOB_ROWS
        )

    @property
    def awaiting_first_job(self) -> bool:
        """Whether nothing more is sent until the run's first job ends or its wait runs out: a
        wait whose end is known, which the caller can spend preparing rows."""
        return (
            not self._confirmed
            and self._first_job_wait_ends is not None
            and time.monotonic() < self._first_job_wait_ends
        )

    def submit(self, batch: Sequence[Prepared]) -> None:
        """Send a batch; call `make_room` first (and send nothing more after a failure)."""
        self._sending.add(self._pool.submit(self._start, batch))

    def _start(self, batch: Sequence[Prepared]) -> BatchResult:
        if interrupt.requested():
            return BatchResult(unsent=list(batch))
        return self._send(batch)

    def drain(self) -> Iterator[BatchResult]:
        """Every outcome still in flight, as each finishes."""
        while self._sending or self._settling:
            yield from self._collect(block=True)

    def _collect(self, block: bool, timeout: float | None = None) -> list[BatchResult]:
        pending = self._sending | self._settling.keys()
        if not pending:
            return []
        done = self._wait(pending, timeout if block else 0)
        results = []
        for future in done:
            result = future.result()
            if future in self._sending:
                self._sending.remove(future)
                for job in result.opened:
                    self._await(job)
                if result.opened and self._first_job_wait_ends is None:
                    self._first_job_wait_ends = time.monotonic() + FIRST_JOB_WAIT_SECONDS
            else:
                del self._settling[future]
            if result.error is None:
                self._confirmed = self._confirmed or not result.opened
                self._open = min(self._width, self._open * 2)
            result.opened = []
            if result.rows or result.error:
                results.append(result)
        return results

    def _wait(
        self, pending: set[Future[BatchResult]], timeout: float | None
    ) -> set[Future[BatchResult]]:
        """The futures that finished within `timeout` (None: until one does), calling
        `before_waiting` only if none finished within `LET_GO_AFTER_SECONDS`."""
        if timeout == 0 or self._before_waiting is None:
            return wait(pending, timeout=timeout, return_when=FIRST_COMPLETED).done
        brief = LET_GO_AFTER_SECONDS if timeout is None else min(timeout, LET_GO_AFTER_SECONDS)
        done = wait(pending, timeout=brief, return_when=FIRST_COMPLETED).done
        if done:
            return done
        self._before_waiting()
        rest = None if timeout is None else timeout - brief
        return wait(pending, timeout=rest, return_when=FIRST_COMPLETED).done

    def _await(self, job: OpenJob) -> None:
        assert self._settle is not None, "a batch opened a job: InFlight needs `settle`"
        self._settling[self._jobs.submit(self._settle, job)] = len(job)
