"""Subscribe and Unsubscribe Profile end to end: warehouse -> real HTTP to the sandbox -> consent.

Every sync test runs on DuckDB and on PostgreSQL (the `warehouse_url` fixture). The sandbox
checks each body against Klaviyo's official schema and its consent rules (consented_at only
with historical_import, a phone for SMS channels, ...). Segment's behaviour is in §2.7 and
§2.8 of the Segment reference; each of its bugs fixed here has a test saying so.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.factory import build_action
from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.warehouse.changes import ChangeRow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

COLUMNS = ["sub_id", "email", "phone", "country", "list_ref", "source", "hist", "opted_in_at"]
SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE = "/api/profile-subscription-bulk-delete-jobs"
PAST = datetime(2024, 3, 1, 9, 30)
OFFLINE = "http://127.0.0.1:9"  # configuration tests send nothing


def config_for(
    url: str,
    base_url: str,
    subscribe: str = "{}",
    unsubscribe: str = "{}",
    *,
    sub_mapping: str = "{phone_number: phone, country_code: country}",
    unsub_mapping: str = "{phone_number: phone, country_code: country}",
    sub_on: str = "[added, deleted]",
    unsub_on: str = "[added, deleted]",
) -> Config:
    """Two syncs of one model: `subs` (subscribe_profile) and `unsubs` (unsubscribe_profile)."""
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base_url}"}}
models:
  subscribers: {{sql: "select * from shop.subscribers", primary_key: sub_id}}
syncs:
  subs:
    model: subscribers
    action: subscribe_profile
    on: {sub_on}
    mapping: {sub_mapping}
    settings: {subscribe}
  unsubs:
    model: subscribers
    action: unsubscribe_profile
    on: {unsub_on}
    mapping: {unsub_mapping}
    settings: {unsubscribe}
""",
        "test.yaml",
    )


def row(
    key: str, email=None, phone=None, country=None, list_ref=None, source=None, hist=None, at=None
):
    return (key, email, phone, country, list_ref, source, hist, at)


def load(wh: Warehouse, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.subscribers"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.subscribers (sub_id VARCHAR, email VARCHAR, phone VARCHAR, "
                "country VARCHAR, list_ref VARCHAR, source VARCHAR, hist BOOLEAN, "
                "opted_in_at TIMESTAMP)"
            )
        )
        wh.bulk_insert(conn, "shop.subscribers", COLUMNS, rows)


def sync(
    config: Config, wh: Warehouse, sandbox: Sandbox, name: str = "subs", **client_options
) -> SyncReport:
    take_snapshot(wh, config.models["subscribers"], config.path)
    options = {"max_backoff": 0.05, **client_options}
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, **options) as client:
        return run_sync(config, name, wh, client)


def posts(sandbox: Sandbox, path: str) -> list:
    return [r for r in sandbox.state.requests if r.method == "POST" and r.path == path]


def consent(sandbox: Sandbox, channel: str, **identifier: str) -> str | None:
    profile = sandbox.state.find_profile(**identifier)
    return sandbox.state.consent(profile.id, channel) if profile else None


def record(sandbox: Sandbox, channel: str, **identifier: str):
    profile = sandbox.state.find_profile(**identifier)
    return sandbox.state.subscriptions[profile.id][channel]


def test_subscribe_sends_1000_profiles_a_request(warehouse_url, sandbox):
    """Segment sends 100 a request; Klaviyo takes 1,000: 1,100 rows are 2 requests, not 11."""
    wh = Warehouse(warehouse_url)
    rows = [
        row(f"s{i:04d}", f"user{i}@example.com", f"+1512555{i:04d}" if i % 3 == 0 else None)
        for i in range(1100)
    ]
    rows.append(row("phone-only", None, "+15125559999"))
    load(wh, rows)
    report = sync(config_for(warehouse_url, sandbox.url), wh, sandbox)

    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 1101 and sum(report.rejected.values()) == 0
    assert sorted(r.items for r in posts(sandbox, SUBSCRIBE)) == [101, 1000]
    assert all(r.status == 202 for r in posts(sandbox, SUBSCRIBE))
    assert consent(sandbox, "email.marketing", email="user3@example.com") == "SUBSCRIBED"
    assert consent(sandbox, "sms.marketing", email="user3@example.com") == "SUBSCRIBED"
    assert consent(sandbox, "sms.marketing", email="user4@example.com") is None  # no phone
    assert consent(sandbox, "sms.transactional", email="user3@example.com") is None
    only_phone = record(sandbox, "sms.marketing", phone_number="+15125559999")
    assert only_phone.consent == "SUBSCRIBED" and only_phone.list_id is None
    assert only_phone.custom_source == "klaviyo_pipelines:subs"  # our default, not Segment's -59
    assert only_phone.historical_import is False
    wh.dispose()


