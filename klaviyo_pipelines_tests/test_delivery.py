"""Batches in flight: several at once, yet nothing recorded before Klaviyo confirmed it.

The window itself is tested with a send function that blocks until the test lets it go, so
what is in flight at each moment is known exactly; the runner is tested over real HTTP to the
sandbox (bulk import jobs kept `processing` long enough for a second job to be submitted).
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from itertools import pairwise

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions import job_watch, upsert_profile
from klaviyo_pipelines.actions.base import BatchResult, Prepared
from klaviyo_pipelines.actions.open_job import OpenJob
from klaviyo_pipelines.collector import FULL_COLLECTION_THRESHOLD, fewer_full_collections
from klaviyo_pipelines.delivery import LET_GO_AFTER_SECONDS, InFlight, in_flight_width
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.errors import TransientError
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import state_table
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.test_upsert_profile_sync import config_for, customers, load

BULK = "/api/profile-bulk-import-jobs"


class Gate:
    """A send function whose calls block until released; it counts what is in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail: set[int] = set()

    def __call__(self, batch: Sequence[Prepared]) -> BatchResult:
        number = len(batch)  # the tests pass batches of distinct lengths as names
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.started.release()
        self.release.acquire()
        with self.lock:
            self.running -= 1
        if number in self.fail:
            error = TransientError(method="POST", path="/x", reason="down")
            return BatchResult(unsent=list(batch), error=error)
        return BatchResult(delivered=list(batch))


def batch(n: int) -> list[Prepared]:
    return [None] * n  # type: ignore[list-item]  # the gate only counts them


def test_window_starts_at_one_batch_and_doubles_with_each_success() -> None:
    gate = Gate()
    finished: list[BatchResult] = []
    with InFlight(gate, width=4) as flight:
        flight.submit(batch(1))
        gate.started.acquire()  # batch 1 is being sent
        room = threading.Thread(target=lambda: finished.extend(flight.make_room()))
        room.start()
        room.join(0.2)
        assert room.is_alive(), "a second batch waits until the first one succeeded"
        gate.release.release()
        room.join(5)
        assert not room.is_alive() and [len(r.delivered) for r in finished] == [1]
        flight.submit(batch(2))
        assert flight.make_room() == []  # two may now be in flight at once
        flight.submit(batch(3))
        gate.started.acquire()
        gate.started.acquire()
        assert gate.running == 2
        for _ in range(2):
            gate.release.release()
        results = list(flight.drain())
    assert sorted(len(r.delivered) for r in results) == [2, 3]
    assert gate.peak == 2


def test_window_never_exceeds_its_width() -> None:
    gate = Gate()
    with InFlight(gate, width=3) as flight:
        done: list[BatchResult] = []
        releaser = threading.Thread(
            target=lambda: [gate.release.release() for _ in range(12)], daemon=True
        )
        for n in range(1, 13):
            if n == 2:
                releaser.start()
            done += flight.make_room()
            flight.submit(batch(n))
        done += list(flight.drain())
    assert len(done) == 12
    assert gate.peak <= 3


def test_a_failed_batch_stops_the_window_from_growing() -> None:
    gate = Gate()
    gate.fail = {1}
    with InFlight(gate, width=4) as flight:
        flight.submit(batch(1))
        gate.release.release()
        finished = flight.make_room()
        while not finished:
            finished = flight.make_room()
        assert finished[0].error is not None
        # still one at a time: the next batch is sent only once the window has room again
        flight.submit(batch(2))
        assert flight.pending == 1
        gate.release.release()
        list(flight.drain())
    assert gate.peak == 1


def test_the_warehouse_is_let_go_only_when_a_wait_outlasts_a_moment(monkeypatch) -> None:
    """Letting go of the DuckDB file checkpoints it and the next transaction opens it again:
    a wait that ends within LET_GO_AFTER_SECONDS keeps it; a longer one lets it go, once."""
    gate = Gate()
    calls: list[float] = []
    with InFlight(gate, width=1, before_waiting=lambda: calls.append(time.monotonic())) as flight:
        # A generous moment, so that a busy machine's thread switches never outlast it.
        monkeypatch.setattr("klaviyo_pipelines.delivery.LET_GO_AFTER_SECONDS", 1.0)
        gate.release.release()  # answered at once
        flight.submit(batch(1))
        assert [len(r.delivered) for r in list(flight.drain())] == [1]
        assert calls == []
        monkeypatch.undo()
        flight.submit(batch(2))
        started = time.monotonic()
        threading.Timer(0.5, gate.release.release).start()  # a long wait
        assert [len(r.delivered) for r in list(flight.drain())] == [2]
    assert len(calls) == 1
    assert LET_GO_AFTER_SECONDS <= calls[0] - started < 0.4


