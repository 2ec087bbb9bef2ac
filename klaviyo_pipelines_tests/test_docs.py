"""The docs kept true mechanically: keys, defaults, pages, links and examples read from the code.

Each check asks the code itself (an unknown key makes config.py or an action list the keys it
accepts; metadata and rate limits are built from the real functions and tables), so a change
in the code that the docs do not follow fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from klaviyo_pipelines.actions.factory import build_action
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.cli import main
from klaviyo_pipelines.config import (
    AUDIENCE_ACTIONS,
    Config,
    ConfigError,
    WarehouseSpec,
    parse_config,
)
from klaviyo_pipelines.dagster_defs.metadata import snapshot_metadata, sync_metadata
from klaviyo_pipelines.demo import create_demo_warehouse
from klaviyo_pipelines.klaviyo import endpoints
from klaviyo_pipelines.runner import SyncReport, check_sync
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import SnapshotStats

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
MARKDOWN = [README, *sorted(DOCS.rglob("*.md"))]
CONFIGURATION = DOCS / "configuration.md"
UNKNOWN = "zz_not_a_key"

# A config reaching every level of config.py, so an unknown key can be put at each.
PROBE_BASE: dict[str, Any] = {
    "warehouse": {},
    "klaviyo": {},
    "models": {
        "days": {
            "table": "analytics.orders",
            "primary_key": "order_id",
            "partition": {"column": "placed_at", "start": "2026-01-01"},
        },
        "aud": {"table": "analytics.customers", "primary_key": "customer_id"},
    },
    "syncs": {"s": {"model": "days", "action": "track_event", "retry": {}, "verify": {}}},
}
# Where each level sits in PROBE_BASE, and how configuration.md writes its keys.
LEVELS = {
    (): "",
    ("warehouse",): "warehouse.",
    ("klaviyo",): "klaviyo.",
    ("models", "days"): "models.<model>.",
    ("models", "days", "partition"): "models.<model>.partition.",
    ("models", "aud", "audience"): "models.<model>.audience.",
    ("syncs", "s"): "syncs.<sync>.",
    ("syncs", "s", "retry"): "syncs.<sync>.retry.",
    ("syncs", "s", "verify"): "syncs.<sync>.verify.",
}
# Settings without which an action refuses a config before looking at the rest.
REQUIRED_SETTINGS = {"remove_profile": {"list_id": "L1"}, "track_event": {"metric_name": "M"}}
COLUMNS = ["customer_id", "email", "phone", "placed_at", "aud"]


def _copy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def _accepted_list(reason: str) -> set[str]:
    """The keys an "unknown key" message lists: `... (expected one of: a, b)` or `(x: a, b)`."""
    listed = re.search(r"\(([^()]*)\)\s*$", reason)
    assert listed, reason
    return set(listed.group(1).split(": ", 1)[1].split(", "))


def structure_keys() -> set[str]:
    """Every key config.py accepts, as configuration.md writes it (`syncs.<sync>.on`)."""
    keys = set()
    for path, prefix in LEVELS.items():
        raw = _copy(PROBE_BASE)
        raw["models"]["aud"]["audience"] = {"column": "aud"}
        node = raw
        for part in path:
            node = node[part]
        node[UNKNOWN] = 1
        with pytest.raises(ConfigError) as error:
            parse_config(yaml.safe_dump(raw), "probe.yaml")
        assert error.value.key == prefix + UNKNOWN or error.value.key.endswith(f".{UNKNOWN}")
        keys |= {prefix + key for key in _accepted_list(error.value.reason)}
    return keys


def action_keys(action: str, section: str) -> set[str]:
    """The `mapping` or `settings` keys an action accepts, from its own refusal of another."""
    consent = action in ("subscribe_profile", "unsubscribe_profile")
    mapping: dict[str, Any] = {"email": "email"} if consent else {"external_id": "customer_id"}
    settings: dict[str, Any] = dict(REQUIRED_SETTINGS.get(action, {}))
    (mapping if section == "mapping" else settings)[UNKNOWN] = "customer_id"
    raw = _copy(PROBE_BASE)
    raw["models"]["aud"]["audience"] = {"column": "aud"}
    model = "aud" if action in AUDIENCE_ACTIONS else "days"
    raw["syncs"] = {"s": {"model": model, "action": action, "mapping": mapping}}
    raw["syncs"]["s"]["settings"] = settings
    config = parse_config(yaml.safe_dump(raw), "probe.yaml")
    with pytest.raises(ConfigError) as error:
        build_action(config.syncs["s"], COLUMNS, "probe.yaml")
    assert error.value.key == f"syncs.s.{section}.{UNKNOWN}", error.value
    return _accepted_list(error.value.reason)


def _outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading`."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]  # past the header and the |---| line


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def page_of(action: str) -> Path:
    return DOCS / "actions" / (action.replace("_", "-") + ".md")


# ---- configuration keys and defaults ---------------------------------------------------------


def test_configuration_md_lists_exactly_the_keys_config_py_accepts() -> None:
    documented = {
        backticked(row[0])[0] for row in table_rows(CONFIGURATION.read_text(), "## Every key")
    }
    accepted = structure_keys()
    assert accepted - documented == set(), "keys config.py accepts that configuration.md lacks"
    assert documented - accepted == set(), "keys configuration.md lists that config.py refuses"


DEFAULT_OF = {
    "warehouse.url": lambda c: c.warehouse.url,
    "warehouse.state_schema": lambda c: c.warehouse.state_schema,
    "klaviyo.api_key": lambda c: "${" + c.klaviyo.api_key.env_var + "}",
    "klaviyo.base_url": lambda c: c.klaviyo.base_url,
    "klaviyo.revision": lambda c: c.klaviyo.revision,
    "klaviyo.timeout_seconds": lambda c: c.klaviyo.timeout_seconds,
    "klaviyo.max_attempts": lambda c: c.klaviyo.max_attempts,
    "models.<model>.audience.entered": lambda c: c.models["aud"].audience.entered,
    "models.<model>.audience.exited": lambda c: c.models["aud"].audience.exited,
    "models.<model>.audience.interval_seconds": lambda c: c.models["aud"].audience.interval_seconds,
    "models.<model>.audience.max_per_tick": lambda c: c.models["aud"].audience.max_per_tick,
    "syncs.<sync>.mapping": lambda c: dict(c.syncs["s"].mapping),
    "syncs.<sync>.settings": lambda c: dict(c.syncs["s"].settings),
    "syncs.<sync>.retry.max_retries": lambda c: c.syncs["s"].retry.max_retries,
    "syncs.<sync>.retry.delay_seconds": lambda c: c.syncs["s"].retry.delay_seconds,
    "syncs.<sync>.max_rejected_share": lambda c: c.syncs["s"].max_rejected_share,
    "syncs.<sync>.verify.sample": lambda c: c.syncs["s"].verify.sample,
    "syncs.<sync>.verify.severity": lambda c: c.syncs["s"].verify.severity,
    "syncs.<sync>.verify.max_drift_share": lambda c: c.syncs["s"].verify.max_drift_share,
}


def test_documented_defaults_are_the_defaults_config_py_applies() -> None:
    raw = _copy(PROBE_BASE)
    raw["models"]["aud"]["audience"] = {"column": "aud"}
    del raw["warehouse"], raw["klaviyo"], raw["syncs"]["s"]["retry"]
    config = parse_config(yaml.safe_dump(raw), "defaults.yaml")
    rows = {
        backticked(row[0])[0]: row[2]
        for row in table_rows(CONFIGURATION.read_text(), "## Every key")
    }
    for key, default_of in DEFAULT_OF.items():
        value, cell = default_of(config), rows[key].strip("`")
        if isinstance(value, int | float):
            assert float(cell) == value, key
        elif isinstance(value, dict):
            assert cell == "{}" and value == {}, key
        else:
            assert cell == value, key


# ---- actions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_action_has_a_page_listing_its_mapping_and_settings(action: str) -> None:
    page = page_of(action)
    assert page.exists(), f"no page for action {action}: {page}"
    text = page.read_text()
    assert f"(`{action}`)" in text.splitlines()[0], "the title names the action"
    allowed = ", ".join(sorted(kind.value for kind in ACTIONS[action].allowed_kinds))
    kinds = re.search(r"\*\*Change kinds:\*\* ([^.(]*)", text)
    assert kinds and ", ".join(sorted(backticked(kinds.group(1)))) == allowed
    for section in ("mapping", "settings"):
        missing = {key for key in action_keys(action, section) if f"`{key}`" not in text}
        assert not missing, f"{page.name} does not describe {section} keys {missing}"
    index = (DOCS / "actions.md").read_text()
    assert f"(actions/{page.name})" in index, "the index links the page"


def test_configuration_md_summarises_each_actions_keys_exactly() -> None:
    rows = {
        backticked(row[0])[0]: row[1:]
        for row in table_rows(CONFIGURATION.read_text(), "### Mapping and settings by action")
    }
    assert set(rows) == set(ACTIONS)

    def keys(action: str, column: int) -> set[str]:
        cell = rows[action][column]
        if cell.startswith("as "):
            return keys(backticked(cell)[0], column)
        return set(backticked(cell))

    for action in ACTIONS:
        assert keys(action, 0) == action_keys(action, "mapping"), action
        assert keys(action, 1) == action_keys(action, "settings"), action


# ---- links -----------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in _outside_fences(page.read_text())
        if re.match(r"^#{1,6} ", line)
    }


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    text = "\n".join(_outside_fences(page.read_text()))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not ours to check here
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link {target} points at nothing"
        if anchor:
            assert resolved.suffix == ".md", f"{page.name}: anchor on a non-page {target}"
            assert anchor in anchors(resolved), f"{page.name}: no heading for {target}"


def test_readme_links_every_page_and_keeps_the_two_commands() -> None:
    text = README.read_text()
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"
    assert "make demo" in text and "make test" in text


# ---- examples --------------------------------------------------------------------------------


def yaml_blocks(page: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", page.read_text(), flags=re.M | re.S)


EXAMPLE_PAGES = [README, CONFIGURATION, DOCS / "getting-started.md"] + [
    page_of(action) for action in ACTIONS
]


@pytest.fixture(scope="module")
def demo_warehouse(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"duckdb:///{tmp_path_factory.mktemp('docs') / 'demo.duckdb'}"
    create_demo_warehouse(url, "klaviyo_sync", customers=60)
    return url


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_examples_load_and_fit_the_demo_warehouse(
    page: Path, demo_warehouse: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every YAML block with `syncs:` is a whole config: it loads, and each of its syncs passes
    the checks `validate` makes against the warehouse (columns, mapping, settings). Nothing is
    sent: no Klaviyo is involved."""
    monkeypatch.setenv("WAREHOUSE_URL", demo_warehouse)
    configs = [block for block in yaml_blocks(page) if "syncs" in (yaml.safe_load(block) or {})]
    assert configs, f"{page.name} has no example config"
    for number, block in enumerate(configs, 1):
        config: Config = parse_config(block, f"{page.name} example {number}")
        config = dataclasses.replace(config, warehouse=WarehouseSpec(demo_warehouse))
        wh = Warehouse(demo_warehouse)
        try:
            for name in config.syncs:
                check_sync(config, name, wh)
        finally:
            wh.dispose()


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_block_parses(page: Path) -> None:
    for block in yaml_blocks(page):
        yaml.safe_load(block)


