"""The deployment the UI tests share: demo-like data in a temporary DuckDB warehouse, the
Klaviyo sandbox over real HTTP, and `dagster dev` serving the project's `workspace.yaml`.

DuckDB lets one process at a time open the file, and the sensor, the run workers and this
test process are separate processes: so the deployment runs one run at a time (the run
queue, as docs/operations.md asks of DuckDB users), the audience sensor starts stopped, and
the tests touch the warehouse only while nothing runs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.dagster_dev import (
    DAGSTER_YAML,
    LAUNCH_RUN,
    LOCATION,
    REPOSITORY,
    START_SENSOR,
    DagsterDev,
    artifacts_dir,
    sensor_selector,
    wait_for,
)

CUSTOMERS = 400
AUDIENCE_MODEL = "audiences"
SENSOR = f"{AUDIENCE_MODEL}_audiences"
SENSOR_INTERVAL_SECONDS = 10
RUN_TIMEOUT = 90  # seconds for one run, queued to done, on a busy 2-core machine
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}

CONFIG = """\
warehouse:
  url: duckdb:///{warehouse}
  state_schema: klaviyo_sync
klaviyo:
  api_key: ${{KLAVIYO_API_KEY}}
  base_url: ${{KLAVIYO_BASE_URL}}
models:
  customers:
    sql: select * from analytics.customers
    primary_key: customer_id
  product_views:
    table: analytics.product_views
    primary_key: view_id
    partition: {{column: viewed_at, start: "{start}"}}
  {audience_model}:
    table: analytics.audience_members
    primary_key: customer_id
    audience: {{column: audience, interval_seconds: {interval}}}
syncs:
  customers_to_klaviyo:
    model: customers
    action: upsert_profile
    mapping:
      email: email
      phone_number: phone
      external_id: customer_id
      properties: {{lifetime_value: ltv, loyalty_tier: loyalty_tier}}
    settings: {{country_code: US}}
    retry: {{max_retries: 0}}
  product_views_to_klaviyo:
    model: product_views
    action: track_event
    mapping:
      external_id: customer_id
      time: viewed_at
      value: price
      properties: {{sku: sku, product_name: product_name}}
    settings: {{metric_name: Viewed Product, backfill: true}}
    retry: {{max_retries: 0}}
  audiences_join:
    model: {audience_model}
    action: add_profile_to_list
    mapping: {{external_id: customer_id, email: email}}
    retry: {{max_retries: 0}}
  audiences_leave:
    model: {audience_model}
    action: remove_profile_from_list
    mapping: {{external_id: customer_id}}
    retry: {{max_retries: 0}}
"""

SENSOR_SELECTOR = sensor_selector(LOCATION, SENSOR)
SENSOR_QUERY = """
query ($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
  __typename ... on Sensor { id sensorState { status } } ... on Error { message } } }
"""
STOP_SENSOR = """
mutation ($id: String!) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } } ... on Error { message } } }
"""
LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }
"""
BACKFILL_QUERY = """
query ($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
  ... on PartitionBackfill { status runs { runId status tags { key value } } }
  ... on Error { message } } }
"""
RUNS_QUERY = """
query ($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
  ... on Runs { results { runId status tags { key value } } } ... on Error { message } } }
"""
MATERIALIZATIONS = """
query ($key: AssetKeyInput!, $partitions: [String!]) { assetOrError(assetKey: $key) {
  __typename ... on Asset { assetMaterializations(partitions: $partitions) {
    partition runId metadataEntries { label __typename
      ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
      ... on TextMetadataEntry { text } ... on JsonMetadataEntry { jsonString }
      ... on TableMetadataEntry { table { records } } } } } } }
"""


