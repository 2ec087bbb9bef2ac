"""Snapshot a model into the state schema: one consistent copy that every sync diffs against.

The model's SQL runs once per snapshot, however many syncs read it, so checks and change sets
all see the same rows. Row hashes are computed per sync in the change-set SQL, over just the
columns that sync reads (see changes.py), so a change to a column no sync sends costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.config import ConfigError, ModelSpec
from klaviyo_pipelines.warehouse.audiences import audience_filter, audience_select
from klaviyo_pipelines.warehouse.engine import Warehouse

KEY = "_kp_key"
PARTITION = "_kp_partition"
RESERVED_COLUMNS = frozenset(
    {KEY, PARTITION, "_kp_hash", "_kp_seq", "_kp_send", "_kp_held", "_kp_kind", "_kp_row_json"}
)


@dataclass(frozen=True)
class SnapshotStats:
    model: str
    rows: int
    columns: tuple[str, ...]
    null_keys: int
    duplicate_keys: int
    duplicate_rows: int
    seconds: float


def snapshot_table(model: str) -> str:
    return f"snapshot__{model}"


def bad_keys_table(model: str) -> str:
    return f"snapshot__{model}__bad_keys"


def resolve_column(columns: list[str] | tuple[str, ...], wanted: str) -> str | None:
    """The model column a config name refers to: exact first, then ignoring case."""
    if wanted in columns:
        return wanted
    folded = [c for c in columns if c.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None


def model_columns(wh: Warehouse, conn: Connection, model: ModelSpec, config_path: str) -> list[str]:
    """The model's columns, read without running the query; a broken query is a config error."""
    try:
        columns = wh.columns_of_query(conn, wh.model_sql(model))
    except sa.exc.SQLAlchemyError as exc:
        source = "sql" if model.sql is not None else "table"
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise ConfigError(
            config_path, f"models.{model.name}.{source}", f"cannot be read: {detail}"
        ) from None
    clash = RESERVED_COLUMNS.intersection(columns)
    if clash:
        raise ConfigError(
            config_path, f"models.{model.name}", f"column names {sorted(clash)} are reserved"
        )
    if resolve_column(columns, model.primary_key) is None:
        raise ConfigError(
            config_path,
            f"models.{model.name}.primary_key",
            f"column {model.primary_key!r} is not in the model (columns: {', '.join(columns)})",
        )
    return columns


def take_snapshot(
    wh: Warehouse, model: ModelSpec, config_path: str, partition: str | None = None
) -> SnapshotStats:
    """Snapshot the whole model (atomic swap), or one day of a partitioned model in place."""
    started = time.monotonic()
    final = snapshot_table(model.name)
    table = wh.table(final)
    with wh.engine.begin() as conn:
        wh.ensure_schema(conn)
        columns = model_columns(wh, conn, model, config_path)
        select, bound = _snapshot_select(wh, model, columns, config_path)
        if partition is None:
            staging = f"{final}__new"
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {wh.table(staging)}"))
            with wh.uncompressed(conn):
                conn.execute(sa.text(f"CREATE TABLE {wh.table(staging)} AS {select}"), bound)
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            conn.execute(sa.text(f"ALTER TABLE {wh.table(staging)} RENAME TO {wh.quote(final)}"))
            _index(wh, conn, table, model.partitioned)
        else:
            with wh.uncompressed(conn):
                _replace_partition(
                    wh, conn, model, columns, (select, bound), partition, config_path
                )
        _record_bad_keys(wh, conn, model.name, partition)
        scope, params = _scope(partition)
        rows = conn.execute(sa.text(f"SELECT count(*) FROM {table} {scope}"), params).scalar()
        bad = conn.execute(
            sa.text(f"SELECT {KEY}, n FROM {wh.table(bad_keys_table(model.name))} {scope}"),
            params,
        ).all()
    null_keys = sum(int(n) for key, n in bad if key is None)
    duplicate_keys = sum(1 for key, _ in bad if key is not None)
    duplicate_rows = sum(int(n) for key, n in bad if key is not None)
    return SnapshotStats(
        model=model.name,
        rows=int(rows),
        columns=tuple(columns),
        null_keys=null_keys,
        duplicate_keys=duplicate_keys,
        duplicate_rows=duplicate_rows,
        seconds=time.monotonic() - started,
    )


def _snapshot_select(
    wh: Warehouse, model: ModelSpec, columns: list[str], config_path: str
) -> tuple[str, dict[str, Any]]:
    """The query a snapshot is made of, and its bound parameters."""
    if model.audience is not None:
        return audience_select(wh, model, columns, config_path)
    pk = resolve_column(columns, model.primary_key)
    day = "CAST(NULL AS VARCHAR)"
    if model.partition is not None:
        column = resolve_column(columns, model.partition.column)
        if column is None:
            raise ConfigError(
                config_path,
                f"models.{model.name}.partition.column",
                f"column {model.partition.column!r} is not in the model",
            )
        day = f"CAST(CAST(m.{wh.quote(column)} AS DATE) AS VARCHAR)"
    return (
        f"SELECT m.*, CAST(m.{wh.quote(pk)} AS VARCHAR) AS {KEY}, {day} AS {PARTITION} "
        f"FROM ({wh.model_sql(model)}) AS m"
    ), {}


