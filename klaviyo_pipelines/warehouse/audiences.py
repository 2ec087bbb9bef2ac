"""Audience models in SQL: who is in each audience now, which audiences changed since their
last sync, and which Klaviyo list each audience was given.

An audience model is partitioned by its audience key, so snapshots, change sets and delivery
state are kept per audience by the same code as daily partitions. A member's row key is the
pair (audience, member) written as JSON text, `["vip","C42"]`: one member of two audiences
is two rows, and the key still names both halves for the ledger and the UI.

For the event-log shape (Segment's "Audience Entered" / "Audience Exited" rows) the current
members are computed in SQL: each member's latest event wins, an exit winning a tie.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from klaviyo_pipelines.config import ConfigError, ModelSpec, SyncSpec
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import (
    LEDGER,
    FailureKind,
    create_tables,
    now,
    state_table,
)

LISTS = "audience_lists"
RANK = "_kp_rank"


@dataclass(frozen=True)
class RememberedList:
    list_id: str
    list_name: str | None


@dataclass(frozen=True)
class AudienceStatus:
    """One audience as the sensor sees it: its members now, and whether every sync has them."""

    key: str
    members: int
    fingerprint: str  # digest of the members' count and order-free hash: one per membership
    in_sync: bool


@dataclass(frozen=True)
class MembershipChange:
    """An audience in a change set: members now, and how many entered and exited."""

    members: int
    entered: int
    exited: int

    @property
    def before(self) -> int:
        """Members at the last sync."""
        return self.members - self.entered + self.exited


def _column(columns: Sequence[str], model: ModelSpec, name: str, setting: str, path: str) -> str:
    from klaviyo_pipelines.warehouse.snapshot import resolve_column

    found = resolve_column(list(columns), name)
    if found is None:
        raise ConfigError(
            path,
            f"models.{model.name}.audience.{setting}",
            f"column {name!r} is not in the model (columns: {', '.join(columns)})",
        )
    return found


def _json_text(wh: Warehouse, expression: str) -> str:
    """SQL escaping `\\` and `"` in a value, so the JSON-text row key stays unambiguous."""
    lit = wh.sql.literal
    text = wh.sql.cast_text(expression)
    return f"replace(replace({text}, {lit(chr(92))}, {lit(chr(92) * 2)}), {lit(chr(34))}, {lit(chr(92) + chr(34))})"


def audience_select(
    wh: Warehouse, model: ModelSpec, columns: Sequence[str], config_path: str
) -> tuple[str, dict[str, Any]]:
    """The snapshot query of an audience model, ending in `FROM (...) AS m` so that a
    partition's filter can be appended; event names are bound parameters."""
    from klaviyo_pipelines.warehouse.snapshot import KEY, PARTITION, resolve_column

    spec = model.audience
    assert spec is not None
    audience = wh.quote(_column(columns, model, spec.column, "column", config_path))
    member = wh.quote(resolve_column(list(columns), model.primary_key) or model.primary_key)
    members, params = wh.model_sql(model), dict(model.sql_params)
    if spec.is_event_log:
        assert spec.event is not None and spec.timestamp is not None
        event = wh.quote(_column(columns, model, spec.event, "event", config_path))
        stamp = wh.quote(_column(columns, model, spec.timestamp, "timestamp", config_path))
        listed = ", ".join(f"r.{wh.quote(c)}" for c in columns)
        members = (
            f"SELECT {listed} FROM (SELECT e.*, row_number() OVER (PARTITION BY e.{audience}, "
            f"e.{member} ORDER BY {wh.sql.order_desc_nulls_last(f'e.{stamp}')}, "
            f"CASE WHEN e.{event} = :kp_exited THEN 0 ELSE 1 END) AS {RANK} "
            f"FROM ({members}) AS e WHERE e.{event} IN (:kp_entered, :kp_exited)) AS r "
            f"WHERE r.{RANK} = 1 AND r.{event} = :kp_entered"
        )
        params |= {"kp_entered": spec.entered, "kp_exited": spec.exited}
    # A blank audience key is no audience, as NULL is: Dagster reads partition "" as none.
    named = (
        f"CASE WHEN trim({wh.sql.cast_text('m.' + audience)}) = '' THEN NULL ELSE m.{audience} END"
    )
    key = wh.sql.concat(
        "'[\"'", _json_text(wh, named), "'\",\"'", _json_text(wh, "m." + member), "'\"]'"
    )
    select = (
        f"SELECT m.*, {wh.sql.cast_key(key)} AS {KEY}, "
        f"{wh.sql.cast_key(named)} AS {PARTITION} FROM ({members}) AS m"
    )
    return select, params