def test_the_dagster_yaml_snippets_are_valid_instance_config(tmp_path, monkeypatch) -> None:
    """deploy/dagster.yaml and the demo's, which `make demo` and `make ui` copy, pass Dagster's
    own schema."""
    from dagster._core.instance.config import dagster_instance_config

    for name in ("HOST", "PORT", "DB", "USERNAME", "PASSWORD"):
        monkeypatch.setenv(f"DAGSTER_PG_{name}", "5432" if name == "PORT" else "x")
    snippets = [(REPO / "deploy" / "dagster.yaml").read_text()]
    snippets.append((REPO / "scripts" / "dagster_demo.yaml").read_text())
    assert "scripts/dagster_demo.yaml" in (REPO / "scripts" / "ui.sh").read_text()
    assert "scripts/dagster_demo.yaml" in (REPO / "Makefile").read_text()
    assert len(snippets) == 2
    for number, text in enumerate(snippets):
        home = tmp_path / str(number)
        home.mkdir()
        (home / "dagster.yaml").write_text(text)
        dagster_instance_config(str(home))  # raises DagsterInvalidConfigError when wrong


# ---- what operations.md says the code records and obeys ----------------------------------------


def test_operations_md_lists_exactly_the_metadata_a_run_records() -> None:
    text = (DOCS / "operations.md").read_text()
    section = text[text.index("## What a run records") : text.index("## Failures and retries")]
    documented = set()
    for key in re.findall(r"`((?:klaviyo|dagster|warehouse)/[a-z_<>0-9]+)`", section):
        if "<" in key.replace("<kind>", ""):
            continue  # an asset key such as klaviyo/<sync>, not metadata
        kinds = ("added", "updated", "deleted") if "<kind>" in key else ("",)
        documented |= {key.replace("<kind>", kind) for kind in kinds}
    report = SyncReport(sync="s", action="upsert_profile", model="m", error="x")
    stats = SnapshotStats("m", 0, (), 0, 0, 0, 0.0)
    recorded = set(sync_metadata(report)) | set(snapshot_metadata(stats))
    assert documented == recorded


