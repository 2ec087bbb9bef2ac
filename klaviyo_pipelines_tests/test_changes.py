"""Change sets computed in the warehouse, on DuckDB and PostgreSQL, without Klaviyo."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.runner import SyncReport, prepare_sync
from klaviyo_pipelines.warehouse.changes import iter_changes
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import (
    Delivered,
    FailureKind,
    ledger_entries,
    record_outcomes,
)

CONFIG = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}"}}
models:
  people: {{table: crm.people, primary_key: id}}
syncs:
  people_sync:
    model: people
    action: upsert_profile
    mapping: {{email: email, properties: {{score: score}}}}
"""


def make_people(wh: Warehouse, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS crm"))
        conn.execute(sa.text("DROP TABLE IF EXISTS crm.people"))
        conn.execute(
            sa.text(
                "CREATE TABLE crm.people (id INTEGER, email VARCHAR, score INTEGER, note VARCHAR)"
            )
        )
        wh.bulk_insert(conn, "crm.people", ["id", "email", "score", "note"], rows)


def plan(wh: Warehouse, config, retry_rejected: bool = False):
    take_snapshot(wh, config.models["people"], config.path)
    report = SyncReport(sync="people_sync", action="upsert_profile", model="people")
    prepared = prepare_sync(config, "people_sync", wh, report, retry_rejected)
    rows = [row for page in iter_changes(wh, "people_sync", prepared.columns, 4) for row in page]
    return report, rows


def deliver_all(wh: Warehouse, rows, sync: str = "people_sync") -> None:
    delivered = [
        Delivered(r.key, r.row_hash, "{}", r.kind.value == "deleted", r.partition) for r in rows
    ]
    record_outcomes(wh, sync, delivered, [])


def test_change_set_lifecycle(warehouse_url: str) -> None:
    wh = Warehouse(warehouse_url)
    config = parse_config(CONFIG.format(url=warehouse_url), "conf.yaml")
    people = [(i, f"p{i}@example.com", i * 10, "x") for i in range(1, 11)]
    make_people(wh, people)

    report, rows = plan(wh, config)
    assert report.planned == {"added": 10}
    assert [r.key for r in rows] == sorted(str(i) for i in range(1, 11))  # read back in 4-row pages
    assert rows[0].values == {"email": "p1@example.com", "score": 10}  # only the columns it reads
    deliver_all(wh, rows)

    report, rows = plan(wh, config)
    assert report.planned == {} and rows == []

    people[1] = (2, "p2@example.com", 999, "x")  # a column the sync reads
    people[4] = (5, "new5@example.com", 50, "x")
    people[7] = (8, "p8@example.com", 80, "a note the sync does not read")
    make_people(wh, people)
    report, rows = plan(wh, config)
    assert {r.key: r.kind.value for r in rows} == {"2": "updated", "5": "updated"}
    deliver_all(wh, rows)

    make_people(wh, [*people[:-1], (11, "p11@example.com", 1, "x")])
    report, rows = plan(wh, config)
    assert report.found == {"added": 1, "deleted": 1}
    assert report.planned == {"added": 1}  # upsert_profile does not act on deleted rows
    wh.dispose()


def test_null_and_duplicate_keys_are_held_back_and_ledgered(warehouse_url: str) -> None:
    wh = Warehouse(warehouse_url)
    config = parse_config(CONFIG.format(url=warehouse_url), "conf.yaml")
    make_people(
        wh,
        [
            (1, "a@example.com", 1, ""),
            (2, "b@example.com", 2, ""),
            (2, "c@example.com", 3, ""),
            (None, "d@example.com", 4, ""),
        ],
    )
    report, rows = plan(wh, config)
    assert [r.key for r in rows] == ["1"]
    assert report.key_rejected == 3
    ledger = {e.key: e for e in ledger_entries(wh, "people_sync")}
    assert set(ledger) == {"2", "<NULL>"}
    assert "share id '2'" in ledger["2"].reason and ledger["2"].kind is FailureKind.INVALID
    wh.dispose()


def test_a_mapping_change_resends_every_row(warehouse_url: str) -> None:
    wh = Warehouse(warehouse_url)
    config = parse_config(CONFIG.format(url=warehouse_url), "conf.yaml")
    make_people(wh, [(i, f"p{i}@example.com", i, "") for i in range(5)])
    deliver_all(wh, plan(wh, config)[1])
    remapped = parse_config(
        CONFIG.format(url=warehouse_url).replace("{score: score}", "{points: score}"), "conf.yaml"
    )
    report, _ = plan(wh, remapped)
    assert report.planned == {"updated": 5}
    wh.dispose()


def test_kinds_the_sync_does_not_act_on_are_recorded_not_sent(warehouse_url: str) -> None:
    wh = Warehouse(warehouse_url)
    text = CONFIG.format(url=warehouse_url).replace(
        "action: upsert_profile", "action: upsert_profile\n    on: [added]"
    )
    config = parse_config(text, "conf.yaml")
    people = [(i, f"p{i}@example.com", i, "") for i in range(4)]
    make_people(wh, people)
    deliver_all(wh, plan(wh, config)[1])

    make_people(wh, [(0, "changed@example.com", 0, ""), *people[1:3]])  # 0 updated, 3 deleted
    report, rows = plan(wh, config)
    assert report.found == {"updated": 1, "deleted": 1}
    assert rows == [] and report.acknowledged == 2
    report, rows = plan(wh, config)
    assert report.found == {}  # the state now matches the model: nothing to acknowledge again

    make_people(wh, [(0, "changed@example.com", 0, ""), *people[1:]])  # 3 is back: added
    report, rows = plan(wh, config)
    assert [(r.key, r.kind.value) for r in rows] == [("3", "added")]
    wh.dispose()


PARTITIONED = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}"}}
models:
  signups:
    table: crm.signups
    primary_key: id
    partition: {{column: signed_up_at, start: 2026-11-01}}
