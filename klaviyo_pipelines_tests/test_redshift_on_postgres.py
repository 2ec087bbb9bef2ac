"""Redshift's SQL run on a real PostgreSQL server, where the two agree.

Redshift grew out of PostgreSQL 8, and most of what our Redshift module writes is PostgreSQL
too: the md5 row hash over length-prefixed `VARCHAR(65535)` text, `CREATE TEMPORARY TABLE`,
`UPDATE ... FROM`, `DELETE ... IN (SELECT ...)`, the swap by `ALTER TABLE ... RENAME`, the lease
row in `run_locks` (Redshift has no advisory lock) and the plain multi-row INSERT of staged
outcomes (no COPY). Here a Warehouse on PostgreSQL speaks the Redshift module's SQL through
whole syncs. Left out, being Redshift's alone: `JSON_SERIALIZE(OBJECT())` (a change the sync
does not act on is acknowledged with the row's JSON) and `STRTOL` (the audience sensor), and
so audiences and syncs that acknowledge; also backslashes in literals, which Redshift reads as
escapes and PostgreSQL does not. test_dialects.py parses all of it as Redshift's SQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.warehouse.dialects.redshift import RedshiftDialect
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import FailureKind, delivered_count, ledger_entries
from klaviyo_pipelines_tests.test_warehouses import (
    NEWSLETTER,
    PROFILES,
    config_for,
    customer,
    customers_table,
    load,
    profile_by_email,
    run,
    views_table,
)


@pytest.fixture
def redshift_sql(postgres_url):  # type: ignore[no-untyped-def]
    """A Warehouse on a fresh PostgreSQL database that writes Redshift's SQL, and the list
    of statements it sent."""
    wh = Warehouse(postgres_url)
    wh.sql = RedshiftDialect(wh.engine.dialect, wh.engine)
    wh.dialect = wh.sql.name
    sent: list[str] = []
    sa.event.listen(wh.engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    yield wh, sent
    wh.dispose()


def assert_spoke_redshift(sent: list[str]) -> None:
    """The statements were the Redshift module's: its hash and types, no PostgreSQL extras."""
    joined = "\n".join(sent)
    assert "md5(" in joined and "VARCHAR(65535)" in joined and "run_locks" in joined
    for postgres_only in ("hashtextextended", "row_to_json", "pg_try_advisory_lock", "COPY "):
        assert postgres_only not in joined


def test_first_sync_rerun_edits_and_held_rows(redshift_sql, postgres_url, sandbox):
    wh, sent = redshift_sql
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    table = customers_table(postgres_url)
    bad = {i: "not-an-email" for i in range(300) if i % 100 == 7}

    def shop(edits: dict[int, dict[str, object]]) -> list[tuple]:
        rows = [customer(i, bad.get(i), **edits.get(i, {})) for i in range(300)]
        keyless = [customer(9001, customer_id=None)]
        return [
            *rows,
            *keyless,
            customer(9003, customer_id="dup"),
            customer(9004, customer_id="dup"),
        ]

    load(wh, table, shop({}))
    config = config_for(postgres_url, sandbox, PROFILES)

    first = run(config, wh, sandbox, "profiles")
    assert first.status == "success", first.error
    assert first.planned == {"added": 300}
    assert (sum(first.delivered.values()), sum(first.rejected.values())) == (297, 3)
    assert first.key_rejected == 3  # one NULL key, two rows of a duplicated one
    invalid = [e for e in ledger_entries(wh, "profiles") if e.kind is FailureKind.INVALID]
    assert {e.key for e in invalid} == {"c00007", "c00107", "c00207", "<NULL>", "dup"}
    assert delivered_count(wh, "profiles") == 297
    assert len(sandbox.state.list_members(NEWSLETTER)) == 297

    again = run(config, wh, sandbox, "profiles")
    assert (again.status, again.requests, again.planned) == ("success", 0, {})
    assert again.held_invalid == 3

    # 10 edits, one a city set to NULL: exactly 10 updates; a column no sync reads: none.
    edits: dict[int, dict[str, object]] = {i: {"first_name": f"Ēdith{i}"} for i in range(20, 29)}
    edits[13] = {"city": None}
    edits[5] = {"ltv": 99.0}
    load(wh, table, shop(edits))
    third = run(config, wh, sandbox, "profiles")
    assert third.status == "success", third.error
    assert (third.planned, sum(third.delivered.values())) == ({"updated": 10}, 10)
    assert profile_by_email(sandbox, "c25@shop.example").attributes["first_name"] == "Ēdith25"
    assert_spoke_redshift(sent)
    with wh.engine.connect() as conn:
        lease = conn.execute(sa.text("SELECT holder FROM klaviyo_sync.run_locks")).all()
        hashes = conn.execute(sa.text("SELECT row_hash FROM klaviyo_sync.state__profiles")).all()
    assert lease == [(None,)]  # one lease row, given back at the end of each run
    assert all(len(h) == 32 for (h,) in hashes)  # md5 hex, as Redshift computes it


def test_deleted_rows_reach_remove_profile(redshift_sql, postgres_url, sandbox):
    wh, sent = redshift_sql
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    table = customers_table(postgres_url)
    load(wh, table, [customer(i) for i in range(40)])
    # on: [added, deleted], every kind the action accepts, so nothing is acknowledged (that
    # takes Redshift's JSON functions): the first run's 40 additions find no list members.
    config = config_for(
        postgres_url,
        sandbox,
        PROFILES
        + """
leavers:
  model: customers
  action: remove_profile
  on: [added, deleted]
  settings: {list_id: NEWSLT}
""",
    )
    assert sum(run(config, wh, sandbox, "leavers").delivered.values()) == 40
    assert run(config, wh, sandbox, "profiles").status == "success"
    assert len(sandbox.state.list_members(NEWSLETTER)) == 40

    gone = {5, 6, 17, 30, 39}
    load(wh, table, [customer(i) for i in range(40) if i not in gone])
    removed = run(config, wh, sandbox, "leavers")
    assert removed.status == "success", removed.error
    assert removed.planned == {"deleted": 5} and sum(removed.delivered.values()) == 5
    members = {
        sandbox.state.profiles[pid].attributes["email"]
        for pid in sandbox.state.list_members(NEWSLETTER)
    }
    assert members == {f"c{i}@shop.example" for i in range(40) if i not in gone}
    assert delivered_count(wh, "leavers") == 35
    assert_spoke_redshift(sent)


def test_daily_partitions_send_each_day_once(redshift_sql, postgres_url, sandbox):
    wh, sent = redshift_sql
    start = datetime(2026, 3, 1, 9, 30)
    views = [
        (f"v{i:04d}", f"c{i % 7}@shop.example", f"/p/{i}", start + timedelta(hours=7 * i))
        for i in range(30)
    ]
    load(wh, views_table(postgres_url), views)
    config = config_for(
        postgres_url,
        sandbox,
        """
views:
  model: page_views
  action: track_event
  mapping: {time: viewed_at, properties: {url: url}}
  settings: {metric_name: Viewed Page}
""",
    )
    days = sorted({v[3].date().isoformat() for v in views})[:3]
    for day in days:
        report = run(config, wh, sandbox, "views", partition=day)
        assert report.status == "success", report.error
        assert sum(report.delivered.values()) == sum(
            1 for v in views if v[3].date().isoformat() == day
        )
    rerun = run(config, wh, sandbox, "views", partition=days[1])
    assert (rerun.status, rerun.requests, rerun.planned) == ("success", 0, {})
    assert len(sandbox.state.events) == sum(1 for v in views if v[3].date().isoformat() in days)
    assert_spoke_redshift(sent)
