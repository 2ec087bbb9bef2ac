"""The user's contract: one YAML file turned into typed, validated, immutable specs.

Everything that can be checked without the warehouse is checked here, so a typo stops the
run with one message naming the file, the place and the reason before anything is sent.
Checks that need the model's columns live with the actions (`actions/`, mapping and settings)
and in `warehouse/snapshot.py` (the model's query and primary key).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from klaviyo_pipelines.actions.registry import ACTIONS, ChangeKind

CONFIG_ENV_VAR = "KLAVIYO_PIPELINES_CONFIG"
DEFAULT_CONFIG_NAME = "klaviyo_pipelines.yaml"
DEMO_CONFIG = "demo_config.yaml"
KLAVIYO_PRODUCTION_URL = "https://a.klaviyo.com"
DEFAULT_REVISION = "2026-07-15"

AUDIENCE_ACTIONS = frozenset({"add_profile_to_list", "remove_profile_from_list"})

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_WHOLE_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}$")


class ConfigError(ValueError):
    """A problem in the configuration file, located by file and dotted key."""

    def __init__(self, path: str | Path | None, key: str, reason: str) -> None:
        self.path = str(path) if path else "<config>"
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path}: {key}: {reason}")


@dataclass(frozen=True)
class WarehouseSpec:
    url: str
    state_schema: str = "klaviyo_sync"


@dataclass(frozen=True)
class EnvSecret:
    """Where the API key comes from: an environment variable, never the file itself."""

    env_var: str

    def resolve(self, config_path: str) -> str:
        value = os.environ.get(self.env_var)
        if not value:
            raise ConfigError(
                config_path,
                "klaviyo.api_key",
                f"environment variable {self.env_var} is not set; export your Klaviyo private "
                "API key in it",
            )
        return value


@dataclass(frozen=True)
class KlaviyoSpec:
    api_key: EnvSecret
    base_url: str = KLAVIYO_PRODUCTION_URL
    revision: str = DEFAULT_REVISION
    timeout_seconds: float = 30.0
    max_attempts: int = 6


@dataclass(frozen=True)
class PartitionSpec:
    """Daily partitions by a timestamp column, so history can be backfilled day by day."""

    column: str
    start: str  # YYYY-MM-DD, the first day


@dataclass(frozen=True)
class AudienceSpec:
    """An audience model: one Dagster partition per audience, the primary key naming a member.

    Two shapes: a membership table (a row per audience and member), or an event log of
    entered/exited rows (`event` and `timestamp` set), where each member's latest event wins.
    """

    column: str  # the audience key: one partition, and one Klaviyo list, per value
    event: str | None = None
    timestamp: str | None = None
    entered: str = "Audience Entered"
    exited: str = "Audience Exited"
    interval_seconds: int = 60  # how often the sensor looks for membership changes
    max_per_tick: int = 50  # audiences one sensor tick examines

    @property
    def is_event_log(self) -> bool:
        return self.event is not None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    primary_key: str
    sql: str | None = None
    table: str | None = None
    partition: PartitionSpec | None = None
    audience: AudienceSpec | None = None
    sql_params_items: tuple[tuple[str, str], ...] = ()

    @property
    def sql_params(self) -> dict[str, str]:
        """Values bound to the `:kp_env_<n>` placeholders that stand for `${VAR}` in `sql`."""
        return dict(self.sql_params_items)

    @property
    def partitioned(self) -> bool:
        """Snapshots, change sets and state are kept per partition (a day or an audience)."""
        return self.partition is not None or self.audience is not None


@dataclass(frozen=True)
class RetrySpec:
    """Dagster step retries: the third retry layer, after per-request and per-row retries."""

    max_retries: int = 1
    delay_seconds: float = 60.0


@dataclass(frozen=True)
class SyncSpec:
    name: str
    model: str
    action: str
    on: tuple[ChangeKind, ...]
    mapping: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    schedule: str | None = None
    retry: RetrySpec = field(default_factory=RetrySpec)
    max_rejected_share: float = 0.05
    extra_models: tuple[str, ...] = ()  # other models the action reads, e.g. line items


@dataclass(frozen=True)
class Config:
    path: str
    warehouse: WarehouseSpec
    klaviyo: KlaviyoSpec
    models: Mapping[str, ModelSpec]
    syncs: Mapping[str, SyncSpec]

    def model_of(self, sync: SyncSpec) -> ModelSpec:
        return self.models[sync.model]


def interpolate(value: str, path: str | None, key: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(path, key, f"environment variable {name} is not set and has no default")

    return _ENV_REF.sub(replace, value)


def default_config_path() -> Path | None:
    """The config a command uses when none is named: $KLAVIYO_PIPELINES_CONFIG, then ./klaviyo_pipelines.yaml."""
    if env := os.environ.get(CONFIG_ENV_VAR):
        return Path(env)
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.exists() else None


def demo_config_text() -> str:
    return resources.files("klaviyo_pipelines").joinpath(DEMO_CONFIG).read_text()


def load_config(path: str | Path | None = None) -> Config:
    """Load the named file, else the default one, else the bundled demo configuration."""
    path = Path(path) if path else default_config_path()
    if path is None:
        return parse_config(demo_config_text(), f"<bundled {DEMO_CONFIG}>")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot read: {exc.strerror}") from None
    return parse_config(text, str(path))


def parse_config(text: str, path: str) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise ConfigError(path, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    raw = _mapping(raw, path, "(top level)")
    _no_unknown(raw, {"warehouse", "klaviyo", "models", "syncs"}, path, "")
    warehouse = _parse_warehouse(_mapping(raw.get("warehouse", {}), path, "warehouse"), path)
    klaviyo = _parse_klaviyo(_mapping(raw.get("klaviyo", {}), path, "klaviyo"), path)
    models = {
        name: _parse_model(name, _mapping(spec, path, f"models.{name}"), path)
        for name, spec in _mapping(raw.get("models"), path, "models").items()
    }
    syncs = {
        name: _parse_sync(name, _mapping(spec, path, f"syncs.{name}"), models, path)
        for name, spec in _mapping(raw.get("syncs"), path, "syncs").items()
    }
    if not syncs:
        raise ConfigError(path, "syncs", "no syncs are configured")
    return Config(path, warehouse, klaviyo, models, syncs)


def _mapping(value: Any, path: str, key: str) -> dict[str, Any]:
    if value is None:
        raise ConfigError(path, key, "is required")
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"must be a mapping, got {type(value).__name__}")
    return value


def _no_unknown(raw: Mapping[str, Any], known: set[str], path: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(path, f"{prefix}{key}", f"unknown key (expected one of: {allowed})")


def _string(
    raw: Mapping[str, Any], name: str, path: str, key: str, default: str | None = None
) -> str:
    value = raw.get(name, default)
    if value is None:
        raise ConfigError(path, key, "is required")
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(path, key, f"must be a string, got {type(value).__name__}")
    return interpolate(str(value), path, key)


def _identifier(name: str, path: str, key: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            path,
            key,
            f"{name!r} is not a valid name: use letters, digits and underscores, starting with a "
            "letter or underscore, at most 63 characters",
        )
    return name


def _parse_warehouse(raw: Mapping[str, Any], path: str) -> WarehouseSpec:
    _no_unknown(raw, {"url", "state_schema"}, path, "warehouse.")
    url = _string(raw, "url", path, "warehouse.url", "duckdb:///klaviyo_demo.duckdb")
    schema = _string(raw, "state_schema", path, "warehouse.state_schema", "klaviyo_sync")
    return WarehouseSpec(url=url, state_schema=_identifier(schema, path, "warehouse.state_schema"))


def _parse_klaviyo(raw: Mapping[str, Any], path: str) -> KlaviyoSpec:
    known = {"api_key", "base_url", "revision", "timeout_seconds", "max_attempts"}
    _no_unknown(raw, known, path, "klaviyo.")
    key_ref = raw.get("api_key", "${KLAVIYO_API_KEY}")
    match = _WHOLE_ENV_REF.match(str(key_ref)) if isinstance(key_ref, str) else None
    if not match or match.group(2) is not None:
        raise ConfigError(
            path,
            "klaviyo.api_key",
            "must name an environment variable without a default, like ${KLAVIYO_API_KEY}: a "
            "key written into the file would be committed and shown along with it",
        )
    revision = _string(raw, "revision", path, "klaviyo.revision", DEFAULT_REVISION)
    if not re.match(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$", revision):
        raise ConfigError(path, "klaviyo.revision", f"{revision!r} is not a YYYY-MM-DD revision")
    return KlaviyoSpec(
        api_key=EnvSecret(match.group(1)),
        base_url=_string(raw, "base_url", path, "klaviyo.base_url", KLAVIYO_PRODUCTION_URL).rstrip(
            "/"
        ),
        revision=revision,
        timeout_seconds=_number(raw, "timeout_seconds", path, "klaviyo.", 30.0, minimum=0.1),
        max_attempts=int(_number(raw, "max_attempts", path, "klaviyo.", 6, minimum=1)),
    )


def _number(
    raw: Mapping[str, Any], name: str, path: str, prefix: str, default: float, minimum: float
) -> float:
    value = raw.get(name, default)
    if isinstance(value, str):
        value = interpolate(value, path, prefix + name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(path, prefix + name, f"must be a number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(path, prefix + name, f"must be at least {minimum}, got {value!r}")
    return number


def _parse_model(name: str, raw: Mapping[str, Any], path: str) -> ModelSpec:
    key = f"models.{name}"
    _identifier(name, path, key)
    _no_unknown(raw, {"sql", "table", "primary_key", "partition", "audience"}, path, f"{key}.")
    if "partition" in raw and "audience" in raw:
        raise ConfigError(
            path,
            key,
            "give 'partition' (days) or 'audience' (one partition per audience), not both",
        )
    if ("sql" in raw) == ("table" in raw):
        raise ConfigError(path, key, "give exactly one of 'sql' or 'table'")
    if not raw.get("primary_key"):
        raise ConfigError(
            path, f"{key}.primary_key", "is required: the column that identifies a row"
        )
    table = _string(raw, "table", path, f"{key}.table") if "table" in raw else None
    if table is not None:
        for part in table.split("."):
            _identifier(part, path, f"{key}.table")
    return ModelSpec(
        name=name,
        primary_key=_string(raw, "primary_key", path, f"{key}.primary_key"),
        sql=_string(raw, "sql", path, f"{key}.sql") if "sql" in raw else None,
        table=table,
        partition=_parse_partition(raw.get("partition"), path, f"{key}.partition"),
        audience=_parse_audience(raw.get("audience"), path, f"{key}.audience"),
    )


def _parse_audience(raw: Any, path: str, key: str) -> AudienceSpec | None:
    if raw is None:
        return None
    raw = _mapping(raw, path, key)
    known = {
        "column",
        "event",
        "timestamp",
        "entered",
        "exited",
        "interval_seconds",
        "max_per_tick",
    }
    _no_unknown(raw, known, path, f"{key}.")
    if ("event" in raw) != ("timestamp" in raw):
        raise ConfigError(
            path,
            key,
            "an event-log audience needs both 'event' (the column holding Audience Entered / "
            "Audience Exited) and 'timestamp' (when it happened); a membership table needs neither",
        )
    optional = {
        name: _string(raw, name, path, f"{key}.{name}")
        for name in ("event", "timestamp", "entered", "exited")
        if name in raw
    }
    if optional.get("entered", "Audience Entered") == optional.get("exited", "Audience Exited"):
        raise ConfigError(path, f"{key}.exited", "must differ from 'entered'")
    return AudienceSpec(
        column=_string(raw, "column", path, f"{key}.column"),
        interval_seconds=int(_number(raw, "interval_seconds", path, f"{key}.", 60, minimum=1)),
        max_per_tick=int(_number(raw, "max_per_tick", path, f"{key}.", 50, minimum=1)),
        **optional,
    )


def _parse_partition(raw: Any, path: str, key: str) -> PartitionSpec | None:
    if raw is None:
        return None
    raw = _mapping(raw, path, key)
    _no_unknown(raw, {"column", "start"}, path, f"{key}.")
    start = raw.get("start")  # YAML reads an unquoted 2026-01-01 as a date
    start = (
        start.isoformat()
        if isinstance(start, date)
        else _string(raw, "start", path, f"{key}.start")
    )
    try:
        date.fromisoformat(start)
    except ValueError:
        raise ConfigError(path, f"{key}.start", f"{start!r} is not a YYYY-MM-DD date") from None
    return PartitionSpec(column=_string(raw, "column", path, f"{key}.column"), start=start)


def _parse_sync(
    name: str, raw: Mapping[str, Any], models: Mapping[str, ModelSpec], path: str
) -> SyncSpec:
    key = f"syncs.{name}"
    _identifier(name, path, key)
    # YAML 1.1 reads a bare `on:` key as the boolean true.
    raw = {("on" if k is True else k): v for k, v in raw.items()}
    known = {
        "model",
        "action",
        "on",
        "mapping",
        "settings",
        "schedule",
        "retry",
        "max_rejected_share",
    }
    _no_unknown(raw, known, path, f"{key}.")
    model = _string(raw, "model", path, f"{key}.model")
    if model not in models:
        raise ConfigError(
            path, f"{key}.model", f"unknown model {model!r} (models: {', '.join(models) or 'none'})"
        )
    action_name = _string(raw, "action", path, f"{key}.action")
    info = ACTIONS.get(action_name)
    if info is None:
        raise ConfigError(
            path, f"{key}.action", f"unknown action {action_name!r} (actions: {', '.join(ACTIONS)})"
        )
    if not info.implemented:
        raise ConfigError(
            path, f"{key}.action", f"action {action_name!r} is not available in this version yet"
        )
    on = _parse_kinds(
        raw.get("on", [kind.value for kind in sorted(info.allowed_kinds)]), info, path, key
    )
    mapping = raw.get("mapping") or {}
    settings = raw.get("settings") or {}
    if not isinstance(mapping, dict):
        raise ConfigError(path, f"{key}.mapping", "must be a mapping of Klaviyo field: column")
    if not isinstance(settings, dict):
        raise ConfigError(path, f"{key}.settings", "must be a mapping")
    schedule = raw.get("schedule")
    if schedule is not None and models[model].audience is not None:
        raise ConfigError(
            path,
            f"{key}.schedule",
            f"model {model!r} is an audience model: its syncs run when the audience sensor sees "
            "a membership change, not on a schedule",
        )
    if info.name in AUDIENCE_ACTIONS and models[model].audience is None:
        raise ConfigError(
            path,
            f"{key}.model",
            f"{info.title} syncs an audience: model {model!r} needs an 'audience' block "
            "(see docs/engage.md)",
        )
    if schedule is not None:
        schedule = _string(raw, "schedule", path, f"{key}.schedule")
        if len(schedule.split()) != 5:
            raise ConfigError(path, f"{key}.schedule", f"{schedule!r} is not a 5-field cron string")
    retry_raw = _mapping(raw.get("retry", {}), path, f"{key}.retry")
    _no_unknown(retry_raw, {"max_retries", "delay_seconds"}, path, f"{key}.retry.")
    retry = RetrySpec(
        max_retries=int(_number(retry_raw, "max_retries", path, f"{key}.retry.", 1, minimum=0)),
        delay_seconds=_number(retry_raw, "delay_seconds", path, f"{key}.retry.", 60, minimum=0),
    )
    share = _number(raw, "max_rejected_share", path, f"{key}.", 0.05, minimum=0)
    extra_models = []
    for setting, value in settings.items():  # a setting like {model: order_items, ...}
        if isinstance(value, dict) and "model" in value:
            if value["model"] not in models:
                raise ConfigError(
                    path, f"{key}.settings.{setting}.model", f"unknown model {value['model']!r}"
                )
            extra_models.append(value["model"])
    return SyncSpec(
        name=name,
        model=model,
        action=action_name,
        on=on,
        mapping=_interpolate_tree(mapping, path, f"{key}.mapping"),
        settings=_interpolate_tree(settings, path, f"{key}.settings"),
        schedule=schedule,
        retry=retry,
        max_rejected_share=share,
        extra_models=tuple(extra_models),
    )


def _parse_kinds(raw: Any, info: Any, path: str, key: str) -> tuple[ChangeKind, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, f"{key}.on", "must be a non-empty list of change kinds")
    kinds: list[ChangeKind] = []
    for value in raw:
        try:
            kind = ChangeKind(value)
        except ValueError:
            raise ConfigError(
                path, f"{key}.on", f"unknown change kind {value!r} (added, updated, deleted)"
            ) from None
        if kind not in info.allowed_kinds:
            allowed = ", ".join(sorted(k.value for k in info.allowed_kinds))
            raise ConfigError(
                path,
                f"{key}.on",
                f"{info.title} does not accept {kind.value!r} rows (it accepts: {allowed})",
            )
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


def _interpolate_tree(value: Any, path: str, key: str) -> Any:
    if isinstance(value, str):
        return interpolate(value, path, key)
    if isinstance(value, dict):
        return {k: _interpolate_tree(v, path, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    return value
