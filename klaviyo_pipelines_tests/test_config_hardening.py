"""A hostile or careless config file: alias bombs and recursive aliases end in a config error
at once; no error echoes a value read from the environment; `${VAR}` in model SQL is a bound
value, never SQL text; the API key goes to https, or to plain http on this machine only."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.factory import build_action
from klaviyo_pipelines.config import ConfigError, parse_config
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

BASE = """
warehouse: {url: "duckdb:///x.duckdb"}
models:
  customers: {table: analytics.customers, primary_key: customer_id}
syncs:
  profiles:
    model: customers
    action: upsert_profile
"""

LAUGHS = "\n".join(
    f"      {name}: &{name} [{', '.join([f'*{previous}'] * 9)}]"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
)
BOMB = (
    BASE + '    settings:\n      a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + LAUGHS
)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml")
    return caught.value


def test_an_alias_bomb_is_refused_at_once():
    assert len(BOMB) < 1000  # expanded: 9**8 * 7 = 301 million strings
    started = time.perf_counter()
    error = error_of(BOMB)
    assert time.perf_counter() - started < 1
    assert "aliases expanded" in error.reason and error.key.startswith("line ")


def test_a_long_string_repeated_by_aliases_is_refused_at_once():
    text = (
        BASE + f"    settings:\n      a: &a {'x' * 200_000}\n      b: [{', '.join(['*a'] * 60)}]\n"
    )
    started = time.perf_counter()
    assert "characters" in error_of(text).reason
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    "text",
    [
        BASE + "    settings: &s {list_id: *s}\n",
        "models: &m {customers: {table: t, primary_key: id, x: *m}}\n",
        "a: &a [*a]\n",
    ],
)
def test_a_recursive_alias_is_a_config_error(text):
    assert "contains it" in error_of(text).reason


def test_a_document_nested_too_deeply_is_a_config_error():
    assert "nested too deeply" in error_of("a: " + "[" * 5000 + "]" * 5000 + "\n").reason


def test_anchors_and_aliases_still_share_settings():
    text = BASE.replace(
        "    action: upsert_profile\n",
        "    action: upsert_profile\n    settings: &shared {batch_size: 10, country_code: GB}\n"
        "  again:\n    model: customers\n    action: upsert_profile\n"
        "    settings: {<<: *shared, batch_size: 20}\n"
        "  twice:\n    model: customers\n    action: upsert_profile\n    settings: *shared\n",
    )
    syncs = parse_config(text, "c.yaml").syncs
    assert syncs["profiles"].settings == syncs["twice"].settings
    assert syncs["twice"].settings == {"batch_size": 10, "country_code": "GB"}
    assert syncs["again"].settings == {"batch_size": 20, "country_code": "GB"}


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("models:", 'klaviyo: {revision: "${SECRET}"}\nmodels:', "klaviyo.revision"),
        ("models:", 'klaviyo: {timeout_seconds: "${SECRET}"}\nmodels:', "klaviyo.timeout_seconds"),
        ("models:", 'klaviyo: {base_url: "${SECRET}"}\nmodels:', "klaviyo.base_url"),
        ('url: "duckdb:///x.duckdb"', 'state_schema: "${SECRET}"', "warehouse.state_schema"),
        ("table: analytics.customers", 'table: "a.${SECRET}"', "models.customers.table"),
        ("model: customers", 'model: "${SECRET}"', "syncs.profiles.model"),
        ("action: upsert_profile", 'action: "${SECRET}"', "syncs.profiles.action"),
        (
            "table: analytics.customers",
            'table: t, partition: {column: c, start: "${SECRET}"}',
            "models.customers.partition.start",
        ),
        (
            "action: upsert_profile",
            'action: upsert_profile\n    schedule: "${SECRET}"',
            "syncs.profiles.schedule",
        ),
    ],
)
def test_config_errors_name_the_variable_never_its_value(old, new, key, monkeypatch):
    monkeypatch.setenv("SECRET", f"{TEST_API_KEY}!")  # no valid name, revision, date, ...
    error = error_of(BASE.replace(old, new))
    assert error.key == key
    assert TEST_API_KEY not in str(error) and "${SECRET}" in str(error)


def test_action_errors_name_the_variable_never_its_value(monkeypatch):
    monkeypatch.setenv("SECRET", TEST_API_KEY)
    for settings in ('{batch: "${SECRET}"}', '{country_code: "x${SECRET}"}'):
        sync = parse_config(BASE + f"    settings: {settings}\n", "c.yaml").syncs["profiles"]
        with pytest.raises(ConfigError) as caught:
            build_action(sync, ["customer_id", "email"], "c.yaml")
        assert TEST_API_KEY not in str(caught.value) and "${SECRET}" in str(caught.value)


def test_a_variable_in_model_sql_becomes_a_bound_parameter(monkeypatch):
    monkeypatch.setenv("TIER", "basic' or '1'='1")
    monkeypatch.delenv("REGION", raising=False)
    text = """
