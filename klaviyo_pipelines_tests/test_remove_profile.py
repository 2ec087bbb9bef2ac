"""Remove Profile end to end: warehouse -> change set -> real HTTP to the sandbox -> list state.

Every sync test runs on DuckDB and on PostgreSQL (the `warehouse_url` fixture). Segment's
behaviour is in §2.4 (mechanics in §2.3) of the Segment reference; each of its bugs that this
action fixes has a test saying so.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.base import BatchResult
from klaviyo_pipelines.actions.factory import build_action
from klaviyo_pipelines.actions.lookup import filter_expressions
from klaviyo_pipelines.actions.remove_profile import RemoveProfile
from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

COLUMNS = ["person_id", "email", "phone", "country", "ext_id"]
LOOKUP = "/api/profiles"
OFFLINE = "http://127.0.0.1:9"  # configuration tests send nothing


def config_for(
    url: str,
    base_url: str,
    settings: str,
    on: str = "[added, deleted]",
    mapping: str = "{phone_number: phone, country_code: country, external_id: ext_id}",
) -> Config:
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base_url}"}}
models:
  people: {{sql: "select * from shop.people", primary_key: person_id}}
syncs:
  leavers:
    model: people
    action: remove_profile
    on: {on}
    mapping: {mapping}
    settings: {settings}
""",
        "test.yaml",
    )


def load(wh: Warehouse, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.people"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.people (person_id VARCHAR, email VARCHAR, phone VARCHAR, "
                "country VARCHAR, ext_id VARCHAR)"
            )
        )
        wh.bulk_insert(conn, "shop.people", COLUMNS, rows)


def sync(config: Config, wh: Warehouse, sandbox: Sandbox, **client_options) -> SyncReport:
    """Run the sync; `report.not_found` collects the rows that matched no Klaviyo profile."""
    take_snapshot(wh, config.models["people"], config.path)
    options = {"max_backoff": 0.05, **client_options}
    not_found: list[str] = []

    def collect(_: SyncReport, result: BatchResult) -> None:
        not_found.extend(item.row.key for item in result.not_found)

    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, **options) as client:
        report = run_sync(config, "leavers", wh, client, on_batch=collect)
    report.not_found = sorted(not_found)  # type: ignore[attr-defined]
    return report


def members_of(sandbox: Sandbox, n: int, list_name: str = "Newsletter") -> tuple[str, list[str]]:
    """A list holding n profiles user<i>@example.com; returns (list id, profile ids)."""
    klist = sandbox.state.create_list(list_name)
    ids = [
        sandbox.state.create_profile(
            {"email": f"user{i}@example.com", "phone_number": f"+1512555{i:04d}"}
        ).id
        for i in range(n)
    ]
    sandbox.state.add_members(klist.id, ids)
    return klist.id, ids


def requests(sandbox: Sandbox, method: str, prefix: str) -> list:
    return [r for r in sandbox.state.requests if r.method == method and r.path.startswith(prefix)]


def test_lookup_reads_every_page_and_unknown_rows_are_delivered_as_not_found(
    warehouse_url, sandbox
):
    """Segment reads only the first page (20) of each lookup; we follow every links.next."""
    list_id, ids = members_of(sandbox, 260)
    wh = Warehouse(warehouse_url)
    rows = [(f"p{i:03d}", f"USER{i}@example.com", None, None, None) for i in range(250)]
    rows += [(f"q{i}", f"stranger{i}@example.com", None, None, None) for i in range(3)]
    load(wh, rows)
    report = sync(config_for(warehouse_url, sandbox.url, f"{{list_id: {list_id}}}"), wh, sandbox)

    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 253 and sum(report.rejected.values()) == 0
    assert report.not_found == ["q0", "q1", "q2"]  # visible, not failed
    assert sandbox.state.list_members(list_id) == set(ids[250:])  # emails match ignoring case
    filters = list(filter_expressions("email", [r[1] for r in rows]))
    # At most a page (100) of identifiers per filter, so each lookup is one request: a page
    # beyond would cost a request of the tight profiles budget for the few left over.
    # (Every links.next is still followed: test_klaviyo_client's pagination test.)
    assert len(filters) == 3
    assert len(requests(sandbox, "GET", LOOKUP)) == len(filters)
    (delete,) = requests(sandbox, "DELETE", f"/api/lists/{list_id}")
    assert delete.items == 250 and delete.status == 204
    assert len(sandbox.state.profiles) == 260  # nothing is created or deleted
    wh.dispose()


