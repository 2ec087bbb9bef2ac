"""Upsert Profile end to end: warehouse -> change set -> real HTTP to the sandbox -> state.

Every test runs on DuckDB and on PostgreSQL (the `warehouse_url` fixture).
"""

from __future__ import annotations

import sqlalchemy as sa

from klaviyo_pipelines.config import Config, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.sandbox.operations import bulk_import
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

COLUMNS = ["customer_id", "email", "phone", "first_name", "city", "ltv"]


def config_for(url: str, sandbox: Sandbox, settings: str = "{}", mapping: str = "") -> Config:
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  customers: {{sql: "select * from shop.customers", primary_key: customer_id}}
syncs:
  profiles:
    model: customers
    action: upsert_profile
    on: [added, updated]
    mapping:
      phone_number: phone
      external_id: customer_id
      properties: {{lifetime_value: ltv}}
      {mapping}
    settings: {settings}
""",
        "test.yaml",
    )


def customers(n: int) -> list[tuple]:
    return [
        (f"c{i:04d}", f"user{i}@example.com", f"+1512555{i:04d}", f"Name{i}", "Austin", i * 1.5)
        for i in range(n)
    ]


def load(wh: Warehouse, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.customers"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.customers (customer_id VARCHAR, email VARCHAR, phone VARCHAR, "
                "first_name VARCHAR, city VARCHAR, ltv DOUBLE PRECISION)"
            )
        )
        wh.bulk_insert(conn, "shop.customers", COLUMNS, rows)


def sync(config: Config, wh: Warehouse, sandbox: Sandbox, **client_options) -> SyncReport:
    take_snapshot(wh, config.models["customers"], config.path)
    options = {"max_backoff": 0.2, **client_options}
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, **options) as client:
        return run_sync(config, "profiles", wh, client)


def posts(sandbox: Sandbox, prefix: str = "/api/profile-bulk-import-jobs") -> list:
    return [r for r in sandbox.state.requests if r.method == "POST" and r.path.startswith(prefix)]


def test_first_run_sends_all_second_nothing_then_exactly_the_changed_rows(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    rows = customers(50)
    load(wh, rows)
    config = config_for(warehouse_url, sandbox)

    first = sync(config, wh, sandbox)
    assert first.status == "success", first.error
    assert first.summary() == {
        "status": "success",
        "added": 50,
        "updated": 0,
        "deleted": 0,
        "delivered": 50,
        "rejected": 0,
        "requests": first.requests,
    }
    assert len(sandbox.state.profiles) == 50
    profile = sandbox.state.find_profile(email="user7@example.com")
    assert profile.attributes["external_id"] == "c0007"
    assert profile.attributes["phone_number"] == "+15125550007"
    assert profile.attributes["first_name"] == "Name7"
    assert profile.attributes["location"]["city"] == "Austin"  # default mapping by column name
    assert profile.attributes["properties"]["lifetime_value"] == 10.5

    sandbox.state.requests.clear()
    second = sync(config, wh, sandbox)
    assert second.summary()["added"] == second.summary()["updated"] == 0
    assert second.requests == 0 and sandbox.state.requests == []

    for i in (3, 17, 42):
        rows[i] = (*rows[i][:3], f"Renamed{i}", *rows[i][4:])
    load(wh, rows)
    third = sync(config, wh, sandbox)
    assert third.planned == {"updated": 3} and sum(third.delivered.values()) == 3
    (job,) = posts(sandbox)
    assert job.items == 3
    assert (
        sandbox.state.find_profile(email="user17@example.com").attributes["first_name"]
        == "Renamed17"
    )
    assert len(sandbox.state.profiles) == 50
    wh.dispose()


def test_invalid_rows_are_rejected_with_reasons_and_the_rest_delivered(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    rows = customers(20)
    rows[1] = ("c0001", "not-an-email", None, "A", "Austin", 1.0)
    rows[2] = ("c0002", "ok2@example.com", "12", "B", "Austin", 1.0)
    rows[3] = ("c0003", None, "5125550000", "C", "Austin", 1.0)  # no country to read it with
    rows[4] = ("x" * 300, "long@example.com", None, "D", "Austin", 1.0)
    rows[5] = ("c0005", "real@mailer.invalid", None, "E", "Austin", 1.0)  # Klaviyo refuses it
    load(wh, rows)
    config = config_for(warehouse_url, sandbox, mapping="email: email")
    report = sync(config, wh, sandbox)

    assert report.status == "success"
    assert sum(report.delivered.values()) == 15 and sum(report.rejected.values()) == 5
    ledger = {e.key: e for e in ledger_entries(wh, "profiles")}
    assert ledger["c0001"].field == "email" and "not a valid email" in ledger["c0001"].reason
    assert ledger["c0002"].field == "phone_number" and "E.164" in ledger["c0002"].reason
    assert ledger["c0003"].field == "phone_number" and "country_code" in ledger["c0003"].reason
    assert ledger["x" * 300].field == "external_id" and "255" in ledger["x" * 300].reason
    assert ledger["c0005"].reason.startswith("Klaviyo:")
    assert all(e.kind is FailureKind.INVALID for e in ledger.values())
    assert len(sandbox.state.profiles) == 15
    wh.dispose()


def test_klaviyo_rejection_is_ledgered_held_while_unchanged_and_resent_once_fixed(
    warehouse_url, sandbox
):
    wh = Warehouse(warehouse_url)
    rows = customers(10)
    rows[4] = ("c0004", "user4@mailer.invalid", None, "Name4", "Austin", 6.0)
    load(wh, rows)
    config = config_for(warehouse_url, sandbox, mapping="email: email")

    first = sync(config, wh, sandbox)
    assert sum(first.delivered.values()) == 9 and sum(first.rejected.values()) == 1
    (entry,) = ledger_entries(wh, "profiles")
    assert entry.key == "c0004" and entry.kind is FailureKind.INVALID and entry.attempts == 1
    assert "Klaviyo" in entry.reason

    sandbox.state.requests.clear()
    unchanged = sync(config, wh, sandbox)
    assert unchanged.held_invalid == 1 and unchanged.requests == 0  # no request for a known-bad row
    assert [e.key for e in ledger_entries(wh, "profiles")] == ["c0004"]

    rows[4] = ("c0004", "user4@example.com", None, "Name4", "Austin", 6.0)
    load(wh, rows)
    fixed = sync(config, wh, sandbox)
    assert fixed.planned == {"added": 1} and sum(fixed.delivered.values()) == 1
    assert ledger_entries(wh, "profiles") == []
    assert sandbox.state.find_profile(email="user4@example.com") is not None
    wh.dispose()


def test_an_import_error_without_a_pointer_is_matched_to_its_row_by_identifier(
    warehouse_url, sandbox, monkeypatch
):
    """Rows awaiting their job keep only their identifiers; that is enough to find the row an
    import error is about when Klaviyo gives its payload but no pointer."""
    unpointed = bulk_import.import_error_resource

    def without_pointer(error):
        resource = unpointed(error)
        resource["attributes"]["source"] = {}
        return resource

    monkeypatch.setattr(bulk_import, "import_error_resource", without_pointer)
    wh = Warehouse(warehouse_url)
    rows = customers(30)
    rows[17] = ("c0017", "user17@mailer.invalid", None, "Name17", "Austin", 1.0)
    load(wh, rows)
    report = sync(
        wh=wh, sandbox=sandbox, config=config_for(warehouse_url, sandbox, mapping="email: email")
    )
    assert sum(report.delivered.values()) == 29 and sum(report.rejected.values()) == 1
    (entry,) = ledger_entries(wh, "profiles")
    assert entry.key == "c0017" and "Klaviyo" in entry.reason
    wh.dispose()


def test_429_and_5xx_are_retried_and_nothing_is_lost(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, customers(30))
    config = config_for(warehouse_url, sandbox, settings="{batch_size: 10}")
    sandbox.faults.add(Fault(kind="rate_limit", retry_after=1, count=1, method="POST"))
    sandbox.faults.add(Fault(kind="status", status=503, count=2, method="POST"))
    sandbox.faults.add(Fault(kind="status", status=502, count=1, method="GET"))
    report = sync(config, wh, sandbox)
    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 30
    assert report.rate_limited == 1 and report.retries >= 4
    assert report.waited_seconds >= 1.0  # Retry-After was honoured
    assert len(sandbox.state.profiles) == 30
    assert ledger_entries(wh, "profiles") == []
    wh.dispose()


def test_an_outage_fails_the_run_keeps_rows_for_retry_and_the_next_run_delivers(
    warehouse_url, sandbox
):
    wh = Warehouse(warehouse_url)
    load(wh, customers(25))
    config = config_for(warehouse_url, sandbox, settings="{batch_size: 10}")
    sandbox.faults.add(Fault(kind="status", status=503, count=None, method="POST"))
    failed = sync(config, wh, sandbox, max_attempts=2)
    assert failed.status == "failed" and "503" in failed.error
    assert sum(failed.retryable.values()) == 10 and failed.not_attempted == 15
    assert {e.kind for e in ledger_entries(wh, "profiles")} == {FailureKind.TRANSIENT}

    sandbox.faults.clear()
    recovered = sync(config, wh, sandbox)
    assert recovered.status == "success" and sum(recovered.delivered.values()) == 25
    assert ledger_entries(wh, "profiles") == [] and len(sandbox.state.profiles) == 25
    wh.dispose()


def test_batches_respect_count_and_byte_limits(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    big = "x" * 90_000  # ~90 KB per profile: 5 MB holds 55 of them
    load(wh, [(f"c{i:03d}", f"u{i}@example.com", None, big, "Austin", 1.0) for i in range(120)])
    config = config_for(warehouse_url, sandbox, mapping="email: email")
    report = sync(config, wh, sandbox)
    assert report.status == "success" and sum(report.delivered.values()) == 120
    jobs = posts(sandbox)
    assert len(jobs) == 3  # the fewest 5 MB requests for 10.8 MB
    assert all(job.bytes <= 5 * 1024 * 1024 for job in jobs)
    wh.dispose()


def test_single_mode_creates_patches_duplicates_and_fills_the_list(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, customers(6))
    vip = sandbox.state.create_list("VIP")
    existing = sandbox.state.create_profile({"email": "user2@example.com", "first_name": "Old"})
    config = config_for(
        warehouse_url,
        sandbox,
        settings=f"{{batch: false, list_id: {vip.id}}}",
        mapping="email: email",
    )
    report = sync(config, wh, sandbox)
    assert report.status == "success" and sum(report.delivered.values()) == 6
    assert (
        sandbox.state.get_profile(existing.id).attributes["first_name"] == "Name2"
    )  # 409 -> PATCH
    assert len(sandbox.state.list_members(vip.id)) == 6
    list_posts = posts(sandbox, f"/api/lists/{vip.id}/relationships/profiles")
    assert len(list_posts) == 1  # one call for the whole batch, not one per profile
    wh.dispose()


def test_bulk_import_adds_profiles_to_the_configured_list(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, customers(12))
    vip = sandbox.state.create_list("VIP")
    config = config_for(warehouse_url, sandbox, settings=f"{{list_id: {vip.id}}}")
    assert sync(config, wh, sandbox).status == "success"
    assert len(sandbox.state.list_members(vip.id)) == 12
    wh.dispose()


def test_a_missing_list_fails_before_sending_any_profile(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, customers(3))
    config = config_for(warehouse_url, sandbox, settings="{list_id: NoSuch}")
    report = sync(config, wh, sandbox)
    assert (
        report.status == "failed" and "NoSuch" in report.error and "does not exist" in report.error
    )
    assert posts(sandbox) == [] and sandbox.state.profiles == {}
    wh.dispose()