@dataclass
class Deployment:
    dev: DagsterDev
    sandbox: Sandbox
    warehouse_url: str
    runs: dict[str, str] = field(default_factory=dict)  # what was launched once, by purpose

    # ---- the warehouse (only while no run is in progress) ----------------------------------

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        engine = sa.create_engine(self.warehouse_url, poolclass=sa.pool.NullPool)
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(sql))
                return [tuple(row) for row in result] if result.returns_rows else []
        finally:
            engine.dispose()

    # ---- GraphQL ---------------------------------------------------------------------------

    def sensor(self) -> dict[str, Any]:
        found = self.dev.graphql(SENSOR_QUERY, selector=SENSOR_SELECTOR)["sensorOrError"]
        assert found["__typename"] == "Sensor", found
        return found

    def stop_sensor(self) -> None:
        stopped = self.dev.graphql(STOP_SENSOR, id=self.sensor()["id"])["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped

    def start_sensor(self) -> None:
        started = self.dev.graphql(START_SENSOR, selector=SENSOR_SELECTOR)["startSensor"]
        assert started["sensorState"]["status"] == "RUNNING", started

    def launch_run(self, *asset_keys: list[str]) -> str:
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": key} for key in asset_keys],
            },
            "runConfigData": {},
        }
        launched = self.dev.graphql(LAUNCH_RUN, params=params)["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def launch_backfill(self, asset_keys: list[list[str]], partitions: list[str]) -> str:
        params = {
            "assetSelection": [{"path": key} for key in asset_keys],
            "partitionNames": partitions,
        }
        launched = self.dev.graphql(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return launched["backfillId"]

    def backfill(self, backfill_id: str) -> dict[str, Any]:
        found = self.dev.graphql(BACKFILL_QUERY, id=backfill_id)["partitionBackfillOrError"]
        assert found["__typename"] == "PartitionBackfill", found
        return found

    def runs_tagged(self, key: str, value: str) -> list[dict[str, Any]]:
        runs = self.dev.graphql(RUNS_QUERY, filter={"tags": [{"key": key, "value": value}]})
        return runs["runsOrError"]["results"]

    def sensor_runs(self) -> list[dict[str, Any]]:
        return self.runs_tagged("dagster/sensor_name", SENSOR)

    def wait_for_backfill_to_end(self, backfill_id: str) -> str:
        """Until the backfill daemon marks the backfill done (it looks every 30 s)."""

        def ended() -> str | None:
            status = self.backfill(backfill_id)["status"]
            return None if status == "REQUESTED" else status

        return wait_for(ended, RUN_TIMEOUT, f"backfill {backfill_id} to end")

    def wait_for_launches(
        self, launched: Callable[[], list[dict[str, Any]]], count: int, what: str
    ) -> list[dict[str, Any]]:
        """Until `launched()` lists `count` runs (a daemon's doing); returns them."""

        def enough() -> list[dict[str, Any]] | None:
            runs = launched()
            return runs if len(runs) >= count else None

        return wait_for(enough, RUN_TIMEOUT * count, what)

    def wait_for_runs(self, run_ids: list[str], timeout: float = RUN_TIMEOUT) -> None:
        """Until every run ended; each must have succeeded."""

        def ended() -> list[dict[str, Any]] | None:
            runs = self.dev.graphql(RUNS_QUERY, filter={"runIds": run_ids})["runsOrError"]
            results = runs["results"]
            done = len(results) == len(run_ids) and all(r["status"] in TERMINAL for r in results)
            return results if done else None

        runs = wait_for(ended, timeout * len(run_ids), f"runs {run_ids} to end")
        failed = [r for r in runs if r["status"] != "SUCCESS"]
        assert not failed, f"runs did not succeed: {failed}\n{self.dev.log()}"

    def materializations(
        self, asset_key: list[str], partitions: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Each materialization's partition, run and metadata ({label: value}), newest first."""
        asset = self.dev.graphql(MATERIALIZATIONS, key={"path": asset_key}, partitions=partitions)
        events = asset["assetOrError"]["assetMaterializations"]
        return [
            {
                "partition": event["partition"],
                "runId": event["runId"],
                "metadata": {
                    entry["label"]: metadata_value(entry) for entry in event["metadataEntries"]
                },
            }
            for event in events
        ]

    def profile_sync_run(self) -> str:
        """The run of the profile sync, launched (and waited for) on first use."""
        if "profiles" not in self.runs:
            run_id = self.launch_run(
                ["warehouse", "customers"], ["klaviyo", "customers_to_klaviyo"]
            )
            self.wait_for_runs([run_id])
            self.runs["profiles"] = run_id
        return self.runs["profiles"]


def metadata_value(entry: dict[str, Any]) -> Any:
    kind = entry["__typename"]
    if kind == "IntMetadataEntry":
        return entry["intValue"]
    if kind == "FloatMetadataEntry":
        return entry["floatValue"]
    if kind == "TextMetadataEntry":
        return entry["text"]
    if kind == "JsonMetadataEntry":
        return entry["jsonString"]
    if kind == "TableMetadataEntry":
        return entry["table"]["records"]
    return kind


def write_files(home: Path, warehouse: Path) -> Path:
    """The project config and dagster.yaml; returns the config's path."""
    start = (datetime.now(UTC).date() - timedelta(days=10)).isoformat()
    config = home / "klaviyo_pipelines.yaml"
    config.write_text(
        CONFIG.format(
            warehouse=warehouse,
            start=start,
            audience_model=AUDIENCE_MODEL,
            interval=SENSOR_INTERVAL_SECONDS,
        )
    )
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    return config


def create_warehouse(url: str) -> None:
    """The demo's warehouse, plus an audience membership table the test fills later."""
    create_demo_warehouse(url, "klaviyo_sync", customers=CUSTOMERS)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE analytics.audience_members "
                    "(audience VARCHAR, customer_id VARCHAR, email VARCHAR)"
                )
            )
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """One `dagster dev` for the UI tests of the session; on teardown, checks that stopping
    it left no process and that its temporary directory is gone. On a failure, its log is
    printed and kept as an artifact."""
    failed_before = request.session.testsfailed
    kept_log = artifacts_dir() / "dagster-dev.log"
    kept_log.unlink(missing_ok=True)  # from an earlier failed session
    home = Path(tempfile.mkdtemp(prefix="kp-ui-"))
    warehouse = home / "warehouse.duckdb"
    url = f"duckdb:///{warehouse}"
    create_warehouse(url)
    config = write_files(home, warehouse)
    sandbox = Sandbox(api_key=TEST_API_KEY, port=0).start()
    dev = DagsterDev(
        home,
        {
            "KLAVIYO_PIPELINES_CONFIG": str(config),
            "KLAVIYO_API_KEY": TEST_API_KEY,
            "KLAVIYO_BASE_URL": sandbox.url,
        },
    )
    try:
        dev.start()
        running = Deployment(dev, sandbox, url)
        running.stop_sensor()  # on by default; the test turns it on when it wants its runs
        yield running
    finally:
        left = dev.stop()
        sandbox.stop()
        if request.session.testsfailed > failed_before or left:
            shutil.copyfile(dev.log_path, kept_log)
            print(f"dagster dev's log (kept in {kept_log}):\n{dev.log()}")
        shutil.rmtree(home, ignore_errors=True)
    assert not left, f"processes left running after dagster dev stopped: {left}"
    assert not home.exists(), f"{home} was not removed"
