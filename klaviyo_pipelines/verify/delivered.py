"""The delivery state as verification reads it: which rows were delivered, each rebuilt into
the payload a run would send now, and forgetting a row's delivery so the next sync resends it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from klaviyo_pipelines.actions.base import Action, Prepared
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.verify.report import VerifyReport
from klaviyo_pipelines.warehouse.changes import ChangeRow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import state_table

CHUNK = 100  # keys per Klaviyo lookup, and per DELETE when forgetting deliveries
# Keys per read of the delivery state: each read opens a connection (~25 ms on a DuckDB file),
# which at 100 keys a read took more time than the Klaviyo lookups themselves.
READ_PAGE = 1000


@dataclass(frozen=True)
class DeliveredRow:
    """A row as last delivered: its values, its partition (a day, an audience) and when."""

    key: str
    values: dict[str, Any]
    partition: str | None
    recorded_at: datetime

    def change(self) -> ChangeRow:
        return ChangeRow(self.key, ChangeKind.ADDED, "", self.values, self.partition)


def delivered_keys(wh: Warehouse, sync: str) -> list[str]:
    with wh.connect("read the delivery state") as conn:
        if not wh.table_exists(conn, state_table(sync)):
            return []
        query = f"SELECT row_key FROM {wh.table(state_table(sync))} ORDER BY row_key"
        return list(conn.execute(sa.text(query)).scalars())


def choose(keys: list[str], sample: int | None, seed: int) -> list[str]:
    """Up to `sample` keys (None: all), the same ones for the same seed, in key order."""
    if sample is None or sample >= len(keys):
        return keys
    return sorted(random.Random(seed).sample(keys, sample))


def delivered_rows(
    wh: Warehouse, sync: str, keys: Sequence[str] | None = None
) -> Iterator[DeliveredRow]:
    """The rows of `keys` (read a page of keys at a time by bound parameters), or every
    delivered row."""
    table = wh.table(state_table(sync))
    columns = "row_key, row_json, partition_key, recorded_at"
    if keys is None:
        with wh.connect("read the delivery state") as conn:
            if not wh.table_exists(conn, state_table(sync)):
                return
            found = conn.execute(sa.text(f"SELECT {columns} FROM {table}")).all()
        yield from (_row(*row) for row in found)
        return
    for chunk in chunks(keys, READ_PAGE):
        names = ", ".join(f":k{i}" for i in range(len(chunk)))
        query = sa.text(f"SELECT {columns} FROM {table} WHERE row_key IN ({names})")
        with wh.connect("read the delivery state") as conn:
            found = conn.execute(query, {f"k{i}": key for i, key in enumerate(chunk)}).all()
        yield from (_row(*row) for row in found)


def _row(key: str, row_json: str | None, partition: str | None, at: datetime) -> DeliveredRow:
    return DeliveredRow(key, json.loads(row_json) if row_json else {}, partition, at)


def rebuild(action: Action, row: DeliveredRow, report: VerifyReport) -> Prepared | None:
    """The payload a run would send for the row now; a row that no longer makes one is
    counted as not checked, with the reason."""
    try:
        return action.prepare(row.change())
    except InvalidRow as exc:
        report.unchecked[f"cannot rebuild its payload: {exc}"] += 1
        return None


def forget_delivery(wh: Warehouse, sync: str, keys: Sequence[str]) -> int:
    """Delete the rows' delivery state: the next sync's change set has them as added."""
    table, forgotten = wh.table(state_table(sync)), 0
    with wh.begin("state write") as conn:
        for chunk in chunks(keys, CHUNK):
            names = ", ".join(f":k{i}" for i in range(len(chunk)))
            result = conn.execute(
                sa.text(f"DELETE FROM {table} WHERE row_key IN ({names})"),
                {f"k{i}": key for i, key in enumerate(chunk)},
            )
            forgotten += result.rowcount
    return forgotten


def chunks(items: Any, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
