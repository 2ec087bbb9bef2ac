"""Databricks (Delta tables): STRING types, xxhash64 over a row's JSON (its multi-argument
hashes skip NULLs, so (NULL, 'a') would equal ('a', NULL)), MERGE instead of UPDATE ... FROM,
no temporary tables (scratch tables are ordinary ones, one per sync)."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect


class DatabricksDialect(WarehouseDialect):
    name = "databricks"
    extra = "databricks"
    max_identifier_length = 255
    text_cast = "STRING"
    # The type databricks-sqlalchemy gives our DateTime columns: a cast to TIMESTAMP would
    # read the value in the session's time zone, then convert it back to store it.
    timestamp_cast = "TIMESTAMP_NTZ"
    session_temp_tables = False

    def literal(self, text: str) -> str:
        # With backslash escapes, as the dialect writes them: in '\\' the backslash escapes
        # the quote, and 'a''b' is two adjacent literals, which Spark SQL joins into 'ab'.
        literal = sa.literal(text, sa.String())
        return str(literal.compile(dialect=self.sa_dialect, compile_kwargs={"literal_binds": True}))

    def concat(self, *parts: str) -> str:
        return f"concat({', '.join(parts)})"

    def _named_struct(self, columns: Sequence[tuple[str, str]]) -> str:
        return "named_struct(" + ", ".join(f"{self.literal(n)}, {e}" for n, e in columns) + ")"

    def sync_hash(self, values: Sequence[str], fingerprint: str) -> str:
        fields = [("f", fingerprint), *((f"c{i}", v) for i, v in enumerate(values))]
        return f"xxhash64(to_json({self._named_struct(fields)}))"

    def member_hash(self, expr: str) -> str:
        return f"CAST(xxhash64({expr}) & 1152921504606846975 AS DECIMAL(38, 0))"

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        return f"to_json({self._named_struct([(c, f'{alias}.{self.quote(c)}') for c in columns])})"

    def create_scratch_as(self, name: str, select: str) -> str:
        return f"CREATE OR REPLACE TABLE {name} AS {select}"

    def create_scratch(self, name: str, columns: str) -> str:
        return f"CREATE TABLE IF NOT EXISTS {name} ({columns})"

    def rename_table(self, schema: str, old: str, new: str) -> str:
        s = self.quote(schema)
        return f"ALTER TABLE {s}.{self.quote(old)} RENAME TO {s}.{self.quote(new)}"

    def update_from(
        self, target: str, source: str, on: str, assignments: Sequence[tuple[str, str]]
    ) -> str:
        sets = ", ".join(f"t.{column} = {value}" for column, value in assignments)
        return f"MERGE INTO {target} AS t USING {source} AS i ON {on} WHEN MATCHED THEN UPDATE SET {sets}"
