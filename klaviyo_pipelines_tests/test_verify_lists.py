"""verify for list membership: Engage audiences (Add Profile To List: each member in its
audience's list; Remove Profile from List: no one in the list the warehouse does not hold) and
Remove Profile (each removed row out of the list). Drift is made in the sandbox behind the
project's back (a member removed by hand, a stranger added, a removed profile put back);
--repair plus the next sync restores the exact membership."""

from __future__ import annotations

import sqlalchemy as sa

from klaviyo_pipelines.config import Config, parse_config
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.audiences import remembered_list
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines_tests.sandbox_runs import sync, verify

REMOVAL_LIST = "LEAVRS"


def config_for(url: str, sandbox: Sandbox) -> Config:
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  segments:
    sql: select * from crm.members
    primary_key: customer_id
    audience: {{column: segment}}
  leavers: {{sql: "select * from crm.leavers", primary_key: customer_id}}
syncs:
  segments_in:
    model: segments
    action: add_profile_to_list
    mapping: {{external_id: customer_id, email: email}}
  segments_out:
    model: segments
    action: remove_profile_from_list
    mapping: {{external_id: customer_id}}
  leave:
    model: leavers
    action: remove_profile
    on: [added]
    mapping: {{email: email}}
    settings: {{list_id: {REMOVAL_LIST}}}
""",
        "test.yaml",
    )


def load(wh: Warehouse, table: str, rows: list[tuple]) -> None:
    columns = ["segment", "customer_id", "email"]
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS crm"))
        conn.execute(sa.text(f"DROP TABLE IF EXISTS crm.{table}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE crm.{table} (segment VARCHAR, customer_id VARCHAR, email VARCHAR)"
            )
        )
        wh.bulk_insert(conn, f"crm.{table}", columns, rows)


def members(n: int, segment: str = "vip") -> list[tuple]:
    return [(segment, f"c{i}", f"c{i}@example.com") for i in range(n)]


def listed(sandbox: Sandbox, list_id: str) -> set[str]:
    """The list's members by email."""
    state = sandbox.state
    return {state.profiles[pid].email for pid in state.list_members(list_id)}


def test_audience_lists_missing_and_extra_members_are_found_and_repaired(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    config = config_for(warehouse_url, sandbox)
    load(wh, "members", members(6))
    for name in ("segments_in", "segments_out"):
        assert sync(config, wh, sandbox, name, "vip").status == "success"
    vip = remembered_list(wh, "segments", "vip")
    assert vip is not None
    everyone = {f"c{i}@example.com" for i in range(6)}
    assert listed(sandbox, vip.list_id) == everyone

    joined, left = (verify(config, wh, sandbox, name) for name in ("segments_in", "segments_out"))
    assert (joined.checked, joined.in_step, sum(joined.drifted.values())) == (6, 6, 0)
    assert (left.checked, left.in_step, sum(left.drifted.values())) == (6, 6, 0)

    state = sandbox.state
    state.remove_members(vip.list_id, [state.find_profile(email="c2@example.com").id])
    stranger = state.create_profile({"email": "stranger@example.com"})
    state.add_members(vip.list_id, [stranger.id])
    reads = len(state.requests)

    joined = verify(config, wh, sandbox, "segments_in")
    assert joined.drifted == {"not_a_member": 1} and joined.in_step == 5
    (missing,) = joined.samples
    assert (missing.key, missing.kind, missing.field) == ('["vip","c2"]', "not_a_member", "list")
    left = verify(config, wh, sandbox, "segments_out")
    assert left.drifted == {"extra_member": 1} and (left.checked, left.in_step) == (6, 5)
    (extra,) = left.samples
    assert (extra.kind, extra.field, extra.klaviyo) == (
        "extra_member",
        "list",
        "stranger@example.com",
    )
    assert extra.key == f'["vip","{stranger.id}"]'  # as Engage writes a member's key
    assert all(r.method == "GET" for r in state.requests[reads:])  # nothing written
    assert stranger.id in state.list_members(vip.list_id)

    assert verify(config, wh, sandbox, "segments_in", repair=True).repaired == 1
    assert verify(config, wh, sandbox, "segments_out", repair=True).repaired == 1
    assert listed(sandbox, vip.list_id) == everyone - {"c2@example.com"}  # the stranger left
    again = sync(config, wh, sandbox, "segments_in", "vip")
    assert again.planned == {"added": 1} and sum(again.delivered.values()) == 1
    assert listed(sandbox, vip.list_id) == everyone  # exact equality
    for name in ("segments_in", "segments_out"):
        assert sum(verify(config, wh, sandbox, name).drifted.values()) == 0

    # A member who left the audience and was put back in its list by hand is extra too.
    load(wh, "members", members(5))
    for name in ("segments_in", "segments_out"):
        assert sync(config, wh, sandbox, name, "vip").status == "success"
    assert listed(sandbox, vip.list_id) == everyone - {"c5@example.com"}
    state.add_members(vip.list_id, [state.find_profile(email="c5@example.com").id])
    back = verify(config, wh, sandbox, "segments_out")
    assert back.drifted == {"extra_member": 1} and back.samples[0].klaviyo == "c5@example.com"


def test_removed_rows_put_back_in_the_list_are_found_and_repaired(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    config = config_for(duckdb_url, sandbox)
    state = sandbox.state
    state.create_list("Leavers", list_id=REMOVAL_LIST)
    everyone = [state.create_profile({"email": f"c{i}@example.com"}) for i in range(6)]
    state.add_members(REMOVAL_LIST, [p.id for p in everyone])
    load(wh, "leavers", members(4, segment="-"))
    assert sync(config, wh, sandbox, "leave").status == "success"
    assert listed(sandbox, REMOVAL_LIST) == {"c4@example.com", "c5@example.com"}

    clean = verify(config, wh, sandbox, "leave")
    assert (clean.checked, clean.in_step, sum(clean.drifted.values())) == (4, 4, 0)

    state.add_members(REMOVAL_LIST, [everyone[1].id])
    found = verify(config, wh, sandbox, "leave")
    assert found.drifted == {"still_a_member": 1} and found.in_step == 3
    assert (found.samples[0].key, found.samples[0].field) == ("c1", "list")

    assert verify(config, wh, sandbox, "leave", repair=True).repaired == 1
    again = sync(config, wh, sandbox, "leave")
    assert again.planned == {"added": 1}
    assert listed(sandbox, REMOVAL_LIST) == {"c4@example.com", "c5@example.com"}
    assert sum(verify(config, wh, sandbox, "leave").drifted.values()) == 0
