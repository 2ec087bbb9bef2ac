"""Issue 14: one default-mapping rule for every action, Upsert Profile's list by name, a stable
namespace for derived identities (and `validate` warning of a renamed sync), one list check per
Unsubscribe run. Each runs on DuckDB and PostgreSQL through real HTTP to the sandbox.
"""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.events import derived_unique_id
from klaviyo_pipelines.actions.factory import build_action
from klaviyo_pipelines.cli.validate import rename_warnings
from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

COLUMNS = ["customer_id", "email", "phone_number", "country", "city", "zip", "event"]


def load(wh: Warehouse, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.people"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.people (" + ", ".join(f"{c} VARCHAR(255)" for c in COLUMNS) + ")"
            )
        )
        wh.bulk_insert(conn, "shop.people", COLUMNS, rows)


PEOPLE = [
    ("c1", "ava@example.com", None, "IN", "Pune", "411001", "Viewed"),
    ("c2", "ben@example.com", None, "GB", "Leeds", "LS1", "Viewed"),
]


def config_for(url: str, base: str, syncs: str) -> Config:
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}"}}
models:
  people: {{sql: "select * from shop.people", primary_key: customer_id}}
syncs:
{syncs}
""",
        "rules.yaml",
    )


def sync_yaml(name: str, action: str, mapping: str, settings: str = "{}", extra: str = "") -> str:
    lines = [
        f"  {name}:",
        "    model: people",
        f"    action: {action}",
        f"    mapping: {mapping}",
        f"    settings: {settings}",
        "    retry: {max_retries: 0}",
    ]
    return "\n".join(lines + ([f"    {extra}"] if extra else []))


def planned(config: Config, wh: Warehouse, name: str) -> dict:
    take_snapshot(wh, config.models["people"], config.path)
    report = plan_sync(config, name, wh, samples=1)
    return report.payload_samples[0]


def run(config: Config, wh: Warehouse, sandbox: Sandbox, name: str) -> SyncReport:
    take_snapshot(wh, config.models["people"], config.path)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.05) as client:
        report = run_sync(config, name, wh, client)
    assert report.status == "success", report.error
    return report


def columns_of(config: Config, wh: Warehouse) -> list[str]:
    from klaviyo_pipelines.warehouse.snapshot import model_columns

    with wh.engine.connect() as conn:
        return model_columns(wh, conn, config.models["people"], config.path)


# ---- item 4: one default-mapping rule --------------------------------------------------------


def test_a_column_mapped_explicitly_is_never_default_mapped_elsewhere(warehouse_url, sandbox):
    """A `country` column mapped as country_code no longer also becomes location.country (a
    first sync sent `"location":{"country":"IN"}`); `city` still maps by default, and the
    action names the fields that came from defaults."""
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    mapping = "{external_id: customer_id, country_code: country}"
    config = config_for(
        warehouse_url, sandbox.url, sync_yaml("profiles", "upsert_profile", mapping)
    )
    body = planned(config, wh, "profiles")
    profile = body["data"]["attributes"]["profiles"]["data"][0]["attributes"]
    assert profile["location"] == {"city": "Pune", "zip": "411001"}
    action = build_action(config.syncs["profiles"], columns_of(config, wh), config.path)
    assert action.default_mappings == {
        "email": "email",
        "phone_number": "phone_number",
        "location.city": "city",
        "location.zip": "zip",
    }
    wh.dispose()


def test_key_null_and_default_mappings_false_turn_defaults_off(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    nulls = "{external_id: customer_id, location: {city: null}, zip: null}"
    config = config_for(
        warehouse_url,
        sandbox.url,
        "\n".join(
            [
                sync_yaml("nulls", "upsert_profile", nulls.replace(", zip: null", "")),
                sync_yaml(
                    "none",
                    "upsert_profile",
                    "{external_id: customer_id}",
                    extra="default_mappings: false",
                ),
            ]
        ),
    )
    body = planned(config, wh, "nulls")
    profile = body["data"]["attributes"]["profiles"]["data"][0]["attributes"]
    assert profile["location"] == {"country": "IN", "zip": "411001"}  # no city
    body = planned(config, wh, "none")
    profile = body["data"]["attributes"]["profiles"]["data"][0]["attributes"]
    assert profile == {"external_id": "c1"}  # no email, no location: nothing by default
    wh.dispose()


@pytest.mark.parametrize(
    ("action", "settings"),
    [
        ("remove_profile", "{list_id: L1}"),
        ("subscribe_profile", "{}"),
        ("unsubscribe_profile", "{}"),
        ("track_event", "{metric_name: Viewed}"),
    ],
)
def test_key_null_turns_defaults_off_in_every_action(warehouse_url, action, settings):
    """Remove Profile, Subscribe and Unsubscribe used to map `email` even with `email: null`."""
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    columns = [*COLUMNS]
    base = "http://127.0.0.1:9"
    with_default = config_for(
        warehouse_url, base, sync_yaml("s", action, "{phone_number: phone_number}", settings)
    ).syncs["s"]
    assert build_action(with_default, columns, "rules.yaml").default_mappings == {"email": "email"}
    turned_off = config_for(
        warehouse_url,
        base,
        sync_yaml("s", action, "{phone_number: phone_number, email: null}", settings),
    ).syncs["s"]
    action_off = build_action(turned_off, columns, "rules.yaml")
    assert action_off.default_mappings == {}
    assert "email" not in action_off.columns
    none = config_for(
        warehouse_url,
        base,
        sync_yaml("s", action, "{phone_number: phone_number}", settings, "default_mappings: false"),
    ).syncs["s"]
    assert build_action(none, columns, "rules.yaml").default_mappings == {}
    # A column mapped explicitly elsewhere is not default-mapped to its namesake.
    elsewhere = config_for(
        warehouse_url, base, sync_yaml("s", action, "{phone_number: email}", settings)
    ).syncs["s"]
    assert build_action(elsewhere, columns, "rules.yaml").default_mappings == {}
    wh.dispose()


def test_default_mappings_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as caught:
        config_for(
            "duckdb:///:memory:",
            "http://127.0.0.1:9",
            sync_yaml("s", "upsert_profile", "{email: email}", extra="default_mappings: nope"),
        )
    assert caught.value.key == "syncs.s.default_mappings"


# ---- item 3: Upsert Profile's list by name -----------------------------------------------------


def test_upsert_profile_list_name_finds_or_creates_the_list_once(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    settings = '{list_name: "Newsletter", batch: false}'
    config = config_for(
        warehouse_url,
        sandbox.url,
        sync_yaml("profiles", "upsert_profile", "{external_id: customer_id}", settings),
    )
    plan = planned(config, wh, "profiles")
    assert plan["data"]["attributes"]["external_id"] == "c1"
    assert not sandbox.state.lists  # plan creates nothing
    run(config, wh, sandbox, "profiles")
    (made,) = sandbox.state.lists.values()
    assert made.name == "Newsletter"
    assert len(sandbox.state.list_members(made.id)) == 2

    # Renamed in Klaviyo: the remembered list is still used, no second one is made.
    sandbox.state.lists[made.id] = dataclasses.replace(made, name="Weekly")
    load(wh, [*PEOPLE, ("c3", "cy@example.com", None, None, None, None, None)])
    run(config, wh, sandbox, "profiles")
    assert list(sandbox.state.lists) == [made.id]
    assert len(sandbox.state.list_members(made.id)) == 3
    wh.dispose()


def test_upsert_profile_list_name_uses_a_list_of_that_exact_name(warehouse_url, sandbox):
    sandbox.state.create_list("Newsletter 2")
    existing = sandbox.state.create_list("Newsletter").id
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    config = config_for(
        warehouse_url,
        sandbox.url,
        sync_yaml(
            "profiles", "upsert_profile", "{external_id: customer_id}", "{list_name: Newsletter}"
        ),
    )
    run(config, wh, sandbox, "profiles")
    assert len(sandbox.state.lists) == 2
    assert len(sandbox.state.list_members(existing)) == 2
    wh.dispose()


def test_upsert_profile_takes_list_id_or_list_name_not_both() -> None:
    config = config_for(
        "duckdb:///:memory:",
        "http://127.0.0.1:9",
        sync_yaml("s", "upsert_profile", "{email: email}", "{list_id: L1, list_name: News}"),
    )
    with pytest.raises(ConfigError) as caught:
        build_action(config.syncs["s"], COLUMNS, config.path)
    assert caught.value.key == "syncs.s.settings.list_name"
    assert "not both" in caught.value.reason


# ---- item 6: a stable namespace for derived identities -----------------------------------------


def test_namespace_keeps_derived_event_ids_and_consent_source(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    event = sync_yaml("renamed", "track_event", "{email: email}", "{metric_name: Viewed}")
    subscribe = sync_yaml("consent", "subscribe_profile", "{email: email}")
    config = config_for(
        warehouse_url,
        sandbox.url,
        "\n".join([event + "\n    namespace: views", subscribe]),
    )
    body = planned(config, wh, "renamed")
    entry = body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]
    unique_id = entry["events"]["data"][0]["attributes"]["unique_id"]
    assert unique_id == derived_unique_id("views", "c1")
    assert planned(config, wh, "consent")["data"]["attributes"]["custom_source"] == (
        "klaviyo_pipelines:consent"  # no namespace: the sync's name, as before
    )
    named = config_for(warehouse_url, sandbox.url, subscribe + "\n    namespace: signups")
    assert planned(named, wh, "consent")["data"]["attributes"]["custom_source"] == (
        "klaviyo_pipelines:signups"
    )
    wh.dispose()


def test_validate_warns_when_a_sync_with_delivered_state_is_renamed(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    old = config_for(
        warehouse_url,
        sandbox.url,
        sync_yaml("views", "track_event", "{email: email}", "{metric_name: Viewed}"),
    )
    run(old, wh, sandbox, "views")
    renamed = sync_yaml("page_views", "track_event", "{email: email}", "{metric_name: Viewed}")
    other = sync_yaml("profiles", "upsert_profile", "{email: email}")
    (warning,) = rename_warnings(config_for(warehouse_url, sandbox.url, renamed + "\n" + other))
    assert warning.startswith("syncs.page_views: sync 'views', which delivered 2 rows")
    assert "syncs.page_views.namespace to 'views'" in warning
    kept = config_for(warehouse_url, sandbox.url, renamed + "\n    namespace: views")
    assert rename_warnings(kept) == []
    assert rename_warnings(old) == []
    wh.dispose()


# ---- item 7: Unsubscribe checks its list once per run --------------------------------------------


def test_unsubscribe_with_a_list_fetches_the_list_once(warehouse_url, sandbox):
    spring = sandbox.state.create_list("Spring").id
    wh = Warehouse(warehouse_url)
    load(wh, PEOPLE)
    config = config_for(
        warehouse_url,
        sandbox.url,
        sync_yaml("unsubs", "unsubscribe_profile", "{email: email}", f"{{list_id: {spring}}}"),
    )
    run(config, wh, sandbox, "unsubs")
    gets = [
        r for r in sandbox.state.requests if r.method == "GET" and r.path.startswith("/api/lists")
    ]
    assert len(gets) == 1
    wh.dispose()
