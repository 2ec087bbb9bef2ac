"""Engage audiences end to end: warehouse audience models -> the audience sensor (real Dagster
sensor evaluation on a real instance) -> one `materialize` run per requested audience ->
Add Profile To List / Remove Profile from List over real HTTP -> the sandbox's lists.

The two audience shapes both run here: a membership table and Segment's event log of
"Audience Entered" / "Audience Exited" rows. Each scenario runs on DuckDB, PostgreSQL and MariaDB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pytest
import sqlalchemy as sa

from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.dagster_defs.assets import SyncRunConfig, sync_key
from klaviyo_pipelines.dagster_defs.audience_sensor import RUN_KEY_TAG, audience_selection
from klaviyo_pipelines.definitions import build_assets, build_definitions, build_resources
from klaviyo_pipelines.runner import check_sync, plan_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.audiences import LISTS
from klaviyo_pipelines.warehouse.changes import changes_table
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines_tests.conftest import state_schema_for

CONFIG = """
warehouse: {{url: "{url}", state_schema: {state_schema}}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}"}}
models:
  segments:
    sql: select * from {crm}.segment_members
    primary_key: customer_id
    audience: {{column: segment, max_per_tick: {per_tick}}}
  journeys:
    table: {crm}.audience_events
    primary_key: user_id
    audience: {{column: audience_key, event: event, timestamp: received_at}}
syncs:
  segments_in:
    model: segments
    action: add_profile_to_list
    mapping: {{external_id: customer_id, first_name: first_name}}
    retry: {{max_retries: 0}}
  segments_out:
    model: segments
    action: remove_profile_from_list
    mapping: {{external_id: customer_id}}
    settings: {{max_exit_share: 0.5, min_exits_guarded: 3}}
    retry: {{max_retries: 0}}
  journeys_in:
    model: journeys
    action: add_profile_to_list
    settings: {{lists: {{winback: WINBCK}}}}
    retry: {{max_retries: 0}}
  journeys_out:
    model: journeys
    action: remove_profile_from_list
    settings: {{max_exit_share: 0.8, lists: {{winback: WINBCK}}}}
    retry: {{max_retries: 0}}
"""


def make_config(url: str, sandbox: Sandbox, per_tick: int = 50) -> Config:
    text = CONFIG.format(
        url=url,
        base=sandbox.url,
        per_tick=per_tick,
        state_schema=state_schema_for(url),
        crm=crm_schema(url),
    )
    return parse_config(text, "e.yaml")


def crm_schema(url: str) -> str:
    """Where the audience tables live: `crm`, or the test's own database on MySQL."""
    return sa.engine.make_url(url).database if url.startswith("mysql") else "crm"


def load_segments(wh: Warehouse, rows: list[tuple[str, str, str | None, str | None]]) -> None:
    """(segment, customer_id, first_name, email) rows: the membership-table shape."""
    crm = crm_schema(wh.url)
    with wh.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {crm}"))
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {crm}.segment_members"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {crm}.segment_members (segment VARCHAR(255), "
                "customer_id VARCHAR(255), first_name VARCHAR(255), email VARCHAR(255))"
            )
        )
        wh.bulk_insert(
            conn, f"{crm}.segment_members", ["segment", "customer_id", "first_name", "email"], rows
        )


def load_events(wh: Warehouse, rows: list[tuple[str, str, str, str, str]]) -> None:
    """(audience_key, user_id, email, event, received_at) rows: Segment's warehouse shape."""
    crm = crm_schema(wh.url)
    stamp = "DATETIME(6)" if wh.dialect == "mysql" else "TIMESTAMP"
    with wh.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {crm}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {crm}.audience_events (audience_key VARCHAR(255), "
                f"user_id VARCHAR(255), email VARCHAR(255), event VARCHAR(255), "
                f"received_at {stamp})"
            )
        )
        columns = ["audience_key", "user_id", "email", "event", "received_at"]
        wh.bulk_insert(conn, f"{crm}.audience_events", columns, rows)


@dataclass
class Tick:
    requested: list[str]  # partition keys of the run requests
    added_partitions: list[str]
    cursor: str | None
    runs: dict[str, dg.ExecuteInProcessResult]