def test_profiles_are_found_by_phone_and_external_id_and_ids_go_1000_per_delete(
    warehouse_url, sandbox
):
    """A row whose email and external_id name two profiles removes both (Segment does too);
    1,200 ids from one batch of 600 rows take the fewest DELETEs: 1,000 + 200."""
    klist = sandbox.state.create_list("VIP")
    by_email = [sandbox.state.create_profile({"email": f"a{i}@example.com"}).id for i in range(600)]
    by_ext = [sandbox.state.create_profile({"external_id": f"ext{i}"}).id for i in range(600)]
    by_phone = sandbox.state.create_profile({"phone_number": "+15125550199"}).id
    keep = sandbox.state.create_profile({"email": "keep@example.com"}).id
    sandbox.state.add_members(klist.id, [*by_email, *by_ext, by_phone, keep])
    wh = Warehouse(warehouse_url)
    rows = [(f"p{i:03d}", f"a{i}@example.com", None, None, f"ext{i}") for i in range(600)]
    rows.append(("phone", None, "(512) 555-0199", "US", None))  # local number + country column
    load(wh, rows)
    report = sync(
        config_for(warehouse_url, sandbox.url, f"{{list_id: {klist.id}, batch_size: 1000}}"),
        wh,
        sandbox,
    )
    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 601 and report.not_found == []
    assert sandbox.state.list_members(klist.id) == {keep}
    deletes = requests(sandbox, "DELETE", f"/api/lists/{klist.id}")
    assert [d.items for d in deletes] == [1000, 201]
    wh.dispose()


def test_invalid_rows_are_rejected_and_a_failed_delete_lands_on_the_right_rows(
    warehouse_url, sandbox
):
    """Segment applies a batch error to shifted rows when some rows failed validation; here
    the invalid rows keep their own reasons and exactly the valid rows are retried."""
    list_id, ids = members_of(sandbox, 4)
    wh = Warehouse(warehouse_url)
    load(
        wh,
        [
            ("r0", "user0@example.com", None, None, None),
            ("r1", "not-an-email", None, None, None),
            ("r2", "user1@example.com", None, None, None),
            ("r3", None, None, None, None),
            ("r4", "user2@example.com", "12", None, None),  # bad phone rejects the whole row
            ("r5", None, "+15125550002", None, "x" * 300),
            ("r6", None, "+15125550003", None, None),
        ],
    )
    config = config_for(warehouse_url, sandbox.url, f"{{list_id: {list_id}}}")
    sandbox.faults.add(Fault(kind="status", status=503, count=None, method="DELETE"))
    failed = sync(config, wh, sandbox, max_attempts=1)

    assert failed.status == "failed" and "503" in failed.error
    ledger = {e.key: e for e in ledger_entries(wh, "leavers")}
    assert ledger["r1"].field == "email" and "not a valid email" in ledger["r1"].reason
    assert ledger["r3"].field is None and "no identifier" in ledger["r3"].reason
    assert ledger["r4"].field == "phone_number" and "E.164" in ledger["r4"].reason
    assert ledger["r5"].field == "external_id" and "255" in ledger["r5"].reason
    transient = {k for k, e in ledger.items() if e.kind is FailureKind.TRANSIENT}
    assert transient == {"r0", "r2", "r6"}
    assert all("503" in ledger[k].reason for k in transient)
    assert sandbox.state.list_members(list_id) == set(ids)  # nothing was removed

    sandbox.faults.clear()
    recovered = sync(config, wh, sandbox)
    assert recovered.status == "success" and recovered.planned == {"added": 3}
    assert sum(recovered.delivered.values()) == 3
    assert sandbox.state.list_members(list_id) == {ids[2]}  # user2's row was rejected
    assert {e.key for e in ledger_entries(wh, "leavers")} == {"r1", "r3", "r4", "r5"}
    wh.dispose()


