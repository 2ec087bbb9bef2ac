"""Track Event end to end: warehouse -> change set -> real HTTP to the sandbox -> its events.

Tests where warehouse types or the state tables matter (timestamps, decimals, identifiers,
reruns) run on DuckDB and on PostgreSQL (the `warehouse_url` fixture); those about payload rules
and packing run on DuckDB only, as each PostgreSQL test pays for a fresh database. Tests named
after Segment's behaviour (segment-klaviyo-actions.md §2.5) pin what we keep and what we fix.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.events import derived_unique_id, event_time
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.actions.track_event import TrackEvent
from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.warehouse.changes import ChangeRow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

BULK = "/api/event-bulk-create-jobs"
MB5 = 5 * 1024 * 1024
COLUMNS = {
    "event_id": "VARCHAR",
    "email": "VARCHAR",
    "phone_number": "VARCHAR",
    "country_code": "VARCHAR",
    "external_id": "VARCHAR",
    "anonymous_id": "VARCHAR",
    "event_name": "VARCHAR",
    "amount": "DECIMAL(10,2)",
    "amount_text": "VARCHAR",
    "uid": "VARCHAR",
    "currency": "VARCHAR",
    "occurred_at": "TIMESTAMP",
    "sku": "VARCHAR",
}
WHEN = datetime(2024, 5, 1, 12, 30, 15, 987654)


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """The sandbox on fast time (rate windows of 1/60 s and 1 s): runs here follow each other
    within a minute, and on real time the client would spread the minute's remaining quota
    evenly over it, as it should against Klaviyo, making these tests wait."""
    with Sandbox(api_key=TEST_API_KEY, port=0, time_scale=60) as running:
        monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
        monkeypatch.setenv("KLAVIYO_BASE_URL", running.url)
        yield running


def row(i: int, **values: Any) -> dict[str, Any]:
    base = {
        "event_id": f"e{i:05d}",
        "email": f"user{i}@example.com",
        "phone_number": None,
        "country_code": None,
        "external_id": None,
        "anonymous_id": None,
        "event_name": "Placed Order",
        "amount": Decimal("12.50"),
        "amount_text": "12.50",
        "uid": None,
        "currency": "usd",
        "occurred_at": WHEN,
        "sku": f"SKU-{i}",
    }
    return {**base, **values}


def load(wh: Warehouse, rows: list[dict[str, Any]], columns: dict[str, str] = COLUMNS) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.events"))
        ddl = ", ".join(f"{name} {kind}" for name, kind in columns.items())
        conn.execute(sa.text(f"CREATE TABLE shop.events ({ddl})"))
        wh.bulk_insert(conn, "shop.events", list(columns), [[r[c] for c in columns] for r in rows])


def config_for(url: str, sandbox: Sandbox, syncs: dict[str, str]) -> Config:
    """`syncs`: name -> the body of the sync as flow-style YAML (mapping and settings)."""
    body = "\n".join(
        f"  {name}: {{model: events, action: track_event, {spec}}}" for name, spec in syncs.items()
    )
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  events: {{sql: "select * from shop.events", primary_key: event_id}}
syncs:
{body}
""",
        "test.yaml",
    )


BASIC = (
    "mapping: {metric_name: event_name, time: occurred_at, value: amount, "
    "value_currency: currency, properties: {sku: sku, amount: amount}}"
)


def sync(
    config: Config, wh: Warehouse, sandbox: Sandbox, name: str = "track", **client_options: Any
) -> SyncReport:
    take_snapshot(wh, config.models["events"], config.path)
    options = {"max_backoff": 0.2, **client_options}
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, **options) as client:
        return run_sync(config, name, wh, client)


def posts(sandbox: Sandbox, path: str = BULK) -> list:
    return [r for r in sandbox.state.requests if r.method == "POST" and r.path == path]