class Daemon:
    """What the Dagster daemon does with a sensor: evaluate a tick on the instance, add the
    partitions it asks for, launch its run requests (here with `materialize`, in process)."""

    def __init__(self, config: Config, instance: dg.DagsterInstance, model: str) -> None:
        self.config, self.instance, self.model = config, instance, config.models[model]
        self.defs = build_definitions(config)
        self.sensor = self.defs.resolve_sensor_def(f"{model}_audiences")
        self.cursor: str | None = None

    def tick(self, **run_config: bool) -> Tick:
        with dg.build_sensor_context(
            instance_ref=self.instance.get_ref(),
            cursor=self.cursor,
            repository_def=self.defs.get_repository_def(),
            resources=build_resources(self.config),
        ) as context:
            result = self.sensor.evaluate_tick(context)
        added = []
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(
                request.partitions_def_name, list(request.partition_keys)
            )
            added += list(request.partition_keys)
        self.cursor = result.cursor
        requests = result.run_requests or []
        runs = {
            r.partition_key: self.run(r.partition_key, r.run_key, **run_config) for r in requests
        }
        return Tick([r.partition_key for r in requests], added, result.cursor, runs)

    def run(
        self, partition: str, run_key: str | None = None, **run_config: bool
    ) -> dg.ExecuteInProcessResult:
        syncs = [s for s in self.config.syncs.values() if s.model == self.model.name]
        return dg.materialize(
            build_assets(self.config),
            selection=audience_selection(self.config, self.model),
            partition_key=partition,
            instance=self.instance,
            resources=build_resources(self.config),
            tags={RUN_KEY_TAG: run_key} if run_key else None,
            run_config=dg.RunConfig(
                ops={
                    sync_key(s.name).to_python_identifier(): SyncRunConfig(**run_config)
                    for s in syncs
                }
            ),
            raise_on_error=False,
        )


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A real (SQLite, temporary) instance: sensor contexts need a persistent one."""
    with dg.instance_for_test() as instance:
        yield instance


def lists_named(sandbox: Sandbox, name: str) -> list[str]:
    return [k.id for k in sandbox.state.lists.values() if k.name == name]


def members(sandbox: Sandbox, name: str, identifier: str = "external_id") -> set[str]:
    (list_id,) = lists_named(sandbox, name)
    return {
        getattr(sandbox.state.profiles[pid], identifier)
        for pid in sandbox.state.list_members(list_id)
    }


def metadata(instance: dg.DagsterInstance, sync: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=sync_key(sync), asset_partitions=[partition]), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_membership_audiences_sync_through_the_sensor(
    every_warehouse_url, sandbox, instance
) -> None:
    wh = Warehouse(every_warehouse_url, state_schema_for(every_warehouse_url))
    config = make_config(every_warehouse_url, sandbox)
    load_segments(
        wh,
        [
            ("vip", "C1", "Ava", None),
            ("vip", "C2", "Liam", None),
            ("vip", "C3", "Maya", None),
            ('churn "risk"', "C3", "Maya", None),  # one member of two audiences
            ('churn "risk"', "C4", "Noah", None),
        ],
    )
    daemon = Daemon(config, instance, "segments")

    first = daemon.tick()
    assert sorted(first.added_partitions) == ['churn "risk"', "vip"]
    assert sorted(first.requested) == ['churn "risk"', "vip"]
    assert all(run.success for run in first.runs.values())
    assert members(sandbox, "vip") == {"C1", "C2", "C3"}  # one list, named after the audience
    assert members(sandbox, 'churn "risk"') == {"C3", "C4"}
    assert sandbox.state.find_profile(external_id="C1").attributes["first_name"] == "Ava"
    vip_list = lists_named(sandbox, "vip")[0]
    shown = metadata(instance, "segments_in", "vip")
    assert shown["audience/entered"] == 3 and shown["audience/exited"] == 0
    assert shown["audience/list_id"] == vip_list and shown["audience/list_name"] == "vip"
    assert shown["audience/members"] == 3 and shown["klaviyo/delivered"] == 3
    assert set(instance.get_dynamic_partitions("audiences_segments")) == {"vip", 'churn "risk"'}

    assert daemon.tick().requested == []  # nothing changed: no run

    load_segments(
        wh,
        [
            ("vip", "C1", "Ava", None),
            ("vip", "C3", "Maya", None),
            ("vip", "C5", "Zoe", None),  # C2 left, C5 entered
            ('churn "risk"', "C3", "Maya", None),
            ('churn "risk"', "C4", "Noah", None),
        ],
    )
    changed = daemon.tick()
    assert changed.requested == ["vip"] and changed.runs["vip"].success
    assert members(sandbox, "vip") == {"C1", "C3", "C5"}
    assert members(sandbox, 'churn "risk"') == {"C3", "C4"}
    shown = metadata(instance, "segments_out", "vip")
    assert shown["audience/entered"] == 1 and shown["audience/exited"] == 1
    assert shown["klaviyo/delivered_deleted"] == 1 and shown["audience/list_id"] == vip_list

    # Re-running an audience, or renaming its list in Klaviyo, never makes a second list.
    sandbox.state.lists[vip_list].name = "VIP (renamed)"
    assert daemon.run("vip").success
    load_segments(
        wh,
        [
            ("vip", "C1", "Ava", None),
            ("vip", "C3", "Maya", None),
            ("vip", "C5", "Zoe", None),
            ("vip", "C6", "Kai", None),  # C6 entered vip, C3 left churn "risk"
            ('churn "risk"', "C4", "Noah", None),
        ],
    )
    assert daemon.tick().requested == ['churn "risk"', "vip"]
    assert lists_named(sandbox, "vip") == [] and lists_named(sandbox, "VIP (renamed)") == [vip_list]
    assert members(sandbox, "VIP (renamed)") == {"C1", "C3", "C5", "C6"}
    assert metadata(instance, "segments_in", "vip")["audience/list_name"] == "VIP (renamed)"
    assert members(sandbox, 'churn "risk"') == {"C4"}
    assert daemon.tick().requested == []
    creates = [r for r in sandbox.state.requests if r.method == "POST" and r.path == "/api/lists"]
    assert len(creates) == 2


def test_event_log_audiences_latest_event_wins(every_warehouse_url, sandbox, instance) -> None:
    wh = Warehouse(every_warehouse_url, state_schema_for(every_warehouse_url))
    config = make_config(every_warehouse_url, sandbox)
    existing = sandbox.state.create_list("cart_abandoners")  # found by its exact name...
    for _ in range(11):  # ...the oldest of 12 (Klaviyo allows duplicate names), over 2 pages
        sandbox.state.create_list("cart_abandoners")
    sandbox.state.create_list("cart_abandoners (old)")
    sandbox.state.create_list("Win-back campaign", list_id="WINBCK")  # configured for winback
    entered, exited = "Audience Entered", "Audience Exited"
    load_events(
        wh,
        [
            ("cart_abandoners", "u1", "u1@example.com", entered, "2026-11-01 10:00"),
            ("cart_abandoners", "u2", "u2@example.com", entered, "2026-11-01 10:00"),
            ("cart_abandoners", "u2", "u2@example.com", exited, "2026-11-02 10:00"),
            ("cart_abandoners", "u3", "u3@example.com", exited, "2026-11-01 09:00"),
            ("cart_abandoners", "u3", "u3@example.com", entered, "2026-11-02 09:00"),
            ("cart_abandoners", "u4", "u4@example.com", entered, "2026-11-03 09:00"),
            ("cart_abandoners", "u4", "u4@example.com", exited, "2026-11-03 09:00"),  # tie: exit
            ("cart_abandoners", "u5", "u5@mailer.invalid", entered, "2026-11-01 09:00"),
            ("winback", "u1", "u1@example.com", entered, "2026-11-01 11:00"),
            ("winback", "u1", "u1@example.com", "Page Viewed", "2026-11-05 11:00"),  # ignored
        ],
    )
    daemon = Daemon(config, instance, "journeys")
    first = daemon.tick()
    assert sorted(first.requested) == ["cart_abandoners", "winback"]
    assert all(run.success for run in first.runs.values())
    assert len(lists_named(sandbox, "cart_abandoners")) == 12  # no new list
    used = metadata(instance, "journeys_in", "cart_abandoners")["audience/list_id"]
    assert used == existing.id
    pages = [r for r in sandbox.state.requests if r.method == "GET" and r.path == "/api/lists"]
    assert len(pages) == 2  # cart_abandoners has 12 namesakes; winback's list is configured
    assert {sandbox.state.profiles[m].email for m in sandbox.state.list_members(used)} == {
        "u1@example.com",
        "u3@example.com",
    }
    assert lists_named(sandbox, "winback") == []
    assert members(sandbox, "Win-back campaign", "email") == {"u1@example.com"}
    assert metadata(instance, "journeys_in", "winback")["audience/list_name"] == "Win-back campaign"
    shown = metadata(instance, "journeys_in", "cart_abandoners")
    assert shown["klaviyo/delivered"] == 2 and shown["klaviyo/rejected"] == 1  # Klaviyo: .invalid
    # A member Klaviyo refused does not make its audience look changed forever.
    assert daemon.tick().requested == []

    load_events(
        wh,
        [
            ("cart_abandoners", "u1", "u1@example.com", exited, "2026-11-04 10:00"),
            ("cart_abandoners", "u5", "u5@mailer.invalid", exited, "2026-11-04 10:00"),
            ("cart_abandoners", "u6", "u6@example.com", entered, "2026-11-04 10:00"),
        ],
    )
    changed = daemon.tick()
    assert changed.requested == ["cart_abandoners"] and changed.runs["cart_abandoners"].success
    assert {sandbox.state.profiles[m].email for m in sandbox.state.list_members(used)} == {
        "u3@example.com",
        "u6@example.com",
    }
    shown = metadata(instance, "journeys_out", "cart_abandoners")
    assert shown["audience/exited"] == 2 and shown["klaviyo/delivered_deleted"] == 2
    assert shown["klaviyo/not_found"] == 1  # u5 never reached Klaviyo: reported, not failed
    assert members(sandbox, "Win-back campaign", "email") == {"u1@example.com"}


def test_the_exit_guard_stops_an_emptying_until_overridden(every_warehouse_url, sandbox, instance):
    wh = Warehouse(every_warehouse_url, state_schema_for(every_warehouse_url))
    config = make_config(every_warehouse_url, sandbox)
    everyone = [("vip", f"C{i}", None, None) for i in range(6)]
    load_segments(wh, [*everyone, ("trial", "T1", None, None)])
    daemon = Daemon(config, instance, "segments")
    assert all(run.success for run in daemon.tick().runs.values())

    load_segments(wh, [("trial", "T1", None, None)])  # a broken model: vip returns no one
    stopped = daemon.tick().runs["vip"]
    assert not stopped.success
    (failure,) = [e for e in stopped.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "audience 'vip'" in message and "returns 0 members where the last sync had 6" in message
    assert "override_exit_guard: true" in message and "max_exit_share" in message
    assert failure.step_key == "klaviyo__segments_out"
    assert len(members(sandbox, "vip")) == 6  # nobody removed
    assert daemon.tick().requested == []  # this membership was tried: not requested again

    load_segments(wh, [*everyone[:2], ("trial", "T1", None, None)])  # 4 of 6 leave: 67% > 50%
    assert not daemon.tick().runs["vip"].success
    assert len(members(sandbox, "vip")) == 6

    load_segments(wh, [("trial", "T1", None, None)])
    assert daemon.run("vip", override_exit_guard=True).success  # the explicit override
    assert members(sandbox, "vip") == set()
    assert daemon.tick().requested == []


def test_the_sensor_works_through_audiences_a_window_at_a_time(duckdb_url, sandbox, instance):
    wh = Warehouse(duckdb_url)
    config = make_config(duckdb_url, sandbox, per_tick=2)
    load_segments(wh, [(f"a{i}", "C1", None, None) for i in range(3)])
    daemon = Daemon(config, instance, "segments")
    windows = [(daemon.tick().requested, daemon.cursor) for _ in range(3)]
    # A full window moves the cursor on; a short one sends the next tick back to the start.
    assert windows == [(["a0", "a1"], '{"after": "a1"}'), (["a2"], "{}"), ([], '{"after": "a1"}')]
    assert sorted(k.name for k in sandbox.state.lists.values()) == ["a0", "a1", "a2"]


def test_plan_shows_the_pending_list_and_config_errors_name_the_key(duckdb_url, sandbox) -> None:
    wh = Warehouse(duckdb_url)
    config = make_config(duckdb_url, sandbox)
    load_segments(wh, [("vip", "C1", "Ava", None)])
    take_snapshot(wh, config.models["segments"], config.path)
    report = plan_sync(config, "segments_in", wh)
    assert report.planned == {"added": 1}
    body = report.payload_samples[0]["data"]
    assert body["relationships"]["lists"]["data"][0]["id"] == "<the audience's list>"
    assert sandbox.state.requests == []
    with wh.engine.connect() as conn:
        assert not wh.table_exists(conn, LISTS)
    assert changes_table("s", 'churn "risk"').startswith("changes__s__p")
    assert changes_table("s", "2026-11-27") == "changes__s__20261127"

    good = CONFIG.format(
        url=duckdb_url, base=sandbox.url, per_tick=5, state_schema="klaviyo_sync", crm="crm"
    )
    for change, key, words in [
        (
            ("    retry:", '    schedule: "0 * * * *"\n    retry:'),
            "syncs.segments_in.schedule",
            "sensor",
        ),
        ((", event: event", ""), "models.journeys.audience", "needs both 'event'"),
        (
            ("audience: {column: segment, max_per_tick: 5}", ""),
            "syncs.segments_in.model",
            "'audience' block",
        ),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(good.replace(*change, 1), "e.yaml")
        assert (caught.value.key, words in caught.value.reason) == (key, True)
    with pytest.raises(ConfigError) as caught:
        check_sync(parse_config(good.replace("share: 0.5", "share: 2"), "e"), "segments_out", wh)
    assert caught.value.key == "syncs.segments_out.settings.max_exit_share"