def test_deleted_rows_remove_their_profiles_from_the_list(warehouse_url, sandbox):
    """`on: [deleted]`: rows leaving the model are removed, using the row as last delivered."""
    list_id, ids = members_of(sandbox, 4)
    wh = Warehouse(warehouse_url)
    rows = [(f"p{i}", f"user{i}@example.com", None, None, None) for i in range(4)]
    load(wh, rows)
    config = config_for(warehouse_url, sandbox.url, f"{{list_id: {list_id}}}", on="[deleted]")
    first = sync(config, wh, sandbox)
    assert first.status == "success" and sum(first.delivered.values()) == 0
    assert sandbox.state.list_members(list_id) == set(ids)

    load(wh, [rows[0], rows[2]])
    second = sync(config, wh, sandbox)
    assert second.status == "success", second.error
    assert second.planned == {"deleted": 2} and second.delivered["deleted"] == 2
    assert sandbox.state.list_members(list_id) == {ids[0], ids[2]}
    wh.dispose()


def test_rerun_after_applied_failure_and_timeout_ends_removed_with_no_row_lost(
    warehouse_url, sandbox
):
    list_id, _ids = members_of(sandbox, 30)
    wh = Warehouse(warehouse_url)
    load(wh, [(f"p{i:02d}", f"user{i}@example.com", None, None, None) for i in range(30)])
    config = config_for(warehouse_url, sandbox.url, f"{{list_id: {list_id}, batch_size: 10}}")
    # Klaviyo applied the DELETE but answered 503: the client cannot know, the run fails.
    sandbox.faults.add(Fault(kind="applied_status", status=503, count=None, method="DELETE"))
    failed = sync(config, wh, sandbox, max_attempts=1)
    assert failed.status == "failed" and sum(failed.retryable.values()) == 10
    assert len(sandbox.state.list_members(list_id)) == 20  # the first 10 were in fact removed

    sandbox.faults.clear()
    # A hung lookup: the client times out and retries it.
    sandbox.faults.add(Fault(kind="timeout", delay=1.0, method="GET", path_prefix=LOOKUP))
    recovered = sync(config, wh, sandbox, timeout=0.3)
    assert recovered.status == "success", recovered.error
    assert recovered.retries >= 1 and sum(recovered.delivered.values()) == 30
    assert recovered.not_found == []  # the removed profiles still exist: found, removed again
    assert sandbox.state.list_members(list_id) == set()
    assert ledger_entries(wh, "leavers") == []
    wh.dispose()


def test_single_mode_makes_one_lookup_and_one_delete_per_row(warehouse_url, sandbox):
    list_id, _ids = members_of(sandbox, 3)
    wh = Warehouse(warehouse_url)
    rows = [(f"p{i}", f"user{i}@example.com", None, None, None) for i in range(3)]
    load(wh, [*rows, ("ghost", "ghost@example.com", None, None, None)])
    config = config_for(warehouse_url, sandbox.url, f"{{list_id: {list_id}, batch: false}}")
    report = sync(config, wh, sandbox)
    assert report.status == "success" and sum(report.delivered.values()) == 4
    assert report.not_found == ["ghost"]  # Segment fails such a row in single mode
    assert len(requests(sandbox, "GET", LOOKUP)) == 4
    assert [d.items for d in requests(sandbox, "DELETE", "/api/lists/")] == [1, 1, 1]
    assert sandbox.state.list_members(list_id) == set()
    wh.dispose()


