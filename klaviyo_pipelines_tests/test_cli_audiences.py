"""`sync --audience` runs chosen audiences of the Engage syncs; `--override-exit-guard` lets a
large exit through once. Real in-process Dagster runs against the sandbox over HTTP."""

from __future__ import annotations

import sqlalchemy as sa

from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines_tests.cli_runs import run, write_config

ENGAGE = ("--select", "audiences_join", "--select", "audiences_leave")


def list_members(sandbox: Sandbox, name: str) -> set[str]:
    [list_id] = [i for i, lst in sandbox.state.lists.items() if lst.name == name]
    return set(sandbox.state.list_members(list_id))


def test_one_audience_then_the_exit_guard_overridden(tmp_path, duckdb_url, sandbox, capsys) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=300)
    config = write_config(tmp_path, duckdb_url, sandbox)

    code, result = run(capsys, "--config", config, "sync", *ENGAGE, "--audience", "high_value")
    assert code == 0
    joined = result["syncs"]["audiences_join"]
    assert list(joined["partitions"]) == ["high_value"]  # platinum_tier not run
    assert joined["status"] == "success" and joined["delivered"] > 0
    members = list_members(sandbox, "high_value")
    assert len(members) == joined["delivered"]
    assert not [lst for lst in sandbox.state.lists.values() if lst.name == "platinum_tier"]

    wh = Warehouse(duckdb_url)  # every high-value customer leaves the audience at once
    with wh.engine.begin() as conn:
        conn.execute(sa.text("UPDATE analytics.customers SET ltv = 0"))
    wh.dispose()

    code, result = run(capsys, "--config", config, "sync", *ENGAGE, "--audience", "high_value")
    left = result["syncs"]["audiences_leave"]
    assert code == 1 and left["status"] == "failed"
    assert "Exit guard" in left["error"] and "override_exit_guard" in left["error"]
    assert list_members(sandbox, "high_value") == members  # nobody removed

    code, result = run(
        capsys,
        "--config",
        config,
        "sync",
        *ENGAGE,
        "--audience",
        "high_value",
        "--override-exit-guard",
    )
    left = result["syncs"]["audiences_leave"]
    assert code == 0 and left["status"] == "success"
    assert left["deleted"] == left["delivered"] == len(members)
    assert list_members(sandbox, "high_value") == set()


def test_an_unknown_audience_or_a_sync_without_audiences_exits_2(
    tmp_path, duckdb_url, sandbox, capsys
) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=20)
    config = write_config(tmp_path, duckdb_url, sandbox)

    code, result = run(capsys, "--config", config, "sync", "--audience", "nobody")
    assert code == 2
    [error] = result["errors"]
    assert error["key"] == "--audience" and "'nobody'" in error["reason"]

    code, result = run(
        capsys, "--config", config, "sync", "--select", "customers_to_klaviyo", "--audience", "x"
    )
    assert code == 2
    assert "'customers_to_klaviyo' is not an audience sync" in result["errors"][0]["reason"]
    assert sandbox.state.requests == []  # refused before anything was sent