def test_width_bounds_rows_in_flight() -> None:
    assert in_flight_width(10_000) == 3
    assert in_flight_width(1_000) == 8
    assert in_flight_width(100_000) == 2


# ---- the runner, over real HTTP ---------------------------------------------------------------


def run(config, wh: Warehouse, sandbox: Sandbox, on_batch=None, **options) -> SyncReport:
    take_snapshot(wh, config.models["customers"], config.path)
    options = {"max_backoff": 0.2, **options}
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, **options) as client:
        return run_sync(config, "profiles", wh, client, on_batch=on_batch)


def delivered_keys(wh: Warehouse) -> set[str]:
    with wh.engine.connect() as conn:
        table = wh.table(state_table("profiles"))
        return set(conn.execute(sa.text(f"SELECT row_key FROM {table}")).scalars())


def job_reads(sandbox: Sandbox) -> tuple[list, list]:
    """The job list requests, and the reads of single jobs (not of their import errors)."""
    gets = [r for r in sandbox.state.requests if r.method == "GET" and r.path.startswith(BULK)]
    lists = [r for r in gets if r.path.rstrip("/") == BULK]
    singles = [r for r in gets if r not in lists and "/import-errors" not in r.path]
    return lists, singles


def assert_watched_through_the_list(sandbox: Sandbox, elapsed: float) -> None:
    """Open jobs were watched through the job list alone, at its own pace however many."""
    lists, singles = job_reads(sandbox)
    assert singles == []
    limit = job_watch.ROUND_BURST + job_watch.ROUNDS_PER_SECOND * elapsed
    assert 0 < len(lists) <= limit, (len(lists), elapsed)


def test_jobs_overlap_and_rows_are_recorded_only_once_their_job_completed(duckdb_url) -> None:
    wh = Warehouse(duckdb_url)
    load(wh, customers(600))
    with Sandbox(api_key=TEST_API_KEY, job_delay=0.3) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        unconfirmed: list[str] = []

        def check(report: SyncReport, result: BatchResult) -> None:
            # whenever a batch is committed, every row in the state was imported by Klaviyo
            with sandbox.state.lock:
                imported = {p.external_id for p in sandbox.state.profiles.values()}
            unconfirmed.extend(delivered_keys(wh) - imported)

        started = time.monotonic()
        report = run(config, wh, sandbox, on_batch=check)
        elapsed = time.monotonic() - started
        assert report.status == "success" and sum(report.delivered.values()) == 600
        assert unconfirmed == []
        # a job was submitted while another one was still queued or processing
        jobs = sorted(sandbox.state.jobs.values(), key=lambda job: job.created_at)
        assert len(jobs) == 6
        assert any(
            later.created_at < earlier.completed_at
            for earlier, later in pairwise(jobs)
            if earlier.completed_at
        )
        assert_watched_through_the_list(sandbox, elapsed)
    wh.engine.dispose()


def test_imports_go_out_while_earlier_jobs_process(duckdb_url) -> None:
    """Jobs that take half a second no longer hold the sending window: more of them are open
    at once than batches may be sent at once."""
    wh = Warehouse(duckdb_url)
    load(wh, customers(2000))
    with Sandbox(api_key=TEST_API_KEY, job_delay=0.5) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        started = time.monotonic()
        report = run(config, wh, sandbox)
        elapsed = time.monotonic() - started
        assert report.status == "success" and sum(report.delivered.values()) == 2000
        assert len(delivered_keys(wh)) == 2000
        jobs = list(sandbox.state.jobs.values())
        assert len(jobs) == 20 and all(job.completed_at for job in jobs)
        open_at_once = max(
            sum(other.created_at <= job.created_at < other.completed_at for other in jobs)
            for job in jobs
        )
        assert open_at_once > in_flight_width(100), open_at_once
        assert_watched_through_the_list(sandbox, elapsed)
    wh.engine.dispose()


def test_a_job_the_list_does_not_show_is_read_on_its_own(duckdb_url, monkeypatch) -> None:
    """Other writers' newer jobs can push a run's job past the pages listed: it is then read by
    its id, and the run neither stalls nor loses it."""
    monkeypatch.setattr(job_watch, "LIST_PAGE_SIZE", 1)
    monkeypatch.setattr(job_watch, "MAX_LIST_PAGES", 1)
    wh = Warehouse(duckdb_url)
    load(wh, customers(300))
    with Sandbox(api_key=TEST_API_KEY, job_delay=0.3) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        report = run(config, wh, sandbox)
        assert report.status == "success" and sum(report.delivered.values()) == 300
        lists, singles = job_reads(sandbox)
        assert lists and singles  # the newest job came from the list, an older one by id
    assert len(delivered_keys(wh)) == 300
    wh.engine.dispose()