models:
  customers:
    primary_key: id
    sql: |
      select * from c -- not ${IN_A_COMMENT}
      where tier = ${TIER} and region = ${REGION:-EU} and tier <> ${TIER} /* ${NOR_HERE} */
syncs: {profiles: {model: customers, action: upsert_profile}}
"""
    model = parse_config(text, "c.yaml").models["customers"]
    assert model.sql == (
        "select * from c -- not ${IN_A_COMMENT}\n"
        "where tier = :kp_env_0 and region = :kp_env_1 and tier <> :kp_env_2 /* ${NOR_HERE} */\n"
    )
    assert model.sql_params == {
        "kp_env_0": "basic' or '1'='1",
        "kp_env_1": "EU",
        "kp_env_2": "basic' or '1'='1",
    }
    hash(model)  # still a frozen, hashable spec


@pytest.mark.parametrize(
    "sql",
    [
        "select * from c where tier = '${TIER}'",
        "select * from c where tier = 'x ${TIER} y'",
        'select "${TIER}" from c',
        "select * from c where tier = $$${TIER}$$",
    ],
)
def test_a_variable_inside_quotes_in_model_sql_is_refused(sql, monkeypatch):
    monkeypatch.setenv("TIER", "basic")
    error = error_of(BASE.replace("table: analytics.customers", f"sql: {sql!r}"))
    assert error.key == "models.customers.sql"
    assert "unquoted" in error.reason and "${TIER}" in error.reason


def test_an_unset_variable_in_model_sql_names_it(monkeypatch):
    monkeypatch.delenv("TIER", raising=False)
    sql = "select * from c where tier = ${TIER}"
    error = error_of(BASE.replace("table: analytics.customers", f"sql: {sql!r}"))
    assert error.key == "models.customers.sql" and "TIER is not set" in error.reason


def test_a_hostile_variable_cannot_rewrite_the_model_query(warehouse_url, monkeypatch):
    wh = Warehouse(warehouse_url)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS h"))
        conn.execute(sa.text("DROP TABLE IF EXISTS h.people"))
        conn.execute(sa.text("CREATE TABLE h.people (id INTEGER, tier VARCHAR)"))
        conn.execute(sa.text("INSERT INTO h.people VALUES (1, 'basic'), (2, 'gold'), (3, 'basic')"))
    text = f"""
warehouse: {{url: "{warehouse_url}"}}
models:
  people: {{sql: "select * from h.people where tier = ${{TIER}}", primary_key: id}}
syncs: {{s: {{model: people, action: upsert_profile}}}}
"""
    monkeypatch.setenv("TIER", "basic' or '1'='1")
    config = parse_config(text, "c.yaml")
    assert take_snapshot(wh, config.models["people"], config.path).rows == 0
    monkeypatch.setenv("TIER", "basic")
    config = parse_config(text, "c.yaml")
    assert take_snapshot(wh, config.models["people"], config.path).rows == 2
    wh.dispose()


def test_a_variable_still_names_a_model_table(monkeypatch):
    monkeypatch.setenv("SCHEMA", "analytics")
    text = BASE.replace("table: analytics.customers", 'table: "${SCHEMA}.customers"')
    assert parse_config(text, "c.yaml").models["customers"].table == "analytics.customers"
    monkeypatch.setenv("SCHEMA", "analytics; drop table x")
    assert "not a valid name" in error_of(text).reason


@pytest.mark.parametrize(
    "url",
    [
        "https://a.klaviyo.com",
        "https://a.klaviyo.com/",
        "http://127.0.0.1:8765",
        "http://127.8.9.10:80",
        "http://[::1]:8765",
        "http://localhost:8765",
    ],
)
def test_klaviyo_is_https_or_this_machine(url):
    text = BASE.replace("models:", f'klaviyo: {{base_url: "{url}"}}\nmodels:')
    assert parse_config(text, "c.yaml").klaviyo.base_url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://a.klaviyo.com",
        "http://10.0.0.5:8765",
        "http://localhost.example.com",
        "ftp://a.klaviyo.com",
        "a.klaviyo.com",
        "https://",
        "file:///etc/passwd",
    ],
)
def test_plain_http_elsewhere_and_other_schemes_are_refused(url):
    error = error_of(BASE.replace("models:", f'klaviyo: {{base_url: "{url}"}}\nmodels:'))
    assert error.key == "klaviyo.base_url" and "https://" in error.reason
