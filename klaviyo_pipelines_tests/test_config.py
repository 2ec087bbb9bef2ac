"""The YAML contract: every mistake stops with one message naming the file, the key and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.config import ConfigError, load_config, parse_config

BASE = """
warehouse:
  url: duckdb:///x.duckdb
klaviyo:
  api_key: ${KLAVIYO_API_KEY}
models:
  customers:
    sql: select * from analytics.customers
    primary_key: customer_id
syncs:
  customers_to_klaviyo:
    model: customers
    action: upsert_profile
    on: [added, updated]
    mapping: {email: email}
"""


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "conf.yaml")
    return caught.value


def test_the_documented_example_parses_with_defaults() -> None:
    config = parse_config(BASE, "conf.yaml")
    sync = config.syncs["customers_to_klaviyo"]
    assert sync.on == (ChangeKind.ADDED, ChangeKind.UPDATED)
    assert config.warehouse.state_schema == "klaviyo_sync"
    assert config.klaviyo.base_url == "https://a.klaviyo.com"
    assert config.klaviyo.revision == "2026-07-15"
    assert config.klaviyo.api_key.env_var == "KLAVIYO_API_KEY"


def test_environment_variables_are_interpolated_with_defaults(monkeypatch) -> None:
    monkeypatch.setenv("WH", "duckdb:///from_env.duckdb")
    monkeypatch.delenv("BASE", raising=False)
    text = BASE.replace("duckdb:///x.duckdb", "${WH}").replace(
        "api_key: ${KLAVIYO_API_KEY}",
        "api_key: ${KLAVIYO_API_KEY}\n  base_url: ${BASE:-http://127.0.0.1:9}",
    )
    config = parse_config(text, "conf.yaml")
    assert config.warehouse.url == "duckdb:///from_env.duckdb"
    assert config.klaviyo.base_url == "http://127.0.0.1:9"


def test_unset_variable_without_default_names_the_key(monkeypatch) -> None:
    monkeypatch.delenv("NOPE", raising=False)
    error = error_of(BASE.replace("duckdb:///x.duckdb", "${NOPE}"))
    assert error.key == "warehouse.url" and "NOPE" in error.reason
    assert str(error).startswith("conf.yaml: warehouse.url:")


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (
            ("upsert_profile", "track_everything"),
            "syncs.customers_to_klaviyo.action",
            "unknown action",
        ),
        (
            ("[added, updated]", "[added, deleted]"),
            "syncs.customers_to_klaviyo.on",
            "does not accept 'deleted'",
        ),
        (("[added, updated]", "[created]"), "syncs.customers_to_klaviyo.on", "unknown change kind"),
        (
            ("model: customers", "model: orders"),
            "syncs.customers_to_klaviyo.model",
            "unknown model",
        ),
        (("    primary_key: customer_id\n", ""), "models.customers.primary_key", "is required"),
        (
            ("api_key: ${KLAVIYO_API_KEY}", "api_key: pk_live_abc"),
            "klaviyo.api_key",
            "environment variable",
        ),
        (
            ("api_key: ${KLAVIYO_API_KEY}", "api_key: ${K:-pk_live}"),
            "klaviyo.api_key",
            "without a default",
        ),
        (
            ("mapping: {email: email}", "mapping: {email: email}\n    colour: red"),
            "syncs.customers_to_klaviyo.colour",
            "unknown key",
        ),
        (
            ("customers_to_klaviyo:", "customers-to-klaviyo:"),
            "syncs.customers-to-klaviyo",
            "not a valid name",
        ),
    ],
)
def test_config_errors_name_the_place(change: tuple[str, str], key: str, words: str) -> None:
    error = error_of(BASE.replace(*change))
    assert error.key == key
    assert words in error.reason
    assert error.path == "conf.yaml"


def test_an_action_without_a_module_yet_is_recognised_but_refused(monkeypatch) -> None:
    from klaviyo_pipelines.actions.registry import ACTIONS, ActionInfo

    monkeypatch.setitem(
        ACTIONS, "sync_list", ActionInfo("sync_list", "Sync List", frozenset({ChangeKind.ADDED}))
    )
    text = BASE.replace("upsert_profile", "sync_list").replace("[added, updated]", "[added]")
    assert "not available" in error_of(text).reason


def test_engage_actions_need_an_audience_model() -> None:
    text = BASE.replace("upsert_profile", "add_profile_to_list").replace(
        "[added, updated]", "[added]"
    )
    error = error_of(text)
    assert error.key == "syncs.customers_to_klaviyo.model"
    assert "needs an 'audience' block" in error.reason


def test_bad_yaml_names_the_line() -> None:
    error = error_of(BASE + "  bad: [unclosed\n")
    assert "invalid YAML" in error.reason and error.key.startswith("line ")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_config_path_comes_from_environment_then_cwd_then_bundled_demo(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KLAVIYO_PIPELINES_CONFIG", raising=False)
    assert "<bundled" in load_config().path
    (tmp_path / "klaviyo_pipelines.yaml").write_text(BASE)
    assert load_config().path.endswith("klaviyo_pipelines.yaml")
    other = tmp_path / "other.yaml"
    other.write_text(BASE)
    monkeypatch.setenv("KLAVIYO_PIPELINES_CONFIG", str(other))
    assert load_config().path == str(other)


@pytest.mark.parametrize(
    ("action", "settings", "key", "words"),
    [
        ("upsert_profile", '{batch: "false"}', "batch", "must be true or false"),
        ("remove_profile", '{batch: "no", list_id: L1}', "batch", "must be true or false"),
        ("subscribe_profile", "{batch: 1, list_id: L1}", "batch", "must be true or false"),
        ("upsert_profile", "{job_timeout_seconds: soon}", "job_timeout_seconds", "positive"),
        ("upsert_profile", "{job_timeout_seconds: 0}", "job_timeout_seconds", "positive"),
    ],
)
def test_setting_types_are_checked_by_every_action(action, settings, key, words) -> None:
    """A quoted "false" is a string, which Python reads as true: refused, not obeyed backwards."""
    from klaviyo_pipelines.actions.factory import build_action

    text = BASE.replace("upsert_profile", action)
    if action != "upsert_profile":
        text = text.replace("[added, updated]", "[deleted]" if "remove" in action else "[added]")
    config = parse_config(text + f"    settings: {settings}\n", "conf.yaml")
    sync = config.syncs["customers_to_klaviyo"]
    with pytest.raises(ConfigError) as caught:
        build_action(sync, ["customer_id", "email"], "conf.yaml")
    assert caught.value.key == f"syncs.customers_to_klaviyo.settings.{key}"
    assert words in caught.value.reason
