"""The CLI's contract: JSON keys scripts rely on, exit codes 0 / 1 / 2, progress and tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

from klaviyo_pipelines.config import load_config
from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Fault
from klaviyo_pipelines_tests.cli_runs import run, run_text, write_config

ONE = ("--select", "customers_to_klaviyo")

SYNC_KEYS = {
    "status",
    "error",
    "added",
    "updated",
    "deleted",
    "delivered",
    "rejected",
    "retryable",
    "not_found",
    "requests",
    "retries",
    "rate_limited",
    "waited_seconds",
    "duration_seconds",
    "samples",
}
PLAN_KEYS = {
    "status",
    "action",
    "added",
    "updated",
    "deleted",
    "delivered",
    "rejected",
    "requests",
    "found",
    "held_invalid",
    "key_rejected",
    "samples",
    "payload_samples",
}
LEDGER_ROW_KEYS = {"key", "kind", "field", "reason", "attempts", "first_seen", "last_seen"}


def test_plan_sync_status_json_keys_and_the_ledger(tmp_path, duckdb_url, sandbox, capsys) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=300)
    config = write_config(tmp_path, duckdb_url, sandbox)

    code, plan = run(capsys, "--config", config, "plan", *ONE)
    assert code == 0
    planned = plan["syncs"]["customers_to_klaviyo"]
    assert planned.keys() >= PLAN_KEYS
    assert planned["status"] == "planned" and planned["added"] == 300
    assert planned["delivered"] == 0 and planned["requests"] == 0
    assert planned["payload_samples"][0]["data"]["type"] == "profile-bulk-import-job"
    assert sandbox.state.requests == []  # plan sends nothing

    # JSON mode never draws progress, even when asked to.
    code, out, err = run_text(
        capsys, "--config", config, "sync", *ONE, "--output", "json", "--progress"
    )
    result = json.loads(out)
    assert "delivered ·" not in err
    synced = result["syncs"]["customers_to_klaviyo"]
    assert synced.keys() >= SYNC_KEYS
    assert code == 0 and synced["status"] == "success" and synced["error"] is None
    assert {k: synced[k] for k in ("added", "updated", "deleted", "delivered", "rejected")} == {
        "added": 300,
        "updated": 0,
        "deleted": 0,
        "delivered": 297,
        "rejected": 3,
    }
    assert synced["retryable"] == 0 and synced["requests"] >= 3
    assert {s["key"] for s in synced["samples"]} == {"C000001", "C000101", "C000201"}

    code, again = run(capsys, "--config", config, "sync", *ONE)
    assert code == 0 and again["syncs"]["customers_to_klaviyo"]["added"] == 0
    assert again["syncs"]["customers_to_klaviyo"]["requests"] == 0

    code, status = run(capsys, "--config", config, "status")
    assert code == 0 and set(status["syncs"]) == set(load_config(config).syncs)
    entry = status["syncs"]["customers_to_klaviyo"]
    assert entry.keys() == {"last_run", "delivered_rows", "ledger"}
    assert entry["delivered_rows"] == 297
    last = entry["last_run"]
    assert last["status"] == "success" and last["added"] == 0  # the second, empty run
    assert {"run_id", "started_at", "finished_at"} <= last.keys()
    assert last["finished_at"] >= last["started_at"]
    ledger = entry["ledger"]
    assert (ledger["invalid"], ledger["transient"]) == (3, 0)
    rows = {row["key"]: row for row in ledger["rows"]}
    assert all(row.keys() == LEDGER_ROW_KEYS for row in rows.values())
    assert rows["C000001"]["kind"] == "invalid" and rows["C000001"]["field"] == "email"
    assert "'not-an-email' is not a valid email address" in rows["C000001"]["reason"]
    assert rows["C000101"]["field"] == "phone_number"
    assert rows["C000201"]["reason"].startswith("Klaviyo:")
    assert status["syncs"]["vips_to_list"]["last_run"] is None  # never ran

    code, one = run(capsys, "--config", config, "status", *ONE, "--rows", "1")
    assert list(one["syncs"]) == ["customers_to_klaviyo"]
    assert len(one["syncs"]["customers_to_klaviyo"]["ledger"]["rows"]) == 1
    assert one["syncs"]["customers_to_klaviyo"]["ledger"]["invalid"] == 3  # counts stay whole

    code, out, _ = run_text(capsys, "--config", config, "status", *ONE, "--all")
    assert code == 0
    assert "customers_to_klaviyo: 3 rows in the ledger, 3 shown" in out
    for text in ("C000001", "'not-an-email' is not a valid email address", "phone_number"):
        assert text in out


def test_forced_progress_counts_rows_batches_and_429s_then_a_summary_table(
    tmp_path, duckdb_url, sandbox, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one progress line, uncut
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=300)
    config = write_config(tmp_path, duckdb_url, sandbox)
    sandbox.faults.add(Fault(kind="rate_limit", retry_after=0.2, count=1, method="POST"))

    code, out, err = run_text(capsys, "--config", config, "sync", *ONE, "--progress")

    assert code == 0
    frames = [f for f in re.split(r"[\r\n]", err) if "customers_to_klaviyo" in f]
    assert len(frames) > 1  # redrawn as the run went, not only at the end
    # The last frame: every row of the change set accounted for, the 429 and its wait.
    final = frames[-1]
    assert "300/300" in final
    assert "297 delivered · 3 rejected · 0 to retry · 1 batches" in final
    assert "429s: 1" in final
    waited = float(re.search(r"waited (\d+\.\d)s", final).group(1))
    assert waited >= 0.2
    # The summary table: one row per sync with the counts, in the documented column order.
    header = next(line for line in out.splitlines() if "sync" in line and "status" in line)
    assert header.split() == [
        "sync",
        "status",
        "added",
        "updated",
        "deleted",
        "delivered",
        "rejected",
        "retry",
        "requests",
        "429s",
        "waited",
        "took",
    ]
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("customers_"))
    assert row[:8] == ["customers_to_klaviyo", "success", "300", "0", "0", "297", "3", "0"]
    assert int(row[8]) >= 3 and row[9] == "1" and float(row[10].rstrip("s")) >= 0.2
    assert "Rejected rows" in out and "'not-an-email' is not a valid email address" in out


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
    code, result = run(capsys, "--config", config, "sync", *ONE)
    synced = result["syncs"]["customers_to_klaviyo"]
    assert code == 1 and synced["status"] == "failed" and "503" in synced["error"]
    assert synced["delivered"] == 0 and synced["retryable"] == 50 - synced["rejected"]

    code, status = run(capsys, "--config", config, "status", *ONE)
    ledger = status["syncs"]["customers_to_klaviyo"]["ledger"]
    assert ledger["transient"] == synced["retryable"] and ledger["transient"] > 0
    transient = [row for row in ledger["rows"] if row["kind"] == "transient"]
    assert transient and "503" in transient[0]["reason"]


def test_config_errors_exit_2_naming_file_sync_and_key(
    tmp_path, duckdb_url, sandbox, capsys
) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, duckdb_url, sandbox)
    Path(config).write_text(Path(config).read_text().replace("email: email", "email: e_mail"))
    code, result = run(capsys, "--config", config, "sync", *ONE)
    assert code == 2
    assert config in result["error"]
    assert "syncs.customers_to_klaviyo.mapping.email" in result["error"]
    assert "'e_mail' is not in model 'customers'" in result["error"]
    assert result["errors"] == [
        {
            "file": config,
            "key": "syncs.customers_to_klaviyo.mapping.email",
            "reason": result["errors"][0]["reason"],
        }
    ]
    assert sandbox.state.requests == []

    code, result = run(capsys, "--config", config, "sync", "--select", "nope")
    assert code == 2 and result["errors"][0]["key"] == "--select"


def test_the_demo_runs_every_action_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("KLAVIYO_PIPELINES_CONFIG", "WAREHOUSE_URL", "KLAVIYO_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    code, result = run(capsys, "demo", "--customers", "600", "--port", "0")
    syncs = {
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
    }
    assert code == 0, result
    assert result["status"] == "success" and result["error"] is None
    assert result.keys() == {
        "status",
        "error",
        "warehouse",
        "customers",
        "first_run",
        "changes",
        "second_run",
        "sandbox",
    }
    for run_ in ("first_run", "second_run"):
        assert set(result[run_]["syncs"]) == syncs
        assert all(r["status"] == "success" for r in result[run_]["syncs"].values())
    first, second = result["first_run"]["syncs"], result["second_run"]["syncs"]
    assert len(first["orders_to_klaviyo"]["partitions"]) == 7  # backfilled day by day
    assert first["customers_to_klaviyo"]["delivered"] > 500
    changed = sum(second["customers_to_klaviyo"][k] for k in ("added", "updated", "deleted"))
    assert 0 < changed < 60  # only the changes travel
    assert second["vips_leaving_list"]["deleted"] == 10 == result["changes"]["VIPs downgraded"]
    assert result["changes"]["newsletter unsubscribes"] == 20
    assert result["customers"] == 600
    assert result["sandbox"]["profiles"] > 0 and result["sandbox"]["events"] > 0
    assert result["sandbox"]["vip_list_members"] > 0 and result["sandbox"]["subscriptions"] > 0
    assert (tmp_path / "klaviyo_demo.duckdb").exists()