def test_operations_md_rate_limits_are_the_clients() -> None:
    rows = table_rows((DOCS / "operations.md").read_text(), "## Rate limits")
    assert rows
    for row in rows:
        name = backticked(row[0])[0]
        limits = next(
            v
            for v in vars(endpoints).values()
            if isinstance(v, endpoints.EndpointClass) and v.name == name
        )
        assert (int(row[2]), int(row[3])) == (limits.burst_per_second, limits.steady_per_minute)


def test_troubleshooting_md_lists_exactly_the_cli_error_matrix() -> None:
    """Each case of the CLI's error matrix has its row (commands and exit code included)."""
    from klaviyo_pipelines_tests.test_cli_errors import CASES

    rows = {
        row[0]: row
        for row in table_rows((DOCS / "troubleshooting.md").read_text(), "## Command line errors")
    }
    assert set(rows) == {case.name for case in CASES}
    for case in CASES:
        _name, commands, code = rows[case.name][:3]
        assert commands.split(", ") == list(case.commands), case.name
        assert code.split()[0] == str(case.code), case.name
        for command, other in case.code_for.items():
            assert f"{command}: {other}" in code, case.name


def test_commands_in_the_docs_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    choices = re.findall(r"\{([a-z,]+)\}", capsys.readouterr().out)  # {table,json} too
    commands = next(set(c.split(",")) for c in choices if "sync" in c.split(","))
    for page in MARKDOWN:
        for command in re.findall(r"klaviyo-pipelines ([a-z]+)", page.read_text()):
            assert command in commands, f"{page.name}: no command klaviyo-pipelines {command}"
