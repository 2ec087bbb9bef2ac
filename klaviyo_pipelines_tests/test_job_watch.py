"""The job watch's turn-taking, with a stand-in for the client whose listing can be made to fail
in ways Klaviyo's API does not (the runner's tests watch real jobs over HTTP: test_delivery)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from klaviyo_pipelines.actions.job_watch import JobWatch


class JobList:
    """Lists every job as complete; its first listing fails after a pause, unexpectedly."""

    def __init__(self) -> None:
        self.listings = 0

    def paginate(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.listings += 1
        if self.listings == 1:
            time.sleep(0.2)  # the other job's thread is waiting for this round meanwhile
            raise ValueError("a page that is not JSON:API")
        for job_id in ("a", "b"):
            yield {"id": job_id, "attributes": {"status": "complete"}}


def test_a_round_that_fails_unexpectedly_does_not_leave_the_others_waiting() -> None:
    watch, jobs = JobWatch("/api/profile-bulk-import-jobs"), JobList()
    deadline = time.monotonic() + 60
    outcome: dict[str, Any] = {}

    def wait_for_b() -> None:
        time.sleep(0.05)  # `a` starts the first round
        outcome["b"] = watch.wait(jobs, "b", deadline)  # type: ignore[arg-type]
        outcome["b_at"] = time.monotonic()

    other = threading.Thread(target=wait_for_b)
    other.start()
    started = time.monotonic()
    with pytest.raises(ValueError, match="not JSON:API"):
        watch.wait(jobs, "a", deadline)  # type: ignore[arg-type]
    other.join(timeout=10)
    assert outcome["b"] == {"status": "complete"}
    assert outcome["b_at"] - started < 2 and jobs.listings == 2
