"""A poison value fails its own row, never the sync: a JSON property nested hundreds of levels
deep is rejected naming its column, and the other rows are delivered.

The nesting is built in Python, stored as text and turned into the warehouse's own nested type
by the model's SQL (a DuckDB list of lists, a PostgreSQL JSONB), so the driver hands the sync
the nested value it would hand it from a real table.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.values import MAX_DEPTH, TooDeeplyNested, json_value
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

DEPTH = 400  # the review's value: a RecursionError in json_value, on every run


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def typed_attrs(url: str) -> str:
    """The model's SQL for the `attrs` text column as the warehouse's nested type."""
    if url.startswith("duckdb"):
        structure = "[" * DEPTH + '"INTEGER"' + "]" * DEPTH
        return f"from_json(attrs, '{structure}')"
    return "CAST(attrs AS JSONB)"


CONFIG = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}"}}
models:
  people: {{sql: "{sql}", primary_key: id}}
syncs:
  profiles:
    model: people
    action: upsert_profile
    mapping: {{properties: {{attrs: attrs}}}}
"""


def load(wh: Warehouse, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS poison"))
        conn.execute(sa.text("DROP TABLE IF EXISTS poison.people"))
        conn.execute(
            sa.text("CREATE TABLE poison.people (id VARCHAR, email VARCHAR, attrs VARCHAR)")
        )
        wh.bulk_insert(conn, "poison.people", ["id", "email", "attrs"], rows)


def sync(url: str, wh: Warehouse, sandbox: Sandbox) -> SyncReport:
    sql = f"select id, email, {typed_attrs(url)} AS attrs from poison.people"
    text = CONFIG.format(url=url, base=sandbox.url, sql=sql.replace('"', '\\"'))
    config = parse_config(text, "poison.yaml")
    take_snapshot(wh, config.models["people"], config.path)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.05) as client:
        return run_sync(config, "profiles", wh, client)


def test_a_json_property_nested_too_deep_rejects_its_row_and_the_others_are_delivered(
    warehouse_url, sandbox
):
    wh = Warehouse(warehouse_url)
    deep = str(nested(DEPTH))
    rows = [(f"p{i}", f"p{i}@example.com", None) for i in range(5)]
    rows.append(("deep", "deep@example.com", deep))
    load(wh, rows)

    report = sync(warehouse_url, wh, sandbox)
    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 5
    assert {p.attributes["email"] for p in sandbox.state.profiles.values()} == {
        f"p{i}@example.com" for i in range(5)
    }
    (entry,) = ledger_entries(wh, "profiles")
    assert (entry.key, entry.kind, entry.field) == ("deep", FailureKind.INVALID, "attrs")
    assert f"nested deeper than {MAX_DEPTH} levels" in entry.reason
    assert report.samples[0]["key"] == "deep" and report.samples[0]["field"] == "attrs"

    again = sync(warehouse_url, wh, sandbox)  # unchanged: held, the sync still succeeds
    assert again.status == "success" and again.held_invalid == 1
    wh.dispose()


def test_the_depth_limit_is_exact_and_the_walk_never_recurses_into_python_s_limit():
    assert json_value({"a": nested(MAX_DEPTH - 1)}) == {"a": nested(MAX_DEPTH - 1)}
    with pytest.raises(TooDeeplyNested):
        json_value({"a": nested(MAX_DEPTH)})
    with pytest.raises(TooDeeplyNested):  # far past the interpreter's recursion limit
        json_value(nested(50_000))
