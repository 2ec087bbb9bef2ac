"""Issue 14: audience keys that are NULL or blank, and the exit guard of small audiences.

A blank audience key used to become Dagster partition "" and fail every run; rows without an
audience left no trace. Both run through the sensor (Dagster in process), the warehouse (DuckDB
and PostgreSQL, MariaDB where cheap) and real HTTP to the sandbox.
"""

from __future__ import annotations

import pytest

from klaviyo_pipelines.actions.engage import ExitGuardTripped, check_exits
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.runner import NO_AUDIENCE_KEY, plan_sync
from klaviyo_pipelines.warehouse.audiences import MembershipChange, audience_statuses
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_counts, ledger_entries
from klaviyo_pipelines_tests.conftest import state_schema_for
from klaviyo_pipelines_tests.test_engage import (
    CONFIG,
    Daemon,
    crm_schema,
    instance,  # noqa: F401 - the fixture
    load_segments,
    make_config,
    members,
)

UNKEYED = [("", "C2", None, None), ("   ", "C3", None, None), (None, "C4", None, None)]


def test_blank_audience_keys_are_no_audience_in_every_engine(every_warehouse_url, sandbox):
    wh = Warehouse(every_warehouse_url, state_schema_for(every_warehouse_url))
    config = make_config(every_warehouse_url, sandbox)
    load_segments(wh, [("vip", "C1", None, None), *UNKEYED])
    model = config.models["segments"]
    syncs = [config.syncs["segments_in"], config.syncs["segments_out"]]
    assert [s.key for s in audience_statuses(wh, model, syncs, config.path)] == ["vip"]
    wh.dispose()


def test_blank_keys_no_longer_break_runs_and_are_ledgered(warehouse_url, sandbox, instance):  # noqa: F811
    wh = Warehouse(warehouse_url, state_schema_for(warehouse_url))
    config = make_config(warehouse_url, sandbox)
    load_segments(wh, [("vip", "C1", None, None), *UNKEYED])
    daemon = Daemon(config, instance, "segments")
    tick = daemon.tick()
    assert tick.requested == ["vip"] and tick.added_partitions == ["vip"]
    assert all(run.success for run in tick.runs.values())
    assert members(sandbox, "vip") == {"C1"}
    assert [k.name for k in sandbox.state.lists.values()] == ["vip"]  # no list named ""
    for sync in ("segments_in", "segments_out"):
        (entry,) = ledger_entries(wh, sync)
        assert (entry.key, entry.kind, entry.field) == (
            NO_AUDIENCE_KEY,
            FailureKind.INVALID,
            "segment",
        )
        assert "3 rows of model 'segments' have a NULL or blank segment" in entry.reason
        assert ledger_counts(wh, sync)[FailureKind.INVALID] == 1  # what `status` shows

    load_segments(wh, [("vip", "C1", None, None)])  # fixed in the model: the ledger row goes
    daemon.run("vip")
    assert ledger_entries(wh, "segments_in") == []
    wh.dispose()


def test_plan_counts_rows_without_an_audience(warehouse_url, sandbox):
    """`plan` snapshots the whole model: blank keys used to show as members of list ""."""
    wh = Warehouse(warehouse_url, state_schema_for(warehouse_url))
    config = make_config(warehouse_url, sandbox)
    load_segments(wh, [("vip", "C1", None, None), ("vip", None, None, None), *UNKEYED])
    take_snapshot(wh, config.models["segments"], config.path)
    report = plan_sync(config, "segments_in", wh)
    assert report.planned == {"added": 1}
    assert report.key_rejected == 4  # one NULL member of vip, three rows of no audience
    reasons = sorted(s["reason"] for s in report.samples)
    assert "have a NULL customer_id" in reasons[0]
    assert "have a NULL or blank segment" in reasons[1]
    wh.dispose()


def _with_guard(url: str, sandbox, guard: str):
    text = CONFIG.format(
        url=url,
        base=sandbox.url,
        per_tick=50,
        state_schema=state_schema_for(url),
        crm=crm_schema(url),
    )
    return parse_config(text.replace("min_exits_guarded: 3", guard), "e.yaml")


def test_small_audiences_may_lose_most_members(warehouse_url, sandbox, instance):  # noqa: F811
    """2 of 3 leaving is 67%, over max_exit_share 0.5, but not more than min_exits_guarded."""
    wh = Warehouse(warehouse_url, state_schema_for(warehouse_url))
    config = _with_guard(warehouse_url, sandbox, "max_exit_share: 0.5")  # the default minimum
    trio = [("vip", f"C{i}", None, None) for i in range(3)]
    load_segments(wh, trio)
    daemon = Daemon(config, instance, "segments")
    assert all(run.success for run in daemon.tick().runs.values())
    load_segments(wh, trio[:1])
    assert daemon.tick().runs["vip"].success
    assert members(sandbox, "vip") == {"C0"}

    crowd = [("big", f"B{i}", None, None) for i in range(12)]
    load_segments(wh, [*trio[:1], *crowd])
    assert all(run.success for run in daemon.tick().runs.values())
    load_segments(wh, [*trio[:1], *crowd[:1]])  # 11 of 12 leave: more than 10 and than 50%
    stopped = daemon.tick().runs["big"]
    assert not stopped.success
    (failure,) = [e for e in stopped.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "11 of its 12 members would leave" in message
    assert "syncs.segments_out.settings.min_exits_guarded" in message
    assert len(members(sandbox, "big")) == 12
    wh.dispose()


@pytest.mark.parametrize(
    ("change", "minimum", "trips"),
    [
        (MembershipChange(members=1, entered=0, exited=2), 10, False),  # 2 of 3
        (MembershipChange(members=1, entered=0, exited=2), 1, True),
        (MembershipChange(members=10, entered=0, exited=11), 10, True),
        (MembershipChange(members=0, entered=0, exited=3), 10, True),  # emptied: always
        (MembershipChange(members=20, entered=0, exited=11), 10, False),  # 35%
    ],
)
def test_the_exit_guard_judges_count_and_share(change, minimum, trips) -> None:
    config = parse_config(
        CONFIG.format(
            url="duckdb:///:memory:",
            base="http://127.0.0.1:9",
            per_tick=5,
            state_schema="k",
            crm="crm",
        ),
        "e.yaml",
    )
    sync = config.syncs["segments_out"]
    if trips:
        with pytest.raises(ExitGuardTripped):
            check_exits(sync, "vip", change, 0.5, "/api/lists", minimum)
    else:
        check_exits(sync, "vip", change, 0.5, "/api/lists", minimum)
