"""Each Klaviyo account's sync steps get their own Dagster concurrency pool: rate limits are
per account, so two accounts must not queue behind one slot. The pool is named after the
variable holding the account's key, never the key itself, unless klaviyo.pool names it."""

from __future__ import annotations

import pytest

from klaviyo_pipelines import build_defs
from klaviyo_pipelines.config import ConfigError, parse_config
from klaviyo_pipelines_tests.conftest import TEST_API_KEY


def pools(duckdb_url: str, klaviyo: str) -> set[str]:
    config = parse_config(
        f"""
warehouse: {{url: "{duckdb_url}"}}
klaviyo: {{{klaviyo}}}
models: {{customers: {{table: shop.customers, primary_key: id}}}}
syncs: {{profiles: {{model: customers, action: upsert_profile}}}}
""",
        "test.yaml",
    )
    graph = build_defs(config).resolve_asset_graph()
    return {pool for key in graph.get_all_asset_keys() for pool in graph.get(key).pools or ()}


def test_two_accounts_get_two_pools_and_the_key_is_in_neither(duckdb_url, monkeypatch):
    monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("KLAVIYO_EU_KEY", "pk_eu_5a4b3c2d1e")
    assert pools(duckdb_url, 'api_key: "${KLAVIYO_API_KEY}"') == {"klaviyo"}
    eu = pools(duckdb_url, 'api_key: "${KLAVIYO_EU_KEY}"')
    assert eu == {"klaviyo_klaviyo_eu_key"} and "pk_eu" not in str(eu)
    assert pools(duckdb_url, 'api_key: "${KLAVIYO_EU_KEY}", pool: europe') == {"europe"}
    with pytest.raises(ConfigError, match=r"klaviyo\.pool"):
        pools(duckdb_url, 'api_key: "${KLAVIYO_EU_KEY}", pool: "two words"')
