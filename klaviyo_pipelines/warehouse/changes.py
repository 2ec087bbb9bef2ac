"""Change sets: added / updated / deleted rows of a sync, computed by set-based SQL.

The comparison of the snapshot with the delivered state runs in the warehouse and lands in
`changes__<sync>`, numbered so it can be read back in pages. Only the rows that will be sent
ever travel to Python, a page at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.config import SyncSpec
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import KEY, PARTITION, bad_keys_table, snapshot_table
from klaviyo_pipelines.warehouse.state import (
    LEDGER,
    FailureKind,
    ensure_tables,
    now,
    state_table,
)

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class ChangeRow:
    """One row to send: its key, why it is in the change set, and its column values."""

    key: str
    kind: ChangeKind
    row_hash: str
    values: dict[str, Any]
    partition: str | None = None


@dataclass(frozen=True)
class ChangeSet:
    sync: str
    by_kind: dict[str, int] = field(default_factory=dict)  # every change found, by kind
    selected: dict[str, int] = field(default_factory=dict)  # those this run will send
    held_invalid: int = 0  # unchanged rows Klaviyo or we rejected before: not re-sent
    acknowledged: int = 0  # changes of a kind the sync does not act on: recorded, not sent

    @property
    def to_send(self) -> int:
        return sum(self.selected.values())


def changes_table(sync: str, partition: str | None = None) -> str:
    """One table per sync and partition, so a backfill's partitions never share one.

    A day names its table (`__20261127`); any other partition key (an audience's, which is
    arbitrary text) is named by a short hash, so the name is always a plain identifier.
    """
    if not partition:
        return f"changes__{sync}"
    if _DAY.fullmatch(partition):
        return f"changes__{sync}__{partition.replace('-', '')}"
    return f"changes__{sync}__p{hashlib.sha256(partition.encode()).hexdigest()[:12]}"


def row_hash_sql(wh: Warehouse, columns: Sequence[str], alias: str) -> str:
    """md5 over every column as text; NULL and '' hash differently ('n' vs 'v'-suffixed)."""
    parts = [f"COALESCE(CAST({alias}.{wh.quote(c)} AS VARCHAR) || 'v', 'n')" for c in columns]
    return "md5(" + " || chr(31) || ".join(parts) + ")"


def compute_change_set(
    wh: Warehouse,
    sync: SyncSpec,
    columns: Sequence[str],
    fingerprint: str,
    *,
    partition: str | None = None,
    retry_rejected: bool = False,
    acknowledge: bool = True,
) -> ChangeSet:
    """Diff the model's snapshot against the sync's delivered state, inside the warehouse.

    A row's sync hash covers only the columns the sync reads, mixed with the sync's
    configuration fingerprint: a change to another column sends nothing, and changing the
    mapping re-sends every row under the new mapping. With a partition, only that day of
    the snapshot and of the state is compared. Rows with a NULL or duplicated key never
    enter the change set (see the snapshot checks).

    Changes of a kind the sync does not act on are recorded in the state at once without
    sending, so that the state follows the model: a sync `on: [deleted]` then knows every
    row that may later leave it.
    """
    snap, state = wh.table(snapshot_table(sync.model)), wh.table(state_table(sync.name))
    bad = wh.table(bad_keys_table(sync.model))
    ledger, table = wh.table(LEDGER), wh.table(changes_table(sync.name, partition))
    selected_kinds = ", ".join(f"'{kind.value}'" for kind in sync.on)  # enum values, not input
    held = (
        "FALSE"
        if retry_rejected
        else (
            f"EXISTS (SELECT 1 FROM {ledger} AS l WHERE l.sync = :sync AND l.row_key = d.k "
            f"AND l.kind = '{FailureKind.INVALID.value}' AND l.row_hash = d.h)"
        )
    )
    in_snapshot = f"s.{PARTITION} = :partition AND " if partition else ""
    in_state = "st.partition_key = :partition AND " if partition else ""
    model_columns = ", ".join(f"s.{wh.quote(c)}" for c in columns)
    params = {"fingerprint": fingerprint, "sync": sync.name, "partition": partition}
    with wh.engine.begin() as conn:
        if wh.dialect == "postgresql":  # fresh tables fool the estimates into costly JIT
            conn.execute(sa.text("SET LOCAL jit = off"))
        ensure_tables(wh, conn, sync.name)
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(
            sa.text(
                f"""
                CREATE TABLE {table} AS
                WITH snap AS (
                    SELECT s.*, md5({row_hash_sql(wh, columns, "s")} || :fingerprint)
                        AS kp_sync_hash
                    FROM {snap} AS s
                    WHERE {in_snapshot} s.{KEY} IS NOT NULL AND NOT EXISTS (
                        SELECT 1 FROM {bad} AS b WHERE b.{KEY} = s.{KEY})
                ),
                diff AS (
                    SELECT s.{KEY} AS k, s.kp_sync_hash AS h, s.{PARTITION} AS p,
                        CASE WHEN st.row_key IS NULL THEN 'added' ELSE 'updated' END AS kind
                    FROM snap AS s LEFT JOIN {state} AS st ON st.row_key = s.{KEY}
                    WHERE st.row_key IS NULL OR st.row_hash <> s.kp_sync_hash
                    UNION ALL
                    SELECT st.row_key AS k, st.row_hash AS h, st.partition_key AS p,
                        'deleted' AS kind
                    FROM {state} AS st
                    WHERE {in_state} NOT EXISTS (
                        SELECT 1 FROM {snap} AS a WHERE a.{KEY} = st.row_key)
                ),
                flagged AS (
                    SELECT d.*, ({held}) AS held,
                        (d.kind IN ({selected_kinds}) AND NOT ({held})) AS send
                    FROM diff AS d
                )
                SELECT
                    CASE WHEN f.send THEN row_number() OVER (PARTITION BY f.send ORDER BY f.k)
                    END AS _kp_seq,
                    f.send AS _kp_send, f.held AS _kp_held, f.kind AS _kp_kind,
                    f.h AS _kp_hash, f.k AS {KEY}, f.p AS {PARTITION},
                    st.row_json AS _kp_row_json, {model_columns}
                FROM flagged AS f
                LEFT JOIN {snap} AS s ON s.{KEY} = f.k AND f.kind <> 'deleted'
                    {"AND s." + PARTITION + " = :partition" if partition else ""}
                LEFT JOIN {state} AS st ON st.row_key = f.k AND f.kind = 'deleted'
                """
            ),
            params,
        )
        if wh.dialect == "postgresql":
            conn.execute(sa.text(f"CREATE INDEX ON {table} (_kp_seq)"))
        if acknowledge:  # `plan` only looks
            _acknowledge(wh, conn, sync.name, table, columns)
        counts = conn.execute(
            sa.text(f"SELECT _kp_kind, _kp_send, _kp_held, count(*) FROM {table} GROUP BY 1, 2, 3")
        ).all()
    by_kind: dict[str, int] = {}
    selected: dict[str, int] = {}
    held_invalid = acknowledged = 0
    for kind, send, is_held, count in counts:
        by_kind[kind] = by_kind.get(kind, 0) + int(count)
        if send:
            selected[kind] = selected.get(kind, 0) + int(count)
        elif is_held:
            held_invalid += int(count)
        else:
            acknowledged += int(count)
    return ChangeSet(sync.name, by_kind, selected, held_invalid, acknowledged)


def _acknowledge(
    wh: Warehouse, conn: Connection, sync: str, table: str, columns: Sequence[str]
) -> None:
    """Record changes the sync does not send (kinds not in `on`) as the state's new truth."""
    state, ledger = wh.table(state_table(sync)), wh.table(LEDGER)
    unsent = f"SELECT {KEY} FROM {table} WHERE NOT _kp_send AND NOT _kp_held"
    conn.execute(sa.text(f"DELETE FROM {state} WHERE row_key IN ({unsent})"))
    conn.execute(
        sa.text(f"DELETE FROM {ledger} WHERE sync = :sync AND row_key IN ({unsent})"),
        {"sync": sync},
    )
    conn.execute(
        sa.text(
            f"INSERT INTO {state} (row_key, row_hash, row_json, partition_key, recorded_at) "
            f"SELECT c.{KEY}, c._kp_hash, {wh.row_json_sql(columns, 'c')}, c.{PARTITION}, "
            f"CAST(:now AS TIMESTAMP) FROM {table} AS c "
            "WHERE NOT c._kp_send AND NOT c._kp_held AND c._kp_kind <> 'deleted'"
        ),
        {"now": now()},
    )


