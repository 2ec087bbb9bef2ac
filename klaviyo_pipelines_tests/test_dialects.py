"""The engines that do not run here: every statement the warehouse layer emits for them,
compiled by the engine's own SQLAlchemy dialect and parsed by sqlglot for that engine.

BigQuery, Redshift and Databricks are compiled by their real dialects (sqlalchemy-bigquery,
sqlalchemy-redshift with redshift_connector, databricks-sqlalchemy), built from a URL without
connecting: their quoting, their DDL for our tables (`Table.create`, through SQLAlchemy's mock
engine) and their literals for the bound values. Snowflake's SQL runs on its emulator
(test_warehouses.py); its dialect does not import on SQLAlchemy 2.1, so PostgreSQL's compiles
its statements here. Parsing is the weakest proof there is (sqlglot accepts some SQL an engine
refuses), which is why these engines are marked experimental. Redshift's PostgreSQL subset also
runs on a real server: test_redshift_on_postgres.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import sqlglot

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.warehouse import audiences, changes, lock, snapshot, state
from klaviyo_pipelines.warehouse.dialects import ENGINES, level_warning
from klaviyo_pipelines.warehouse.engine import Warehouse

# Our engine -> a URL naming the SQLAlchemy dialect that compiles its statements.
DIALECT_URLS = {
    "snowflake": "postgresql+psycopg://",  # stand-in: see the module's docstring
    "bigquery": "bigquery://project/dataset",
    "redshift": "redshift+redshift_connector://user@host:5439/db",
    "databricks": "databricks://token@host",
}
EXPERIMENTAL = list(DIALECT_URLS)
# Every column of every model below: the recorder answers each "which columns" query with it.
MODEL_COLUMNS = ["customer_id", "email", "view_id", "viewed_at", "segment", "event", "received_at"]


class _Result:
    rowcount = 1  # a lease UPDATE took the lease

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def all(self) -> list[tuple[Any, ...]]:
        return self.rows

    def one(self) -> tuple[Any, ...]:
        return self.rows[0]

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def scalar(self) -> int:
        return 0

    def scalars(self) -> Iterator[Any]:
        return iter([])

    def mappings(self) -> Iterator[Any]:
        return iter([])

    def keys(self) -> list[str]:
        return MODEL_COLUMNS


# What the recorder answers to the few queries whose answer steers the code: the change set's
# counts (one kind sent, one acknowledged), a direct model's key check.
ANSWERS = {
    "GROUP BY 1, 2, 3": [("added", True, False, 3), ("updated", False, False, 2)],
    "sum(g.n)": [(5, 0, 0, 0)],
}


class Recorder:
    """Stands in for an engine and its connections: compiles each statement with the real
    dialect, its bound values rendered as that dialect's literals, and keeps the SQL text."""

    # The generic bulk insert (neither COPY nor DuckDB) asks for the DBAPI connection, unused.
    connection = SimpleNamespace(driver_connection=None)

    def __init__(self, url: str) -> None:
        self._mock = sa.create_mock_engine(url, lambda sql, *_, **__: self.execute(sql))
        self.dialect = self._mock.dialect
        self.statements: list[str] = []

    def begin(self) -> contextlib.AbstractContextManager[Recorder]:
        return contextlib.nullcontext(self)

    connect = begin

    def execution_options(self, **_: Any) -> Recorder:
        return self

    def close(self) -> None:
        pass

    def _run_ddl_visitor(self, visitor: Any, element: Any, **kwargs: Any) -> None:
        """`Table.create(conn)`: SQLAlchemy's mock engine emits the CREATE statements."""
        self._mock._run_ddl_visitor(visitor, element, **kwargs)

    def execute(self, statement: Any, params: Any = None) -> _Result:
        if isinstance(params, list):  # executemany: one row shows the statement
            params = params[0]
        if isinstance(statement, sa.TextClause) and params:
            used = statement.compile(dialect=self.dialect).params
            statement = statement.bindparams(**{k: v for k, v in params.items() if k in used})
        text = str(statement.compile(dialect=self.dialect, compile_kwargs={"literal_binds": True}))
        self.statements.append(text)
        return _Result(next((rows for key, rows in ANSWERS.items() if key in text), []))


def warehouse_for(engine: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Warehouse, Recorder]:
    """A Warehouse speaking `engine`'s SQL into a Recorder of the engine's SQLAlchemy dialect.
    Every table asked about exists (so reads run), with columns unlike the model's (so a
    partition's snapshot table is made afresh)."""
    wh = Warehouse("duckdb:///:memory:")
    recorder = Recorder(DIALECT_URLS[engine])
    wh.engine = recorder  # type: ignore[assignment]
    wh.sql = ENGINES[engine](recorder.dialect)
    wh.dialect = engine
    monkeypatch.setattr(wh, "table_exists", lambda *_: True)
    return wh, recorder


CONFIG = parse_config(
    """
models:
  customers: {sql: "select * from shop.customers", primary_key: customer_id}
  accounts: {table: shop.accounts, primary_key: customer_id}
  views:
    sql: "select * from shop.views"
    primary_key: view_id
    partition: {column: viewed_at, start: "2026-03-01"}
  segments:
    sql: "select * from crm.segment_members"
    primary_key: customer_id
    audience: {column: segment}
  journeys:
    table: crm.audience_events
    primary_key: customer_id
    audience: {column: segment, event: event, timestamp: received_at}
syncs:
  profiles:
    model: customers
    action: upsert_profile
    on: [added]
    mapping: {external_id: customer_id}
  accounts:
    model: accounts
    action: upsert_profile
    mapping: {external_id: customer_id}
  views:
    model: views
    action: track_event
    mapping: {time: viewed_at}
    settings: {metric_name: Viewed Page}
  segments_in:
    model: segments
    action: add_profile_to_list
    mapping: {external_id: customer_id}
""",
    "test.yaml",
)


