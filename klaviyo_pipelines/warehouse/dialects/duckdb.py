"""DuckDB: the embedded default. Hashes typed values natively; our tables need no index
(zone maps serve the scans); a file's lock is taken by warehouse/lock.py, not here."""

from __future__ import annotations

from collections.abc import Sequence

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect


class DuckDBDialect(WarehouseDialect):
    name = "duckdb"
    level = "verified"
    max_identifier_length = 1024

    def sync_hash(self, values: Sequence[str], fingerprint: str) -> str:
        # Its own 64-bit hash() over the typed values: no text at all (bench/change_set.py).
        return f"hash({self.cast_text(fingerprint)}, {', '.join(values)})"

    def member_hash(self, expr: str) -> str:
        return f"CAST('0x' || substr(md5({expr}), 1, 15) AS BIGINT)"

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        packed = ", ".join(f"{self.quote(c)} := {alias}.{self.quote(c)}" for c in columns)
        return f"CAST(to_json(struct_pack({packed})) AS VARCHAR)"
