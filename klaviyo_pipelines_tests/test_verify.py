"""verify reads Klaviyo back: after a sync, drift made in the sandbox behind the project's back
(a field edited, a profile deleted, a member removed from the list) is found with its kind and
field; --repair plus the next sync restores exact equality; a clean account has no drift."""

from __future__ import annotations

from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.verify import verify_sync
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines_tests.cli_runs import run, write_config
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.test_upsert_profile_sync import config_for, customers, load, sync

LIST_ID = "VERIFY"


def verify(config, wh, sandbox, **options):  # type: ignore[no-untyped-def]
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.2) as client:
        return verify_sync(config, "profiles", wh, client, **options)


def test_drift_is_found_by_kind_and_field_and_repair_restores_it(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    sandbox.state.create_list("Verified", list_id=LIST_ID)
    load(wh, customers(30))
    config = config_for(warehouse_url, sandbox, settings=f"{{list_id: {LIST_ID}}}")
    assert sync(config, wh, sandbox).status == "success"

    clean = verify(config, wh, sandbox, sample=None)
    assert (clean.delivered, clean.checked, clean.in_step) == (30, 30, 30)
    assert sum(clean.drifted.values()) == 0 and not clean.samples

    state = sandbox.state
    edited = state.find_profile(email="user3@example.com")
    edited.attributes["first_name"] = "Edited in the UI"
    state.delete_profile(state.find_profile(email="user7@example.com").id)
    state.remove_members(LIST_ID, [state.find_profile(email="user11@example.com").id])
    requests = len(state.requests)

    found = verify(config, wh, sandbox, sample=None)
    assert found.drifted == {"different": 1, "missing": 1, "not_a_member": 1}
    assert found.in_step == 27 and found.repaired == 0
    by_key = {d.key: d for d in found.samples}
    assert (by_key["c0003"].kind, by_key["c0003"].field) == ("different", "first_name")
    assert (by_key["c0003"].warehouse, by_key["c0003"].klaviyo) == ("Name3", "Edited in the UI")
    assert by_key["c0007"].kind == "missing"
    assert (by_key["c0011"].kind, by_key["c0011"].field) == ("not_a_member", "list")
    assert all(r.method == "GET" for r in state.requests[requests:])  # read quotas only

    sampled = verify(config, wh, sandbox, sample=10, seed=4)
    assert sampled.checked == 10
    assert verify(config, wh, sandbox, sample=10, seed=4).to_dict() == sampled.to_dict()

    repaired = verify(config, wh, sandbox, sample=None, repair=True)
    assert repaired.repaired == 3
    again = sync(config, wh, sandbox)
    assert again.planned == {"added": 3} and sum(again.delivered.values()) == 3
    after = verify(config, wh, sandbox, sample=None)
    assert (after.checked, after.in_step, sum(after.drifted.values())) == (30, 30, 0)


def test_the_cli_prints_one_json_object_and_exits_1_on_drift(duckdb_url, sandbox, tmp_path, capsys):
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=40)
    config = write_config(tmp_path, duckdb_url, sandbox)
    select = ("--config", config, "--select", "customers_to_klaviyo", "--output", "json")
    assert run(capsys, "sync", *select)[0] == 0

    code, clean = run(capsys, "verify", *select, "--all")
    report = clean["syncs"]["customers_to_klaviyo"]
    assert (code, clean["status"], report["drifted"]) == (0, "in_step", 0)
    assert report["checked"] == report["delivered"] > 0

    profile = next(iter(sandbox.state.profiles.values()))
    profile.attributes["properties"]["loyalty_tier"] = "edited"
    code, drift = run(capsys, "verify", *select, "--all")
    report = drift["syncs"]["customers_to_klaviyo"]
    assert (code, drift["status"], report["drifted_by_kind"]) == (1, "drift", {"different": 1})
    assert report["samples"][0]["field"] == "properties.loyalty_tier"