def test_a_profile_gone_between_lookup_and_delete_is_left_out(sandbox):
    """Klaviyo refuses a DELETE naming a profile that no longer exists; the rest still go."""
    list_id, ids = members_of(sandbox, 2)
    config = config_for("duckdb:///:memory:", sandbox.url, f"{{list_id: {list_id}}}")
    action = build_action(config.syncs["leavers"], COLUMNS, config.path)
    assert isinstance(action, RemoveProfile)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url) as client:
        gone = action._remove(client, action.path, [ids[0], "01HZZZZZZZZZZZZZZZZZZZZZZZ", ids[1]])
    assert gone == {"01HZZZZZZZZZZZZZZZZZZZZZZZ"}
    assert sandbox.state.list_members(list_id) == set()
    assert [r.status for r in requests(sandbox, "DELETE", "/api/lists/")] == [400, 204]


def test_plan_shows_the_lookup_and_the_delete(duckdb_url, sandbox):
    list_id, _ = members_of(sandbox, 1)
    wh = Warehouse(duckdb_url)
    load(wh, [("p0", "user0@example.com", "+15125550000", None, "c-0")])
    config = config_for(duckdb_url, sandbox.url, f"{{list_id: {list_id}}}")
    take_snapshot(wh, config.models["people"], config.path)
    report = plan_sync(config, "leavers", wh)
    (payload,) = report.payload_samples
    filters = [lookup["params"]["filter"] for lookup in payload["lookup"]]
    assert filters == [
        'any(email,["user0@example.com"])',
        'any(phone_number,["+15125550000"])',
        'any(external_id,["c-0"])',
    ]
    assert payload["remove"]["method"] == "DELETE"
    assert payload["remove"]["path"] == f"/api/lists/{list_id}/relationships/profiles"
    assert sandbox.state.requests == []  # planning sends nothing
    wh.dispose()


@pytest.mark.parametrize(
    ("on", "settings", "mapping", "key", "reason"),
    [
        ("[updated]", "{list_id: L1}", "{}", "syncs.leavers.on", "updated"),
        ("[added]", "{}", "{}", "syncs.leavers.settings.list_id", "required"),
        ("[added]", "{list_id: L1, colour: red}", "{}", "settings.colour", "unknown setting"),
        ("[added]", "{list_id: L1, batch_size: 1001}", "{}", "settings.batch_size", "1000"),
        ("[added]", "{list_id: L1}", "{first_name: email}", "mapping.first_name", "not a field"),
        ("[added]", "{list_id: L1}", "{email: nope}", "mapping.email", "not in model"),
    ],
)
def test_configuration_errors_name_the_key(on, settings, mapping, key, reason):
    with pytest.raises(ConfigError) as caught:
        config = config_for("duckdb:///:memory:", OFFLINE, settings, on=on, mapping=mapping)
        build_action(config.syncs["leavers"], COLUMNS, config.path)
    assert key in str(caught.value) and reason in str(caught.value)


def test_a_model_without_identifier_columns_is_refused():
    config = config_for("duckdb:///:memory:", OFFLINE, "{list_id: L1}", mapping="{}")
    with pytest.raises(ConfigError, match="no identifier is mapped"):
        build_action(config.syncs["leavers"], ["person_id", "name"], config.path)


def test_a_missing_list_fails_the_run_before_any_lookup(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    load(wh, [("p0", "user0@example.com", None, None, None)])
    report = sync(config_for(duckdb_url, sandbox.url, "{list_id: NoSuch}"), wh, sandbox)
    assert report.status == "failed" and "NoSuch" in report.error
    assert "does not exist" in report.error and "settings.list_id" in report.error
    assert requests(sandbox, "GET", LOOKUP) == [] and report.retryable == {}
    wh.dispose()