def audience_filter(
    wh: Warehouse, model: ModelSpec, columns: Sequence[str], audience: str, config_path: str
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause appended to `audience_select` to read one audience."""
    assert model.audience is not None
    column = wh.quote(_column(columns, model, model.audience.column, "column", config_path))
    return f"WHERE {wh.sql.cast_key(f'm.{column}')} = :kp_audience", {"kp_audience": audience}


# ---- which audiences changed (the sensor) ------------------------------------------------


def audience_statuses(
    wh: Warehouse,
    model: ModelSpec,
    syncs: Sequence[SyncSpec],
    config_path: str,
    after: str | None = None,
    limit: int | None = None,
) -> list[AudienceStatus]:
    """Audiences after `after` in key order (at most `limit`): those in the model now and
    those the syncs' state still holds members of, i.e. audiences that became empty.

    An audience is in sync when every sync's delivered state holds exactly the model's
    members; members some sync rejected as invalid are left out on both sides, so a bad row
    does not make its audience look changed forever. One statement, run in the warehouse.
    """
    from klaviyo_pipelines.warehouse.snapshot import KEY, PARTITION, model_columns

    params: dict[str, Any] = {"after": after}
    with wh.engine.connect() as conn:
        columns = model_columns(wh, conn, model, config_path)
        select, bound = audience_select(wh, model, columns, config_path)
        params |= bound
        states = [
            wh.table(state_table(s.name)) if wh.table_exists(conn, state_table(s.name)) else None
            for s in syncs
        ]
        has_ledger = wh.table_exists(conn, LEDGER)
        null = wh.sql.cast_text("NULL")
        empty = f"SELECT {null} AS a, {null} AS k FROM (SELECT 1 AS one) AS z WHERE 1 = 0"
        ctes = [
            f"live AS (SELECT s.{PARTITION} AS a, s.{KEY} AS k FROM ({select}) AS s "
            f"WHERE s.{PARTITION} IS NOT NULL AND s.{KEY} IS NOT NULL)"
        ]
        if has_ledger:
            names = ", ".join(f":sync{i}" for i in range(len(syncs)))
            params |= {f"sync{i}": s.name for i, s in enumerate(syncs)}
            ctes.append(
                f"bad AS (SELECT row_key AS k FROM {wh.table(LEDGER)} "
                f"WHERE kind = '{FailureKind.INVALID.value}' AND sync IN ({names}))"
            )
        else:
            ctes.append(f"bad AS ({empty})")
        for i, table in enumerate(states):
            source = f"SELECT partition_key AS a, row_key AS k FROM {table}" if table else empty
            ctes.append(f"st{i} AS ({source})")
        union = f" {wh.sql.union_distinct} ".join(
            ["SELECT a FROM live", *(f"SELECT a FROM st{i}" for i in range(len(states)))]
        )
        bounded = f" LIMIT {int(limit)}" if limit else ""
        ctes.append(
            f"win AS (SELECT a FROM ({union}) AS u WHERE a IS NOT NULL AND "
            f"({wh.sql.cast_text(':after')} IS NULL OR a > {wh.sql.cast_text(':after')}) "
            f"ORDER BY a{bounded})"
        )
        digest = wh.sql.member_hash("x.k")  # summed: an order-free fingerprint
        sources = ["live", *(f"st{i}" for i in range(len(states)))]
        for name in sources:
            ctes.append(
                f"agg_{name} AS (SELECT x.a, count(*) AS n, sum({digest}) AS f FROM {name} AS x "
                "JOIN win AS w ON w.a = x.a "
                "WHERE NOT EXISTS (SELECT 1 FROM bad AS b WHERE b.k = x.k) GROUP BY x.a)"
            )
        picked = ", ".join(f"agg_{name}.n, agg_{name}.f" for name in sources)
        joins = " ".join(f"LEFT JOIN agg_{name} ON agg_{name}.a = w.a" for name in sources)
        rows = conn.execute(
            sa.text(
                f"WITH {', '.join(ctes)} SELECT w.a, {picked} FROM win AS w {joins} ORDER BY w.a"
            ),
            params,
        ).all()
    statuses = []
    for row in rows:
        pairs = [(int(row[i] or 0), str(row[i + 1] or 0)) for i in range(1, len(row), 2)]
        live, synced = pairs[0], pairs[1:]
        statuses.append(
            AudienceStatus(
                key=row[0],
                members=live[0],
                fingerprint=hashlib.sha256(json.dumps(live).encode()).hexdigest()[:16],
                in_sync=all(pair == live for pair in synced),
            )
        )
    return statuses


# ---- what a run is about to do (the exit guard) -------------------------------------------


def membership_changes(
    wh: Warehouse, model: str, changes: str, partition: str | None
) -> dict[str, MembershipChange]:
    """Per audience of the change set table `changes` (a quoted name): members now (in the
    snapshot), members entered (added) and exited (deleted)."""
    from klaviyo_pipelines.warehouse.snapshot import KEY, PARTITION, snapshot_table

    scope = f"AND {PARTITION} = :partition" if partition is not None else ""
    with wh.engine.connect() as conn:
        kinds = conn.execute(
            sa.text(
                f"SELECT {PARTITION}, "
                "sum(CASE WHEN _kp_kind = 'added' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN _kp_kind = 'deleted' THEN 1 ELSE 0 END) "
                f"FROM {changes} GROUP BY {PARTITION}"
            )
        ).all()
        members = dict(
            conn.execute(
                sa.text(
                    f"SELECT {PARTITION}, count(DISTINCT {KEY}) "
                    f"FROM {wh.table(snapshot_table(model))} "
                    f"WHERE {KEY} IS NOT NULL {scope} GROUP BY {PARTITION}"
                ),
                {"partition": partition},
            ).all()
        )
    return {
        audience: MembershipChange(int(members.get(audience, 0)), int(entered), int(exited))
        for audience, entered, exited in kinds
        if audience is not None
    }


# ---- the list each audience syncs to --------------------------------------------------------


def _lists_table_def(wh: Warehouse) -> sa.Table:
    k = wh.sql.key_type
    return sa.Table(
        wh.fit(LISTS),
        sa.MetaData(),
        sa.Column("model", k, nullable=False),
        sa.Column("audience", k, nullable=False),
        sa.Column("list_id", k, nullable=False),
        sa.Column("list_name", k),
        sa.Column("recorded_at", wh.sql.time_type, nullable=False),
        schema=wh.state_schema,
    )


def remembered_list(wh: Warehouse, model: str, audience: str) -> RememberedList | None:
    """The list an audience of `model` was synced to before, if any."""
    with wh.engine.connect() as conn:
        if not wh.table_exists(conn, LISTS):
            return None
        row = conn.execute(
            sa.text(
                f"SELECT list_id, list_name FROM {wh.table(LISTS)} "
                "WHERE model = :model AND audience = :audience"
            ),
            {"model": model, "audience": audience},
        ).first()
    return RememberedList(row[0], row[1]) if row else None


def remember_list(
    wh: Warehouse, model: str, audience: str, list_id: str, list_name: str | None
) -> None:
    """Record the audience's list, so later runs (and renames in Klaviyo) reuse it."""
    create_tables(wh, _lists_table_def(wh))
    with wh.engine.begin() as conn:
        params = {"model": model, "audience": audience}
        conn.execute(
            sa.text(f"DELETE FROM {wh.table(LISTS)} WHERE model = :model AND audience = :audience"),
            params,
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {wh.table(LISTS)} (model, audience, list_id, list_name, recorded_at) "
                "VALUES (:model, :audience, :list_id, :list_name, :now)"
            ),
            {**params, "list_id": list_id, "list_name": list_name, "now": now()},
        )


def audience_summary(wh: Warehouse, model: str, audience: str) -> tuple[int, RememberedList | None]:
    """Members of the audience in the model's snapshot, and the audience's remembered list."""
    from klaviyo_pipelines.warehouse.snapshot import KEY, PARTITION, snapshot_table

    with wh.engine.connect() as conn:
        members = conn.execute(
            sa.text(
                f"SELECT count(DISTINCT {KEY}) FROM {wh.table(snapshot_table(model))} "
                f"WHERE {PARTITION} = :audience"
            ),
            {"audience": audience},
        ).scalar()
    return int(members or 0), remembered_list(wh, model, audience)
