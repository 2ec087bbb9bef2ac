"""The production setup in deploy/, run for real: a Dagster instance whose storage is PostgreSQL.

The instance is made from deploy/dagster.yaml as shipped, copied unchanged into a fresh
DAGSTER_HOME; only the environment variables it reads point it at a fresh PostgreSQL database.
Syncs from deploy/klaviyo_pipelines.yaml run against the sandbox over HTTP, then the runs,
materializations and pool slots are read back through the instance and straight from SQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from klaviyo_pipelines.config import Config, load_config
from klaviyo_pipelines.dagster_defs.assets import KLAVIYO_POOL, sync_key
from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
from klaviyo_pipelines.demo import DEMO_LIST_ID, create_demo_warehouse, seed_sandbox
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
POOL_LIMIT = 1  # deploy/dagster.yaml: concurrency.pools.default_limit


@pytest.fixture
def production_home(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME holding deploy/dagster.yaml byte for byte, its variables set."""
    url = sa.engine.make_url(postgres_url)
    for name, value in {
        "DAGSTER_PG_HOST": url.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(url.port or 5432),
        "DAGSTER_PG_DB": url.database or "",
        "DAGSTER_PG_USERNAME": url.username or "",
        "DAGSTER_PG_PASSWORD": url.password or "",
    }.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def production_config(warehouse_url: str, monkeypatch: pytest.MonkeyPatch) -> Config:
    """deploy/klaviyo_pipelines.yaml on the demo warehouse; the sandbox holds the VIP list."""
    create_demo_warehouse(warehouse_url, "klaviyo_sync", customers=200)
    monkeypatch.setenv("WAREHOUSE_URL", warehouse_url)
    monkeypatch.setenv("KLAVIYO_VIP_LIST_ID", DEMO_LIST_ID)
    return load_config(DEPLOY / "klaviyo_pipelines.yaml")


def test_a_sync_on_the_production_instance_is_stored_in_postgresql(
    production_home, postgres_url, duckdb_url, sandbox, monkeypatch
) -> None:
    seed_sandbox(sandbox)
    config = production_config(duckdb_url, monkeypatch)
    instance = dg.DagsterInstance.get()  # from $DAGSTER_HOME, as the webserver and daemon do

    report = materialize_syncs(config, ["customers_to_klaviyo"], instance=instance)[
        "customers_to_klaviyo"
    ]
    assert report["status"] == "success", report
    assert report["delivered"] == len(sandbox.state.profiles) > 150

    # The instance is the one deploy/dagster.yaml describes.
    assert type(instance.run_storage).__module__.startswith("dagster_postgres")
    assert type(instance.event_log_storage).__module__.startswith("dagster_postgres")
    assert type(instance.schedule_storage).__module__.startswith("dagster_postgres")
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    settings = instance.get_concurrency_config()
    assert settings.run_queue_config is not None
    assert settings.run_queue_config.max_concurrent_runs == 4
    assert settings.pool_config.default_pool_limit == POOL_LIMIT
    assert instance.run_monitoring_enabled
    assert not instance.telemetry_enabled

    # Through the instance: the run and the materialization with our metadata.
    (run,) = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.SUCCESS
    event = instance.get_latest_materialization_event(sync_key("customers_to_klaviyo"))
    assert event is not None and event.run_id == run.run_id
    metadata = event.asset_materialization.metadata
    assert metadata["klaviyo/delivered"].value == report["delivered"]
    assert metadata["klaviyo/status"].value == "success"

    # Straight from PostgreSQL: the rows Dagster wrote there.
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            runs = conn.execute(sa.text("SELECT run_id, status FROM runs")).all()
            stored = conn.execute(
                sa.text(
                    "SELECT event FROM event_logs WHERE run_id = :run "
                    "AND dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key = :key"
                ),
                {"run": run.run_id, "key": sync_key("customers_to_klaviyo").to_string()},
            ).scalar_one()
            leaked = conn.execute(
                sa.text("SELECT count(*) FROM event_logs WHERE event LIKE :key"),
                {"key": f"%{TEST_API_KEY}%"},
            ).scalar_one()
            pools = conn.execute(
                sa.text('SELECT concurrency_key, "limit" FROM concurrency_limits')
            ).all()
            held = conn.execute(
                sa.text("SELECT count(*) FROM concurrency_slots WHERE run_id IS NOT NULL")
            ).scalar_one()
    finally:
        engine.dispose()
    assert runs == [(run.run_id, "SUCCESS")]
    assert '"klaviyo/delivered"' in stored and f'"value": {report["delivered"]}' in stored
    assert leaked == 0

    # The klaviyo pool got the default limit when its first step claimed a slot, and the slot
    # was given back when the step ended.
    assert pools == [(KLAVIYO_POOL, POOL_LIMIT)]
    (pool,) = instance.event_log_storage.get_pool_limits()
    assert (pool.name, pool.limit, pool.from_default) == (KLAVIYO_POOL, POOL_LIMIT, True)
    assert held == 0