def test_a_job_list_that_fails_leaves_its_jobs_rows_for_the_next_run(duckdb_url) -> None:
    """When Klaviyo cannot list the jobs, nobody knows what became of their rows: none is
    recorded, the run fails naming the request, and the next run sends them again."""
    wh = Warehouse(duckdb_url)
    load(wh, customers(300))
    with Sandbox(api_key=TEST_API_KEY, job_delay=0.1) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        sandbox.faults.add(Fault(kind="status", status=503, count=None, method="GET"))
        report = run(config, wh, sandbox, max_attempts=2)
        assert report.status == "failed"
        assert f"GET {BULK}" in (report.error or "") and "503" in (report.error or "")
        assert delivered_keys(wh) == set() and sum(report.retryable.values()) > 0
        sandbox.faults.clear()
        again = run(config, wh, sandbox)
        assert again.status == "success"
    assert len(delivered_keys(wh)) == 300
    wh.engine.dispose()


def test_a_job_that_does_not_end_in_time_fails_the_run_and_keeps_its_rows(duckdb_url) -> None:
    wh = Warehouse(duckdb_url)
    load(wh, customers(100))
    with Sandbox(api_key=TEST_API_KEY, job_delay=3.0) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{job_timeout_seconds: 0.5}")
        report = run(config, wh, sandbox)
        assert report.status == "failed"
        assert "had not ended after 0.5 s" in (report.error or "")
        assert delivered_keys(wh) == set() and sum(report.retryable.values()) == 100
    wh.engine.dispose()


@pytest.mark.parametrize("job_delay", [0.1, 2.0])
def test_the_first_job_is_waited_for_briefly_not_for_its_whole_latency(
    duckdb_url, monkeypatch, job_delay
) -> None:
    """A quick first job is confirmed before a second import goes out; a slow one (2 s here,
    half a minute under load) holds the second back for FIRST_JOB_WAIT_SECONDS only."""
    monkeypatch.setattr("klaviyo_pipelines.delivery.FIRST_JOB_WAIT_SECONDS", 0.5)
    wh = Warehouse(duckdb_url)
    load(wh, customers(300))
    with Sandbox(api_key=TEST_API_KEY, job_delay=job_delay) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        report = run(config, wh, sandbox)
        assert report.status == "success" and sum(report.delivered.values()) == 300
        first, second, _ = sorted(sandbox.state.jobs.values(), key=lambda job: job.created_at)
    assert first.completed_at is not None
    if job_delay < 0.5:
        assert second.created_at >= first.completed_at
    else:
        assert first.created_at + timedelta(seconds=0.5) <= second.created_at
        assert second.created_at < first.completed_at
    wh.engine.dispose()


def test_rows_are_prepared_while_the_first_job_is_awaited(duckdb_url, monkeypatch) -> None:
    """The first job's wait is spent preparing the next pages (up to PREPARED_AHEAD_ROWS),
    which go out together once it ends, instead of the run idling for it."""
    monkeypatch.setattr("klaviyo_pipelines.delivery.FIRST_JOB_WAIT_SECONDS", 0.5)
    monkeypatch.setattr("klaviyo_pipelines.runner.MIN_PAGE_ROWS", 100)
    monkeypatch.setattr("klaviyo_pipelines.runner.PREPARED_AHEAD_ROWS", 300)
    prepared_when_sent: list[int] = []
    prepared = [0]
    prepare, submit = upsert_profile.UpsertProfile.prepare, InFlight.submit

    def counted_prepare(action, row):  # type: ignore[no-untyped-def]
        prepared[0] += 1
        return prepare(action, row)

    def counted_submit(flight, batch):  # type: ignore[no-untyped-def]
        prepared_when_sent.append(prepared[0])
        submit(flight, batch)

    monkeypatch.setattr(upsert_profile.UpsertProfile, "prepare", counted_prepare)
    monkeypatch.setattr(InFlight, "submit", counted_submit)
    wh = Warehouse(duckdb_url)
    load(wh, customers(1000))
    with Sandbox(api_key=TEST_API_KEY, job_delay=2.0) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        report = run(config, wh, sandbox)
        assert report.status == "success" and sum(report.delivered.values()) == 1000
        first, second, *_ = sorted(sandbox.state.jobs.values(), key=lambda job: job.created_at)
    assert first.created_at + timedelta(seconds=0.5) <= second.created_at
    # The first import went out with its own page; the second only after three more pages.
    assert prepared_when_sent[:2] == [100, 400], prepared_when_sent
    assert len(delivered_keys(wh)) == 1000
    wh.engine.dispose()


