"""A dbt model upstream of our snapshot: docs/dagster.md's dbt example, with the dbt project
under klaviyo_pipelines_tests/dbt_project (dbt-duckdb, the warehouse our sync reads). The edge
is in the asset graph; `dbt build` materializing makes automation request our snapshot and
sync, which deliver the dbt model's rows to the sandbox."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "dagster.md"
DBT_PROJECT = Path(__file__).resolve().parent / "dbt_project"
DBT_MODEL = dg.AssetKey(["customers"])  # dagster-dbt's default key: the model's name
SNAPSHOT = dg.AssetKey(["klaviyo_pipelines", "warehouse", "customers"])
SYNC = dg.AssetKey(["klaviyo_pipelines", "klaviyo", "customers_to_klaviyo"])


def doc_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


@pytest.fixture
def dbt_defs(
    tmp_path: Path, duckdb_url: str, sandbox, monkeypatch: pytest.MonkeyPatch
) -> dg.Definitions:
    """The documented project, run as written in a copy of the dbt project (dbt writes its
    target/ and logs/ there), after the sandbox exported its URL; `dagster dev`'s flag makes
    `prepare_if_dev` parse it."""
    shutil.copytree(DBT_PROJECT, tmp_path / "dbt_project")
    config = doc_block("yaml", "key_prefix: klaviyo")
    assert "deps: [analytics/customers]" in config
    (tmp_path / "klaviyo_pipelines.yaml").write_text(
        config.replace("deps: [analytics/customers]", "deps: [customers]")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WAREHOUSE_URL", duckdb_url)
    monkeypatch.setenv("DBT_DUCKDB_PATH", duckdb_url.removeprefix("duckdb:///"))
    monkeypatch.setenv("DAGSTER_IS_DEV_CLI", "1")
    # `dbt` is found on PATH, as in an activated venv (the tests run without activating one)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    namespace: dict[str, Any] = {}
    # compiled on its own: this module's `from __future__ import annotations` would turn the
    # example's type hints into strings, which Dagster refuses on a `context` parameter
    code = compile(doc_block("python", "dbt_assets"), str(DOC), "exec", dont_inherit=True)
    exec(code, namespace)
    return namespace["defs"]


def test_dbt_build_then_automation_delivers_the_dbt_models_rows(dbt_defs, sandbox) -> None:
    graph = dbt_defs.resolve_asset_graph()
    assert graph.get(SNAPSHOT).parent_keys == {DBT_MODEL}
    assert graph.get(SYNC).parent_keys == {SNAPSHOT}
    assert "dbt" in graph.get(DBT_MODEL).kinds

    assets = list(dbt_defs.assets or [])
    instance = dg.DagsterInstance.ephemeral()
    before = dg.evaluate_automation_conditions(defs=dbt_defs, instance=instance)
    built = dg.materialize(
        assets, selection=[DBT_MODEL], resources=dbt_defs.resources, instance=instance
    )
    assert built.success
    after = dg.evaluate_automation_conditions(
        defs=dbt_defs, instance=instance, cursor=before.cursor
    )
    requested = {key for key in (DBT_MODEL, SNAPSHOT, SYNC) if after.get_num_requested(key)}
    assert requested == {SNAPSHOT, SYNC}

    synced = dg.materialize(
        assets,
        selection=sorted(requested, key=str),
        resources=dbt_defs.resources,
        instance=instance,
    )
    assert synced.success
    assert {p.email for p in sandbox.state.profiles.values()} == {
        "ada@example.com",
        "grace@example.com",
    }
