"""`build_defs` in a user's project: docs/dagster.md's example merged with the user's asset,
lineage, declarative automation, delivery to the sandbox, and an import that reads nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from klaviyo_pipelines import KlaviyoAssetProps, KlaviyoTranslator, build_defs
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.dagster_defs.metadata import snapshot_metadata, sync_metadata
from klaviyo_pipelines.runner import SyncReport
from klaviyo_pipelines.warehouse.snapshot import SnapshotStats

DOC = Path(__file__).resolve().parents[1] / "docs" / "dagster.md"
UPSTREAM = dg.AssetKey(["analytics", "customers"])
SNAPSHOT = dg.AssetKey(["klaviyo_pipelines", "warehouse", "customers"])
SYNC = dg.AssetKey(["klaviyo_pipelines", "klaviyo", "customers_to_klaviyo"])


def doc_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "klaviyo_pipelines.yaml").write_text(doc_block("yaml", "key_prefix: klaviyo"))
    return tmp_path


def project(url: str, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    """docs/dagster.md's user project, run as written against the warehouse at `url`."""
    monkeypatch.setenv("WAREHOUSE_URL", url)
    namespace: dict[str, Any] = {}
    exec(doc_block("python", "CREATE TABLE analytics.customers"), namespace)
    return namespace["defs"]


def test_the_users_asset_is_upstream_of_the_snapshot_and_nothing_clashes(
    chdir_tmp, duckdb_url, sandbox, monkeypatch
) -> None:
    defs = project(duckdb_url, monkeypatch)
    graph = defs.resolve_asset_graph()
    assert graph.get(SNAPSHOT).parent_keys == {UPSTREAM}
    assert graph.get(SYNC).parent_keys == {SNAPSHOT}
    assert set(defs.resources or {}) == {"klaviyo_warehouse", "klaviyo_api"}
    assert defs.executor is None  # the user's choice, not ours
    assert graph.get(SNAPSHOT).kinds == {"sql", "duckdb"}
    assert graph.get(SYNC).kinds == {"klaviyo", "duckdb"}
    assert graph.get(SYNC).owners == ["team:crm"]
    assert graph.get(SYNC).automation_condition is not None
    assert graph.get(UPSTREAM).automation_condition is None
    # a user's own `warehouse` resource and executor merge without a clash
    mine = dg.Definitions(resources={"warehouse": object()}, executor=dg.in_process_executor)
    merged = dg.Definitions.merge(defs, mine)
    assert set(merged.resources or {}) == {"warehouse", "klaviyo_warehouse", "klaviyo_api"}


def test_the_upstream_materializing_requests_the_snapshot_and_sync_which_deliver(
    chdir_tmp, warehouse_url, sandbox, monkeypatch
) -> None:
    defs = project(warehouse_url, monkeypatch)
    assets = list(defs.assets or [])
    instance = dg.DagsterInstance.ephemeral()

    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert before.total_requested == 0  # the upstream has never been built

    upstream = dg.materialize(
        assets, selection=[UPSTREAM], resources=defs.resources, instance=instance
    )
    assert upstream.success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    requested = {key for key in (UPSTREAM, SNAPSHOT, SYNC) if after.get_num_requested(key)}
    assert requested == {SNAPSHOT, SYNC} and after.total_requested == 2

    run = dg.materialize(
        assets,
        selection=sorted(requested, key=str),
        resources=defs.resources,
        instance=instance,
    )
    assert run.success
    emails = {p.email for p in sandbox.state.profiles.values()}
    assert emails == {"ada@example.com", "grace@example.com"}

    snapshot = instance.get_latest_materialization_event(SNAPSHOT).asset_materialization.metadata
    assert snapshot["dagster/row_count"].value == 2
    # a plain table is read where it is (`snapshot: direct`): the asset names it, copies nothing
    assert snapshot["dagster/table_name"].value == "analytics.customers"
    assert snapshot["warehouse/snapshot"].value == "direct"
    columns = [c.name for c in snapshot["dagster/column_schema"].value.columns]
    assert columns[:3] == ["customer_id", "email", "first_name"]
    sync = instance.get_latest_materialization_event(SYNC).asset_materialization.metadata
    assert sync["dagster/row_count"].value == 2

    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert settled.total_requested == 0  # nothing changed upstream since


def test_importing_the_package_and_build_defs_reads_no_config(tmp_path) -> None:
    code = (
        "import klaviyo_pipelines\n"
        "from klaviyo_pipelines import KlaviyoTranslator, build_defs\n"
        "import klaviyo_pipelines.dagster_defs.execution\n"
    )
    env = {"KLAVIYO_PIPELINES_CONFIG": str(tmp_path / "missing.yaml"), "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_resource_prefix_translator_and_yaml_keys(chdir_tmp, duckdb_url, monkeypatch) -> None:
    class CrmTranslator(KlaviyoTranslator):
        def get_asset_spec(self, props: KlaviyoAssetProps) -> dg.AssetSpec:
            spec = super().get_asset_spec(props)
            if props.sync is None:
                return spec.replace_attributes(key=spec.key.with_prefix("crm"))
            return spec.merge_attributes(tags={"team": "crm"})

    text = (chdir_tmp / "klaviyo_pipelines.yaml").read_text()
    text += 'group: crm\ntags: {pii: "yes"}\n'
    monkeypatch.setenv("WAREHOUSE_URL", duckdb_url)
    monkeypatch.setenv("KLAVIYO_API_KEY", "pk_test")
    config = parse_config(text, "k.yaml")
    defs = build_defs(config, translator=CrmTranslator(), resource_prefix="crm_")
    graph = defs.resolve_asset_graph()
    moved = SNAPSHOT.with_prefix("crm")
    assert graph.get(SYNC).parent_keys == {moved}  # the edge follows the translated key
    assert graph.get(moved).group_name == "crm" and graph.get(SYNC).group_name == "crm"
    assert graph.get(SYNC).tags.items() >= {"pii": "yes", "team": "crm"}.items()
    assert set(defs.resources or {}) == {"crm_warehouse", "crm_api"}


def test_a_partitioned_run_records_the_partition_row_count() -> None:
    report = SyncReport(sync="s", action="track_event", model="m", partition="2026-11-01")
    assert "dagster/partition_row_count" in sync_metadata(report)
    assert "dagster/row_count" not in sync_metadata(report)
    stats = SnapshotStats("m", 5, ("a",), 0, 0, 0, 0.1)
    assert snapshot_metadata(stats, "2026-11-01")["dagster/partition_row_count"] == 5
    assert snapshot_metadata(stats)["dagster/row_count"] == 5
