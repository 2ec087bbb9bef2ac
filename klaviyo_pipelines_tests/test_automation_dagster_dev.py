"""Declarative automation in a real `dagster dev`: a user's project merges `build_defs` with an
asset of its own that builds the customers table; once that asset is materialized (launched
through GraphQL, as the UI launches it), Dagster's default automation condition sensor starts
the snapshot and the sync, and the sandbox receives the rows.

The default sensor starts stopped (Dagster gives it no running default), so the test turns it
on as a user does in the UI's Automation tab, and waits for its first tick before the upstream
runs: eager conditions fire on an update seen after an evaluation, not on one made before the
first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.dagster_dev import (
    DAGSTER_YAML,
    LAUNCH_RUN,
    REPOSITORY,
    START_SENSOR,
    DagsterDev,
    sensor_selector,
    wait_for,
)

LOCATION = "user_project"
SENSOR = "default_automation_condition_sensor"
UPSTREAM = ["analytics", "customers"]
SNAPSHOT = ["klaviyo_pipelines", "warehouse", "customers"]
SYNC = ["klaviyo_pipelines", "klaviyo", "customers_to_klaviyo"]
AUTOMATION_TIMEOUT = 120  # a 30 s sensor interval, then the run, on a busy 2-core machine
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}

PROJECT = '''\
import os
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from klaviyo_pipelines import build_defs

CUSTOMERS = """
CREATE TABLE analytics.customers AS
SELECT * FROM (VALUES ('c1', 'ada@example.com', 'Ada'), ('c2', 'grace@example.com', 'Grace'))
AS t (customer_id, email, first_name)
"""


@dg.asset(key=["analytics", "customers"])
def customers() -> None:
    engine = sa.create_engine(os.environ["WAREHOUSE_URL"])
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS analytics"))
            conn.execute(sa.text("DROP TABLE IF EXISTS analytics.customers"))
            conn.execute(sa.text(CUSTOMERS))
    finally:
        engine.dispose()


# DuckDB: one process opens the file at a time, so a run's steps share one process.
defs = dg.Definitions.merge(
    dg.Definitions(assets=[customers], executor=dg.in_process_executor),
    build_defs(Path(__file__).parent / "klaviyo_pipelines.yaml"),
)
'''

CONFIG = """\
warehouse:
  url: ${WAREHOUSE_URL}
klaviyo:
  api_key: ${KLAVIYO_API_KEY}
  base_url: ${KLAVIYO_BASE_URL}
key_prefix: klaviyo_pipelines
models:
  customers:
    table: analytics.customers
    primary_key: customer_id
    deps: [analytics/customers]
syncs:
  customers_to_klaviyo:
    model: customers
    action: upsert_profile
    mapping: {external_id: customer_id, email: email, first_name: first_name}
    automation: eager
    retry: {max_retries: 0}
"""

WORKSPACE = """\
load_from:
  - python_file:
      relative_path: definitions.py
      location_name: {location}
"""

SENSOR_SELECTOR = sensor_selector(LOCATION, SENSOR)
SENSOR_QUERY = """
query ($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
  __typename ... on Sensor { sensorType sensorState { status ticks(limit: 5) { status } } }
  ... on Error { message } } }
"""
RUNS_QUERY = """
query ($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
  ... on Runs { results { runId status assetSelection { path } tags { key value } } }
  ... on Error { message } } }
