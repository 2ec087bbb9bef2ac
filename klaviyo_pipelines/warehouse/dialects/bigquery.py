"""BigQuery: STRING and DATETIME types, FARM_FINGERPRINT over a row's JSON, no session temp
tables outside scripts (scratch tables are ordinary tables of the state dataset, one per
sync, which the run lock keeps to one writer), DELETE only with a WHERE clause."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect


class BigQueryDialect(WarehouseDialect):
    name = "bigquery"
    extra = "bigquery"
    max_identifier_length = 1024
    text_cast = "STRING"
    timestamp_cast = "DATETIME"
    session_temp_tables = False
    union_distinct = "UNION DISTINCT"

    def literal(self, text: str) -> str:
        # With backslash escapes, as the dialect writes them: in '\\' the backslash escapes
        # the quote, and 'a''b' is two adjacent literals, which BigQuery refuses.
        literal = sa.literal(text, sa.String())
        return str(literal.compile(dialect=self.sa_dialect, compile_kwargs={"literal_binds": True}))

    def concat(self, *parts: str) -> str:
        return f"CONCAT({', '.join(parts)})"

    def _struct(self, columns: Sequence[tuple[str, str]]) -> str:
        return (
            "STRUCT(" + ", ".join(f"{expr} AS {self.quote(name)}" for name, expr in columns) + ")"
        )

    def sync_hash(self, values: Sequence[str], fingerprint: str) -> str:
        fields = [("f", fingerprint), *((f"c{i}", v) for i, v in enumerate(values))]
        return f"FARM_FINGERPRINT(TO_JSON_STRING({self._struct(fields)}))"

    def member_hash(self, expr: str) -> str:
        return f"CAST(FARM_FINGERPRINT({expr}) & 0x0FFFFFFFFFFFFFFF AS NUMERIC)"

    def row_json(self, columns: Sequence[str], alias: str) -> str:
        return f"TO_JSON_STRING({self._struct([(c, f'{alias}.{self.quote(c)}') for c in columns])})"

    def create_scratch_as(self, name: str, select: str) -> str:
        return f"CREATE OR REPLACE TABLE {name} AS {select}"

    def create_scratch(self, name: str, columns: str) -> str:
        return f"CREATE TABLE IF NOT EXISTS {name} ({columns})"

    def empty(self, name: str) -> str:
        return f"DELETE FROM {name} WHERE TRUE"