def _replace_partition(
    wh: Warehouse,
    conn: Connection,
    model: ModelSpec,
    columns: list[str],
    query: tuple[str, dict[str, Any]],
    day: str,
    config_path: str,
) -> None:
    """Delete and re-insert one day (or audience); the filter goes into the model's query, so
    the warehouse reads only that partition."""
    assert model.partitioned
    select, bound = query
    final = snapshot_table(model.name)
    table = wh.table(final)
    expected = [*columns, KEY, PARTITION]
    existing = (
        wh.columns_of_query(conn, f"SELECT * FROM {table}")
        if wh.table_exists(conn, final)
        else None
    )
    if existing != expected:  # new, or the model's columns changed: start the table afresh
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(sa.text(f"CREATE TABLE {table} AS {select} WHERE 1 = 0"), bound)
        _index(wh, conn, table, partitioned=True)
    conn.execute(sa.text(f"DELETE FROM {table} WHERE {PARTITION} = :day"), {"day": day})
    if model.audience is not None:
        where, params = audience_filter(wh, model, columns, day, config_path)
        conn.execute(sa.text(f"INSERT INTO {table} {select} {where}"), {**bound, **params})
        return
    assert model.partition is not None
    start = date.fromisoformat(day)
    column = wh.quote(resolve_column(columns, model.partition.column) or model.partition.column)
    conn.execute(
        sa.text(
            f"INSERT INTO {table} {select} WHERE m.{column} >= CAST(:start AS TIMESTAMP) "
            f"AND m.{column} < CAST(:end AS TIMESTAMP)"
        ),
        {"start": start.isoformat(), "end": (start + timedelta(days=1)).isoformat()},
    )


def _record_bad_keys(wh: Warehouse, conn: Connection, model: str, partition: str | None) -> None:
    """Find NULL and duplicated keys once per snapshot, into a small table that the snapshot
    check, the ledger and every sync's change set then read instead of re-counting."""
    table, bad = wh.table(snapshot_table(model)), wh.table(bad_keys_table(model))
    scope, params = _scope(partition)
    conn.execute(
        sa.text(f"CREATE TABLE IF NOT EXISTS {bad} ({KEY} VARCHAR, n BIGINT, {PARTITION} VARCHAR)")
    )
    conn.execute(sa.text(f"DELETE FROM {bad} {scope}"), params)
    conn.execute(
        sa.text(
            f"INSERT INTO {bad} SELECT {KEY}, count(*), max({PARTITION}) FROM {table} {scope} "
            f"GROUP BY {KEY} HAVING {KEY} IS NULL OR count(*) > 1"
        ),
        params,
    )


def _index(wh: Warehouse, conn: Connection, table: str, partitioned: bool) -> None:
    if wh.dialect == "postgresql":  # DuckDB's zone maps serve these scans without one
        conn.execute(sa.text(f"CREATE INDEX ON {table} ({KEY})"))
        if partitioned:
            conn.execute(sa.text(f"CREATE INDEX ON {table} ({PARTITION})"))


def _scope(partition: str | None) -> tuple[str, dict[str, Any]]:
    """A WHERE clause limiting a snapshot query to one partition, when there is one."""
    if partition is None:
        return "", {}
    return f"WHERE {PARTITION} = :partition", {"partition": partition}


def key_problems(
    wh: Warehouse, model: str, partition: str | None = None, limit: int = 1000
) -> list[tuple[str | None, int]]:
    """Keys that cannot identify a row: (None, n) for NULL keys, (key, n) for duplicates."""
    scope, params = _scope(partition)
    with wh.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT {KEY}, n FROM {wh.table(bad_keys_table(model))} {scope} "
                f"ORDER BY n DESC, {KEY} LIMIT :limit"
            ),
            {**params, "limit": limit},
        ).all()
    return [(row[0], int(row[1])) for row in rows]


def snapshot_rows_for_keys(
    wh: Warehouse, model: str, key_column: str, keys: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Rows of another model's snapshot whose `key_column` is one of `keys`, grouped by key.

    For actions that join a second model (an order's line items) one page at a time: the
    keys are bulk-loaded into a scratch table and joined, never formatted into SQL.
    """
    if not keys:
        return {}
    table = wh.table(snapshot_table(model))
    grouped: dict[str, list[dict[str, Any]]] = {}
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE TEMP TABLE IF NOT EXISTS kp_wanted_keys (k VARCHAR)"))
        conn.execute(sa.text("DELETE FROM kp_wanted_keys"))
        wh.bulk_insert(conn, "kp_wanted_keys", ["k"], ((k,) for k in set(keys)))
        result = conn.execute(
            sa.text(
                f"SELECT s.* FROM {table} AS s JOIN kp_wanted_keys AS w "
                f"ON CAST(s.{wh.quote(key_column)} AS VARCHAR) = w.k"
            )
        )
        names = [c for c in result.keys() if c not in RESERVED_COLUMNS]  # noqa: SIM118 - a cursor
        for row in result.mappings():
            values = {name: row[name] for name in names}
            grouped.setdefault(str(row[key_column]), []).append(values)
    return grouped
