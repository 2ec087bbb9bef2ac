"""The `verify` asset check in real Dagster runs against the sandbox: after a sync it passes
with no drift; after drift made in the sandbox behind the project's back it fails with the
configured severity, the counts and sample drifts in its metadata, emails masked, nothing
written; `verify_schedule` runs the check alone; a bad `verify:` setting is a config error."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from klaviyo_pipelines import build_defs
from klaviyo_pipelines.config import ConfigError, parse_config
from klaviyo_pipelines.dagster_defs.assets import (
    PRIMARY_KEY_CHECK,
    REJECTED_SHARE_CHECK,
    snapshot_key,
    sync_key,
)
from klaviyo_pipelines.dagster_defs.build import build_executor, sync_selection
from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
from klaviyo_pipelines.dagster_defs.verify_check import VERIFY_CHECK, masked
from klaviyo_pipelines.definitions import build_definitions
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import state_table
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

LIST_ID = "VERIFIED"
SYNC = sync_key("profiles")
CHECK = dg.AssetCheckKey(SYNC, VERIFY_CHECK)
ROWS = 30


def config_text(url: str, base_url: str, verify: str) -> str:
    return f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base_url}"}}
models:
  customers: {{sql: "select * from shop.customers", primary_key: email}}
syncs:
  profiles:
    model: customers
    action: upsert_profile
    mapping: {{email: email, first_name: first_name, properties: {{referrer: referrer}}}}
    settings: {{list_id: {LIST_ID}}}
    verify: {verify}
"""


def load_customers(url: str) -> None:
    wh = Warehouse(url)
    try:
        with wh.engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
            conn.execute(sa.text("DROP TABLE IF EXISTS shop.customers"))
            conn.execute(
                sa.text(
                    "CREATE TABLE shop.customers"
                    " (email VARCHAR(100), first_name VARCHAR(100), referrer VARCHAR(100))"
                )
            )
            rows = [
                (f"user{i}@example.com", f"Name{i}", f"friend{i}@example.org") for i in range(ROWS)
            ]
            wh.bulk_insert(conn, "shop.customers", ["email", "first_name", "referrer"], rows)
    finally:
        wh.dispose()


