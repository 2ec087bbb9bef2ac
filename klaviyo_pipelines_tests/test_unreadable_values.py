"""A value the driver cannot read fails its own row, never the page or the sync.

PostgreSQL's timestamps of 'infinity' and BC dates make psycopg raise while it reads a page, and
JSON nested thousands of levels deep makes the driver's JSON decoder recurse too far (on
PostgreSQL and DuckDB). Each such row is rejected naming its key, field and reason; the other
rows of the page are delivered.
"""

from __future__ import annotations

import sqlalchemy as sa

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import run_sync
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

DEEP = "[" * 5000 + "]" * 5000  # past every JSON decoder's recursion limit


def test_unreadable_values_reject_their_rows_and_the_rest_is_delivered(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    postgres = wh.dialect == "postgresql"
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS odd"))
        conn.execute(sa.text("DROP TABLE IF EXISTS odd.people"))
        conn.execute(
            sa.text(
                "CREATE TABLE odd.people (id VARCHAR, email VARCHAR, seen TIMESTAMP, attrs JSON)"
            )
        )
        rows = [(f"p{i:03d}", f"p{i}@odd.example", "2026-03-01 10:00", "[1]") for i in range(50)]
        rows[7] = ("p007", "p7@odd.example", "2026-03-01 10:00", DEEP)
        if postgres:
            rows[20] = ("p020", "p20@odd.example", "infinity", "[1]")
            rows[33] = ("p033", "p33@odd.example", "0044-03-15 BC", "[1]")
        for row in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO odd.people VALUES (:id, :email, CAST(:seen AS TIMESTAMP), :j)"
                ),
                dict(zip(["id", "email", "seen", "j"], row, strict=True)),
            )
    config = parse_config(
        f"""
warehouse: {{url: "{warehouse_url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  people: {{sql: "select * from odd.people", primary_key: id}}
syncs:
  profiles:
    model: people
    action: upsert_profile
    mapping: {{properties: {{seen: seen, attrs: attrs}}}}
""",
        "test.yaml",
    )
    take_snapshot(wh, config.models["people"], config.path)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.2) as client:
        report = run_sync(config, "profiles", wh, client)

    bad = {"p007": "attrs", **({"p020": "seen", "p033": "seen"} if postgres else {})}
    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 50 - len(bad)
    ledger = {e.key: e for e in ledger_entries(wh, "profiles")}
    assert set(ledger) == set(bad)
    for key, field in bad.items():
        entry = ledger[key]
        assert (entry.kind, entry.field) == (FailureKind.INVALID, field)
        assert "cannot be read from the warehouse" in entry.reason
    assert len(sandbox.state.profiles) == 50 - len(bad)