def test_rows_are_grouped_by_list_and_source_into_the_fewest_requests(warehouse_url, sandbox):
    """Segment fails a whole batch with more than 9 (list, source) groups; 12 groups here go
    as one request each, and a row naming a list that does not exist is rejected alone."""
    lists = [sandbox.state.create_list(f"L{n}").id for n in range(6)]
    wh = Warehouse(warehouse_url)
    rows = [
        row(f"s{i:03d}", f"u{i}@example.com", list_ref=lists[i % 6], source=f"src{(i // 6) % 2}")
        for i in range(48)
    ]
    rows.append(row("nolist", "nolist@example.com", list_ref="NoSuch"))
    rows.append(row("default", "default@example.com"))  # no list column value: the setting's
    load(wh, rows)
    mapping = "{list_id: list_ref, custom_source: source}"
    config = config_for(warehouse_url, sandbox.url, f"{{list_id: {lists[0]}}}", sub_mapping=mapping)
    report = sync(config, wh, sandbox)

    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 49
    (entry,) = ledger_entries(wh, "subs")
    assert entry.key == "nolist" and entry.field == "list_id" and "NoSuch" in entry.reason
    requests = posts(sandbox, SUBSCRIBE)
    assert len(requests) == 13 and sum(r.items for r in requests) == 49  # 12 groups + default
    for i in (0, 13, 47):
        sub = record(sandbox, "email.marketing", email=f"u{i}@example.com")
        assert sub.list_id == lists[i % 6] and sub.custom_source == f"src{(i // 6) % 2}"
        assert sub.profile_id in sandbox.state.list_members(lists[i % 6])
    default = record(sandbox, "email.marketing", email="default@example.com")
    assert default.list_id == lists[0] and default.custom_source == "klaviyo_pipelines:subs"
    wh.dispose()


def test_bad_identifiers_are_rejected_with_reasons_never_dropped(warehouse_url, sandbox):
    """Segment silently drops a row whose phone is invalid (and reports it delivered)."""
    sandbox.state.create_profile({"email": "owner@example.com"})
    sandbox.state.create_profile({"phone_number": "+15125550177"})
    wh = Warehouse(warehouse_url)
    load(
        wh,
        [
            row("s0", "ok0@example.com"),
            row("s1", None, "12"),  # invalid phone, no email
            row("s2", "ok2@example.com", "12"),  # invalid phone, valid email: whole row
            row("s3", "not-an-email"),
            row("s4"),  # no identifier
            row("s5", None, "(512) 555-0100", "US"),  # local number, country column
            row("s6", None, "07400 123456"),  # local number, settings.country_code GB
            row("s7", "someone@mailer.invalid"),  # Klaviyo refuses it, by pointer
            row("s8", "ok8@example.com", "+15125550108"),
            row("s9", "owner@example.com", "+15125550177"),  # two profiles' identifiers: 409
        ],
    )
    report = sync(config_for(warehouse_url, sandbox.url, "{country_code: GB}"), wh, sandbox)

    assert report.status == "success", report.error
    ledger = {e.key: e for e in ledger_entries(wh, "subs")}
    assert set(ledger) == {"s1", "s2", "s3", "s4", "s7", "s9"}
    assert ledger["s1"].field == "phone_number" and "E.164" in ledger["s1"].reason
    assert ledger["s2"].field == "phone_number" and "E.164" in ledger["s2"].reason
    assert ledger["s3"].field == "email" and "not a valid email" in ledger["s3"].reason
    assert ledger["s4"].field is None and "no identifier" in ledger["s4"].reason
    # The Klaviyo rejection lands on its own row, not on a row shifted by the invalid ones.
    assert ledger["s7"].field == "email" and ledger["s7"].reason.startswith("Klaviyo:")
    assert "already exists" in ledger["s9"].reason
    assert consent(sandbox, "email.marketing", email="owner@example.com") is None
    assert sandbox.state.find_profile(email="ok2@example.com") is None  # not half-subscribed
    assert consent(sandbox, "sms.marketing", phone_number="+15125550100") == "SUBSCRIBED"
    assert consent(sandbox, "sms.marketing", phone_number="+447400123456") == "SUBSCRIBED"
    assert consent(sandbox, "email.marketing", email="ok0@example.com") == "SUBSCRIBED"
    assert consent(sandbox, "sms.marketing", email="ok8@example.com") == "SUBSCRIBED"
    wh.dispose()


