"""The CLI's contract: JSON keys scripts rely on, and exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

from klaviyo_pipelines.cli import main
from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Fault, Sandbox

REPO = Path(__file__).resolve().parents[1]
ONE = ("--select", "customers_to_klaviyo")


def write_config(tmp_path: Path, url: str, sandbox: Sandbox, extra: str = "") -> str:
    text = (REPO / "klaviyo_pipelines" / "demo_config.yaml").read_text()
    text = text.replace("${WAREHOUSE_URL:-duckdb:///klaviyo_demo.duckdb}", url)
    text = text.replace("${KLAVIYO_BASE_URL:-http://127.0.0.1:8765}", sandbox.url)
    text = text.replace("retry: {max_retries: 1, delay_seconds: 10}", "retry: {max_retries: 0}")
    path = tmp_path / "klaviyo_pipelines.yaml"
    path.write_text(text + extra)
    return str(path)


def run(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


def test_plan_then_sync_then_status_in_json(tmp_path, duckdb_url, sandbox, capsys) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=300)
    config = write_config(tmp_path, duckdb_url, sandbox)

    code, plan = run(capsys, "--config", config, "plan", *ONE, "--output", "json")
    assert code == 0
    planned = plan["syncs"]["customers_to_klaviyo"]
    assert planned["status"] == "planned" and planned["added"] == 300
    assert planned["delivered"] == 0 and planned["requests"] == 0
    assert planned["payload_samples"][0]["data"]["type"] == "profile-bulk-import-job"
    assert sandbox.state.requests == []  # plan sends nothing

    code, result = run(capsys, "--config", config, "sync", *ONE, "--output", "json")
    synced = result["syncs"]["customers_to_klaviyo"]
    assert code == 0 and synced["status"] == "success"
    assert {k: synced[k] for k in ("added", "updated", "deleted", "delivered", "rejected")} == {
        "added": 300,
        "updated": 0,
        "deleted": 0,
        "delivered": 297,
        "rejected": 3,
    }
    assert synced["requests"] >= 3

    code, again = run(capsys, "--config", config, "sync", *ONE, "--output", "json")
    assert code == 0 and again["syncs"]["customers_to_klaviyo"]["added"] == 0
    assert again["syncs"]["customers_to_klaviyo"]["requests"] == 0

    code, status = run(capsys, "--config", config, "status", "--output", "json")
    entry = status["syncs"]["customers_to_klaviyo"]
    assert code == 0 and entry["delivered_rows"] == 297 and entry["rejected_invalid"] == 3
    assert entry["last_run"]["status"] == "success"


def test_a_failed_sync_exits_1_with_the_reason(tmp_path, duckdb_url, sandbox, capsys) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=50)
    config = write_config(tmp_path, duckdb_url, sandbox)
    text = (
        Path(config)
        .read_text()
        .replace('revision: "2026-07-15"', 'revision: "2026-07-15"\n  max_attempts: 2')
    )
    Path(config).write_text(text)
    sandbox.faults.add(Fault(kind="status", status=503, count=None, method="POST"))
    code, result = run(capsys, "--config", config, "sync", *ONE, "--output", "json")
    synced = result["syncs"]["customers_to_klaviyo"]
    assert code == 1 and synced["status"] == "failed" and "503" in synced["error"]
    assert synced["delivered"] == 0


def test_config_errors_exit_2_naming_file_sync_and_key(
    tmp_path, duckdb_url, sandbox, capsys
) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, duckdb_url, sandbox)
    Path(config).write_text(Path(config).read_text().replace("email: email", "email: e_mail"))
    code, result = run(capsys, "--config", config, "sync", *ONE, "--output", "json")
    assert code == 2
    assert config in result["error"]
    assert "syncs.customers_to_klaviyo.mapping.email" in result["error"]
    assert "'e_mail' is not in model 'customers'" in result["error"]
    assert sandbox.state.requests == []

    code, result = run(capsys, "--config", config, "validate", "--output", "json")
    assert code == 2 and "e_mail" in result["error"]


def test_the_demo_runs_every_action_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("KLAVIYO_PIPELINES_CONFIG", "WAREHOUSE_URL", "KLAVIYO_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["demo", "--customers", "600", "--port", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    for sync in (
        "customers_to_klaviyo",
        "vips_to_list",
        "vips_leaving_list",
        "newsletter_subscribe",
        "newsletter_unsubscribe",
        "product_views_to_klaviyo",
        "orders_to_klaviyo",
        "audiences_join",
        "audiences_leave",
        "abandoners_join",
        "abandoners_leave",
    ):
        assert sync in out
    assert "failed" not in out
    assert "10 VIPs downgraded, 20 newsletter unsubscribes" in out
    assert (tmp_path / "klaviyo_demo.duckdb").exists()