def test_batch_sends_one_bulk_entry_per_row_with_default_identifier_mappings(
    warehouse_url, sandbox
):
    """§2.5 batch flow: one event-bulk-create entry per row; plus what we fix: country_code
    never reaches the profile (Segment leaked it when no phone was present), and an
    anonymous_id alone identifies the profile."""
    wh = Warehouse(warehouse_url)
    rows = [row(i) for i in range(40)]
    rows[1] = row(1, phone_number="(512) 555-0101", country_code="us", external_id="c1")
    rows[2] = row(2, country_code="GB")  # a country code but no phone: must not leak
    rows[3] = row(3, email=None, anonymous_id="anon-3")
    load(wh, rows)
    config = config_for(warehouse_url, sandbox, {"track": BASIC})

    take_snapshot(wh, config.models["events"], config.path)
    planned = plan_sync(config, "track", wh, samples=3)
    assert sandbox.state.requests == []  # plan sends nothing
    entries = [
        s["data"]["attributes"]["events-bulk-create"]["data"][0] for s in planned.payload_samples
    ]
    profiles = [e["attributes"]["profile"]["data"]["attributes"] for e in entries]
    assert profiles[1] == {
        "email": "user1@example.com",
        "phone_number": "+15125550101",
        "external_id": "c1",
    }
    assert profiles[2] == {"email": "user2@example.com"}  # no country_code
    event = entries[0]["attributes"]["events"]["data"][0]["attributes"]
    assert event == {
        "properties": {"sku": "SKU-0", "amount": 12.5},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
        "unique_id": derived_unique_id("track", "e00000"),
        "time": "2024-05-01T12:30:15Z",
        "value": 12.5,
        "value_currency": "USD",
    }

    report = sync(config, wh, sandbox)
    assert report.status == "success", report.error
    assert report.delivered == {"added": 40} and not report.rejected and not report.retryable
    (request,) = posts(sandbox)
    assert request.status == 202 and request.items == 40  # the official schema accepted it
    assert len(sandbox.state.events) == 40
    stored = {e.unique_id: e for e in sandbox.state.events}
    first = stored[derived_unique_id("track", "e00000")]
    assert (first.metric, first.value, first.value_currency) == ("Placed Order", 12.5, "USD")
    assert first.backfill is False
    assert first.time == WHEN.replace(microsecond=0, tzinfo=UTC)
    phone = sandbox.state.find_profile(phone_number="+15125550101")
    assert phone is not None and phone.external_id == "c1"
    anonymous = stored[derived_unique_id("track", "e00003")]
    assert sandbox.state.profiles[anonymous.profile_id].attributes["anonymous_id"] == "anon-3"

    sandbox.state.requests.clear()
    again = sync(config, wh, sandbox)
    assert again.requests == 0 and sandbox.state.requests == []
    wh.dispose()


def test_invalid_rows_are_rejected_alone_and_good_rows_delivered_in_the_same_run(
    duckdb_url, sandbox
):
    """§2.5 checks (identifiers, E.164, external_id length) per row with reasons, plus the
    time window and metric name Klaviyo enforces. Klaviyo's refusal of one entry (a 400
    naming it by pointer) rejects that row only: the good rows go in the same run instead of
    Segment's "retryable 429" for every other row."""
    wh = Warehouse(duckdb_url)
    good = [row(i) for i in range(10)]
    bad = {
        "e00100": row(100, email=None),
        "e00101": row(101, email="not-an-email"),
        "e00102": row(102, phone_number="12345", country_code="US"),
        "e00103": row(103, email=None, phone_number="5125550000"),
        "e00104": row(104, external_id="x" * 300),
        "e00105": row(105, occurred_at=datetime(1985, 1, 1)),
        "e00106": row(106, occurred_at=datetime.now() + timedelta(days=800)),
        "e00107": row(107, amount_text="about ten"),
        "e00108": row(108, event_name="  "),
        "e00109": row(109, event_name="M" * 200),
        "e00110": row(110, email="real@mailer.invalid"),  # passes our check, Klaviyo refuses
        "e00111": row(111, currency="dollars"),
    }
    load(wh, good + list(bad.values()))
    spec = (
        "mapping: {metric_name: event_name, time: occurred_at, value: amount_text, "
        "value_currency: currency, external_id: external_id}"
    )
    report = sync(config_for(duckdb_url, sandbox, {"track": spec}), wh, sandbox)

    assert report.status == "success", report.error
    assert report.delivered == {"added": 10} and report.rejected == {"added": 12}
    assert not report.retryable
    ledger = {e.key: e for e in ledger_entries(wh, "track")}
    assert all(e.kind is FailureKind.INVALID for e in ledger.values())
    expected = {
        "e00100": (None, "no identifier"),
        "e00101": ("email", "not a valid email"),
        "e00102": ("phone_number", "E.164"),
        "e00103": ("phone_number", "country_code"),
        "e00104": ("external_id", "255"),
        "e00105": ("time", "from 1990"),
        "e00106": ("time", "one year from now"),
        "e00107": ("value", "not a number"),
        "e00108": ("metric_name", "empty"),
        "e00109": ("metric_name", "127"),
        "e00110": ("email", "Klaviyo: Invalid email address"),
        "e00111": ("value_currency", "ISO 4217"),
    }
    assert set(ledger) == set(expected)
    for key, (field, words) in expected.items():
        assert ledger[key].field == field, key
        assert words in ledger[key].reason, (key, ledger[key].reason)
    refused, accepted = posts(sandbox)
    assert (refused.status, refused.items) == (400, 11)  # our 10 good rows + the .invalid one
    assert (accepted.status, accepted.items) == (202, 10)
    assert len(sandbox.state.events) == 10
    wh.dispose()


