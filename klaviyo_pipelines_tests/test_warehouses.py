"""The warehouse suite: the same syncs on every engine that runs here (DuckDB, PostgreSQL,
MariaDB), each asserting exact outcomes in the sandbox, the delivery state and the ledger.

Tables are created with SQLAlchemy Core, so each engine gets its own types (MySQL wants string
lengths and DATETIME); the state schema is a database of its own per test on MariaDB.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.dialects import UnsupportedWarehouse
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.lock import SyncLocked, sync_lock
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import (
    FailureKind,
    delivered_count,
    ensure_tables,
    ledger_entries,
)
from klaviyo_pipelines_tests.conftest import TEST_API_KEY, state_schema_for

NEWSLETTER = "NEWSLT"


@pytest.fixture(
    params=["duckdb", "postgres", "mariadb", pytest.param("snowflake", marks=pytest.mark.snowflake)]
)
def every_warehouse_url(request: pytest.FixtureRequest) -> str:
    """The engines that run here: the three servers, and Snowflake's emulator."""
    return request.getfixturevalue(f"{request.param}_url")


def model_schema(url: str) -> str:
    """Where a test's own tables live: `shop`, or the test's database on MariaDB."""
    return sa.engine.make_url(url).database if url.startswith("mysql") else "shop"


def open_warehouse(url: str) -> Warehouse:
    return Warehouse(url, state_schema_for(url))


def customers_table(url: str) -> sa.Table:
    return sa.Table(
        "customers",
        sa.MetaData(),
        sa.Column("customer_id", sa.String(64)),
        sa.Column("email", sa.String(255)),
        sa.Column("phone", sa.String(32)),
        sa.Column("first_name", sa.String(255)),
        sa.Column("city", sa.String(255)),
        sa.Column("ltv", sa.Float),
        schema=model_schema(url),
    )


def views_table(url: str) -> sa.Table:
    return sa.Table(
        "page_views",
        sa.MetaData(),
        sa.Column("view_id", sa.String(64)),
        sa.Column("email", sa.String(255)),
        sa.Column("url", sa.String(255)),
        sa.Column("viewed_at", sa.DateTime),
        schema=model_schema(url),
    )


LOAD_CHUNK = 500  # rows an INSERT: far below PostgreSQL's 65,535 parameters a statement


def load(wh: Warehouse, table: sa.Table, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {wh.quote(table.schema)}"))
        table.drop(conn, checkfirst=True)
        table.create(conn)
        names = [c.name for c in table.columns]
        # Multi-row INSERTs, not executemany: the Snowflake emulator translates each statement
        # on its own, and row by row 3,000 customers took it a minute.
        for start in range(0, len(rows), LOAD_CHUNK):
            chunk = rows[start : start + LOAD_CHUNK]
            conn.execute(
                table.insert().values([dict(zip(names, row, strict=True)) for row in chunk])
            )


def config_for(url: str, sandbox: Sandbox, syncs: str, models: str = "") -> Config:
    schema = model_schema(url)
    return parse_config(
        f"""
warehouse: {{url: "{url}", state_schema: {state_schema_for(url)}}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  customers: {{sql: "select * from {schema}.customers", primary_key: customer_id}}
  page_views:
    sql: "select * from {schema}.page_views"
    primary_key: view_id
    partition: {{column: viewed_at, start: "2026-03-01"}}
{models}
syncs:
{textwrap.indent(textwrap.dedent(syncs), "  ")}
""",
        "test.yaml",
    )


PROFILES = """
profiles:
  model: customers
  action: upsert_profile
  mapping: {external_id: customer_id, phone_number: phone, location: {city: city}}
  settings: {list_id: NEWSLT}
"""


def run(
    config: Config, wh: Warehouse, sandbox: Sandbox, sync: str, partition: str | None = None
) -> SyncReport:
    model = config.models[config.syncs[sync].model]
    take_snapshot(wh, model, config.path, partition=partition)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.2) as client:
        return run_sync(config, sync, wh, client, partition=partition)


def customer(i: int, email: str | None = None, **changes: object) -> tuple:
    row = {
        "customer_id": f"c{i:05d}",
        "email": email or f"c{i}@shop.example",
        "phone": f"+1512555{i:04d}" if i % 3 == 0 else None,
        "first_name": f"Näme{i}",
        "city": "Austin" if i % 2 else None,
        "ltv": i * 1.25,
    }
    row.update(changes)
    return tuple(row.values())


