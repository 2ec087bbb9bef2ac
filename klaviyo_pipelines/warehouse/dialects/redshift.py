"""Amazon Redshift: PostgreSQL's syntax without its functions. VARCHAR means 256 bytes unless
given a length, there is no advisory lock (a lease row serves), and STRTOL reads md5 hex."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect

MAX_VARCHAR = 65535


class RedshiftDialect(WarehouseDialect):
    name = "redshift"
    extra = "redshift"
    max_identifier_length = 127
    text_cast = f"VARCHAR({MAX_VARCHAR})"
    key_type = sa.String(MAX_VARCHAR)
    text_type = sa.String(MAX_VARCHAR)

    def literal(self, text: str) -> str:
        # A backslash escapes in Redshift's literals (PostgreSQL 8 without standard conforming
        # strings), so '\\' would open an escape. (sqlalchemy-redshift writes PostgreSQL's.)
        return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"

    def member_hash(self, expr: str) -> str:
        return f"CAST(STRTOL(SUBSTRING(MD5({expr}), 1, 15), 16) AS DECIMAL(38, 0))"

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        pairs = ", ".join(f"{self.literal(c)}, {alias}.{self.quote(c)}" for c in columns)
        return f"JSON_SERIALIZE(OBJECT({pairs}))"
