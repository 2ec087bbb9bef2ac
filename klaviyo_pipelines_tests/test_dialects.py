"""The experimental engines (Snowflake, BigQuery, Redshift, Databricks): every statement of a
change set, a commit of outcomes and the lease lock, as our code builds it for that engine,
parsed by sqlglot for that engine's SQL. Parsing is the weakest proof there is (sqlglot
accepts some SQL the engine refuses), which is why these engines are marked experimental;
the engines that run here are proven by test_warehouses.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import sqlalchemy as sa
import sqlglot
from sqlalchemy.dialects import postgresql

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.warehouse import changes, lock, state
from klaviyo_pipelines.warehouse.dialects import ENGINES, level_warning
from klaviyo_pipelines.warehouse.engine import Warehouse

EXPERIMENTAL = ["snowflake", "bigquery", "redshift", "databricks"]
SQLGLOT_NAMES = {"databricks": "databricks", "bigquery": "bigquery"}


class _Result:
    rowcount = 1

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def all(self) -> list[tuple[Any, ...]]:
        return self.rows

    def scalar(self) -> int:
        return 0


class Recorder:
    """Stands in for an engine and its connections: records each statement, answers the
    change set's count query with one kind sent and one acknowledged."""

    def __init__(self, dialect: sa.engine.Dialect) -> None:
        self.dialect = dialect
        self.statements: list[str] = []

    def begin(self) -> contextlib.AbstractContextManager[Recorder]:
        return contextlib.nullcontext(self)

    connect = begin

    def execute(self, statement: Any, params: Any = None) -> _Result:
        text = str(statement)
        self.statements.append(text)
        if "GROUP BY 1, 2, 3" in text:
            return _Result([("added", True, False, 3), ("updated", False, False, 2)])
        return _Result([])


def warehouse_for(engine: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Warehouse, Recorder]:
    """A Warehouse speaking `engine`'s SQL into a Recorder (PostgreSQL's SQLAlchemy dialect
    stands in for quoting: our lower-case names are left unquoted on every engine)."""
    wh = Warehouse("duckdb:///:memory:")
    recorder = Recorder(postgresql.dialect())
    wh.engine = recorder  # type: ignore[assignment]
    wh.sql = ENGINES[engine](recorder.dialect)
    wh.dialect = engine
    monkeypatch.setattr(changes, "ensure_tables", lambda *_: None)
    monkeypatch.setattr(lock, "create_tables", lambda *_: None)
    monkeypatch.setattr(wh, "bulk_insert", lambda *_: None)
    return wh, recorder


CONFIG = parse_config(
    """
models:
  customers: {sql: "select * from shop.customers", primary_key: customer_id}
syncs:
  profiles:
    model: customers
    action: upsert_profile
    on: [added]
    mapping: {external_id: customer_id}
""",
    "test.yaml",
)


@pytest.mark.parametrize("engine", EXPERIMENTAL)
def test_every_statement_parses_for_the_engine(engine, monkeypatch):
    wh, recorder = warehouse_for(engine, monkeypatch)
    changes.compute_change_set(
        wh, CONFIG.syncs["profiles"], ["customer_id", "email"], "f" * 16, partition="2026-03-01"
    )
    failure = state.Failure("c1", "h", state.FailureKind.INVALID, "email", "bad")
    state.record_outcomes(wh, "profiles", [state.Delivered("c2", "h", "{}")], [failure])
    with lock.sync_lock(wh, "profiles"):
        pass

    statements = recorder.statements
    joined = "\n".join(statements)
    assert "kp_diff" in joined and "_kp_seq" in joined  # the change set ...
    assert wh.sql.row_json(["customer_id", "email"], "c") in joined  # ... acknowledged rows
    assert "run_locks" in joined  # the lease
    for statement in statements:
        try:
            sqlglot.parse(statement, read=SQLGLOT_NAMES.get(engine, engine))
        except sqlglot.errors.ParseError as exc:
            pytest.fail(f"{engine} cannot parse:\n{statement}\n{exc}")


@pytest.mark.parametrize("engine", EXPERIMENTAL)
def test_each_engine_spells_what_differs_its_own_way(engine):
    sql = ENGINES[engine](postgresql.dialect())
    assert sql.level == ("emulated" if engine == "snowflake" else "experimental")
    assert sql.extra == engine
    assert "||" not in sql.sync_hash(["a", "b"], "'f'") or engine == "redshift"


def test_validate_warns_of_engines_not_proven_on_a_real_server():
    assert level_warning("duckdb:///w.duckdb") is None
    assert level_warning("mysql+pymysql://u@h/db") is None
    assert "verified on an emulator only" in level_warning("snowflake://u@a/db/s")
    for url in ("bigquery://p/d", "redshift+psycopg2://u@h/db", "databricks://h"):
        assert "experimental" in level_warning(url)