def run_schedule(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """One tick of the verify schedule, run as Dagster would launch it."""
    schedule = defs.resolve_schedule_def("profiles_verify_schedule")
    job = defs.resolve_job_def(schedule.job_name)
    return job.execute_in_process(instance=instance, raise_on_error=False)


def test_the_check_passes_in_step_then_fails_on_drift_with_masked_samples(
    warehouse_url, sandbox
) -> None:
    verify = '{sample: all, severity: error, max_drift_share: 0.05, schedule: "0 6 * * *"}'
    config = parse_config(config_text(warehouse_url, sandbox.url, verify), "test.yaml")
    sandbox.state.create_list("Verified", list_id=LIST_ID)
    load_customers(warehouse_url)
    instance = dg.DagsterInstance.ephemeral()

    synced = materialize_syncs(config, ["profiles"], instance=instance)["profiles"]
    assert synced["status"] == "success" and synced["delivered"] == ROWS
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key
    assert not latest([CHECK]) and latest([dg.AssetCheckKey(SYNC, REJECTED_SHARE_CHECK)])

    defs = build_defs(config, executor=build_executor(config))
    clean = run_schedule(defs, instance)
    assert clean.success
    (evaluation,) = clean.get_asset_check_evaluations()
    assert (evaluation.asset_check_key, evaluation.passed) == (CHECK, True)
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    assert (metadata["verify/checked"], metadata["verify/in_step"]) == (ROWS, ROWS)
    assert metadata["verify/drifted"] == 0 and metadata["verify/drift_share"] == 0
    assert metadata["verify/samples"].records == []

    state = sandbox.state
    edited = state.find_profile(email="user3@example.com")
    edited.attributes["properties"]["referrer"] = "stranger@elsewhere.net"
    state.delete_profile(state.find_profile(email="user7@example.com").id)
    state.remove_members(LIST_ID, [state.find_profile(email="user11@example.com").id])
    requests = len(state.requests)

    drift = run_schedule(defs, instance)
    assert drift.success  # a failed check is a result, not a failed step
    (evaluation,) = drift.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    assert (metadata["verify/checked"], metadata["verify/in_step"]) == (ROWS, ROWS - 3)
    assert metadata["verify/drifted"] == 3 and metadata["verify/drift_share"] == 0.1
    assert metadata["verify/drifted_by_kind"] == {"different": 1, "missing": 1, "not_a_member": 1}
    assert metadata["verify/drifted_missing"] == 1 and metadata["verify/unchecked"] == 0
    samples = [r.data for r in metadata["verify/samples"].records]
    assert {r["kind"] for r in samples} == {"different", "missing", "not_a_member"}
    assert {r["key"] for r in samples} == {"u***@example.com"}  # user3, user7, user11 masked
    different = next(r for r in samples if r["kind"] == "different")
    assert different == {
        "key": "u***@example.com",
        "kind": "different",
        "field": "properties.referrer",
        "warehouse": "f***@example.org",
        "klaviyo": "s***@elsewhere.net",
    }

    logs = [str(event) for event in instance.all_logs(drift.run_id)]
    for full in ("user3@example.com", "friend3@example.org", "stranger@elsewhere.net"):
        assert not [line for line in logs if full in line]
    assert not [line for line in logs if TEST_API_KEY in line]
    # the check never repairs: reads only, and every row still recorded as delivered
    assert {r.method for r in state.requests[requests:]} == {"GET"}
    wh = Warehouse(warehouse_url)
    try:
        with wh.connect("count") as conn:
            table = wh.table(state_table("profiles"))
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == ROWS
    finally:
        wh.dispose()


def test_the_verify_schedule_targets_only_the_check_in_both_code_locations(
    duckdb_url, sandbox
) -> None:
    verify = '{schedule: "0 6 * * *"}'
    text = config_text(duckdb_url, sandbox.url, verify).replace(
        "    verify:", '    schedule: "0 * * * *"\n    verify:'
    )
    config = parse_config(text, "test.yaml")
    for defs in (build_defs(config), build_definitions(config)):
        schedule = defs.resolve_schedule_def("profiles_verify_schedule")
        assert schedule.cron_schedule == "0 6 * * *"
        job = defs.resolve_job_def(schedule.job_name)
        assert job.asset_layer.executable_asset_keys == set()
        assert set(job.asset_layer.asset_graph.asset_check_keys) >= {CHECK}
        assert [node.name for node in job.graph.node_defs] == ["klaviyo__profiles_verify"]
        check = defs.resolve_asset_graph().get(CHECK)
        assert check.blocking is False  # not blocking unless asked
        # the sync's own schedule and runs leave the verify check out
        sync_job = defs.resolve_job_def(defs.resolve_schedule_def("profiles_schedule").job_name)
        assert {n.name for n in sync_job.graph.node_defs} == {
            snapshot_key("customers").to_python_identifier(),
            SYNC.to_python_identifier(),
        }
    assert sync_selection(config, config.syncs["profiles"]).resolve_checks(
        build_defs(config).resolve_asset_graph()
    ) == {
        dg.AssetCheckKey(SYNC, REJECTED_SHARE_CHECK),
        dg.AssetCheckKey(snapshot_key("customers"), PRIMARY_KEY_CHECK),
    }
    without = parse_config(config_text(duckdb_url, sandbox.url, "{}"), "test.yaml")
    names = [s.name for s in build_defs(without).schedules or []]
    assert "profiles_verify_schedule" not in names  # the check still exists, unscheduled
    assert CHECK in build_defs(without).resolve_asset_graph().asset_check_keys


@pytest.mark.parametrize(
    ("verify", "key", "reason"),
    [
        ("{sample: 0}", "sample", "whole number >= 1 or all"),
        ("{sample: some}", "sample", "whole number >= 1 or all"),
        ("{seed: 1.5}", "seed", "whole number"),
        ("{severity: fatal}", "severity", "warn or error"),
        ("{max_drift_share: 2}", "max_drift_share", "at most 1"),
        ("{max_drift_share: -0.1}", "max_drift_share", "at least 0"),
        ("{blocking: maybe}", "blocking", "true or false"),
        ('{schedule: "daily"}', "schedule", "5-field cron"),
        ("{samples: 10}", "samples", "unknown key"),
        ("[1000]", None, "must be a mapping"),
    ],
)
def test_a_bad_verify_setting_is_a_config_error_naming_file_and_key(
    verify, key, reason, duckdb_url
) -> None:
    text = config_text(duckdb_url, "http://127.0.0.1:8765", verify)
    with pytest.raises(ConfigError) as error:
        parse_config(text, "shop.yaml")
    where = "syncs.profiles.verify" + (f".{key}" if key else "")
    assert error.value.path == "shop.yaml" and error.value.key == where
    assert reason in error.value.reason


def test_settings_are_read_and_defaults_are_a_warning_on_a_sample() -> None:
    config = parse_config(
        config_text("duckdb:///x.duckdb", "http://127.0.0.1:8765", "{}"), "test.yaml"
    )
    spec = config.syncs["profiles"].verify
    assert (spec.sample, spec.seed, spec.severity, spec.max_drift_share, spec.blocking) == (
        1000,
        None,
        "warn",
        0.01,
        False,
    )
    verify = "{sample: all, seed: 7, severity: ERROR, max_drift_share: 0, blocking: true}"
    config = parse_config(
        config_text("duckdb:///x.duckdb", "http://127.0.0.1:8765", verify), "test.yaml"
    )
    spec = config.syncs["profiles"].verify
    assert (spec.sample, spec.seed, spec.severity, spec.max_drift_share, spec.blocking) == (
        None,
        7,
        "error",
        0.0,
        True,
    )


def test_masking_keeps_the_first_letter_and_domain_of_every_address() -> None:
    sample = {"key": "ada.l@example.com", "values": ["x <grace@navy.mil>", 3, None]}
    assert masked(sample) == {"key": "a***@example.com", "values": ["x <g***@navy.mil>", 3, None]}