@pytest.mark.parametrize("job_delay", [0.05, 1.0])
def test_only_a_job_that_stays_open_holds_its_rows_compressed(
    duckdb_url, monkeypatch, job_delay
) -> None:
    """Compressing costs CPU a quick job does not need: its rows stay as packed; a slow job's
    are compressed while it waits. Either way every row's state is the row as delivered."""
    monkeypatch.setattr(upsert_profile, "COMPRESS_AFTER_SECONDS", 0.3)
    compressed: list[str] = []
    compress = OpenJob.compress

    def counted(job: OpenJob) -> None:
        compressed.append(job.job_id)
        compress(job)

    monkeypatch.setattr(OpenJob, "compress", counted)
    wh = Warehouse(duckdb_url)
    rows = customers(300)
    load(wh, rows)
    with Sandbox(api_key=TEST_API_KEY, job_delay=job_delay) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        report = run(config, wh, sandbox)
        assert report.status == "success" and sum(report.delivered.values()) == 300
        jobs = len(sandbox.state.jobs)
    assert len(set(compressed)) == (jobs if job_delay > 0.3 else 0) and jobs == 3
    with wh.engine.connect() as conn:
        table = wh.table(state_table("profiles"))
        states = dict(conn.execute(sa.text(f"SELECT row_key, row_json FROM {table}")).all())
    for key, email, phone, name, city, ltv in rows:
        assert json.loads(states[key]) == {
            "customer_id": key,
            "email": email,
            "phone": phone,
            "first_name": name,
            "city": city,
            "ltv": ltv,
        }
    wh.engine.dispose()


def test_a_failure_mid_run_records_only_confirmed_batches(duckdb_url) -> None:
    wh = Warehouse(duckdb_url)
    load(wh, customers(800))
    with Sandbox(api_key=TEST_API_KEY, job_delay=0.1) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        # the 4th submit and every one after it fail: three jobs at most complete
        seen = {"posts": 0}
        original = sandbox.faults.pick

        def pick(method: str, path: str):
            if method == "POST" and path.startswith(BULK):
                seen["posts"] += 1
                if seen["posts"] >= 4:
                    return Fault(kind="status", status=503, count=None)
            return original(method, path)

        sandbox.faults.pick = pick  # type: ignore[method-assign]
        report = run(config, wh, sandbox, max_attempts=2)
        assert report.status == "failed" and "503" in (report.error or "")
        recorded = delivered_keys(wh)
        in_klaviyo = {p.external_id for p in sandbox.state.profiles.values()}
        assert recorded <= in_klaviyo and len(recorded) == 300
        assert sum(report.retryable.values()) + len(recorded) <= 800
    wh.engine.dispose()


def test_pacing_with_batches_in_flight_stays_under_the_limits(duckdb_url) -> None:
    """Six imports a window allowed (burst 10/s, steady 150/m at scale 25): no 429."""
    wh = Warehouse(duckdb_url)
    load(wh, customers(1500))
    with Sandbox(api_key=TEST_API_KEY, time_scale=25) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 50}")
        report = run(config, wh, sandbox, time_scale=25)
        assert report.status == "success" and sum(report.delivered.values()) == 1500
        assert report.rate_limited == 0
        assert not any(r.status == 429 for r in sandbox.state.requests)
    wh.engine.dispose()


# ---- the collector's thresholds ---------------------------------------------------------------


def test_a_delivery_runs_with_full_collections_rarer_and_restores_the_thresholds(
    duckdb_url,
) -> None:
    before = gc.get_threshold()
    wh = Warehouse(duckdb_url)
    load(wh, customers(300))
    during: list[tuple[int, ...]] = []
    with Sandbox(api_key=TEST_API_KEY) as sandbox:
        config = config_for(duckdb_url, sandbox, settings="{batch_size: 100}")
        report = run(config, wh, sandbox, on_batch=lambda *_: during.append(gc.get_threshold()))
        assert report.status == "success"
    assert during and all(t == (*before[:2], FULL_COLLECTION_THRESHOLD) for t in during)
    assert gc.get_threshold() == before
    wh.engine.dispose()


def test_the_thresholds_are_restored_when_the_last_overlapping_delivery_ends() -> None:
    before = gc.get_threshold()
    first, second = fewer_full_collections(), fewer_full_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[2] == FULL_COLLECTION_THRESHOLD
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