def test_time_is_rendered_in_utc_to_the_second_from_every_column_type(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    columns = {
        "event_id": "VARCHAR",
        "email": "VARCHAR",
        "naive": "TIMESTAMP",
        "aware": "TIMESTAMP WITH TIME ZONE",
        "day": "DATE",
        "text": "VARCHAR",
    }
    plus_two = timezone(timedelta(hours=2))
    load(
        wh,
        [
            {
                "event_id": "e1",
                "email": "t@example.com",
                "naive": datetime(2024, 3, 10, 23, 59, 59, 987654),
                "aware": datetime(2024, 3, 10, 23, 59, 59, 987654, tzinfo=plus_two),
                "day": date(2024, 3, 10),
                "text": "2024-03-10T20:15:30.5-05:00",
            }
        ],
        columns,
    )
    syncs = {
        col: f"mapping: {{time: {col}}}, settings: {{metric_name: {col}}}"
        for col in ("naive", "aware", "day", "text")
    }
    config = config_for(warehouse_url, sandbox, syncs)
    for name in syncs:
        assert sync(config, wh, sandbox, name).status == "success"
    times = {e.metric: e.time for e in sandbox.state.events}
    assert times == {
        "naive": datetime(2024, 3, 10, 23, 59, 59, tzinfo=UTC),  # naive is UTC, ms dropped
        "aware": datetime(2024, 3, 10, 21, 59, 59, tzinfo=UTC),
        "day": datetime(2024, 3, 10, tzinfo=UTC),
        "text": datetime(2024, 3, 11, 1, 15, 30, tzinfo=UTC),
    }
    wh.dispose()


def test_event_time_rendering_and_klaviyos_window():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert event_time("2024-01-01T00:00:49.8919123Z", now) == "2024-01-01T00:00:49Z"
    assert event_time("2024-01-01 10:00", now) == "2024-01-01T10:00:00Z"
    assert event_time(datetime(2024, 1, 1, 1, tzinfo=timezone(timedelta(hours=3))), now) == (
        "2023-12-31T22:00:00Z"
    )
    assert event_time(date(1990, 1, 1), now) == "1990-01-01T00:00:00Z"
    assert event_time(datetime(2027, 1, 1), now) == "2027-01-01T00:00:00Z"  # exactly a year
    assert event_time(None, now) is None and event_time(" ", now) is None
    for bad, words in (
        ("yesterday", "not an ISO-8601"),
        (1714560000, "got int"),
        (datetime(1989, 12, 31, 23, 59, 59), "from 1990"),
        (datetime(2027, 1, 1, 0, 0, 1), "one year from now"),
    ):
        with pytest.raises(InvalidRow) as caught:
            event_time(bad, now)
        assert caught.value.field == "time" and words in caught.value.reason


def test_batches_hold_at_most_1000_events_and_5_mb_in_the_fewest_requests(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    load(wh, [row(i) for i in range(2001)])
    config = config_for(duckdb_url, sandbox, {"track": BASIC})
    assert sync(config, wh, sandbox).delivered == {"added": 2001}
    # the fewest requests, each full but the last (batches in flight arrive in any order)
    assert sorted((r.items for r in posts(sandbox)), reverse=True) == [1000, 1000, 1]

    sandbox.state.reset()
    big = "x" * 90_000  # ~90 KB per event: 5 MB holds 57 of them
    load(wh, [row(i, sku=big, event_id=f"big{i:03d}") for i in range(70)])
    report = sync(config, wh, sandbox)
    assert report.delivered == {"added": 70}
    first, last = posts(sandbox)
    assert first.items + last.items == 70
    entry = (first.bytes + last.bytes) / 70  # the entries are all about the same size
    assert first.bytes <= MB5 < first.bytes + entry  # full: one more would not have fitted
    wh.dispose()


def test_rerun_after_injected_failures_delivers_each_event_exactly_once(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, [row(i) for i in range(30)])
    config = config_for(warehouse_url, sandbox, {"track": BASIC + ", settings: {batch_size: 10}"})
    # Klaviyo stores the first request, but the answer is lost, twice: the run gives up.
    sandbox.faults.add(Fault(kind="applied_status", status=503, count=2, path_prefix=BULK))
    failed = sync(config, wh, sandbox, max_attempts=2)
    assert failed.status == "failed" and failed.retryable == {"added": 10}
    assert failed.not_attempted == 20
    assert len(sandbox.state.events) == 10  # applied twice, kept once (unique_id)
    assert {e.kind for e in ledger_entries(wh, "track")} == {FailureKind.TRANSIENT}

    sandbox.faults.add(Fault(kind="timeout", delay=0.3, count=1, path_prefix=BULK))
    recovered = sync(config, wh, sandbox)
    assert recovered.status == "success" and recovered.delivered == {"added": 30}
    assert recovered.retries >= 1
    by_id = Counter(e.unique_id for e in sandbox.state.events)
    assert len(by_id) == 30 and set(by_id.values()) == {1}
    assert set(by_id) == {derived_unique_id("track", f"e{i:05d}") for i in range(30)}
    assert ledger_entries(wh, "track") == []
    wh.dispose()


def test_single_mode_rerun_after_failure_delivers_each_event_exactly_once(duckdb_url, sandbox):
    """§2.5 single flow: one POST /api/events per row, 202 each; a refused row is rejected
    alone, a lost answer leaves rows for the next run, and unique_ids keep it duplicate-free."""
    wh = Warehouse(duckdb_url)
    rows = [row(i) for i in range(6)]
    rows[2] = row(2, email="bad@mailer.invalid")
    load(wh, rows)
    config = config_for(duckdb_url, sandbox, {"track": BASIC + ", settings: {batch: false}"})
    sandbox.faults.add(Fault(kind="applied_status", status=503, count=2, path_prefix="/api/events"))
    failed = sync(config, wh, sandbox, max_attempts=2)
    assert failed.status == "failed" and failed.retryable == {"added": 6}
    assert len(sandbox.state.events) == 1

    recovered = sync(config, wh, sandbox)
    assert recovered.status == "success"
    assert recovered.delivered == {"added": 5} and recovered.rejected == {"added": 1}
    (entry,) = ledger_entries(wh, "track")
    assert entry.key == "e00002" and entry.field == "email"
    assert entry.reason == "Klaviyo: Invalid email address"
    assert {r.status for r in posts(sandbox, "/api/events")} == {202, 400, 503}
    by_id = Counter(e.unique_id for e in sandbox.state.events)
    assert len(by_id) == 5 and set(by_id.values()) == {1}
    wh.dispose()


def test_repeated_unique_ids_in_one_change_set_never_fail_a_request(duckdb_url, sandbox):
    """Klaviyo refuses a whole bulk request that repeats a unique_id for a profile and metric.
    A true duplicate (same event) waits for a later request and is delivered (Klaviyo keeps
    one); another profile's event is sent too; the same profile with a different event is
    rejected, since Klaviyo would silently keep only the first."""
    wh = Warehouse(duckdb_url)
    rows = [
        row(1, uid="U1", email="a@example.com"),
        row(2, uid="U1", email="a@example.com"),  # the same event again
        row(3, uid="U1", email="A@example.com", amount=Decimal("99.00")),  # same profile, differs
        row(4, uid="U1", email="b@example.com"),  # another profile
        row(5, uid="U2", email="a@example.com"),
        row(6, uid=None, email="a@example.com"),  # NULL: the derived id
    ]
    for r in rows:
        r["sku"] = "SKU"
    load(wh, rows)
    spec = BASIC.replace("mapping: {", "mapping: {unique_id: uid, ")
    report = sync(config_for(duckdb_url, sandbox, {"track": spec}), wh, sandbox)

    assert report.status == "success"
    assert report.delivered == {"added": 5} and report.rejected == {"added": 1}
    (entry,) = ledger_entries(wh, "track")
    assert entry.key == "e00003" and entry.field == "unique_id"
    assert "duplicate unique_id 'U1'" in entry.reason and "'e00001'" in entry.reason
    assert [r.status for r in posts(sandbox)] == [202, 202, 202]
    a = sandbox.state.find_profile(email="a@example.com").id
    b = sandbox.state.find_profile(email="b@example.com").id
    assert sorted((e.profile_id == a, e.unique_id) for e in sandbox.state.events) == sorted(
        [(True, "U1"), (False, "U1"), (True, "U2"), (True, derived_unique_id("track", "e00006"))]
    )
    assert {e.profile_id for e in sandbox.state.events} == {a, b}
    wh.dispose()


def test_backfill_marks_events_historical_so_flows_are_not_triggered(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    load(wh, [row(i) for i in range(3)])
    syncs = {
        "history": "settings: {metric_name: History, backfill: true}",
        "live": "settings: {metric_name: Live}",
    }
    config = config_for(duckdb_url, sandbox, syncs)
    for name in syncs:
        assert sync(config, wh, sandbox, name).status == "success"
    flags = Counter((e.metric, e.backfill) for e in sandbox.state.events)
    assert flags == {("History", True): 3, ("Live", False): 3}
    wh.dispose()


def test_config_is_checked_before_anything_is_sent(sandbox):
    def build(spec: str, on: str = "") -> TrackEvent:
        config = parse_config(
            f"""
warehouse: {{url: "duckdb:///unused.duckdb"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  events: {{sql: "select * from shop.events", primary_key: event_id}}
syncs:
  track: {{model: events, action: track_event, {on}{spec}}}
""",
            "test.yaml",
        )
        return TrackEvent(config.syncs["track"], list(COLUMNS), config.path)

    for on in ("on: [updated], ", "on: [added, deleted], "):
        with pytest.raises(ConfigError, match=r"syncs\.track\.on"):
            build("settings: {metric_name: X}", on)
    cases = {
        "mapping: {email: mail}, settings: {metric_name: X}": "mapping.email",
        "settings: {}": "mapping.metric_name",
        "mapping: {metric_name: event_name}, settings: {metric_name: X}": "mapping.metric_name",
        "settings: {metric_name: ''}": "settings.metric_name",
        f"settings: {{metric_name: {'M' * 128}}}": "settings.metric_name",
        "mapping: {colour: sku}, settings: {metric_name: X}": "mapping.colour",
        "settings: {metric_name: X, list_id: L}": "settings.list_id",
        "settings: {metric_name: X, batch_size: 1001}": "settings.batch_size",
        "settings: {metric_name: X, backfill: 'yes'}": "settings.backfill",
        "settings: {metric_name: X, value_currency: dollars}": "settings.value_currency",
        "settings: {metric_name: X, country_code: XX}": "settings.country_code",
        "mapping: {email: null, external_id: null, phone_number: null, anonymous_id: null}, "
        "settings: {metric_name: X}": "mapping",
    }
    for spec, key in cases.items():
        with pytest.raises(ConfigError) as caught:
            build(spec)
        assert caught.value.key == f"syncs.track.{key}", spec
    action = build("mapping: {email: null}, settings: {metric_name: X, batch: false}")
    assert action.columns == {"phone_number", "external_id", "anonymous_id", "country_code"}
    assert action.endpoint.name == "events"
    # Unmapped time and value are left out (Klaviyo then uses the time it receives the event);
    # unique_id never is: unmapped, it is derived from the sync and the row key.
    prepared = action.prepare(
        ChangeRow("e1", ChangeKind.ADDED, "h", {"external_id": 42, "phone_number": None})
    )
    (body,) = json.loads(action.request_body([prepared]))
    assert body["data"]["attributes"] == {
        "properties": {},
        "metric": {"data": {"type": "metric", "attributes": {"name": "X"}}},
        "unique_id": derived_unique_id("track", "e1"),
        "profile": {"data": {"type": "profile", "attributes": {"external_id": "42"}}},
    }
