"""What every warehouse engine is asked for, with the ANSI form as the default.

Our SQL is written once, in warehouse/snapshot.py, changes.py, state.py and audiences.py; each
piece that differs between engines (types, casts, the row hash, scratch tables, renames,
UPDATE ... FROM, indexes, session locks, identifier case) is a method here, overridden by the
engine's own module. A new engine is one new module and one line in `dialects/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection


class WarehouseDialect:
    """An engine family's SQL. Expressions in, SQL text out; no connection is needed except
    for `acquire_session_lock` / `release_session_lock`."""

    name = "generic"
    # How well it is proven here: "verified" (a real server runs the warehouse suite in CI),
    # "emulated" (an emulator runs it) or "experimental" (its statements are parsed only).
    level = "experimental"
    extra: str | None = None  # the package extra that installs the driver
    max_identifier_length = 63  # bytes; PostgreSQL's is the smallest of the engines we know
    text_cast = "VARCHAR"  # the type name of an unbounded string in CAST
    timestamp_cast = "TIMESTAMP"
    session_temp_tables = True  # CREATE TEMPORARY TABLE lives as long as the connection
    supports_indexes = False
    union_distinct = "UNION"  # BigQuery insists on saying DISTINCT
    # DDL for our own tables: SQLAlchemy types compile per dialect.
    key_type: sa.types.TypeEngine = sa.String()  # row keys, joined and compared exactly
    text_type: sa.types.TypeEngine = sa.Text()  # long text: row JSON, reasons, reports
    time_type: sa.types.TypeEngine = sa.DateTime()

    def __init__(self, sa_dialect: sa.engine.Dialect, engine: sa.Engine | None = None) -> None:
        self.sa_dialect, self.engine = sa_dialect, engine  # no engine: compile only
        self._preparer = sa_dialect.identifier_preparer

    # ---- names ---------------------------------------------------------------------------

    def quote(self, name: str) -> str:
        """An identifier, quoted only when it must be (upper case, reserved word, odd
        characters): then each engine folds our lower-case names its own way, consistently,
        and Snowflake's upper-case column names keep their quotes."""
        return self._preparer.quote(name)

    def literal(self, text: str) -> str:
        """A string literal for text we control (column names used as JSON keys)."""
        return "'" + text.replace("'", "''") + "'"

    # ---- expressions ---------------------------------------------------------------------

    def cast_text(self, expr: str) -> str:
        return f"CAST({expr} AS {self.text_cast})"

    def cast_key(self, expr: str) -> str:
        """A primary key as text, compared byte for byte (never by a case-blind collation)."""
        return self.cast_text(expr)

    def cast_timestamp(self, expr: str) -> str:
        return f"CAST({expr} AS {self.timestamp_cast})"

    def cast_day(self, expr: str) -> str:
        """A timestamp's day as `YYYY-MM-DD` text: the partition key of daily models."""
        return self.cast_text(f"CAST({expr} AS DATE)")

    def concat(self, *parts: str) -> str:
        return "(" + " || ".join(parts) + ")"

    def sync_hash(self, values: Sequence[str], fingerprint: str) -> str:
        """A row's hash over `values` and the `fingerprint` expression, as text or a number.

        It must tell NULL from '' and one column from the next. The default is md5 over each
        value's length-prefixed text (`4:abcd`, or `n` for NULL), joined by commas: an
        injective encoding, unlike a plain separator that a value may contain.
        """
        parts = []
        for value in values:
            text = self.cast_text(value)
            prefixed = self.concat(self.cast_text(f"length({text})"), "':'", text)
            parts.append(f"COALESCE({prefixed}, 'n')")
        comma = "','"
        return f"md5({self.concat(*self._join_with(parts, comma), comma, fingerprint)})"

    @staticmethod
    def _join_with(parts: Sequence[str], separator: str) -> list[str]:
        joined: list[str] = []
        for part in parts:
            if joined:
                joined.append(separator)
            joined.append(part)
        return joined

    def member_hash(self, expr: str) -> str:
        """An integer hash of a member's key whose SUM over an audience cannot overflow: the
        sensor's order-free fingerprint of a membership."""
        return f"CAST(CAST('x' || substr(md5({expr}), 1, 15) AS BIT(60)) AS BIGINT)"

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        """A JSON text object of `alias`'s columns, keyed by column name."""
        raise NotImplementedError(f"{self.name} has no JSON object constructor")

    def direct_rows(self, model_sql: str, key: str, columns: Sequence[str], key_as: str) -> str:
        """A model read where it is (`snapshot: direct`): the columns a sync reads and the
        primary key as text, as a derived table's query, never a view of ours over the user's
        table (a dependent view would block their DROP TABLE, or vanish in a CASCADE)."""
        listed = "".join(f", m.{self.quote(c)}" for c in columns)
        return f"SELECT {self.cast_key(f'm.{self.quote(key)}')} AS {key_as}{listed} FROM ({model_sql}) AS m"

    def computed_once(self, select: str) -> str:
        """`select`, for a derived table whose expressions are computed once per row rather
        than copied into each use of them above it."""
        return select

    def order_desc_nulls_last(self, expr: str) -> str:
        return f"{expr} DESC NULLS LAST"

    # ---- statements ----------------------------------------------------------------------

    def create_scratch_as(self, name: str, select: str) -> str:
        """A connection-local table holding `select` (see `session_temp_tables`)."""
        return f"CREATE TEMPORARY TABLE {name} AS {select}"

    def create_scratch(self, name: str, columns: str) -> str:
        return f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} ({columns})"

    def empty(self, name: str) -> str:
        return f"DELETE FROM {name}"

    def drop_scratch(self, name: str) -> str:
        return f"DROP TABLE IF EXISTS {name}"

    def rename_table(self, schema: str, old: str, new: str) -> str:
        """Rename within `schema`; the new name qualified wherever the engine would otherwise
        put it in the connection's current schema (MySQL, Snowflake)."""
        return f"ALTER TABLE {self.quote(schema)}.{self.quote(old)} RENAME TO {self.quote(new)}"

    def update_from(
        self, target: str, source: str, on: str, assignments: Sequence[tuple[str, str]]
    ) -> str:
        """UPDATE `target` (aliased `t`) from `source` (aliased `i`) where `on` holds.
        Assignments are (column of t, expression over t and i)."""
        sets = ", ".join(f"{column} = {value}" for column, value in assignments)
        return f"UPDATE {target} AS t SET {sets} FROM {source} AS i WHERE {on}"

    def delete_matching(
        self,
        target: str,
        column: str,
        source: str,
        source_column: str,
        target_where: str = "",
        source_where: str = "",
    ) -> str:
        """DELETE the rows of `target` whose `column` is among `source`'s `source_column`,
        where the conditions hold (each over its own table's unqualified columns)."""
        also = f"{target_where} AND " if target_where else ""
        only = f" WHERE {source_where}" if source_where else ""
        return (
            f"DELETE FROM {target} WHERE {also}{column} IN "
            f"(SELECT {source_column} FROM {source}{only})"
        )

    def index(
        self, table: str, columns: Sequence[str], name: str, unique: bool = False
    ) -> str | None:
        """An index on our own table, or None where the engine has none (cloud warehouses)."""
        return None

    def set_session(self) -> list[str]:
        """Statements that tune a change-set transaction (PostgreSQL: JIT off)."""
        return []

    # ---- locks ---------------------------------------------------------------------------

    has_session_lock = False

    def acquire_session_lock(self, conn: Connection, key: int, name: str) -> bool:
        """Take the engine's session lock without waiting; True when taken."""
        raise NotImplementedError

    def release_session_lock(self, conn: Connection, key: int, name: str) -> None:
        raise NotImplementedError

    def lock_holder(self, conn: Connection, key: int, name: str) -> str:
        return "another session"
