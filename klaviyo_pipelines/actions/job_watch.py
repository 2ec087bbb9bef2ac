"""A run's open bulk jobs, watched through Klaviyo's job list: one request for up to 100 of them.

Why: polling each job (`GET .../{id}`) spends the job endpoints' quota (150 a minute for
profile imports, as many as the imports themselves) once per job and poll, and jobs opened in
a burst come due together and draw 429s. The job list, newest first, tells the status of every
job a run has open (at most `delivery.MAX_OPEN_JOBS`, 100) in one request, however many there
are. The threads awaiting jobs take turns listing: whichever finds a round due lists for all,
so one list request at most is in flight, with no thread of its own. Rounds come quickly at
first (a quick job is seen in tens of milliseconds) and then at `ROUNDS_PER_SECOND`, well
inside the quota whatever the number of jobs. A job the list does not show within
`MAX_LIST_PAGES` (other writers' jobs are newer) is read on its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.errors import KlaviyoError

ENDED = frozenset({"complete", "cancelled"})
LIST_PAGE_SIZE = 100  # Klaviyo's largest page
MAX_LIST_PAGES = 2
FIRST_GAP_SECONDS = 0.05  # between rounds at first, doubling while no job ends
MAX_GAP_SECONDS = 1.0
ROUNDS_PER_SECOND = 2.0  # in the long run: 80% of the list's 150 a minute
ROUND_BURST = 5  # rounds that may come at the first gaps before the long-run rate applies


class JobWatch:
    """The jobs awaited at `path` (a job list endpoint) and what the last rounds learned."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._changed = threading.Condition()
        self._waiting: set[str] = set()
        self._ended: dict[str, dict[str, Any]] = {}  # job id -> its attributes
        self._failed: dict[str, KlaviyoError] = {}  # job id -> the error of its round
        self._listing = False
        self._gap = FIRST_GAP_SECONDS
        self._last_round = float("-inf")
        self._tokens = float(ROUND_BURST)
        self._tokens_at = time.monotonic()

    def wait(self, client: KlaviyoClient, job_id: str, deadline: float) -> dict[str, Any] | None:
        """The attributes of `job_id` once it ended, or None if it is still open at `deadline`;
        raises the `KlaviyoError` of a round that could not tell."""
        with self._changed:
            self._waiting.add(job_id)
            try:
                while True:
                    if job_id in self._ended:
                        return self._ended.pop(job_id)
                    if job_id in self._failed:
                        raise self._failed.pop(job_id)
                    now = time.monotonic()
                    if now >= deadline:
                        return None
                    due = self._next_round()
                    if self._listing:  # its round ends with a notify
                        self._changed.wait(deadline - now)
                    elif now >= due:
                        self._round(client)
                    else:
                        self._changed.wait(min(deadline, due) - now)
            finally:
                self._waiting.discard(job_id)
                self._ended.pop(job_id, None)
                self._failed.pop(job_id, None)

    def _next_round(self) -> float:
        """When the next round may start: a gap after the last, and a token to spend."""
        refill = (1 - self._tokens) / ROUNDS_PER_SECOND if self._tokens < 1 else 0.0
        return max(self._last_round + self._gap, self._tokens_at + refill)

    def _round(self, client: KlaviyoClient) -> None:
        """List the jobs, outside the lock, and tell every waiter what became of its job.
        Called with the lock held; returns with it held."""
        now = time.monotonic()
        self._tokens = min(ROUND_BURST, self._tokens + (now - self._tokens_at) * ROUNDS_PER_SECOND)
        self._tokens, self._tokens_at, self._last_round = self._tokens - 1, now, now
        self._listing, waiting = True, set(self._waiting)
        self._changed.release()
        try:
            ended, error = self._look_up(client, waiting), None
        except KlaviyoError as exc:
            ended, error = {}, exc
        finally:  # whatever happened, the others stop waiting for this round
            self._changed.acquire()
            self._listing = False
            self._changed.notify_all()
        if error is not None:
            self._failed.update(dict.fromkeys(waiting, error))
        ended = {job: attributes for job, attributes in ended.items() if job in self._waiting}
        self._ended.update(ended)
        self._gap = FIRST_GAP_SECONDS if ended else min(self._gap * 2, MAX_GAP_SECONDS)

    def _look_up(self, client: KlaviyoClient, jobs: set[str]) -> dict[str, dict[str, Any]]:
        """The attributes of those of `jobs` that ended: from the newest jobs' list, and for
        any it did not show, from the job itself."""
        ended: dict[str, dict[str, Any]] = {}
        unseen = set(jobs)
        params = {"sort": "-created_at", "page[size]": LIST_PAGE_SIZE}
        for listed, job in enumerate(client.paginate(self._path, params), 1):
            unseen.discard(job.get("id"))
            if job.get("id") in jobs and job["attributes"]["status"] in ENDED:
                ended[job["id"]] = job["attributes"]
            if not unseen or listed >= LIST_PAGE_SIZE * MAX_LIST_PAGES:
                break
        for job_id in unseen:
            attributes = client.get(f"{self._path}/{job_id}")["data"]["attributes"]
            if attributes["status"] in ENDED:
                ended[job_id] = attributes
        return ended
