"""Real Dagster runs: definitions from YAML, materializations with metadata and checks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.dagster_defs.assets import REJECTED_SHARE_CHECK, snapshot_key, sync_key
from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
from klaviyo_pipelines.definitions import build_definitions
from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = (REPO / "klaviyo_pipelines" / "demo_config.yaml").read_text()


def demo_config(url: str, sandbox: Sandbox):
    text = DEMO_CONFIG.replace("${WAREHOUSE_URL:-duckdb:///klaviyo_demo.duckdb}", url)
    text = text.replace("${KLAVIYO_BASE_URL:-http://127.0.0.1:8765}", sandbox.url)
    return parse_config(text.replace("delay_seconds: 10", "delay_seconds: 0"), "demo.yaml")


def test_definitions_have_snapshot_and_sync_assets_checks_and_schedule(duckdb_url, sandbox) -> None:
    config = demo_config(duckdb_url, sandbox)
    defs = build_definitions(config)
    graph = defs.resolve_asset_graph()
    assert set(graph.get_all_asset_keys()) == {
        *(snapshot_key(m) for m in config.models),
        *(sync_key(s) for s in config.syncs),
    }
    assert graph.get(sync_key("customers_to_klaviyo")).parent_keys == {snapshot_key("customers")}
    assert graph.get(sync_key("orders_to_klaviyo")).parent_keys == {
        snapshot_key("orders"),
        snapshot_key("order_items"),  # line items are joined from their own snapshot
    }
    assert graph.get(sync_key("orders_to_klaviyo")).partitions_def is not None
    schedule = defs.resolve_schedule_def("customers_to_klaviyo_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    # a key check per snapshot; a rejected-share and a verify check per sync
    assert len(list(graph.asset_check_keys)) == len(config.models) + 2 * len(config.syncs)


def test_materialize_records_metadata_and_checks_and_never_the_key(
    warehouse_url, sandbox, caplog, capsys
) -> None:
    caplog.set_level(logging.DEBUG)
    config = demo_config(warehouse_url, sandbox)
    create_demo_warehouse(warehouse_url, "klaviyo_sync", customers=1000)
    instance = dg.DagsterInstance.ephemeral()

    reports = materialize_syncs(config, ["customers_to_klaviyo"], instance=instance)
    report = reports["customers_to_klaviyo"]
    assert report["status"] == "success"
    assert report["added"] == 997 and report["delivered"] == 991  # 2 dup + 1 NULL key held back
    assert report["rejected"] == 3 + 6  # 3 key rows, 2 emails, 2 phones, 2 refused by Klaviyo
    assert len(sandbox.state.profiles) == 991

    materialization = instance.get_latest_materialization_event(sync_key("customers_to_klaviyo"))
    metadata = materialization.asset_materialization.metadata
    assert metadata["klaviyo/delivered"].value == 991
    assert metadata["klaviyo/planned_added"].value == 997
    assert metadata["dagster/row_count"].value == 991
    assert metadata["klaviyo/requests"].value >= 3
    assert len(metadata["klaviyo/job_ids"].value) == 1
    failures = metadata["klaviyo/failures"].value.records
    assert {r.data["field"] for r in failures} >= {"email", "phone_number", "customer_id"}
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(sync_key("customers_to_klaviyo"), REJECTED_SHARE_CHECK)]
    )
    assert check  # the rejected-share check ran

    # a run with a revoked key fails with a clear message, and still leaks nothing
    os.environ["KLAVIYO_API_KEY"] = "pk_revoked_0123456789abcdef"
    try:
        failed = materialize_syncs(config, ["customers_to_klaviyo"], instance=instance)
    finally:
        os.environ["KLAVIYO_API_KEY"] = TEST_API_KEY
    assert failed["customers_to_klaviyo"]["status"] == "success"  # nothing changed: no request

    everything = [str(e) for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
    everything += [caplog.text, *capsys.readouterr()]
    for text in everything:
        assert TEST_API_KEY not in text
        assert "pk_revoked_0123456789abcdef" not in text


def test_an_auth_failure_fails_the_step_with_a_clear_message(
    duckdb_url, sandbox, monkeypatch
) -> None:
    config = demo_config(duckdb_url, sandbox)
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=50)
    monkeypatch.setenv("KLAVIYO_API_KEY", "pk_wrong_key_5555")
    instance = dg.DagsterInstance.ephemeral()
    report = materialize_syncs(config, ["customers_to_klaviyo"], instance=instance)[
        "customers_to_klaviyo"
    ]
    assert report["status"] == "failed"
    assert "401" in report["error"] and "API key" in report["error"]
    attempts = [r for r in sandbox.state.requests if r.path.startswith("/api/profile-bulk")]
    assert len(attempts) == 1  # no retry storm
    logs = "".join(str(e) for run in instance.get_runs() for e in instance.all_logs(run.run_id))
    assert "pk_wrong_key_5555" not in logs


def test_workspace_loads_in_dagster_from_the_repo_root(tmp_path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    env.pop("KLAVIYO_PIPELINES_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


PARTITIONED = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}"}}
models:
  signups:
    sql: select * from crm.signups
    primary_key: id
    partition: {{column: signed_up_at, start: "2026-11-01"}}
syncs:
  signup_profiles:
    model: signups
    action: upsert_profile
    schedule: "0 * * * *"
    retry: {{max_retries: 0}}
"""


def test_partitioned_syncs_backfill_day_by_day_and_schedule_recent_days(
    duckdb_url, sandbox
) -> None:
    import sqlalchemy as sa

    from klaviyo_pipelines.warehouse.engine import Warehouse

    wh = Warehouse(duckdb_url)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA crm"))
        conn.execute(
            sa.text(
                "CREATE TABLE crm.signups AS SELECT range AS id, 'u' || range || '@example.com' "
                "AS email, TIMESTAMP '2026-11-01 08:00' + range * INTERVAL 6 HOUR AS signed_up_at "
                "FROM range(12)"
            )
        )
    wh.dispose()
    config = parse_config(PARTITIONED.format(url=duckdb_url, base=sandbox.url), "p.yaml")
    instance = dg.DagsterInstance.ephemeral()
    report = materialize_syncs(
        config, ["signup_profiles"], instance=instance, partitions=["2026-11-01", "2026-11-02"]
    )["signup_profiles"]
    assert report["status"] == "success"
    assert {day: r["delivered"] for day, r in report["partitions"].items()} == {
        "2026-11-01": 3,  # 08:00, 14:00, 20:00
        "2026-11-02": 4,
    }
    assert report["delivered"] == 7 and len(sandbox.state.profiles) == 7
    materialized = instance.get_materialized_partitions(sync_key("signup_profiles"))
    assert materialized == {"2026-11-01", "2026-11-02"}

    defs = build_definitions(config)
    schedule = defs.resolve_schedule_def("signup_profiles_schedule")
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 11, 5, 10, tzinfo=UTC),
        repository_def=defs.get_repository_def(),
    ) as context:
        requests = schedule.evaluate_tick(context).run_requests
    assert [r.partition_key for r in requests] == ["2026-11-04", "2026-11-05"]
