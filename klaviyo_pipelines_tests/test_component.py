"""`KlaviyoSyncsComponent` as a Dagster components user meets it: `dg list components`,
`dg scaffold defs`, `dg check defs` in a scratch project, then docs/dagster.md's `defs.yaml`
loaded and its sync materialized against the sandbox."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from klaviyo_pipelines import KlaviyoAssetProps, KlaviyoSyncsComponent

DOC = Path(__file__).resolve().parents[1] / "docs" / "dagster.md"
DG = Path(sys.executable).parent / "dg"
COMPONENT = "klaviyo_pipelines.KlaviyoSyncsComponent"
UPSTREAM = dg.AssetKey(["analytics", "customers"])
SNAPSHOT = dg.AssetKey(["crm", "warehouse", "customers"])
SYNC = dg.AssetKey(["crm", "klaviyo", "customers_to_klaviyo"])
CUSTOMERS = """
CREATE TABLE analytics.customers AS
SELECT * FROM (VALUES ('c1', 'ada@example.com', 'Ada'), ('c2', 'grace@example.com', 'Grace'))
AS t (customer_id, email, first_name)
"""


def doc_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def scratch_project(root: Path) -> tuple[Path, str]:
    """A dg project as a user lays it out, its `definitions.py` the one docs/dagster.md shows;
    a package name of its own, so two tests' imports never meet."""
    package = f"kp_project_{uuid.uuid4().hex[:8]}"
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{package}"\nversion = "0.1.0"\n\n'
        f'[tool.dg]\ndirectory_type = "project"\n\n[tool.dg.project]\nroot_module = "{package}"\n'
    )
    source = root / "src" / package
    (source / "defs").mkdir(parents=True)
    (source / "__init__.py").write_text("")
    (source / "defs" / "__init__.py").write_text("")
    (source / "definitions.py").write_text(doc_block("python", "load_from_defs_folder"))
    return source, package


def run_dg(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = project / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(project / "src")}
    return subprocess.run(
        [str(DG), *args], cwd=project, env=env, capture_output=True, text=True, timeout=180
    )


def load_error(
    root: Path, monkeypatch: pytest.MonkeyPatch, defs_yaml: str
) -> tuple[Path, list[str]]:
    """Load a scratch project whose `defs/klaviyo/defs.yaml` is `defs_yaml`, which must fail:
    its folder, and the messages of the error and its causes (Dagster wraps ours in its own,
    naming the component)."""
    source, _ = scratch_project(root)
    folder = source / "defs" / "klaviyo"
    folder.mkdir()
    (folder / "defs.yaml").write_text(defs_yaml)
    monkeypatch.syspath_prepend(str(root / "src"))
    with pytest.raises(Exception) as error:
        dg.load_from_defs_folder(path_within_project=source)
    causes, cause = [], error.value
    while cause is not None:
        causes.append(str(cause))
        cause = cause.__cause__
    return folder, causes