def test_historical_import_sends_consented_at_in_utc_per_group(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    future = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=3)
    load(
        wh,
        [
            row("h1", "h1@example.com", "+15125550001", hist=True, at=PAST),
            row("h2", "h2@example.com", hist=True, at=future),
            row("h3", "h3@example.com", hist=True, at=None),
            row("n1", "n1@example.com", hist=False, at=PAST),  # consented_at not sent
            row("d1", "d1@example.com", at=PAST),  # NULL: the setting (false)
        ],
    )
    mapping = "{phone_number: phone, historical_import: hist, consented_at: opted_in_at}"
    config = config_for(
        warehouse_url, sandbox.url, "{sms_transactional: true}", sub_mapping=mapping
    )
    report = sync(config, wh, sandbox)

    assert report.status == "success", report.error
    ledger = {e.key: e for e in ledger_entries(wh, "subs")}
    assert set(ledger) == {"h2", "h3"}
    assert ledger["h2"].field == "consented_at" and "future" in ledger["h2"].reason
    assert ledger["h3"].field == "consented_at" and "historical_import" in ledger["h3"].reason
    assert sorted(r.items for r in posts(sandbox, SUBSCRIBE)) == [1, 2]  # by historical_import
    h1 = record(sandbox, "email.marketing", email="h1@example.com")
    assert h1.historical_import and h1.consented_at == PAST.replace(tzinfo=UTC)
    sms = record(sandbox, "sms.transactional", email="h1@example.com")
    assert sms.consent == "SUBSCRIBED" and sms.consented_at == PAST.replace(tzinfo=UTC)
    n1 = record(sandbox, "email.marketing", email="n1@example.com")
    assert not n1.historical_import and n1.consented_at is None
    wh.dispose()


