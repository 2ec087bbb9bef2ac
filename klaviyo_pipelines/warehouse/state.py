"""Delivery state, the failure ledger and the run log: what Klaviyo has confirmed, and what not.

A row enters `state__<sync>` only once Klaviyo confirmed it, in the same transaction that
clears it from the ledger; so a crash between batches loses nothing, since every row not yet
confirmed is still in the next run's change set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.errors import warehouse_step

LEDGER = "ledger"
RUNS = "sync_runs"


class FailureKind(StrEnum):
    """Transient rows are retried on every run; invalid ones only once the row changes."""

    TRANSIENT = "transient"
    INVALID = "invalid"


class Delivered(NamedTuple):
    """A row Klaviyo confirmed; a tuple in the staging table's column order, bulk-loaded as is."""

    key: str
    row_hash: str
    row_json: str | None
    deletion: bool = False
    partition: str | None = None


@dataclass(frozen=True)
class Failure:
    key: str
    row_hash: str
    kind: FailureKind
    field: str | None
    reason: str


@dataclass(frozen=True)
class LedgerEntry:
    sync: str
    key: str
    row_hash: str
    kind: FailureKind
    field: str | None
    reason: str
    attempts: int
    first_seen: datetime
    last_seen: datetime


def state_table(sync: str) -> str:
    return f"state__{sync}"


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _name_type(wh: Warehouse) -> sa.types.TypeEngine:
    """Sync and model names, kinds, statuses: short text (MySQL indexes them with a key)."""
    return sa.String(255) if wh.dialect == "mysql" else wh.sql.key_type


def state_table_def(wh: Warehouse, sync: str) -> sa.Table:
    name = wh.fit(state_table(sync))
    k, text, time_ = wh.sql.key_type, wh.sql.text_type, wh.sql.time_type
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("row_key", k, nullable=False),
        sa.Column("row_hash", k, nullable=False),
        sa.Column("row_json", text),
        sa.Column("partition_key", k),
        sa.Column("recorded_at", time_, nullable=False),
        *(
            [sa.Index(wh.fit(f"{state_table(sync)}__key"), "row_key", unique=True)]
            if wh.sql.supports_indexes
            else []
        ),
        schema=wh.state_schema,
    )


