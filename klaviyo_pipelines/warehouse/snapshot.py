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
from klaviyo_pipelines.warehouse.errors import engine_message, warehouse_step
from klaviyo_pipelines.warehouse.state import create_tables

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
        columns = wh.columns_of_query(conn, wh.model_sql(model), dict(model.sql_params))
    except sa.exc.ProgrammingError as exc:  # a missing table or column, bad SQL: the config's
        source = "sql" if model.sql is not None else "table"
        raise ConfigError(
            config_path, f"models.{model.name}.{source}", f"cannot be read: {engine_message(exc)}"
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
    """Snapshot the whole model (atomic swap), or one day of a partitioned model in place; a
    direct model is only checked (`check_direct_model`)."""
    if model.snapshot == "direct":
        return check_direct_model(wh, model, config_path)
    started = time.monotonic()
    final = snapshot_table(model.name)
    table = wh.table(final)
    create_tables(wh, bad_keys_table_def(wh, model.name))
    step = f"snapshot of model {model.name!r}"
    with warehouse_step(wh.name, step), wh.engine.begin() as conn:
        columns = model_columns(wh, conn, model, config_path)
        select, bound = _snapshot_select(wh, model, columns, config_path)
        if partition is None:
            staging = f"{final}__new"
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {wh.table(staging)}"))
            with wh.uncompressed(conn):
                conn.execute(sa.text(f"CREATE TABLE {wh.table(staging)} AS {select}"), bound)
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            rename = wh.sql.rename_table(wh.state_schema, wh.fit(staging), wh.fit(final))
            conn.execute(sa.text(rename))
            _index(wh, conn, table, model.partitioned)
        else:
            with wh.uncompressed(conn):
                _replace_partition(
                    wh, conn, model, columns, (select, bound), partition, config_path
                )
        _record_bad_keys(wh, conn, model.name, partition, model.audience is not None)
        if model.audience is not None:
            _record_rows_without_audience(wh, conn, model.name, partition, (select, bound))
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


def check_direct_model(wh: Warehouse, model: ModelSpec, config_path: str) -> SnapshotStats:
    """What a snapshot reports, for a model the change sets read where it is: its rows and
    its NULL and duplicated keys, from one grouped read of the key column, and nothing
    written. A copy left by an earlier `snapshot: copy` is dropped, so nothing reads it."""
    started = time.monotonic()
    wh.ensure_schema()
    with warehouse_step(wh.name, f"key check of model {model.name!r}"), wh.engine.begin() as conn:
        columns = model_columns(wh, conn, model, config_path)
        pk = resolve_column(columns, model.primary_key)
        assert pk is not None  # model_columns checked it
        keys = wh.sql.direct_rows(wh.model_sql(model), pk, [], KEY)
        dup = f"g.{KEY} IS NOT NULL AND g.n > 1"
        rows, null_keys, duplicate_keys, duplicate_rows = conn.execute(
            sa.text(
                f"SELECT sum(g.n), sum(CASE WHEN g.{KEY} IS NULL THEN g.n ELSE 0 END), "
                f"sum(CASE WHEN {dup} THEN 1 ELSE 0 END), sum(CASE WHEN {dup} THEN g.n ELSE 0 END) "
                f"FROM (SELECT k.{KEY}, count(*) AS n FROM ({keys}) AS k GROUP BY k.{KEY}) AS g"
            ),
            dict(model.sql_params),
        ).one()
        for stale in (snapshot_table(model.name), bad_keys_table(model.name)):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {wh.table(stale)}"))
    return SnapshotStats(
        model=model.name,
        rows=int(rows or 0),
        columns=tuple(columns),
        null_keys=int(null_keys or 0),
        duplicate_keys=int(duplicate_keys or 0),
        duplicate_rows=int(duplicate_rows or 0),
        seconds=time.monotonic() - started,
    )


def _snapshot_select(
    wh: Warehouse, model: ModelSpec, columns: list[str], config_path: str
) -> tuple[str, dict[str, Any]]:
    """The query a snapshot is made of, and its bound parameters."""
    if model.audience is not None:
        return audience_select(wh, model, columns, config_path)
    pk = resolve_column(columns, model.primary_key)
    assert pk is not None  # model_columns checked it
    day = wh.sql.cast_text("NULL")
    if model.partition is not None:
        column = resolve_column(columns, model.partition.column)
        if column is None:
            raise ConfigError(
                config_path,
                f"models.{model.name}.partition.column",
                f"column {model.partition.column!r} is not in the model",
            )
        day = wh.sql.cast_day(f"m.{wh.quote(column)}")
    return (
        f"SELECT m.*, {wh.sql.cast_key(f'm.{wh.quote(pk)}')} AS {KEY}, {day} AS {PARTITION} "
        f"FROM ({wh.model_sql(model)}) AS m"
    ), dict(model.sql_params)


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
    # (Snowflake reports our lower-case names upper-cased.)
    if [c.lower() for c in existing or []] != [c.lower() for c in expected]:
        # new, or the model's columns changed: start the table afresh
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
    ts = wh.sql.cast_timestamp
    conn.execute(
        sa.text(
            f"INSERT INTO {table} {select} WHERE m.{column} >= {ts(':start')} "
            f"AND m.{column} < {ts(':end')}"
        ),
        {**bound, "start": start.isoformat(), "end": (start + timedelta(days=1)).isoformat()},
    )


def _record_bad_keys(
    wh: Warehouse, conn: Connection, model: str, partition: str | None, audience: bool = False
) -> None:
    """Find NULL and duplicated keys once per snapshot, into a small table that the snapshot
    check, the ledger and every sync's change set then read instead of re-counting. (An
    audience model's rows without an audience are counted apart: `_record_rows_without_audience`.)
    """
    table, bad = wh.table(snapshot_table(model)), wh.table(bad_keys_table(model))
    scope, params = _scope(partition)
    conn.execute(sa.text(f"DELETE FROM {bad} {scope or 'WHERE 1 = 1'}"), params)
    rows = scope or (f"WHERE {PARTITION} IS NOT NULL" if audience else "")
    conn.execute(
        sa.text(
            f"INSERT INTO {bad} SELECT {KEY}, count(*), max({PARTITION}) FROM {table} {rows} "
            f"GROUP BY {KEY} HAVING {KEY} IS NULL OR count(*) > 1"
        ),
        params,
    )


def _record_rows_without_audience(
    wh: Warehouse,
    conn: Connection,
    model: str,
    partition: str | None,
    query: tuple[str, dict[str, Any]],
) -> None:
    """Count the audience model's rows whose audience key is NULL or blank, as one bad-keys
    row (key and partition NULL) that every sync of the model ledgers. One audience's
    snapshot never holds them, so the model's query is counted again (a second read of it)."""
    bad = wh.table(bad_keys_table(model))
    conn.execute(sa.text(f"DELETE FROM {bad} WHERE {KEY} IS NULL AND {PARTITION} IS NULL"))
    source, params = (
        (wh.table(snapshot_table(model)), {}) if partition is None else (f"({query[0]})", query[1])
    )
    conn.execute(
        sa.text(
            f"INSERT INTO {bad} SELECT {wh.sql.cast_key('NULL')}, count(*), "
            f"{wh.sql.cast_key('NULL')} FROM {source} AS s WHERE s.{PARTITION} IS NULL "
            "HAVING count(*) > 0"
        ),
        params,
    )


def rows_without_audience(wh: Warehouse, model: str) -> int:
    """Rows of the audience model that name no audience, at its last snapshot."""
    with wh.engine.connect() as conn:
        if not wh.table_exists(conn, bad_keys_table(model)):
            return 0
        found = conn.execute(
            sa.text(
                f"SELECT sum(n) FROM {wh.table(bad_keys_table(model))} "
                f"WHERE {KEY} IS NULL AND {PARTITION} IS NULL"
            )
        ).scalar()
    return int(found or 0)


def _index(wh: Warehouse, conn: Connection, table: str, partitioned: bool) -> None:
    """Indexes where the engine has them (DuckDB's zone maps and the cloud warehouses' scans
    do without): MySQL would otherwise join snapshot and state row by row."""
    for column in [KEY, PARTITION] if partitioned else [KEY]:
        if index := wh.sql.index(table, [column], column):
            conn.execute(sa.text(index))


def bad_keys_table_def(wh: Warehouse, model: str) -> sa.Table:
    return sa.Table(
        wh.fit(bad_keys_table(model)),
        sa.MetaData(),
        sa.Column(KEY, wh.sql.key_type),
        sa.Column("n", sa.BigInteger),
        sa.Column(PARTITION, wh.sql.key_type),
        schema=wh.state_schema,
    )


def _scope(partition: str | None) -> tuple[str, dict[str, Any]]:
    """A WHERE clause limiting a snapshot query to one partition, when there is one."""
    if partition is None:
        return "", {}
    return f"WHERE {PARTITION} = :partition", {"partition": partition}


def key_problems(
    wh: Warehouse,
    model: str,
    partition: str | None = None,
    limit: int = 1000,
    audience: bool = False,
) -> list[tuple[str | None, int]]:
    """Keys that cannot identify a row: (None, n) for NULL keys, (key, n) for duplicates. For
    an audience model, rows without an audience are left to `rows_without_audience`."""
    scope, params = _scope(partition)
    if audience and not scope:
        scope = f"WHERE {PARTITION} IS NOT NULL"
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
    wanted = wh.scratch("kp_wanted_keys", model)
    with warehouse_step(wh.name, f"read model {model!r}"), wh.engine.begin() as conn:
        key_type = wh.sql.key_type.compile(dialect=wh.engine.dialect)
        conn.execute(sa.text(wh.sql.create_scratch(wanted, f"k {key_type}")))
        conn.execute(sa.text(wh.sql.empty(wanted)))
        wh.bulk_insert(conn, wanted, ["k"], ((k,) for k in set(keys)))
        result = conn.execute(
            sa.text(
                f"SELECT s.* FROM {table} AS s JOIN {wanted} AS w "
                f"ON {wh.sql.cast_key(f's.{wh.quote(key_column)}')} = w.k"
            )
        )
        names = [c for c in result.keys() if c not in RESERVED_COLUMNS]  # noqa: SIM118 - a cursor
        for row in result.mappings():
            values = {name: row[name] for name in names}
            grouped.setdefault(str(row[key_column]), []).append(values)
    return grouped