def test_single_mode_sends_one_profile_a_request(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(
        wh,
        [
            row("a", "a@example.com"),
            row("b", "b@mailer.invalid"),
            row("c", None, "+15125550103"),
        ],
    )
    setting = "{batch: false}"
    config = config_for(warehouse_url, sandbox.url, setting, setting)
    for name, path, expected in [
        ("subs", SUBSCRIBE, "SUBSCRIBED"),
        ("unsubs", UNSUBSCRIBE, "UNSUBSCRIBED"),
    ]:
        report = sync(config, wh, sandbox, name)
        assert report.status == "success", report.error
        requests = posts(sandbox, path)
        assert [(r.items, r.status) for r in requests] == [(1, 202), (1, 400), (1, 202)]
        (entry,) = ledger_entries(wh, name)
        assert entry.key == "b" and entry.field == "email" and entry.reason.startswith("Klaviyo:")
        assert consent(sandbox, "email.marketing", email="a@example.com") == expected
        assert consent(sandbox, "sms.marketing", phone_number="+15125550103") == expected
    wh.dispose()


def test_unsubscribe_sends_100_a_request_grouped_by_list(warehouse_url, sandbox):
    spring = sandbox.state.create_list("Spring").id
    wh = Warehouse(warehouse_url)
    rows = [
        row(f"u{i:03d}", f"user{i}@example.com", "+15125550999" if i == 0 else None)
        for i in range(250)
    ]
    rows += [row(f"l{i}", f"listed{i}@example.com", list_ref=spring) for i in range(30)]
    load(wh, rows)
    members = [
        sandbox.state.create_profile({"email": f"listed{i}@example.com"}).id for i in range(30)
    ]
    sandbox.state.add_members(spring, members)
    mapping = "{phone_number: phone, list_id: list_ref}"
    report = sync(
        config_for(warehouse_url, sandbox.url, unsub_mapping=mapping), wh, sandbox, "unsubs"
    )

    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 280
    assert sorted(r.items for r in posts(sandbox, UNSUBSCRIBE)) == [30, 50, 100, 100]
    assert consent(sandbox, "email.marketing", email="user7@example.com") == "UNSUBSCRIBED"
    assert consent(sandbox, "sms.marketing", email="user0@example.com") == "UNSUBSCRIBED"
    assert consent(sandbox, "sms.transactional", email="user0@example.com") == "UNSUBSCRIBED"
    listed = record(sandbox, "email.marketing", email="listed3@example.com")
    assert listed.consent == "UNSUBSCRIBED" and listed.list_id == spring
    assert sandbox.state.list_members(spring) == set()
    wh.dispose()


def test_unsubscribe_with_every_row_invalid_sends_nothing_and_says_so(warehouse_url, sandbox):
    """Segment's "nothing left" check reads the unfiltered batch: every row reported 200."""
    wh = Warehouse(warehouse_url)
    load(wh, [row("x1", None, "12"), row("x2", "nope"), row("x3"), row("x4", None, "555")])
    report = sync(config_for(warehouse_url, sandbox.url), wh, sandbox, "unsubs")
    assert sum(report.delivered.values()) == 0 and sum(report.rejected.values()) == 4
    assert {e.key for e in ledger_entries(wh, "unsubs")} == {"x1", "x2", "x3", "x4"}
    assert posts(sandbox, UNSUBSCRIBE) == [] and report.requests == 0
    wh.dispose()


def test_rows_leaving_the_model_are_unsubscribed(warehouse_url, sandbox):
    """Subscribe on `added`, unsubscribe on `deleted`: whoever leaves the model is unsubscribed,
    from the row as last delivered."""
    wh = Warehouse(warehouse_url)
    rows = [row(f"m{i}", f"m{i}@example.com", f"+1512555{i:04d}") for i in range(5)]
    load(wh, rows)
    config = config_for(warehouse_url, sandbox.url, sub_on="[added]", unsub_on="[deleted]")
    assert sync(config, wh, sandbox, "subs").status == "success"
    first = sync(config, wh, sandbox, "unsubs")
    assert first.status == "success" and posts(sandbox, UNSUBSCRIBE) == []

    load(wh, [rows[0], rows[2], rows[4]])
    assert sync(config, wh, sandbox, "subs").planned == {}
    left = sync(config, wh, sandbox, "unsubs")
    assert left.status == "success", left.error
    assert left.planned == {"deleted": 2} and left.delivered["deleted"] == 2
    for i, expected in enumerate(["SUBSCRIBED", "UNSUBSCRIBED"] * 2 + ["SUBSCRIBED"]):
        assert consent(sandbox, "email.marketing", email=f"m{i}@example.com") == expected
        assert consent(sandbox, "sms.marketing", email=f"m{i}@example.com") == expected
    wh.dispose()


def test_rerun_after_applied_failure_and_timeout_loses_no_row(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, [row(f"r{i:02d}", f"r{i}@example.com") for i in range(40)])
    config = config_for(warehouse_url, sandbox.url, "{batch_size: 10}", "{batch_size: 10}")
    for name, path, expected in [
        ("subs", SUBSCRIBE, "SUBSCRIBED"),
        ("unsubs", UNSUBSCRIBE, "UNSUBSCRIBED"),
    ]:
        # Klaviyo applied the first request but answered 503: the run stops, rows kept.
        sandbox.faults.add(Fault(kind="applied_status", status=503, count=None, path_prefix=path))
        failed = sync(config, wh, sandbox, name, max_attempts=1)
        assert failed.status == "failed" and "503" in failed.error
        assert sum(failed.retryable.values()) == 10 and failed.not_attempted == 30

        sandbox.faults.clear()
        sandbox.faults.add(Fault(kind="timeout", delay=1.0, method="POST", path_prefix=path))
        recovered = sync(config, wh, sandbox, name, timeout=0.3)
        assert recovered.status == "success", recovered.error
        assert recovered.retries >= 1 and sum(recovered.delivered.values()) == 40
        assert ledger_entries(wh, name) == []
        assert all(
            consent(sandbox, "email.marketing", email=f"r{i}@example.com") == expected
            for i in range(40)
        )
    wh.dispose()


def test_plan_shows_the_request_bodies(duckdb_url, sandbox):
    klist = sandbox.state.create_list("Plan")
    wh = Warehouse(duckdb_url)
    load(wh, [row("p", "p@example.com", "+15125550100", list_ref=klist.id)])
    config = config_for(
        duckdb_url,
        sandbox.url,
        "{custom_source: Checkout}",
        unsub_mapping="{phone_number: phone, list_id: list_ref}",
    )
    take_snapshot(wh, config.models["subscribers"], config.path)
    (subscribe,) = plan_sync(config, "subs", wh).payload_samples
    assert subscribe == {
        "data": {
            "type": "profile-subscription-bulk-create-job",
            "attributes": {
                "custom_source": "Checkout",
                "historical_import": False,
                "profiles": {
                    "data": [
                        {
                            "type": "profile",
                            "attributes": {
                                "email": "p@example.com",
                                "phone_number": "+15125550100",
                                "subscriptions": {
                                    "email": {"marketing": {"consent": "SUBSCRIBED"}},
                                    "sms": {"marketing": {"consent": "SUBSCRIBED"}},
                                },
                            },
                        }
                    ]
                },
            },
        }
    }
    (unsubscribe,) = plan_sync(config, "unsubs", wh).payload_samples
    assert unsubscribe["data"]["relationships"] == {
        "list": {"data": {"type": "list", "id": klist.id}}
    }
    sms = unsubscribe["data"]["attributes"]["profiles"]["data"][0]["attributes"]["subscriptions"]
    assert sms["sms"] == {
        "marketing": {"consent": "UNSUBSCRIBED"},
        "transactional": {"consent": "UNSUBSCRIBED"},
    }
    assert sandbox.state.requests == []
    wh.dispose()


@pytest.mark.parametrize(
    ("sync_name", "overrides", "key", "reason"),
    [
        ("subs", {"sub_on": "[updated]"}, "syncs.subs.on", "updated"),
        ("unsubs", {"unsub_on": "[added, updated]"}, "syncs.unsubs.on", "updated"),
        ("subs", {"subscribe": "{historical_import: true}"}, "mapping.consented_at", "required"),
        (
            "subs",
            {"sub_mapping": "{consented_at: opted_in_at}"},
            "mapping.consented_at",
            "historical",
        ),
        ("subs", {"sub_mapping": "{external_id: sub_id}"}, "mapping.external_id", "email"),
        ("subs", {"subscribe": "{historical_import: yes please}"}, "historical_import", "true"),
        ("unsubs", {"unsubscribe": "{batch_size: 101}"}, "settings.batch_size", "100"),
        ("subs", {"subscribe": "{batch_size: 1001}"}, "settings.batch_size", "1000"),
        ("unsubs", {"unsubscribe": "{custom_source: x}"}, "settings.custom_source", "unknown"),
        # Segment silently ignores a consented_at mapped on Unsubscribe Profile.
        ("unsubs", {"unsub_mapping": "{consented_at: opted_in_at}"}, "consented_at", "not a"),
        ("subs", {"subscribe": "{country_code: XX}"}, "settings.country_code", "XX"),
    ],
)
def test_configuration_errors_name_the_key(sync_name, overrides, key, reason):
    with pytest.raises(ConfigError) as caught:
        config = config_for("duckdb:///:memory:", OFFLINE, **overrides)
        build_action(config.syncs[sync_name], COLUMNS, config.path)
    assert key in str(caught.value) and reason in str(caught.value)


def test_a_model_without_email_or_phone_is_refused():
    config = config_for("duckdb:///:memory:", OFFLINE, sub_mapping="{}")
    with pytest.raises(ConfigError, match="no identifier is mapped"):
        build_action(config.syncs["subs"], ["sub_id", "name"], config.path)


def test_a_conflict_without_pointers_is_narrowed_down_by_halving(sandbox):
    """A 409 that names no profile: halves are sent until the refused row stands alone."""
    config = config_for("duckdb:///:memory:", sandbox.url)
    action = build_action(config.syncs["subs"], COLUMNS, config.path)
    batch = [
        action.prepare(ChangeRow(f"k{i}", ChangeKind.ADDED, "h", {"email": f"k{i}@example.com"}))
        for i in range(2)
    ]
    conflict = '{"errors":[{"status":409,"code":"duplicate_profile","detail":"Conflict here."}]}'
    sandbox.faults.add(Fault(kind="status", status=409, count=2, body=conflict))
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url) as client:
        result = action.send(client, batch)
    assert [r.item.row.key for r in result.rejected] == ["k0"]
    assert result.rejected[0].reason == "Klaviyo: Conflict here."
    assert [item.row.key for item in result.delivered] == ["k1"]
    assert consent(sandbox, "email.marketing", email="k1@example.com") == "SUBSCRIBED"
    assert [r.items for r in posts(sandbox, SUBSCRIBE)] == [2, 1, 1]


def test_a_missing_list_setting_fails_the_run_before_sending(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    load(wh, [row("a", "a@example.com")])
    report = sync(config_for(duckdb_url, sandbox.url, "{list_id: NoSuch}"), wh, sandbox)
    assert report.status == "failed" and "NoSuch" in report.error
    assert "does not exist" in report.error and "settings.list_id" in report.error
    assert posts(sandbox, SUBSCRIBE) == [] and sandbox.state.profiles == {}
    wh.dispose()