def ledger_table_def(wh: Warehouse) -> sa.Table:
    k, n, text, time_ = wh.sql.key_type, _name_type(wh), wh.sql.text_type, wh.sql.time_type
    return sa.Table(
        LEDGER,
        sa.MetaData(),
        sa.Column("sync", n, nullable=False),
        sa.Column("row_key", k, nullable=False),
        sa.Column("row_hash", k, nullable=False),
        sa.Column("kind", n, nullable=False),
        sa.Column("field", n),
        sa.Column("reason", text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_seen", time_, nullable=False),
        sa.Column("last_seen", time_, nullable=False),
        *(
            [sa.Index("ledger__sync_key", "sync", "row_key", unique=True)]
            if wh.sql.supports_indexes
            else []
        ),
        schema=wh.state_schema,
    )


def runs_table_def(wh: Warehouse) -> sa.Table:
    n, text, time_ = _name_type(wh), wh.sql.text_type, wh.sql.time_type
    return sa.Table(
        RUNS,
        sa.MetaData(),
        sa.Column("run_id", n, nullable=False),
        sa.Column("sync", n, nullable=False),
        sa.Column("started_at", time_, nullable=False),
        sa.Column("finished_at", time_, nullable=False),
        sa.Column("status", n, nullable=False),
        sa.Column("report_json", text, nullable=False),
        schema=wh.state_schema,
    )


def create_tables(wh: Warehouse, *tables: sa.Table) -> None:
    """Create our tables where missing, each engine with its own types, in a transaction of
    their own: when two first runs race to create one, the loser finds it there and goes on."""
    wh.ensure_schema()
    with warehouse_step(wh.name, "create the state tables"):
        for table in tables:
            wh.create_racing(
                lambda conn, t=table: t.create(conn, checkfirst=True),
                lambda conn, t=table: sa.inspect(conn).has_table(t.name, schema=t.schema),
            )


def ensure_tables(wh: Warehouse, sync: str) -> None:
    """Create the sync's state table and the shared ledger and run log when missing."""
    create_tables(wh, state_table_def(wh, sync), ledger_table_def(wh), runs_table_def(wh))


def _ddl(wh: Warehouse, type_: sa.types.TypeEngine) -> str:
    """A column type as this engine's DDL spells it."""
    return type_.compile(dialect=wh.engine.dialect)


def _staging(wh: Warehouse, conn: Connection, name: str, owner: str, columns: str) -> str:
    """A scratch table, emptied, for set-based merges of one batch (see `Warehouse.scratch`)."""
    table = wh.scratch(name, owner)
    conn.execute(sa.text(wh.sql.create_scratch(table, columns)))
    conn.execute(sa.text(wh.sql.empty(table)))
    return table


def record_outcomes(
    wh: Warehouse, sync: str, delivered: Sequence[Delivered], failures: Sequence[Failure]
) -> None:
    """Commit one batch's outcome in one transaction: state, ledger, all or nothing."""
    if not delivered and not failures:
        return
    stamp = now()
    state, ledger = wh.table(state_table(sync)), wh.table(LEDGER)
    with wh.begin("state write") as conn:
        if delivered:
            key = _ddl(wh, wh.sql.key_type)
            staged = _staging(
                wh,
                conn,
                "kp_delivered_in",
                sync,
                f"row_key {key}, row_hash {key}, row_json {_ddl(wh, wh.sql.text_type)}, "
                f"deletion BOOLEAN, partition_key {key}",
            )
            wh.bulk_insert(
                conn,
                staged,
                ["row_key", "row_hash", "row_json", "deletion", "partition_key"],
                delivered,
            )
            delete = wh.sql.delete_matching
            conn.execute(sa.text(delete(state, "row_key", staged, "row_key")))
            conn.execute(
                sa.text(
                    f"INSERT INTO {state} (row_key, row_hash, row_json, partition_key, "
                    f"recorded_at) SELECT row_key, row_hash, row_json, partition_key, :stamp "
                    f"FROM {staged} WHERE NOT deletion"
                ),
                {"stamp": stamp},
            )
            conn.execute(
                sa.text(delete(ledger, "row_key", staged, "row_key", "sync = :sync")),
                {"sync": sync},
            )
        if failures:
            _merge_failures(wh, conn, sync, failures, stamp)


def record_failures(wh: Warehouse, sync: str, failures: Sequence[Failure]) -> None:
    if failures:
        with wh.begin("ledger write") as conn:
            _merge_failures(wh, conn, sync, failures, now())


def forget_failures(wh: Warehouse, sync: str, row_hash: str) -> None:
    """Drop the sync's ledger rows recorded under `row_hash` (a marker for whole-run checks)."""
    with wh.begin("ledger write") as conn:
        conn.execute(
            sa.text(f"DELETE FROM {wh.table(LEDGER)} WHERE sync = :sync AND row_hash = :row_hash"),
            {"sync": sync, "row_hash": row_hash},
        )


def _merge_failures(
    wh: Warehouse, conn: Connection, sync: str, failures: Sequence[Failure], stamp: datetime
) -> None:
    ledger = wh.table(LEDGER)
    key, name = _ddl(wh, wh.sql.key_type), _ddl(wh, _name_type(wh))
    staged = _staging(
        wh,
        conn,
        "kp_failures_in",
        sync,
        f"row_key {key}, row_hash {key}, kind {name}, field {name}, "
        f"reason {_ddl(wh, wh.sql.text_type)}",
    )
    # The last word on a key wins when one batch reports it twice.
    unique = {f.key: f for f in failures}
    wh.bulk_insert(
        conn,
        staged,
        ["row_key", "row_hash", "kind", "field", "reason"],
        ((f.key, f.row_hash, f.kind.value, f.field, f.reason) for f in unique.values()),
    )
    params = {"sync": sync, "stamp": stamp}
    update = wh.sql.update_from(
        ledger,
        staged,
        "t.sync = :sync AND t.row_key = i.row_key",
        [
            ("row_hash", "i.row_hash"),
            ("kind", "i.kind"),
            ("field", "i.field"),
            ("reason", "i.reason"),
            ("attempts", "t.attempts + 1"),
            ("last_seen", ":stamp"),
        ],
    )
    conn.execute(sa.text(update), params)
    conn.execute(
        sa.text(
            f"INSERT INTO {ledger} (sync, row_key, row_hash, kind, field, reason, attempts, "
            "first_seen, last_seen) "
            f"SELECT {wh.sql.cast_text(':sync')}, i.row_key, i.row_hash, i.kind, i.field, "
            f"i.reason, 1, {wh.sql.cast_timestamp(':stamp')}, {wh.sql.cast_timestamp(':stamp')} "
            f"FROM {staged} AS i WHERE NOT EXISTS (SELECT 1 FROM {ledger} AS l "
            "WHERE l.sync = :sync AND l.row_key = i.row_key)"
        ),
        params,
    )


def ledger_entries(wh: Warehouse, sync: str, limit: int | None = None) -> list[LedgerEntry]:
    """The sync's rows awaiting retry or a fix, most recently seen first."""
    with wh.connect("read the ledger") as conn:
        if not wh.table_exists(conn, LEDGER):
            return []
        query = (
            "SELECT sync, row_key, row_hash, kind, field, reason, attempts, first_seen, last_seen "
            f"FROM {wh.table(LEDGER)} WHERE sync = :sync ORDER BY last_seen DESC, row_key"
        )
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        rows = conn.execute(sa.text(query), {"sync": sync}).all()
    return [
        LedgerEntry(r[0], r[1], r[2], FailureKind(r[3]), r[4], r[5], r[6], r[7], r[8]) for r in rows
    ]


def ledger_counts(wh: Warehouse, sync: str) -> dict[FailureKind, int]:
    """How many of the sync's rows await a fix (invalid) or a retry (transient), by kind."""
    counts = dict.fromkeys(FailureKind, 0)
    with wh.connect("read the ledger") as conn:
        if not wh.table_exists(conn, LEDGER):
            return counts
        rows = conn.execute(
            sa.text(
                f"SELECT kind, count(*) FROM {wh.table(LEDGER)} WHERE sync = :sync GROUP BY kind"
            ),
            {"sync": sync},
        ).all()
    return counts | {FailureKind(kind): int(n) for kind, n in rows}


def delivered_count(wh: Warehouse, sync: str) -> int:
    with wh.connect("read the delivery state") as conn:
        if not wh.table_exists(conn, state_table(sync)):
            return 0
        return int(
            conn.execute(sa.text(f"SELECT count(*) FROM {wh.table(state_table(sync))}")).scalar()
        )


def record_run(
    wh: Warehouse,
    run_id: str,
    sync: str,
    started_at: datetime,
    status: str,
    report: dict[str, Any],
) -> None:
    with wh.begin("run log write") as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {wh.table(RUNS)} (run_id, sync, started_at, finished_at, status, "
                "report_json) VALUES (:run_id, :sync, :started, :finished, :status, :report)"
            ),
            {
                "run_id": run_id,
                "sync": sync,
                "started": started_at,
                "finished": now(),
                "status": status,
                "report": json.dumps(report, default=str),
            },
        )