def emit_every_statement(wh: Warehouse) -> None:
    """Each step of the warehouse layer, once per shape: snapshots (whole, a day, an audience,
    an event-log audience, a direct model's key check), change sets (copied, of a day, direct),
    a page read, a batch's outcome, the ledger, the run log, the lease, the audience sensor's
    query, the exit guard's counts and the audience lists, a second model's rows by key."""
    models, syncs, path = CONFIG.models, CONFIG.syncs, CONFIG.path
    columns, fingerprint = ["customer_id", "email"], "f" * 16
    snapshot.take_snapshot(wh, models["customers"], path)
    snapshot.take_snapshot(wh, models["views"], path, partition="2026-03-01")
    snapshot.take_snapshot(wh, models["segments"], path, partition="vip")
    snapshot.take_snapshot(wh, models["journeys"], path)
    snapshot.take_snapshot(wh, models["accounts"], path)
    changes.compute_change_set(wh, syncs["profiles"], columns, fingerprint)
    changes.compute_change_set(
        wh, syncs["views"], ["view_id", "viewed_at"], fingerprint, partition="2026-03-01"
    )
    changes.compute_change_set(
        wh, syncs["accounts"], columns, fingerprint, model=models["accounts"]
    )
    list(changes.iter_changes(wh, "profiles", columns))
    failure = state.Failure("c1", "h", state.FailureKind.INVALID, "email", "bad")
    state.record_outcomes(wh, "profiles", [state.Delivered("c2", "h", "{}")], [failure])
    state.record_failures(wh, "profiles", [failure])
    state.forget_failures(wh, "profiles", "h")
    state.record_run(wh, "r1", "profiles", state.now(), "success", {"delivered": 1})
    state.ledger_entries(wh, "profiles", limit=20)
    state.ledger_counts(wh, "profiles")
    state.delivered_count(wh, "profiles")
    state.latest_run(wh, "profiles")
    with lock.sync_lock(wh, "profiles"):
        pass
    audiences.audience_statuses(wh, models["segments"], [syncs["segments_in"]], path, limit=10)
    changes_table = wh.table(changes.changes_table("segments_in", "vip"))
    audiences.membership_changes(wh, "segments", changes_table, "vip")
    audiences.remember_list(wh, "segments", "vip", "L1", "vip")
    audiences.audience_summary(wh, "segments", "vip")
    snapshot.snapshot_rows_for_keys(wh, "customers", "customer_id", ["c1", "c2"])


def understood(statement: str, engine: str) -> None:
    """Parse `statement` as `engine`'s SQL; raise unless sqlglot understood all of it (where
    it does not, sqlglot keeps the text as an opaque Command: `ALTER TABLE a RENAME b` too)."""
    for tree in sqlglot.parse(statement, read=engine):
        if tree is not None and tree.find(sqlglot.exp.Command):
            raise sqlglot.errors.ParseError(f"{engine}: not understood, kept as a Command")


@pytest.mark.parametrize("engine", EXPERIMENTAL)
def test_every_statement_compiles_and_parses_for_the_engine(engine, monkeypatch):
    wh, recorder = warehouse_for(engine, monkeypatch)
    emit_every_statement(wh)

    statements = recorder.statements
    joined = "\n".join(statements)
    for made in ("state__profiles", "ledger", "sync_runs", "run_locks", "audience_lists"):
        assert any(s.startswith("\nCREATE TABLE") and made in s for s in statements), made
    assert "kp_diff" in joined and "_kp_seq" in joined  # the change set ...
    assert wh.sql.row_json(["customer_id", "email"], "c") in joined  # ... acknowledged rows
    assert wh.sql.member_hash("x.k") in joined  # the audience sensor
    for statement in statements:
        try:
            understood(statement, engine)
        except sqlglot.errors.SqlglotError as exc:
            pytest.fail(f"{engine} cannot parse:\n{statement}\n{exc}")


@pytest.mark.parametrize("engine", ["bigquery", "redshift", "databricks"])
def test_our_tables_take_the_engines_own_types(engine, monkeypatch):
    wh, recorder = warehouse_for(engine, monkeypatch)
    state.ensure_tables(wh, "profiles")
    ddl = "\n".join(recorder.statements)
    expected = {
        "bigquery": ("`row_json` STRING", "`recorded_at` DATETIME"),
        "redshift": ("row_json VARCHAR(65535)", "recorded_at TIMESTAMP WITHOUT TIME ZONE"),
        "databricks": ("row_json STRING", "recorded_at TIMESTAMP_NTZ"),
    }[engine]
    for column in expected:
        assert column in ddl


@pytest.mark.parametrize("engine", EXPERIMENTAL)
def test_each_engine_spells_what_differs_its_own_way(engine):
    sql = ENGINES[engine](Recorder(DIALECT_URLS[engine]).dialect)
    assert sql.level == ("emulated" if engine == "snowflake" else "experimental")
    assert sql.extra == engine
    assert "||" not in sql.sync_hash(["a", "b"], "'f'") or engine == "redshift"


def test_validate_warns_of_engines_not_proven_on_a_real_server():
    assert level_warning("duckdb:///w.duckdb") is None
    assert level_warning("mysql+pymysql://u@h/db") is None
    assert "verified on an emulator only" in level_warning("snowflake://u@a/db/s")
    for url in ("bigquery://p/d", "redshift+psycopg2://u@h/db", "databricks://h"):
        assert "experimental" in level_warning(url)
