"""The user's contract: one YAML file turned into typed, validated, immutable specs.

Everything that can be checked without the warehouse is checked here, so a typo stops the
run with one message naming the file, the place and the reason before anything is sent.
Checks that need the model's columns live with the actions (`actions/`, mapping and settings)
and in `warehouse/snapshot.py` (the model's query and primary key).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
import yaml

from klaviyo_pipelines.actions.registry import ACTIONS, ChangeKind
from klaviyo_pipelines.warehouse.dialects import UnsupportedWarehouse, check_url

CONFIG_ENV_VAR = "KLAVIYO_PIPELINES_CONFIG"
DEFAULT_CONFIG_NAME = "klaviyo_pipelines.yaml"
DEMO_CONFIG = "demo_config.yaml"
KLAVIYO_PRODUCTION_URL = "https://a.klaviyo.com"
DEFAULT_REVISION = "2026-07-15"

AUDIENCE_ACTIONS = frozenset({"add_profile_to_list", "remove_profile_from_list"})
VERIFY_SEVERITIES = ("warn", "error")  # Dagster's AssetCheckSeverity, lower-cased
DAGSTER_KEYS = ("key_prefix", "group", "owners", "tags")  # top level: see DagsterSpec

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_WHOLE_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}$")
DEFAULT_WAREHOUSE_URL = "duckdb:///klaviyo_demo.duckdb"
_PASSWORD_PARAMS = frozenset({"password", "passwd", "pwd"})
# Bounds on a YAML document once its aliases are expanded: a real config is a few thousand
# nodes; a 1 KB "billion laughs" file is billions, and took minutes and gigabytes to refuse.
MAX_EXPANDED_NODES = 100_000
MAX_EXPANDED_CHARS = 10_000_000
# Model SQL pieces where `${VAR}` is not a value: quoted text (strings, identifiers, PostgreSQL
# dollar quotes) and comments; and the `${VAR}` references themselves.
_SQL_PIECES = re.compile(
    r"""(?P<quoted>
          '(?:[^']|'')*'?
        | "(?:[^"]|"")*"?
        | `[^`]*`?
        | \$(?P<tag>[A-Za-z_]\w*|)\$.*?\$(?P=tag)\$
    )
    | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<env>\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})""",
    re.S | re.X,
)


class ConfigError(ValueError):
    """A problem in the configuration file, located by file and dotted key."""

    def __init__(self, path: str | Path | None, key: str, reason: str) -> None:
        self.path = str(path) if path else "<config>"
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path}: {key}: {reason}")


class FromEnvironment(str):
    """A value `${VAR}` filled in. Its repr is the text as written in the file, so a message
    that echoes it (`got {value!r}`) names the variable and never shows what it holds (the
    API key, a password)."""

    written: str

    def __new__(cls, value: str, written: str) -> FromEnvironment:
        self = super().__new__(cls, value)
        self.written = written
        return self

    def __repr__(self) -> str:
        return repr(self.written)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FromEnvironment, (str(self), self.written))


@dataclass(frozen=True)
class WarehouseSpec:
    """`url_env` names the variable holding the whole URL, when one does: Dagster then gets the
    URL as an `EnvVar`, so its UI and the run snapshots it stores show that name, not a password."""

    url: str
    state_schema: str = "klaviyo_sync"
    url_env: str | None = None


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
    # The Dagster concurrency pool of the account's sync steps: Klaviyo's rate limits are per
    # account, so two accounts must not queue behind one slot.
    pool: str = "klaviyo"


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
    deps: tuple[str, ...] = ()  # upstream Dagster asset keys, `/`-separated: lineage
    # "copy": each run copies the model into the state schema; "direct": change sets read it
    # where it is (no copy to pay for), for unpartitioned models only. See `_snapshot_mode`.
    snapshot: str = "copy"

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
class AutomationSpec:
    """When Dagster runs a sync by itself: once its upstream changed (eager), or on a cron once
    its upstream changed since the last tick (on_cron)."""

    kind: str  # "eager" or "on_cron"
    cron: str | None = None


@dataclass(frozen=True)
class VerifySpec:
    """The sync's `verify` asset check: how many delivered rows it reads back from Klaviyo,
    the drift share that fails it and how loudly, and the cron that runs it alone."""

    sample: int | None = 1_000  # None: every delivered row (`sample: all`)
    seed: int | None = None  # None: a new sample each run, its seed recorded in the metadata
    severity: str = "warn"
    max_drift_share: float = 0.01
    blocking: bool = False  # an ERROR failure stops downstream assets of the same run
    schedule: str | None = None


@dataclass(frozen=True)
class DagsterSpec:
    """How our assets appear among the user's: a key prefix, a group, owners and tags."""

    key_prefix: tuple[str, ...] = ()
    group: str | None = None
    owners: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)


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
    automation: AutomationSpec | None = None
    default_mappings: bool = True  # a column named like a Klaviyo field maps to it
    namespace: str | None = None  # in derived event ids and consent source; None: the name
    verify: VerifySpec = field(default_factory=VerifySpec)

    @property
    def identity(self) -> str:
        """The name derived event unique_ids and the default consent source are made of."""
        return self.namespace or self.name


@dataclass(frozen=True)
class Config:
    path: str
    warehouse: WarehouseSpec
    klaviyo: KlaviyoSpec
    models: Mapping[str, ModelSpec]
    syncs: Mapping[str, SyncSpec]
    dagster: DagsterSpec = field(default_factory=DagsterSpec)

    def model_of(self, sync: SyncSpec) -> ModelSpec:
        return self.models[sync.model]


def interpolate(value: str, path: str | None, key: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without default is an error.
    A value that used a variable comes back as `FromEnvironment`, which errors echo safely."""
    if not _ENV_REF.search(value):
        return value
    return FromEnvironment(_ENV_REF.sub(lambda ref: _env_value(ref, path, key), value), value)


def _env_value(ref: re.Match[str], path: str | None, key: str) -> str:
    """The value of a `${VAR}` / `${VAR:-default}` reference."""
    name, default = ref.group(1), ref.group(2)
    if name in os.environ:
        return os.environ[name]
    if default is not None:
        return default
    raise ConfigError(path, key, f"environment variable {name} is not set and has no default")


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
    raw = _mapping(_load_yaml(text, path), path, "(top level)")
    known = {"warehouse", "klaviyo", "models", "syncs", *DAGSTER_KEYS}
    _no_unknown(raw, known, path, "")
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
    models = _copy_models_read_by_key(models, syncs, raw["models"], path)
    return Config(path, warehouse, klaviyo, models, syncs, _parse_dagster(raw, path))


def _copy_models_read_by_key(
    models: dict[str, ModelSpec], syncs: Mapping[str, SyncSpec], raw: Any, path: str
) -> dict[str, ModelSpec]:
    """A model another sync reads page by page (line items) is read from its copy: direct
    by default becomes copy, and direct set in the file is refused."""
    for sync in syncs.values():
        for name in sync.extra_models:
            if models[name].snapshot != "direct":
                continue
            if "snapshot" in raw[name]:
                raise ConfigError(
                    path,
                    f"models.{name}.snapshot",
                    f"sync {sync.name!r} reads this model page by page from its copy "
                    "(settings.line_items): use copy",
                )
            models[name] = replace(models[name], snapshot="copy")
    return models


def _parse_dagster(raw: Mapping[str, Any], path: str) -> DagsterSpec:
    """The top-level keys placing our assets among a user's (`DAGSTER_KEYS`)."""
    prefix = _string(raw, "key_prefix", path, "key_prefix", "")
    tags = _mapping(raw.get("tags", {}), path, "tags")
    return DagsterSpec(
        key_prefix=tuple(part for part in prefix.split("/") if part),
        group=_string(raw, "group", path, "group") if "group" in raw else None,
        owners=_strings(raw.get("owners", []), path, "owners"),
        tags={str(k): _string(tags, k, path, f"tags.{k}") for k in tags},
    )


def _strings(value: Any, path: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(path, key, f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _parse_automation(value: Any, path: str, key: str) -> AutomationSpec | None:
    """`eager`, `{on_cron: "<cron>"}` or absent (no automation)."""
    if value is None:
        return None
    if value == "eager":
        return AutomationSpec("eager")
    if isinstance(value, dict) and set(value) == {"on_cron"}:
        cron = _string(value, "on_cron", path, f"{key}.on_cron")
        if len(cron.split()) != 5:
            raise ConfigError(path, f"{key}.on_cron", f"{cron!r} is not a 5-field cron string")
        return AutomationSpec("on_cron", cron)
    raise ConfigError(path, key, f'must be eager or {{on_cron: "<cron>"}}, got {value!r}')


def _load_yaml(text: str, path: str) -> Any:
    """The document as Python values, refused before it is built when its aliases would expand
    it past MAX_EXPANDED_NODES / MAX_EXPANDED_CHARS or an alias contains itself: PyYAML builds
    the graph, and every copy made from it afterwards (interpolation) would expand it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _ExpansionCheck(path).size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise ConfigError(path, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(path, "(yaml)", "the document is nested too deeply") from None
    finally:
        loader.dispose()


class _ExpansionCheck:
    """Sizes a YAML node graph as if every alias were copied out, each shared node sized once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, characters)
        self.open: set[int] = set()  # nodes whose children are being sized

    def size(self, node: yaml.Node) -> tuple[int, int]:
        if id(node) in self.sizes:
            return self.sizes[id(node)]
        where = f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"
        if id(node) in self.open:
            raise ConfigError(self.path, where, "an alias refers to a node that contains it")
        self.open.add(id(node))
        nodes, chars = 1, 0
        if isinstance(node, yaml.ScalarNode):
            chars = len(node.value)
        else:
            children = (
                node.value
                if isinstance(node, yaml.SequenceNode)
                else itertools.chain.from_iterable(node.value)
            )
            for child in children:
                child_nodes, child_chars = self.size(child)
                nodes, chars = nodes + child_nodes, chars + child_chars
        if nodes > MAX_EXPANDED_NODES or chars > MAX_EXPANDED_CHARS:
            raise ConfigError(
                self.path,
                where,
                f"with its aliases expanded, this is over {MAX_EXPANDED_NODES:,} values or "
                f"{MAX_EXPANDED_CHARS:,} characters: write the repeated parts out, or share less",
            )
        self.open.discard(id(node))
        self.sizes[id(node)] = nodes, chars
        return nodes, chars


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
    return interpolate(_written(raw, name, path, key, default), path, key)


def _written(
    raw: Mapping[str, Any], name: str, path: str, key: str, default: str | None = None
) -> str:
    """A string value as the file writes it, `${VAR}` references not yet expanded."""
    value = raw.get(name, default)
    if value is None:
        raise ConfigError(path, key, "is required")
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(path, key, f"must be a string, got {type(value).__name__}")
    return str(value)


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
    written = _written(raw, "url", path, "warehouse.url", DEFAULT_WAREHOUSE_URL)
    url = interpolate(written, path, "warehouse.url")
    whole = _WHOLE_ENV_REF.match(written)
    # A password must come in a variable holding the whole URL: Dagster stores and shows any
    # other value (the run config, the UI's resource view), a default included.
    in_file = (whole.group(2) or "") if whole else url
    if _holds_password(in_file):
        raise ConfigError(
            path,
            "warehouse.url",
            "holds a password, which Dagster would store with every run and show in its UI: "
            "put the whole URL in an environment variable (url: ${WAREHOUSE_URL}) and export "
            "it there",
        )
    try:
        check_url(url)
    except UnsupportedWarehouse as exc:
        raise ConfigError(path, "warehouse.url", str(exc)) from None
    schema = _string(raw, "state_schema", path, "warehouse.state_schema", "klaviyo_sync")
    return WarehouseSpec(
        url=url,
        state_schema=_identifier(schema, path, "warehouse.state_schema"),
        url_env=whole.group(1) if whole and whole.group(1) in os.environ else None,
    )


def _holds_password(url: str) -> bool:
    """Whether a SQLAlchemy URL carries a password (as user:password@, or a query parameter)."""
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "@" in url  # unreadable as a URL: a password may still be in it
    return bool(parsed.password) or any(k.lower() in _PASSWORD_PARAMS for k in parsed.query)


def _base_url(raw: Mapping[str, Any], path: str) -> str:
    """Klaviyo's address: https, or plain http only to this machine (the sandbox), since the
    API key goes with every request."""
    url = _string(raw, "base_url", path, "klaviyo.base_url", KLAVIYO_PRODUCTION_URL)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
    if host and (parts.scheme == "https" or (parts.scheme == "http" and _loopback(host))):
        return url.rstrip("/")
    raise ConfigError(
        path,
        "klaviyo.base_url",
        f"{url!r} is not allowed: use https:// (Klaviyo), or http:// only to this machine "
        "(127.0.0.1, ::1, localhost: the sandbox), since the API key goes with every request",
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _parse_klaviyo(raw: Mapping[str, Any], path: str) -> KlaviyoSpec:
    known = {"api_key", "base_url", "revision", "timeout_seconds", "max_attempts", "pool"}
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
        base_url=_base_url(raw, path),
        revision=revision,
        timeout_seconds=_number(raw, "timeout_seconds", path, "klaviyo.", 30.0, minimum=0.1),
        max_attempts=int(_number(raw, "max_attempts", path, "klaviyo.", 6, minimum=1)),
        pool=_identifier(
            _string(raw, "pool", path, "klaviyo.pool", _default_pool(match.group(1))),
            path,
            "klaviyo.pool",
        ),
    )


def _default_pool(key_variable: str) -> str:
    """The account's pool, named after the variable holding its key (never the key itself):
    `klaviyo` for KLAVIYO_API_KEY, `klaviyo_<variable>` for another account's."""
    return "klaviyo" if key_variable == "KLAVIYO_API_KEY" else f"klaviyo_{key_variable.lower()}"


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
    known = {"sql", "table", "primary_key", "partition", "audience", "deps", "snapshot"}
    _no_unknown(raw, known, path, f"{key}.")
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
    if table is not None and not all(_NAME.match(part) for part in table.split(".")):
        raise ConfigError(
            path,
            f"{key}.table",
            f"{table!r} is not a valid name: give [schema.]table, each part letters, digits and "
            "underscores, starting with a letter or underscore, at most 63 characters",
        )
    sql, params = (
        _model_sql(_written(raw, "sql", path, f"{key}.sql"), path, f"{key}.sql")
        if "sql" in raw
        else (None, ())
    )
    return ModelSpec(
        name=name,
        primary_key=_string(raw, "primary_key", path, f"{key}.primary_key"),
        sql=sql,
        table=table,
        sql_params_items=params,
        partition=_parse_partition(raw.get("partition"), path, f"{key}.partition"),
        audience=_parse_audience(raw.get("audience"), path, f"{key}.audience"),
        deps=_strings(raw.get("deps", []), path, f"{key}.deps"),
        snapshot=_snapshot_mode(raw, path, key),
    )


SNAPSHOT_MODES = ("copy", "direct")


def _snapshot_mode(raw: Mapping[str, Any], path: str, key: str) -> str:
    """`snapshot`: direct by default for an unpartitioned `table:` model (reading a table where
    it is costs one scan; a copy costs a scan and a write every run); copy otherwise, as a
    `sql:` query may be costly or non-deterministic to run again. A partitioned or audience
    model replaces one partition of its copy at a time, so it cannot be direct."""
    partitioned = "partition" in raw or "audience" in raw
    if "snapshot" not in raw:
        return "direct" if "table" in raw and not partitioned else "copy"
    mode = raw["snapshot"]
    if mode not in SNAPSHOT_MODES:
        raise ConfigError(path, f"{key}.snapshot", f"must be copy or direct, got {mode!r}")
    if mode == "direct" and partitioned:
        raise ConfigError(
            path,
            f"{key}.snapshot",
            "direct reads an unpartitioned model where it is; a partitioned or audience model "
            "keeps a copy, one partition at a time (use copy)",
        )
    return str(mode)


def _model_sql(text: str, path: str, key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The SQL with each `${VAR}` replaced by a bound parameter `:kp_env_<n>`, and the values:
    pasted into the text, a value like `x' or '1'='1` would rewrite the query. A `${VAR}` in
    quotes cannot be a parameter and is refused; one in a comment is left as written."""
    pieces: list[str] = []
    params: list[tuple[str, str]] = []
    end = 0
    for match in _SQL_PIECES.finditer(text):
        pieces.append(text[end : match.start()])
        end = match.end()
        if match.group("env"):
            ref = _ENV_REF.fullmatch(match.group("env"))
            assert ref is not None
            params.append((f"kp_env_{len(params)}", _env_value(ref, path, key)))
            pieces.append(f":{params[-1][0]}")
            continue
        quoted = _ENV_REF.search(match.group()) if match.group("quoted") else None
        if quoted:
            ref = quoted.group()
            raise ConfigError(
                path,
                key,
                f"{ref} is inside quotes: in SQL a variable is sent as a bound value, so write "
                f"it unquoted where a value goes (tier = {ref}, not tier = '{ref}')",
            )
        pieces.append(match.group())
    pieces.append(text[end:])
    return "".join(pieces), tuple(params)


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
        "automation",
        "default_mappings",
        "namespace",
        "verify",
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
        automation=_parse_automation(raw.get("automation"), path, f"{key}.automation"),
        default_mappings=_sync_flag(raw, "default_mappings", path, key),
        namespace=_namespace(raw, path, key),
        verify=_parse_verify(raw.get("verify", {}), path, f"{key}.verify"),
    )


def _parse_verify(value: Any, path: str, key: str) -> VerifySpec:
    """`verify: {sample, seed, severity, max_drift_share, blocking, schedule}`, all optional."""
    raw = _mapping(value, path, key)
    known = {"sample", "seed", "severity", "max_drift_share", "blocking", "schedule"}
    _no_unknown(raw, known, path, f"{key}.")
    sample = raw.get("sample", VerifySpec.sample)
    if sample != "all" and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise ConfigError(
            path, f"{key}.sample", f"must be a whole number >= 1 or all, got {sample!r}"
        )
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(path, f"{key}.seed", f"must be a whole number, got {seed!r}")
    severity = _string(raw, "severity", path, f"{key}.severity", VerifySpec.severity).lower()
    if severity not in VERIFY_SEVERITIES:
        raise ConfigError(path, f"{key}.severity", f"must be warn or error, got {severity!r}")
    share = _number(raw, "max_drift_share", path, f"{key}.", VerifySpec.max_drift_share, 0)
    if share > 1:
        raise ConfigError(path, f"{key}.max_drift_share", f"must be at most 1, got {share!r}")
    blocking = raw.get("blocking", False)
    if not isinstance(blocking, bool):
        raise ConfigError(path, f"{key}.blocking", f"must be true or false, got {blocking!r}")
    schedule = _string(raw, "schedule", path, f"{key}.schedule") if "schedule" in raw else None
    if schedule is not None and len(schedule.split()) != 5:
        raise ConfigError(path, f"{key}.schedule", f"{schedule!r} is not a 5-field cron string")
    return VerifySpec(
        sample=None if sample == "all" else sample,
        seed=seed,
        severity=severity,
        max_drift_share=share,
        blocking=blocking,
        schedule=schedule,
    )


def _namespace(raw: Mapping[str, Any], path: str, key: str) -> str | None:
    """`namespace`: kept when a sync is renamed, so its derived identities stay the same."""
    if "namespace" not in raw:
        return None
    value = _string(raw, "namespace", path, f"{key}.namespace")
    if not value.strip():
        raise ConfigError(path, f"{key}.namespace", "must be a non-empty text")
    return value


def _sync_flag(raw: Mapping[str, Any], name: str, path: str, key: str) -> bool:
    value = raw.get(name, True)
    if not isinstance(value, bool):
        raise ConfigError(path, f"{key}.{name}", f"must be true or false, got {value!r}")
    return value


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
