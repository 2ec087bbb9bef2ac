"""The warehouse password reaches Dagster only as an `EnvVar`: no run config, snapshot or event
the instance stores, and no repr or str of a resource, shows it; a password written into the
file is refused."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.remote_representation.external_data import RepositorySnap

from klaviyo_pipelines.config import ConfigError, parse_config
from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
from klaviyo_pipelines.dagster_defs.resources import WarehouseResource
from klaviyo_pipelines.definitions import build_definitions, build_resources
from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "Pw_s3cret_7c1e9a4b"  # PostgreSQL's trust authentication ignores it
SYNC = "customers_to_klaviyo"


def demo_config_text(sandbox: Sandbox) -> str:
    """The bundled demo config, its warehouse still `${WAREHOUSE_URL:-...}`."""
    text = (REPO / "klaviyo_pipelines" / "demo_config.yaml").read_text()
    return text.replace("${KLAVIYO_BASE_URL:-http://127.0.0.1:8765}", sandbox.url)


def stored_by(instance: dg.DagsterInstance) -> list[str]:
    """Everything the instance keeps about its runs: run config, tags, job and execution plan
    snapshots (where resource config lives), and every event."""
    texts = []
    for record in instance.get_run_records():
        run = record.dagster_run
        texts.append(dg.serialize_value(run))
        texts.append(dg.serialize_value(instance.get_job_snapshot(run.job_snapshot_id)))
        plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        texts.append(dg.serialize_value(plan))
        texts += [dg.serialize_value(entry) for entry in instance.all_logs(run.run_id)]
    return texts


def test_a_password_from_the_environment_is_nowhere_dagster_stores_or_shows(
    postgres_url, sandbox, monkeypatch, capsys
):
    url = sa.make_url(postgres_url).set(password=PASSWORD)
    secret_url = url.render_as_string(hide_password=False)
    create_demo_warehouse(secret_url, "klaviyo_sync", customers=50)
    monkeypatch.setenv("WAREHOUSE_URL", secret_url)
    config = parse_config(demo_config_text(sandbox), "demo.yaml")
    assert config.warehouse.url_env == "WAREHOUSE_URL"

    instance = dg.DagsterInstance.ephemeral()
    report = materialize_syncs(config, [SYNC], instance=instance)[SYNC]
    assert report["status"] == "success" and report["delivered"] > 40  # it connected

    stored = stored_by(instance)
    assert any("WAREHOUSE_URL" in text for text in stored)  # the resource config is in there
    defs = build_definitions(config)
    # what the code server hands the UI: GraphQL's `configuredValues` are read from this
    served = RepositorySnap.from_def(defs.get_repository_def())
    (warehouse,) = [r for r in served.resources if r.name == "klaviyo_warehouse"]
    assert warehouse.configured_values["url"].name == "WAREHOUSE_URL"
    stored.append(dg.serialize_value(served))
    resolved = WarehouseResource(url=secret_url)  # as a step holds it, the EnvVar resolved
    shown = [
        repr(config),
        repr(build_resources(config)),
        repr(defs.resources),
        repr(resolved),
        str(resolved),
        f"{resolved}",
        *capsys.readouterr(),
    ]
    assert "127.0.0.1" in repr(resolved)  # the URL is shown, its password masked
    for text in stored + shown:
        assert PASSWORD not in text


def test_an_unset_variable_falls_back_to_its_default(duckdb_url, sandbox, monkeypatch):
    monkeypatch.delenv("WAREHOUSE_URL", raising=False)
    text = demo_config_text(sandbox).replace("duckdb:///klaviyo_demo.duckdb", duckdb_url)
    config = parse_config(text, "demo.yaml")
    assert config.warehouse.url == duckdb_url and config.warehouse.url_env is None
    create_demo_warehouse(duckdb_url, "klaviyo_sync", customers=20)
    report = materialize_syncs(config, [SYNC], instance=dg.DagsterInstance.ephemeral())[SYNC]
    assert report["status"] == "success" and report["delivered"] > 10


CONFIG = """
warehouse: {{url: "{url}"}}
models: {{m: {{table: t, primary_key: id}}}}
syncs: {{s: {{model: m, action: upsert_profile}}}}
"""


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://retl:{PASSWORD}@db.example/analytics",
        f"postgresql+psycopg://retl@db.example/analytics?password={PASSWORD}",
        f"${{WAREHOUSE_URL:-postgresql+psycopg://retl:{PASSWORD}@db.example/analytics}}",
        "postgresql+psycopg://retl:${WAREHOUSE_PASSWORD}@db.example/analytics",
    ],
)
def test_a_password_written_into_the_file_is_refused(url, monkeypatch):
    monkeypatch.setenv("WAREHOUSE_URL", "duckdb:///x.duckdb")
    monkeypatch.setenv("WAREHOUSE_PASSWORD", PASSWORD)
    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG.format(url=url), "c.yaml")
    assert caught.value.key == "warehouse.url"
    assert "environment variable" in caught.value.reason
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "duckdb:///x.duckdb",
        "postgresql+psycopg://retl@db.example/analytics",
        "mysql+pymysql://retl@db.example/analytics",
    ],
)
def test_a_url_without_a_password_may_be_written_out(url):
    config = parse_config(CONFIG.format(url=url), "c.yaml")
    assert config.warehouse.url == url and config.warehouse.url_env is None
    resource = build_resources(config)["klaviyo_warehouse"]
    assert resource.url == url and not isinstance(resource.url, dg.EnvVar)
