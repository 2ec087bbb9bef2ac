"""`validate`: every problem in the config and against the warehouse, each naming file, key and
reason, exit 2; a sound config exits 0. Runs on DuckDB and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines_tests.cli_runs import run, run_text, write_config


def test_a_sound_config_is_valid(tmp_path, warehouse_url, sandbox, capsys) -> None:
    create_demo_warehouse(warehouse_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, warehouse_url, sandbox)
    code, result = run(capsys, "--config", config, "validate")
    assert code == 0
    assert result["valid"] is True and result["errors"] == [] and "error" not in result
    assert result["config"] == config and "customers_to_klaviyo" in result["syncs"]


def test_every_problem_is_reported_with_file_key_and_reason(
    tmp_path, warehouse_url, sandbox, capsys, monkeypatch
) -> None:
    create_demo_warehouse(warehouse_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, warehouse_url, sandbox)
    text = Path(config).read_text()
    text = text.replace("email: email", "email: e_mail", 1)  # customers_to_klaviyo's mapping
    text = text.replace("table: analytics.product_views", "table: analytics.no_such_table")
    text = text.replace("partition: {column: placed_at,", "partition: {column: placed_on,")
    text = text.replace("audience: {column: audience}", "audience: {column: segment}")
    Path(config).write_text(text)
    monkeypatch.delenv("KLAVIYO_API_KEY")

    code, result = run(capsys, "--config", config, "validate")

    assert code == 2 and result["valid"] is False
    found = {e["key"]: e["reason"] for e in result["errors"]}
    assert all(e["file"] == config for e in result["errors"])
    assert found.keys() == {
        "klaviyo.api_key",
        "models.product_views.table",
        "models.orders.partition.column",
        "models.audiences.audience.column",
        "syncs.customers_to_klaviyo.mapping.email",
    }  # the syncs of broken models are not reported a second time
    assert "KLAVIYO_API_KEY is not set" in found["klaviyo.api_key"]
    assert found["models.product_views.table"].startswith("cannot be read:")
    assert "'placed_on' is not in the model" in found["models.orders.partition.column"]
    assert "'segment' is not in the model" in found["models.audiences.audience.column"]
    assert (
        "'e_mail' is not in model 'customers'" in found["syncs.customers_to_klaviyo.mapping.email"]
    )
    assert config in result["error"]

    code, out, err = run_text(capsys, "--config", config, "validate")
    assert code == 2 and out == ""
    assert f"{config}: syncs.customers_to_klaviyo.mapping.email: column 'e_mail'" in err
    assert f"{config}: klaviyo.api_key: environment variable KLAVIYO_API_KEY" in err
    assert f"5 problem(s) in {config}" in err


def test_the_file_and_the_warehouse_connection(tmp_path, duckdb_url, sandbox, capsys) -> None:
    config = write_config(tmp_path, duckdb_url, sandbox)
    Path(config).write_text(Path(config).read_text().replace("models:", "models: [", 1))
    code, result = run(capsys, "--config", config, "validate")
    assert code == 2 and result["syncs"] == []
    [error] = result["errors"]
    assert error["file"] == config and error["key"].startswith("line ")
    assert "invalid YAML" in error["reason"]

    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    config = write_config(tmp_path, unreachable, sandbox)
    code, result = run(capsys, "--config", config, "validate")
    assert code == 2
    [error] = result["errors"]
    assert error["key"] == "warehouse.url" and error["reason"].startswith("cannot connect:")


def test_sync_without_the_key_is_a_config_error_not_a_traceback(
    tmp_path, duckdb_url, sandbox, capsys, monkeypatch
) -> None:
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=10)
    config = write_config(tmp_path, duckdb_url, sandbox)
    monkeypatch.delenv("KLAVIYO_API_KEY")
    code, result = run(capsys, "--config", config, "sync", "--select", "customers_to_klaviyo")
    assert code == 2 and "Traceback" not in result["error"]
    [error] = result["errors"]
    assert error["key"] == "klaviyo.api_key" and "KLAVIYO_API_KEY is not set" in error["reason"]
    assert sandbox.state.requests == []