def profile_by_email(sandbox: Sandbox, email: str):  # type: ignore[no-untyped-def]
    found = [p for p in sandbox.state.profiles.values() if p.attributes.get("email") == email]
    assert len(found) == 1, f"{email}: {len(found)} profiles"
    return found[0]


def test_3000_customers_first_sync_rerun_and_exact_edits(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    table = customers_table(every_warehouse_url)
    rows = [customer(i, "not-an-email" if i % 100 == 7 else None) for i in range(3000)]
    rows += [customer(9001, customer_id=None), customer(9002, customer_id=None)]
    rows += [customer(9003, customer_id="dup"), customer(9004, customer_id="dup")]
    load(wh, table, rows)
    config = config_for(every_warehouse_url, sandbox, PROFILES)

    first = run(config, wh, sandbox, "profiles")
    assert first.status == "success", first.error
    assert first.planned == {"added": 3000}
    assert sum(first.delivered.values()) == 2970
    assert sum(first.rejected.values()) == 30 and first.key_rejected == 4
    invalid = [e for e in ledger_entries(wh, "profiles") if e.kind is FailureKind.INVALID]
    assert {e.field for e in invalid if e.key.startswith("c")} == {"email"}
    assert {e.key for e in invalid if not e.key.startswith("c")} == {"<NULL>", "dup"}
    assert delivered_count(wh, "profiles") == 2970
    assert len(sandbox.state.list_members(NEWSLETTER)) == 2970
    assert profile_by_email(sandbox, "c3@shop.example").attributes["location"]["city"] == "Austin"

    again = run(config, wh, sandbox, "profiles")
    assert (again.status, again.requests, again.planned) == ("success", 0, {})
    assert again.held_invalid == 30  # unchanged bad rows cost no request

    # 10 edits, one of them a city set to NULL: exactly 10 updates; NULL keeps Klaviyo's value.
    def shop(edits: dict[int, dict[str, object]]) -> list[tuple]:
        bad = {i: "not-an-email" for i in range(3000) if i % 100 == 7}
        return [customer(i, bad.get(i), **edits.get(i, {})) for i in range(3000)]

    edits: dict[int, dict[str, object]] = {i: {"first_name": f"Ēdith{i}"} for i in range(20, 29)}
    edits[13] = {"city": None}
    load(wh, table, shop(edits))
    third = run(config, wh, sandbox, "profiles")
    assert third.status == "success", third.error
    assert (third.planned, sum(third.delivered.values())) == ({"updated": 10}, 10)
    for i in range(20, 29):
        assert (
            profile_by_email(sandbox, f"c{i}@shop.example").attributes["first_name"] == f"Ēdith{i}"
        )
    assert profile_by_email(sandbox, "c13@shop.example").attributes["location"]["city"] == "Austin"

    # then 3 more edits of columns the sync reads (a column it does not read sends nothing)
    edits |= {11: {"first_name": "Bob"}, 12: {"phone": "+15125550199"}, 2999: {"city": "Dallas"}}
    edits[5] = {"ltv": 99.0}
    load(wh, table, shop(edits))
    fourth = run(config, wh, sandbox, "profiles")
    assert (fourth.planned, sum(fourth.delivered.values())) == ({"updated": 3}, 3)
    assert profile_by_email(sandbox, "c11@shop.example").attributes["first_name"] == "Bob"


def test_leavers_reach_remove_profile_with_their_identifiers(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    table = customers_table(every_warehouse_url)
    load(wh, table, [customer(i) for i in range(40)])
    config = config_for(
        every_warehouse_url,
        sandbox,
        PROFILES
        + """
leavers:
  model: customers
  action: remove_profile
  on: [deleted]
  settings: {list_id: NEWSLT}
""",
    )
    assert run(config, wh, sandbox, "profiles").status == "success"
    acknowledged = run(config, wh, sandbox, "leavers")
    assert (acknowledged.acknowledged, acknowledged.requests) == (40, 0)

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


def test_daily_partitions_and_a_backfill_send_each_day_once(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    start = datetime(2026, 3, 1, 9, 30)
    views = [
        (f"v{i:04d}", f"c{i % 7}@shop.example", f"/p/{i}", start + timedelta(hours=7 * i))
        for i in range(30)
    ]  # 30 views over 9 days
    load(wh, views_table(every_warehouse_url), views)
    config = config_for(
        every_warehouse_url,
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
        expected = sum(1 for v in views if v[3].date().isoformat() == day)
        assert report.status == "success", report.error
        assert sum(report.delivered.values()) == expected
    assert len(sandbox.state.events) == sum(1 for v in views if v[3].date().isoformat() in days)
    rerun = run(config, wh, sandbox, "views", partition=days[1])
    assert (rerun.requests, rerun.planned) == (0, {})


@pytest.mark.parametrize("lease", [False, True], ids=["engine lock", "lease row"])
def test_a_second_process_is_refused_while_a_sync_runs(every_warehouse_url, lease):
    if lease and every_warehouse_url.startswith("duckdb"):
        pytest.skip("DuckDB locks by file, never by lease")
    if every_warehouse_url.startswith("snowflake"):
        pytest.skip("the emulator's database lives in this process: the lease is proven above")
    wh = open_warehouse(every_warehouse_url)
    if lease:  # the lease serves the cloud warehouses: prove it on a real server
        wh.sql.has_session_lock = False
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from klaviyo_pipelines.warehouse.engine import Warehouse
                from klaviyo_pipelines.warehouse.lock import sync_lock
                wh = Warehouse({every_warehouse_url!r}, {wh.state_schema!r})
                if {lease}:
                    wh.sql.has_session_lock = False
                with sync_lock(wh, "profiles"):
                    print("held", flush=True)
                    sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SyncLocked, match="already running"), sync_lock(wh, "profiles"):
            pass
        with sync_lock(wh, "other_sync"):  # another sync is not held up
            pass
    finally:
        holder.communicate("\n", timeout=30)
    with sync_lock(wh, "profiles", wait=10):  # released when the holder ended
        pass


def test_long_sync_names_get_tables_of_their_own(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    load(wh, customers_table(every_warehouse_url), [customer(i) for i in range(10)])
    stem = "profiles_for_the_newsletter_of_the_spring_campaign_in_tx_"  # 58 characters
    syncs = "".join(
        PROFILES.replace("profiles:", f"{stem}{suffix}:") for suffix in ("north", "south")
    )
    config = config_for(every_warehouse_url, sandbox, syncs)
    for suffix in ("north", "south"):
        report = run(config, wh, sandbox, f"{stem}{suffix}")
        assert (report.status, sum(report.delivered.values())) == ("success", 10), report.error
        assert run(config, wh, sandbox, f"{stem}{suffix}").requests == 0
    limit = wh.engine.dialect.max_identifier_length
    assert all(len(wh.fit(f"state__{stem}{s}").encode()) <= limit for s in ("north", "south"))
    assert wh.fit(f"state__{stem}north") != wh.fit(f"state__{stem}south")


def test_first_runs_racing_to_create_the_state_tables_both_go_on(every_warehouse_url):
    if every_warehouse_url.startswith("snowflake"):
        pytest.skip("the emulator's threads share one DuckDB, whose conflicts are not Snowflake's")
    errors: list[BaseException] = []

    def first_run(sync: str) -> None:
        try:
            ensure_tables(open_warehouse(every_warehouse_url), sync)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_run, args=(f"sync{i % 2}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_an_engine_outside_the_list_is_refused(tmp_path):
    with pytest.raises(UnsupportedWarehouse, match="'sqlite' is not supported"):
        Warehouse(f"sqlite:///{tmp_path / 'w.db'}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("sqlite:///w.db", "the warehouse engine 'sqlite' is not supported"),
        ("mysql+mysqldb://u@h/db", "the driver for mysql is not installed"),
        # (the [dev] set installs the other engines' drivers: test_dialects.py compiles with them)
        ("snowflake://u@account/db/s", "pip install 'klaviyo_pipelines[snowflake]'"),
    ],
)
def test_an_unknown_engine_or_a_missing_driver_is_a_config_error(url, reason):
    text = f"""
warehouse: {{url: "{url}"}}
models: {{m: {{table: t, primary_key: id}}}}
syncs: {{s: {{model: m, action: upsert_profile}}}}
"""
    with pytest.raises(ConfigError, match=re.escape(reason)) as refused:
        parse_config(text, "test.yaml")
    assert refused.value.key == "warehouse.url"