def test_dg_lists_scaffolds_and_checks_the_component(tmp_path: Path) -> None:
    source, _ = scratch_project(tmp_path)

    listed = run_dg(tmp_path, "list", "components", "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    items = items["items"] if isinstance(items, dict) else items  # dg 1.12: a bare list
    assert COMPONENT in {item["key"] for item in items}

    scaffolded = run_dg(tmp_path, "scaffold", "defs", COMPONENT, "klaviyo")
    assert scaffolded.returncode == 0, scaffolded.stderr
    folder = source / "defs" / "klaviyo"
    assert (folder / "defs.yaml").read_text().split() == [
        "type:",
        COMPONENT,
        "attributes:",
        "config:",
        "klaviyo_pipelines.yaml",
    ]
    assert "upsert_profile" in (folder / "klaviyo_pipelines.yaml").read_text()

    checked = run_dg(tmp_path, "check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed_defs = run_dg(tmp_path, "list", "defs", "--json")
    assert listed_defs.returncode == 0, listed_defs.stderr
    # key and deps as dg 1.13 names them (asset_key, dependency_keys), or 1.12 (key, deps)
    assets = {
        a.get("asset_key", a.get("key")): a.get("dependency_keys", a.get("deps"))
        for a in json.loads(listed_defs.stdout)["assets"]
    }
    assert assets == {
        "warehouse/customers": [],
        "klaviyo/customers_to_klaviyo": ["warehouse/customers"],
    }

    # a mistake in the config: `dg check defs` fails, naming file, key and reason
    config = folder / "klaviyo_pipelines.yaml"
    config.write_text(config.read_text().replace("upsert_profile", "upsert_profiles"))
    broken = run_dg(tmp_path, "check", "defs")
    assert broken.returncode != 0
    assert (
        f"{config}: syncs.customers_to_klaviyo.action: unknown action 'upsert_profiles'"
        in broken.stdout + broken.stderr
    )


def test_the_documented_defs_yaml_loads_and_its_sync_delivers(
    tmp_path: Path, duckdb_url: str, sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = scratch_project(tmp_path)
    folder = source / "defs" / "klaviyo"
    folder.mkdir()
    (folder / "defs.yaml").write_text(doc_block("yaml", f"type: {COMPONENT}"))
    monkeypatch.setenv("WAREHOUSE_URL", duckdb_url)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    engine = sa.create_engine(duckdb_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA analytics"))
        conn.execute(sa.text(CUSTOMERS))
    engine.dispose()

    defs = dg.load_from_defs_folder(path_within_project=source)
    graph = defs.resolve_asset_graph()
    assert graph.get(SNAPSHOT).parent_keys == {UPSTREAM}  # `deps`, under the moved key
    assert graph.get(SYNC).parent_keys == {SNAPSHOT}  # the edge followed `translation`
    assert set(defs.resources or {}) == {"crm_warehouse", "crm_api"}
    assert graph.get(SNAPSHOT).group_name == "crm" and graph.get(SYNC).group_name == "crm"
    assert graph.get(SNAPSHOT).tags["step"] == "snapshot"
    assert graph.get(SYNC).tags["step"] == "sync"
    assert graph.get(SYNC).owners == ["team:crm"]  # post_processing

    instance = dg.DagsterInstance.ephemeral()
    run = dg.materialize(
        list(defs.assets or []),
        selection=[SNAPSHOT, SYNC],
        resources=defs.resources,
        instance=instance,
    )
    assert run.success
    assert {p.email for p in sandbox.state.profiles.values()} == {
        "ada@example.com",
        "grace@example.com",
    }
    sync = instance.get_latest_materialization_event(SYNC).asset_materialization.metadata
    assert sync["dagster/row_count"].value == 2


def test_an_inline_config_mistake_names_the_defs_yaml_and_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = doc_block("yaml", f"type: {COMPONENT}").replace("primary_key: customer_id", "")
    monkeypatch.setenv("WAREHOUSE_URL", "duckdb:///unused.duckdb")
    folder, causes = load_error(tmp_path, monkeypatch, text)
    message = "\n".join(causes)
    assert "klaviyo" in causes[0] and "defs.yaml" in causes[0]
    assert f"{folder / 'defs.yaml'} (attributes.config): models.customers" in message
    assert "primary_key" in message


def test_a_dagster_template_in_an_inline_config_is_refused_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`{{ env.X }}` inline would otherwise reach the warehouse or Klaviyo as its own text."""
    text = doc_block("yaml", f"type: {COMPONENT}")
    assert "api_key: ${KLAVIYO_API_KEY}" in text
    text = text.replace("api_key: ${KLAVIYO_API_KEY}", 'api_key: "{{ env.KLAVIYO_API_KEY }}"')
    monkeypatch.setenv("WAREHOUSE_URL", "duckdb:///unused.duckdb")
    monkeypatch.setenv("KLAVIYO_API_KEY", "pk_never_shown_0123456789")
    folder, causes = load_error(tmp_path, monkeypatch, text)
    message = "\n".join(causes)
    assert f"{folder / 'defs.yaml'} (attributes.config): klaviyo.api_key" in message
    assert "write ${VAR}" in message
    assert "pk_never_shown" not in message


def test_a_subclass_overrides_get_asset_spec_and_the_sync_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class CrmSyncs(KlaviyoSyncsComponent):
        def get_asset_spec(self, props: KlaviyoAssetProps) -> dg.AssetSpec:
            spec = super().get_asset_spec(props)
            if props.sync is None:
                return spec.replace_attributes(key=["crm", "snapshots", props.model.name])
            return spec

    config = tmp_path / "klaviyo_pipelines.yaml"
    config.write_text(doc_block("yaml", "key_prefix: klaviyo"))
    monkeypatch.setenv("WAREHOUSE_URL", "duckdb:///unused.duckdb")
    component = CrmSyncs.from_attributes_dict(attributes={"config": str(config)})
    graph = dg.build_defs_for_component(component).resolve_asset_graph()
    moved = dg.AssetKey(["crm", "snapshots", "customers"])
    assert graph.get(moved).parent_keys == {UPSTREAM}
    sync = dg.AssetKey(["klaviyo_pipelines", "klaviyo", "customers_to_klaviyo"])
    assert graph.get(sync).parent_keys == {moved}
