"""`klaviyo-pipelines verify` over the demo's syncs of every action: a clean account verifies
with 0 drift (exit 0), drift of each kind made behind the project's back is found (exit 1),
`--repair` plus the next sync restores it, a configuration error exits 2, and `--output json`
keeps one shape."""

from __future__ import annotations

from klaviyo_pipelines.demo import DEMO_LIST_ID, DEMO_LIST_NAME, create_demo_warehouse
from klaviyo_pipelines.sandbox.state import Subscription, utcnow
from klaviyo_pipelines.warehouse.audiences import remembered_list
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines_tests.cli_runs import run, run_text, write_config

SYNCS = (
    "vips_to_list",  # Upsert Profile into a list
    "vips_leaving_list",  # Remove Profile, on deleted rows only
    "newsletter_subscribe",
    "newsletter_unsubscribe",  # on deleted rows only
    "product_views_to_klaviyo",  # Track Event
    "audiences_join",  # Add Profile To List (Engage)
    "audiences_leave",  # Remove Profile from List (Engage)
)
REPORT_KEYS = {
    "sync",
    "action",
    "delivered",
    "checked",
    "in_step",
    "drifted",
    "drifted_by_kind",
    "unchecked",
    "repaired",
    "samples",
}
SAMPLE_KEYS = {"key", "kind", "field", "warehouse", "klaviyo"}


def test_every_action_verifies_reports_drift_by_kind_and_repairs(
    duckdb_url, sandbox, tmp_path, capsys
):
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=60)
    sandbox.state.create_list(DEMO_LIST_NAME, list_id=DEMO_LIST_ID)
    config = write_config(tmp_path, duckdb_url, sandbox)
    select = ["--config", config]
    for name in SYNCS:
        select += ["--select", name]
    assert run(capsys, "sync", *select)[0] == 0

    code, clean = run(capsys, "verify", *select, "--all")
    assert (code, clean["status"], set(clean["syncs"])) == (0, "in_step", set(SYNCS))
    for name, report in clean["syncs"].items():
        assert set(report) == REPORT_KEYS, name
        assert (report["drifted"], report["samples"], report["repaired"]) == (0, [], 0), name
    for name in ("vips_leaving_list", "newsletter_unsubscribe"):
        report = clean["syncs"][name]
        assert report["checked"] == 0 and sum(report["unchecked"].values()) == report["delivered"]
    for name in ("vips_to_list", "newsletter_subscribe", "product_views_to_klaviyo"):
        report = clean["syncs"][name]
        assert report["checked"] == report["in_step"] == report["delivered"] > 0, name

    state = sandbox.state
    subscribed = next(
        pid
        for pid, channels in state.subscriptions.items()
        if "email.marketing" in channels and pid in state.profiles
    )
    state.set_consent(Subscription(subscribed, "email.marketing", "UNSUBSCRIBED", utcnow()))
    viewed = next(e for e in state.events if e.metric == "Viewed Product")
    assert state.delete_events("Viewed Product", [viewed.unique_id or ""]) == 1
    audience = remembered_list(Warehouse(duckdb_url), "audiences", "high_value")
    assert audience is not None
    member = sorted(state.list_members(audience.list_id))[0]
    state.remove_members(audience.list_id, [member])
    stranger = state.create_profile({"email": "stranger@example.com"})
    state.add_members(audience.list_id, [stranger.id])

    code, drift = run(capsys, "verify", *select, "--all")
    assert (code, drift["status"]) == (1, "drift")
    found = {name: report["drifted_by_kind"] for name, report in drift["syncs"].items()}
    assert found == {
        "vips_to_list": {},
        "vips_leaving_list": {},
        "newsletter_subscribe": {"consent_changed": 1},
        "newsletter_unsubscribe": {},
        "product_views_to_klaviyo": {"missing": 1},
        "audiences_join": {"not_a_member": 1},
        "audiences_leave": {"extra_member": 1},
    }
    for report in drift["syncs"].values():
        assert all(set(sample) == SAMPLE_KEYS for sample in report["samples"])
    consent = drift["syncs"]["newsletter_subscribe"]["samples"][0]
    assert (consent["field"], consent["warehouse"], consent["klaviyo"]) == (
        "email.marketing",
        "SUBSCRIBED",
        "UNSUBSCRIBED",
    )
    code, text, _ = run_text(capsys, "verify", *select, "--all")
    assert code == 1 and "extra_member list" in text and "consent_changed email.marketing" in text

    code, repaired = run(capsys, "verify", *select, "--all", "--repair")
    assert code == 1 and all(r["repaired"] > 0 for n, r in repaired["syncs"].items() if found[n])
    assert stranger.id not in state.list_members(audience.list_id)
    assert run(capsys, "sync", *select)[0] == 0
    code, after = run(capsys, "verify", *select, "--all")
    assert (code, after["status"]) == (0, "in_step")
    assert member in state.list_members(audience.list_id)
    assert state.consent(subscribed, "email.marketing") == "SUBSCRIBED"


def test_a_configuration_error_exits_2(duckdb_url, sandbox, tmp_path, capsys):
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, duckdb_url, sandbox)
    code, refused = run(capsys, "verify", "--config", config, "--select", "nope")
    assert code == 2 and "no sync named 'nope'" in refused["error"]