def iter_changes(
    wh: Warehouse,
    sync: str,
    columns: Sequence[str],
    page_size: int = 10_000,
    partition: str | None = None,
) -> Iterator[list[ChangeRow]]:
    """Stream the rows to send in pages, in key order, holding one page in memory at a time.

    Each page is its own short read, so delivery state can be committed between pages.
    """
    table = wh.table(changes_table(sync, partition))
    names = ", ".join(wh.quote(c) for c in columns)
    query = sa.text(
        f"SELECT {KEY}, _kp_kind, _kp_hash, _kp_row_json, {PARTITION}, {names} FROM {table} "
        "WHERE _kp_send AND _kp_seq > :low AND _kp_seq <= :high ORDER BY _kp_seq"
    )
    low = 0
    while True:
        with wh.engine.connect() as conn:
            rows = conn.execute(query, {"low": low, "high": low + page_size}).all()
        if not rows:
            return
        page = []
        for row in rows:
            kind = ChangeKind(row[1])
            if kind is ChangeKind.DELETED:
                values = json.loads(row[3]) if row[3] else {}
            else:
                values = dict(zip(columns, row[5:], strict=True))
            page.append(
                ChangeRow(key=row[0], kind=kind, row_hash=row[2], values=values, partition=row[4])
            )
        yield page
        low += page_size
