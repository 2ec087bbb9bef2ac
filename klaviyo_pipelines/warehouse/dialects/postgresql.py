"""PostgreSQL: a real server in every test run. Session advisory locks, COPY for bulk writes
(warehouse/engine.py), B-tree indexes on our keys."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect


class PostgreSQLDialect(WarehouseDialect):
    name = "postgresql"
    level = "verified"
    max_identifier_length = 63
    supports_indexes = True

    def sync_hash(self, values: Sequence[str], fingerprint: str) -> str:
        # The row as text (record syntax, so NULL and '' differ) through hashtextextended, the
        # 64-bit hash behind hash partitioning, hence stable across versions.
        return f"hashtextextended(CAST(ROW({', '.join(values)}) AS TEXT) || {fingerprint}, 0)"

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        listed = ", ".join(f"{alias}.{self.quote(c)}" for c in columns)
        return f"CAST((SELECT row_to_json(r) FROM (SELECT {listed}) AS r) AS VARCHAR)"

    def computed_once(self, select: str) -> str:
        # OFFSET 0 keeps the planner from pulling the subquery up: it copied a row's hash
        # into each of the direct change set's CASEs, computing it once per column (4x).
        return f"{select} OFFSET 0"

    def index(self, table: str, columns: Sequence[str], name: str, unique: bool = False) -> str:
        # Unnamed: PostgreSQL names it uniquely within the schema.
        return f"CREATE {'UNIQUE ' if unique else ''}INDEX ON {table} ({', '.join(columns)})"

    def set_session(self) -> list[str]:
        return ["SET LOCAL jit = off"]  # fresh tables fool the estimates into costly JIT

    has_session_lock = True

    def acquire_session_lock(self, conn: Connection, key: int, name: str) -> bool:
        return bool(
            conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
        )

    def release_session_lock(self, conn: Connection, key: int, name: str) -> None:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})

    def lock_holder(self, conn: Connection, key: int, name: str) -> str:
        pid = conn.execute(
            sa.text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = :key LIMIT 1"
            ),
            {"key": key},
        ).scalar()
        return f"PostgreSQL backend {pid}" if pid else "another session"
