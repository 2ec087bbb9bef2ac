"""Real Dagster runs: definitions from YAML, materializations with metadata and checks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
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
    defs = build_definitions(demo_config(duckdb_url, sandbox))
    graph = defs.resolve_asset_graph()
    assert set(graph.get_all_asset_keys()) == {
        snapshot_key("customers"),
        sync_key("customers_to_klaviyo"),
    }
    assert graph.get(sync_key("customers_to_klaviyo")).parent_keys == {snapshot_key("customers")}
    schedule = defs.resolve_schedule_def("customers_to_klaviyo_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    assert len(list(graph.asset_check_keys)) == 2


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
