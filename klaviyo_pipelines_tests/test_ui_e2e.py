"""The real deployment end to end: `dagster dev` (webserver, daemon, code server) from
workspace.yaml, driven through the webserver's GraphQL API as the UI drives it.

A profile sync run, the Engage audience sensor turned on, and a backfill of a daily Track
Event sync over three days: each checked in the sandbox (what Klaviyo received) against the
warehouse, and in the metadata Dagster recorded.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from klaviyo_pipelines.sandbox import Sandbox

if TYPE_CHECKING:
    from klaviyo_pipelines_tests.ui_deployment import Deployment

# The `deployment` fixture, one `dagster dev` shared with test_ui_browser.py.
pytest_plugins = ["klaviyo_pipelines_tests.ui_deployment"]

VIEWS = ["klaviyo", "product_views_to_klaviyo"]
AUDIENCES = {
    "high_value": "ltv >= 2300",
    "platinum_tier": "loyalty_tier = 'platinum' AND ltv >= 2000",
}


def views_per_day(deployment: Deployment) -> dict[str, int]:
    rows = deployment.query(
        "SELECT CAST(CAST(viewed_at AS DATE) AS VARCHAR), count(*) "
        "FROM analytics.product_views GROUP BY 1"
    )
    return dict(rows)


def add_audience_members(deployment: Deployment) -> dict[str, set[str]]:
    """Two audiences of customers with deliverable emails; returns their members."""
    for audience, condition in AUDIENCES.items():
        deployment.query(
            f"INSERT INTO analytics.audience_members SELECT '{audience}', customer_id, email "
            f"FROM analytics.customers WHERE {condition} AND customer_id IS NOT NULL "
            "AND email LIKE '%@example.com'"
        )
    members: dict[str, set[str]] = {}
    for audience, customer in deployment.query(
        "SELECT audience, customer_id FROM analytics.audience_members"
    ):
        members.setdefault(audience, set()).add(customer)
    return members


def sandbox_events_per_day(sandbox: Sandbox, metric: str) -> Counter[str]:
    with sandbox.state.lock:
        times = [e.time for e in sandbox.state.events if e.metric == metric]
    return Counter(
        t.astimezone(UTC).date().isoformat() if t.tzinfo else t.date().isoformat() for t in times
    )


def sandbox_list_members(sandbox: Sandbox, name: str) -> set[str]:
    with sandbox.state.lock:
        (klist,) = [k for k in sandbox.state.lists.values() if k.name == name]
        return {
            sandbox.state.profiles[pid].external_id for pid in sandbox.state.list_members(klist.id)
        }


def sandbox_profiles_from(sandbox: Sandbox, sync_property: str) -> int:
    """Profiles carrying a property only the profile sync sets (events and list joins create
    profiles too)."""
    with sandbox.state.lock:
        return sum(
            sync_property in (p.attributes.get("properties") or {})
            for p in sandbox.state.profiles.values()
        )


def test_backfill_profile_sync_and_audience_sensor_through_dagster_dev(deployment) -> None:
    started = datetime.now(UTC)
    sandbox = deployment.sandbox
    days = views_per_day(deployment)  # read while nothing runs: DuckDB has one process at a time
    ((customers,),) = deployment.query(
        "SELECT count(DISTINCT customer_id) FROM analytics.customers"
    )

    # A backfill of the daily Track Event sync over the days that have views, and a profile
    # sync, launched as the UI launches them; the run queue runs one at a time.
    backfill_id = deployment.launch_backfill([["warehouse", "product_views"], VIEWS], sorted(days))
    run_id = deployment.profile_sync_run()

    (latest,) = deployment.materializations(["klaviyo", "customers_to_klaviyo"])[:1]
    shown = latest["metadata"]
    assert latest["runId"] == run_id
    assert shown["klaviyo/status"] == "success"
    assert shown["klaviyo/planned_added"] == customers
    assert shown["klaviyo/delivered"] == sandbox_profiles_from(sandbox, "loyalty_tier") > 0
    assert shown["klaviyo/delivered"] + shown["klaviyo/rejected"] == customers
    rejected = [f for f in map(json.loads, shown["klaviyo/failures"]) if f["kind"] == "added"]
    assert shown["klaviyo/rejected"] == len(rejected) > 0  # the demo's bad rows, with reasons
    assert all(f["reason"] for f in rejected)
    assert shown["dagster/row_count"] == shown["klaviyo/delivered"]
    assert shown["klaviyo/requests"] >= 2  # the import job and its polls

    # The backfill: one run per day, each day's events in Klaviyo, each day's metadata.
    backfill_runs = deployment.wait_for_launches(
        lambda: deployment.backfill(backfill_id)["runs"],
        len(days),
        "the backfill daemon to launch a run per day",
    )
    assert len(backfill_runs) == len(days)
    deployment.wait_for_runs([r["runId"] for r in backfill_runs])
    assert sandbox_events_per_day(sandbox, "Viewed Product") == days
    recorded = deployment.materializations(VIEWS, sorted(days))
    by_day = {m["partition"]: m["metadata"] for m in recorded}
    assert set(by_day) == set(days)
    for day, count in days.items():
        assert by_day[day]["klaviyo/status"] == "success"
        assert by_day[day]["klaviyo/planned_added"] == count
        assert by_day[day]["klaviyo/delivered"] == count
        assert by_day[day]["klaviyo/rejected"] == 0
    assert {m["runId"] for m in recorded} == {r["runId"] for r in backfill_runs}

    # The audience sensor, turned on once nothing runs and the audiences have members.
    members = add_audience_members(deployment)
    assert set(members) == set(AUDIENCES) and all(members.values())
    deployment.start_sensor()
    audience_runs = deployment.wait_for_launches(
        deployment.sensor_runs, len(AUDIENCES), "the audience sensor to request its runs"
    )
    # Its next tick would read the warehouse while those runs write it, and DuckDB allows
    # one process at a time: turn it off before that tick (SENSOR_INTERVAL_SECONDS later).
    deployment.stop_sensor()
    assert len(audience_runs) == len(AUDIENCES)
    deployment.wait_for_runs([r["runId"] for r in audience_runs])
    partitions = {
        tag["value"]
        for run in audience_runs
        for tag in run["tags"]
        if tag["key"] == "dagster/partition"
    }
    assert partitions == set(AUDIENCES)
    for audience, expected in members.items():
        assert sandbox_list_members(sandbox, audience) == expected
        (joined,) = deployment.materializations(["klaviyo", "audiences_join"], [audience])[:1]
        assert joined["metadata"]["audience/members"] == len(expected)
        assert joined["metadata"]["audience/entered"] == len(expected)
        assert joined["metadata"]["audience/list_name"] == audience
        assert joined["metadata"]["klaviyo/delivered"] == len(expected)

    assert deployment.wait_for_backfill_to_end(backfill_id) == "COMPLETED_SUCCESS"
    print(f"e2e through dagster dev: {(datetime.now(UTC) - started).total_seconds():.1f} s")
