"""The API key never leaks, on the failure paths too; TLS stays verified; the sandbox stays local.

Extends `test_dagster.py::test_materialize_records_metadata_and_checks_and_never_the_key` (the
happy path) to every way a run can fail: a step that raises with a traceback, retried 503s
logged at WARNING, a refused key, a config error inside the step, and the CLI's JSON output
for each. Everything captured is grepped: logs at DEBUG, stdout and stderr, the Dagster
instance's event log including error stacks, materialization metadata, the run log and the
ledger in the warehouse, and the reprs of every object that holds the key.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from klaviyo_pipelines.cli import main
from klaviyo_pipelines.config import ConfigError, parse_config
from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
from klaviyo_pipelines.dagster_defs.resources import KlaviyoApiResource
from klaviyo_pipelines.definitions import build_resources
from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.klaviyo.client import DEFAULT_BASE_URL, KlaviyoClient
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.lock import sync_lock
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

REPO = Path(__file__).resolve().parents[1]
WRONG_KEY = "pk_wrong_key_0f1e2d3c4b5a69788796"
SYNC = "customers_to_klaviyo"


def config_text(url: str, sandbox: Sandbox) -> str:
    text = (REPO / "klaviyo_pipelines" / "demo_config.yaml").read_text()
    text = text.replace("${WAREHOUSE_URL:-duckdb:///klaviyo_demo.duckdb}", url)
    text = text.replace("${KLAVIYO_BASE_URL:-http://127.0.0.1:8765}", sandbox.url)
    text = text.replace("delay_seconds: 10", "delay_seconds: 0")
    return text.replace('revision: "2026-07-15"', 'revision: "2026-07-15"\n  max_attempts: 2')


def event_log(instance: dg.DagsterInstance) -> list[str]:
    """Every event of every run, with the full error (message, stack, causes) of failures."""
    texts = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            texts.append(str(entry))
            event = entry.dagster_event
            if event and event.is_step_failure and event.step_failure_data.error:
                texts.append(event.step_failure_data.error.to_string())
            if event and event.is_step_materialization:
                metadata = event.step_materialization_data.materialization.metadata
                texts.append(json.dumps({k: str(v) for k, v in metadata.items()}))
    return texts


def test_no_failure_path_shows_the_key(duckdb_url, sandbox, caplog, capsys, tmp_path, monkeypatch):
    caplog.set_level(logging.DEBUG)
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=200)
    path = tmp_path / "klaviyo_pipelines.yaml"
    path.write_text(config_text(duckdb_url, sandbox))
    config = parse_config(path.read_text(), str(path))
    instance = dg.DagsterInstance.ephemeral()
    wh = Warehouse(duckdb_url)
    reports = []

    # a step that raises (another run holds the sync): a Dagster failure with a traceback
    with sync_lock(wh, SYNC):
        reports.append(materialize_syncs(config, [SYNC], instance=instance)[SYNC])
    assert "already running" in reports[-1]["error"]

    # 503s retried (logged at WARNING by the client), then the run fails, also via the CLI
    sandbox.faults.add(Fault(kind="status", status=503, count=None))
    reports.append(materialize_syncs(config, [SYNC], instance=instance)[SYNC])
    assert "503" in reports[-1]["error"]
    assert main(["--config", str(path), "sync", "--select", SYNC, "--output", "json"]) == 1
    sandbox.faults.clear()

    # a refused key: 401, in Dagster and in the CLI
    monkeypatch.setenv("KLAVIYO_API_KEY", WRONG_KEY)
    reports.append(materialize_syncs(config, [SYNC], instance=instance)[SYNC])
    assert "401" in reports[-1]["error"]
    assert main(["--config", str(path), "sync", "--select", SYNC, "--output", "json"]) == 1
    monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)

    # a config error raised inside the step (the model lost a mapped column)
    broken = parse_config(
        path.read_text().replace(
            "select * from analytics.customers\n",
            "select customer_id, email from analytics.customers\n",
            1,
        ),
        str(path),
    )
    reports.append(materialize_syncs(broken, [SYNC], instance=instance)[SYNC])
    assert reports[-1]["status"] == "failed"

    # and the happy path, then every JSON command of the CLI
    reports.append(materialize_syncs(config, [SYNC], instance=instance)[SYNC])
    assert reports[-1]["status"] == "success"
    for command in ("sync", "plan", "status", "validate"):
        assert main(["--config", str(path), command, "--output", "json"]) in (0, 1)

    # run in a subprocess too: what a user's terminal and CI logs would show
    cli = subprocess.run(
        [sys.executable, "-m", "klaviyo_pipelines.cli", "--config", str(path), "status"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "KLAVIYO_API_KEY": TEST_API_KEY, "HOME": str(tmp_path)},
    )
    assert cli.returncode == 0, cli.stderr

    with wh.engine.connect() as conn:
        stored = [
            str(row)
            for table in ("sync_runs", "ledger")
            for row in conn.execute(sa.text(f"SELECT * FROM {wh.table(table)}"))
        ]
    resources = build_resources(config)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url) as client:
        holders = [repr(client), str(client), repr(resources), repr(config), repr(sandbox)]
    resolved = KlaviyoApiResource(api_key=TEST_API_KEY, base_url=sandbox.url)
    holders += [repr(resolved), str(resolved), f"{resolved}"]
    out, err = capsys.readouterr()
    everything = [
        *event_log(instance),
        caplog.text,
        out,
        err,
        cli.stdout,
        cli.stderr,
        json.dumps(reports),
        *stored,
        *holders,
    ]
    assert any("Traceback" in text or "File " in text for text in everything)  # stacks seen
    assert any("retrying in" in text for text in everything)  # retry warnings seen
    for text in everything:
        assert TEST_API_KEY not in text
        assert WRONG_KEY not in text
    wh.dispose()


def test_tls_is_verified_for_real_klaviyo_by_default():
    with KlaviyoClient("pk_live_check_only") as client:
        assert client.base_url == DEFAULT_BASE_URL == "https://a.klaviyo.com"
        context = client._http._transport._pool._ssl_context
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # neither the YAML nor the Dagster resource can turn verification off
    assert "verify" not in KlaviyoApiResource.model_fields
    text = "klaviyo: {api_key: '${K}'%s}\nmodels: {m: {table: t, primary_key: id}}\n"
    text += "syncs: {s: {model: m, action: upsert_profile}}\n"
    assert parse_config(text % "", "c.yaml").klaviyo.base_url == "https://a.klaviyo.com"
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(text % ", verify: false", "c.yaml")


def test_the_sandbox_command_listens_on_loopback_only(tmp_path):
    server = subprocess.Popen(
        [sys.executable, "-m", "klaviyo_pipelines.cli", "sandbox", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("Klaviyo sandbox listening on http://127.0.0.1:")
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        outside = _non_loopback_address()
        if outside:  # the same port on this host's network address answers nothing
            probe = socket.socket()
            probe.settimeout(2)
            assert probe.connect_ex((outside, port)) != 0
            probe.close()
    finally:
        server.terminate()
        server.wait(10)


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
            address = udp.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address
