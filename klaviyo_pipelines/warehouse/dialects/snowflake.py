"""Snowflake: folds unquoted names to upper case (our names are left unquoted, so they fold
consistently), hashes natively with HASH(), builds JSON with OBJECT_CONSTRUCT_KEEP_NULL, and
has no session lock (a lease row in the state schema serves, see warehouse/lock.py)."""

from __future__ import annotations

from collections.abc import Sequence

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect


class SnowflakeDialect(WarehouseDialect):
    name = "snowflake"
    level = "emulated"  # fakesnow runs the warehouse suite: Snowflake's SQL on DuckDB
    extra = "snowflake"
    max_identifier_length = 255
    timestamp_cast = "TIMESTAMP_NTZ"

    def literal(self, text: str) -> str:
        # A backslash escapes in Snowflake's literals: '\\' would open a literal never closed.
        return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

    def sync_hash(self, values: Sequence[str], fingerprint: str) -> str:
        # 64-bit, over the typed values; NULL hashes apart from ''.
        return f"HASH({fingerprint}, {', '.join(values)})"

    def member_hash(self, expr: str) -> str:
        return f"HASH({expr})"  # sums in NUMBER(38): no overflow

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        pairs = ", ".join(f"{self.literal(c)}, {alias}.{self.quote(c)}" for c in columns)
        return f"TO_JSON(OBJECT_CONSTRUCT_KEEP_NULL({pairs}))"

    def rename_table(self, schema: str, old: str, new: str) -> str:
        s = self.quote(schema)
        return f"ALTER TABLE {s}.{self.quote(old)} RENAME TO {s}.{self.quote(new)}"