"""


def write_project(project: Path, home: Path) -> None:
    project.mkdir()
    home.mkdir()
    (project / "definitions.py").write_text(PROJECT)
    (project / "klaviyo_pipelines.yaml").write_text(CONFIG)
    (project / "workspace.yaml").write_text(WORKSPACE.format(location=LOCATION))
    (home / "dagster.yaml").write_text(DAGSTER_YAML)


def sensor(dev: DagsterDev) -> dict[str, Any]:
    found = dev.graphql(SENSOR_QUERY, selector=SENSOR_SELECTOR)["sensorOrError"]
    assert found["__typename"] == "Sensor", found
    return found


def runs(dev: DagsterDev, **run_filter: Any) -> list[dict[str, Any]]:
    found = dev.graphql(RUNS_QUERY, filter=run_filter)["runsOrError"]
    assert found["__typename"] == "Runs", found
    return found["results"]


def wait_for_run(dev: DagsterDev, run_id: str, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        (run,) = runs(dev, runIds=[run_id])
        return run if run["status"] in TERMINAL else None

    run = wait_for(ended, timeout, f"run {run_id} to end")
    assert run["status"] == "SUCCESS", f"run {run_id}: {run['status']}\n{dev.log()}"
    return run


def delivered(sandbox: Sandbox) -> set[tuple[Any, ...]]:
    with sandbox.state.lock:
        return {
            (p.external_id, p.email, p.attributes.get("first_name"))
            for p in sandbox.state.profiles.values()
        }


def test_the_default_automation_sensor_runs_the_sync_once_the_upstream_is_built(
    tmp_path, sandbox
) -> None:
    project, home = tmp_path / "project", tmp_path / "home"
    write_project(project, home)
    env = {
        "WAREHOUSE_URL": f"duckdb:///{tmp_path / 'warehouse.duckdb'}",
        "KLAVIYO_API_KEY": TEST_API_KEY,
        "KLAVIYO_BASE_URL": sandbox.url,
    }
    dev = DagsterDev(home, env, workspace=project / "workspace.yaml")
    try:
        dev.start()
        found = sensor(dev)
        assert found["sensorType"] == "AUTO_MATERIALIZE"
        assert found["sensorState"]["status"] == "STOPPED"  # Dagster's default: off
        started = dev.graphql(START_SENSOR, selector=SENSOR_SELECTOR)["startSensor"]
        assert started["sensorState"]["status"] == "RUNNING", started
        (first_tick,) = wait_for(
            lambda: (
                [t for t in sensor(dev)["sensorState"]["ticks"] if t["status"] != "STARTED"] or None
            ),
            AUTOMATION_TIMEOUT,
            "the automation sensor's first tick to end",
        )
        assert first_tick["status"] == "SKIPPED", first_tick  # evaluated; nothing requested
        assert not runs(dev)  # the upstream was never built: nothing to do yet

        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": UPSTREAM}],
            },
            "runConfigData": {},
        }
        launched = dev.graphql(LAUNCH_RUN, params=params)["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        upstream_run = launched["run"]["runId"]
        wait_for_run(dev, upstream_run, AUTOMATION_TIMEOUT)
        built = time.monotonic()

        # The sensor's next tick sees the update and requests the snapshot and the sync.
        (automated,) = wait_for(
            lambda: runs(dev, tags=[{"key": "dagster/sensor_name", "value": SENSOR}]) or None,
            AUTOMATION_TIMEOUT,
            "the automation sensor to start the sync",
        )
        run = wait_for_run(dev, automated["runId"], AUTOMATION_TIMEOUT)
        tags = {tag["key"]: tag["value"] for tag in run["tags"]}
        assert tags["dagster/from_automation_condition"] == "true"
        assert {tuple(key["path"]) for key in run["assetSelection"]} == {
            tuple(SNAPSHOT),
            tuple(SYNC),
        }
        assert delivered(sandbox) == {
            ("c1", "ada@example.com", "Ada"),
            ("c2", "grace@example.com", "Grace"),
        }
        assert {r["runId"] for r in runs(dev)} == {upstream_run, run["runId"]}
        print(f"upstream built to rows delivered by automation: {time.monotonic() - built:.1f} s")
    except BaseException:
        print(f"dagster dev's log ({dev.log_path}):\n{dev.log()}")
        raise
    finally:
        left = dev.stop()
    assert not left, f"processes left running after dagster dev stopped: {left}"