syncs:
  signup_profiles: {{model: signups, action: upsert_profile, mapping: {{email: email}}}}
"""


def test_a_partition_sees_only_its_own_day(warehouse_url: str) -> None:
    wh = Warehouse(warehouse_url)
    config = parse_config(PARTITIONED.format(url=warehouse_url), "conf.yaml")
    assert config.models["signups"].partition.start == "2026-11-01"

    def load(rows: list[tuple]) -> None:
        with wh.engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS crm"))
            conn.execute(sa.text("DROP TABLE IF EXISTS crm.signups"))
            conn.execute(
                sa.text(
                    "CREATE TABLE crm.signups (id INTEGER, email VARCHAR, signed_up_at TIMESTAMP)"
                )
            )
            wh.bulk_insert(conn, "crm.signups", ["id", "email", "signed_up_at"], rows)

    def day(partition: str):
        take_snapshot(wh, config.models["signups"], config.path, partition)
        report = SyncReport(sync="signup_profiles", action="upsert_profile", model="signups")
        prepared = prepare_sync(config, "signup_profiles", wh, report, False, partition)
        pages = iter_changes(wh, "signup_profiles", prepared.columns, partition=partition)
        return report, [row for page in pages for row in page]

    first, second = datetime(2026, 11, 1, 23, 59), datetime(2026, 11, 2, 0, 0)
    load([(1, "a@example.com", first), (2, "b@example.com", first), (3, "c@example.com", second)])
    report, rows = day("2026-11-01")
    assert [r.key for r in rows] == ["1", "2"] and {r.partition for r in rows} == {"2026-11-01"}
    deliver_all(wh, rows, "signup_profiles")
    report, rows = day("2026-11-02")
    assert [r.key for r in rows] == ["3"]
    deliver_all(wh, rows, "signup_profiles")

    load([(1, "a@example.com", first), (3, "c2@example.com", second)])  # 2 gone, 3 changed
    report, rows = day("2026-11-02")
    assert report.found == {"updated": 1}  # day 1's deletion is not day 2's business
    report, rows = day("2026-11-01")
    assert report.found == {"deleted": 1}
    wh.dispose()