def _step_events(instance: dg.DagsterInstance, sync: str, *types: dg.DagsterEventType) -> list:
    """Events of the Klaviyo step of `sync`, from every run in the instance."""
    step = sync_key(sync).to_python_identifier()
    return [
        event
        for record in instance.get_run_records()
        for event in instance.all_logs(record.dagster_run.run_id, of_type=set(types))
        if event.step_key == step
    ]


def _step_window(instance: dg.DagsterInstance, sync: str) -> tuple[float, float]:
    """When the sync's Klaviyo step started and when it succeeded."""
    started = _step_events(instance, sync, dg.DagsterEventType.STEP_START)
    succeeded = _step_events(instance, sync, dg.DagsterEventType.STEP_SUCCESS)
    assert len(started) == len(succeeded) == 1
    return started[0].timestamp, succeeded[0].timestamp


def _blocked(instance: dg.DagsterInstance, sync: str) -> list[str]:
    """Dagster's notes that the sync's Klaviyo step waited for a slot of the klaviyo pool."""
    return [
        event.message
        for event in _step_events(instance, sync, dg.DagsterEventType.ENGINE_EVENT)
        if f"blocked by limit for pool {KLAVIYO_POOL}" in (event.message or "")
    ]


def _wait_for(what: str, condition, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 180
    while not condition():
        for process in processes:
            if process.poll() is not None:
                out, err = process.communicate()
                pytest.fail(f"a sync ended before {what}: {out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.2)


def test_the_klaviyo_pool_runs_one_klaviyo_step_at_a_time(
    production_home, postgres_url, sandbox, monkeypatch
) -> None:
    """Two syncs run as two `klaviyo-pipelines sync` processes on the instance: while the
    first holds the pool's one slot, the second's Klaviyo step waits for it."""
    seed_sandbox(sandbox)
    # The warehouse: schemas analytics and klaviyo_sync beside Dagster's tables in public.
    production_config(postgres_url, monkeypatch)
    instance = dg.DagsterInstance.get()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    config = str(DEPLOY / "klaviyo_pipelines.yaml")

    def start(sync: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "klaviyo_pipelines.cli", "--config", config]
        return subprocess.Popen(
            [*command, "sync", "--select", sync],
            env=env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    processes: list[subprocess.Popen] = []
    try:
        with sandbox.state.lock:  # Klaviyo stalls: whoever holds the slot keeps it meanwhile
            processes.append(start("customers_to_klaviyo"))
            _wait_for(
                "customers_to_klaviyo holds the pool's slot",
                lambda: instance.event_log_storage.get_concurrency_info(KLAVIYO_POOL).claimed_slots,
                processes,
            )
            processes.append(start("vips_to_list"))
            _wait_for(
                "vips_to_list waits for the pool",
                lambda: _blocked(instance, "vips_to_list"),
                processes,
            )
        for process in processes:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, out + err
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()

    first = _step_window(instance, "customers_to_klaviyo")
    second = _step_window(instance, "vips_to_list")
    assert first[1] <= second[0], f"the Klaviyo steps overlapped: {first} and {second}"
    assert instance.event_log_storage.get_concurrency_info(KLAVIYO_POOL).claimed_slots == []
    assert len(sandbox.state.list_members(DEMO_LIST_ID)) > 50


def test_the_workspace_loads_the_production_config(production_home, duckdb_url) -> None:
    """deploy/workspace.yaml, as the webserver and the daemon load it, on the instance."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KLAVIYO_PIPELINES_CONFIG": str(DEPLOY / "klaviyo_pipelines.yaml"),
        "WAREHOUSE_URL": duckdb_url,
        "KLAVIYO_VIP_LIST_ID": DEMO_LIST_ID,
    }
    workspace = str(DEPLOY / "workspace.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", workspace],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