@dataclass(frozen=True)
class RunRecord:
    """One row of the run log: when a run of a sync happened, and its report."""

    run_id: str
    started_at: datetime
    finished_at: datetime
    status: str
    report: dict[str, Any]


def latest_run(wh: Warehouse, sync: str) -> RunRecord | None:
    """The sync's most recently finished run, or None when it never ran."""
    with wh.connect("read the run log") as conn:
        if not wh.table_exists(conn, RUNS):
            return None
        row = conn.execute(
            sa.text(
                f"SELECT run_id, started_at, finished_at, status, report_json FROM "
                f"{wh.table(RUNS)} WHERE sync = :sync ORDER BY finished_at DESC LIMIT 1"
            ),
            {"sync": sync},
        ).first()
    return RunRecord(row[0], row[1], row[2], row[3], json.loads(row[4])) if row else None


def run_report(wh: Warehouse, sync: str, run_id: str | None = None) -> dict[str, Any] | None:
    """The report `record_run` stored for the sync's run `run_id`, or its latest run."""
    where, params = "sync = :sync", {"sync": sync}
    if run_id is not None:
        where, params = where + " AND run_id = :run_id", {**params, "run_id": run_id}
    with wh.connect("read the run log") as conn:
        if not wh.table_exists(conn, RUNS):
            return None
        row = conn.execute(
            sa.text(
                f"SELECT report_json FROM {wh.table(RUNS)} WHERE {where} "
                "ORDER BY finished_at DESC LIMIT 1"
            ),
            params,
        ).first()
    return json.loads(row[0]) if row else None
