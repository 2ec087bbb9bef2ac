"""SIGTERM stops a sync at once: nothing more is sent, what Klaviyo confirmed is recorded, the
report says interrupted with the true count, and the next run sends the rest exactly once.

The real `klaviyo-pipelines sync` command runs in a child process (through Dagster, as a user
runs it) against the sandbox served by this test process, at Klaviyo's real rate for bulk
events (about 2.5 requests a second), so the sync is still sending when the signal comes.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from klaviyo_pipelines import interrupt
from klaviyo_pipelines.actions.events import derived_unique_id
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.delivery import MAX_BATCHES_IN_FLIGHT
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import run_report, state_table
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.test_crash import start_child

ROWS = 2_000
BATCH = 10
CONFIRMED_BEFORE_SIGNAL = 15  # bulk requests Klaviyo answered before the test sends SIGTERM
BULK = "/api/event-bulk-create-jobs"
CONFIG = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}"}}
models:
  page_views: {{sql: "select * from shop.page_views", primary_key: view_id}}
syncs:
  views:
    model: page_views
    action: track_event
    mapping: {{time: viewed_at, properties: {{url: url}}}}
    settings: {{metric_name: Viewed Page, batch_size: {batch}}}
"""


def load(wh: Warehouse) -> None:
    start = datetime(2026, 3, 1, 8, 0, 0)
    rows = [
        (f"v{i:05d}", f"u{i % 300}@shop.example", f"/p/{i}", start + timedelta(minutes=i))
        for i in range(ROWS)
    ]
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.page_views"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.page_views "
                "(view_id VARCHAR, email VARCHAR, url VARCHAR, viewed_at TIMESTAMP)"
            )
        )
        wh.bulk_insert(conn, "shop.page_views", ["view_id", "email", "url", "viewed_at"], rows)


def bulk_posts(sandbox: Sandbox) -> list:
    return [r for r in list(sandbox.state.requests) if r.method == "POST" and r.path == BULK]


def recorded_keys(wh: Warehouse) -> set[str]:
    with wh.engine.connect() as conn:
        table = wh.table(state_table("views"))
        return set(conn.execute(sa.text(f"SELECT row_key FROM {table}")).scalars())


def events_by_key(sandbox: Sandbox) -> Counter[str]:
    keys = {derived_unique_id("views", f"v{i:05d}"): f"v{i:05d}" for i in range(ROWS)}
    return Counter(keys[e.unique_id] for e in sandbox.state.events)


def test_sigterm_stops_sending_at_once_records_what_was_confirmed_and_reports_it(
    warehouse_url, tmp_path, capsys
):
    with Sandbox(api_key=TEST_API_KEY) as sandbox:
        wh = Warehouse(warehouse_url)
        load(wh)
        wh.dispose()  # DuckDB: the child needs the file
        config = tmp_path / "views.yaml"
        config.write_text(CONFIG.format(url=warehouse_url, base=sandbox.url, batch=BATCH))

        child = start_child(config, sandbox, cli=True)
        deadline = time.monotonic() + 120
        while len([r for r in bulk_posts(sandbox) if r.status == 202]) < CONFIRMED_BEFORE_SIGNAL:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the sync never got going"
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        signalled, at_signal = time.monotonic(), len(sandbox.state.requests)
        try:
            out, err = child.communicate(timeout=30)
        finally:
            child.kill()  # a run that would not stop must not outlive the test
        took = time.monotonic() - signalled

        # Stopped at once: only the batches already in flight were sent after the signal.
        assert took < 8, f"the sync went on for {took:.1f}s after SIGTERM"
        after = len(sandbox.state.requests) - at_signal
        assert after <= MAX_BATCHES_IN_FLIGHT, f"{after} requests after the signal"
        assert child.returncode != 0, out + err[-3000:]  # cli/syncs.py: 143
        report = json.loads(out)["syncs"]["views"]
        assert report["status"] == "interrupted" and "SIGTERM" in report["error"]

        wh = Warehouse(warehouse_url)
        recorded = recorded_keys(wh)
        in_klaviyo = events_by_key(sandbox)
        assert recorded == set(in_klaviyo), "the state must hold exactly what Klaviyo confirmed"
        assert 0 < len(recorded) < ROWS and report["delivered"] == len(recorded)
        logged = run_report(wh, "views")
        assert logged is not None and logged["status"] == "interrupted"
        assert logged["delivered"] == len(recorded)

        # The next run (fast: rate limits off) sends the rest, each event exactly once.
        sandbox.app.enforce_rate_limits = False
        spec = parse_config(config.read_text(), str(config))
        take_snapshot(wh, spec.models["page_views"], spec.path)
        with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, time_scale=1000) as client:
            rest = run_sync(spec, "views", wh, client)
        assert rest.status == "success", rest.error
        assert sum(rest.delivered.values()) == ROWS - len(recorded)
        in_klaviyo = events_by_key(sandbox)
        assert len(in_klaviyo) == ROWS and max(in_klaviyo.values()) == 1
        assert recorded_keys(wh) == set(in_klaviyo)
        wh.dispose()
    with capsys.disabled():
        print(
            f"\ninterrupt ({warehouse_url.split(':')[0]}): stopped {took:.2f}s after SIGTERM, "
            f"{after} requests after it, {len(recorded)} of {ROWS} rows recorded"
        )


def test_ctrl_c_asks_for_a_stop_and_a_second_one_stops_hard():
    with interrupt.on_signals():
        signal.raise_signal(signal.SIGINT)  # handled at once, in this (the main) thread
        assert interrupt.requested() and interrupt.signal_number() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the handler that was there before
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupt.on_signals():  # a new run starts with a clear flag
        assert not interrupt.requested() and interrupt.signal_number() is None


def test_a_signal_the_process_ignores_stays_ignored():
    """A job a shell starts in the background ignores SIGINT (a Ctrl-C at the terminal is meant
    for the job in the foreground): a sync there goes on, and SIGTERM still stops it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not interrupt.requested()
            signal.raise_signal(signal.SIGTERM)
            assert interrupt.requested() and interrupt.signal_number() == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
        with interrupt.on_signals():  # clears the flag, so the tests after this one can send
            assert not interrupt.requested()
