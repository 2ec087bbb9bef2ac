"""`build_defs`: a config's Dagster definitions, to serve alone or merge into a user's project.

Nothing here reads a config until called. The result holds the snapshot and sync assets with
their checks (each sync's `verify` among them), the syncs' schedules and verify schedules, the
audience sensors and our two resources under prefixed keys (`klaviyo_warehouse`,
`klaviyo_api`), and no executor unless one is given, so `dg.Definitions.merge` with the
user's own definitions never clashes.
"""

from __future__ import annotations

import os

import dagster as dg

from klaviyo_pipelines.config import Config, SyncSpec, load_config
from klaviyo_pipelines.dagster_defs.assets import (
    build_snapshot_asset,
    build_sync_asset,
    partitions_of,
)
from klaviyo_pipelines.dagster_defs.audience_sensor import audience_syncs, build_audience_sensor
from klaviyo_pipelines.dagster_defs.resources import (
    DEFAULT_RESOURCE_PREFIX,
    KlaviyoApiResource,
    ResourceKeys,
    WarehouseResource,
)
from klaviyo_pipelines.dagster_defs.translator import KlaviyoTranslator, snapshot_spec, sync_spec
from klaviyo_pipelines.dagster_defs.verify_check import (
    build_verify_check,
    build_verify_schedule,
    without_verify,
)
from klaviyo_pipelines.progress import SyncObserver


def build_defs(
    config: str | os.PathLike[str] | Config,
    *,
    translator: KlaviyoTranslator | None = None,
    resource_prefix: str = DEFAULT_RESOURCE_PREFIX,
    executor: dg.ExecutorDefinition | None = None,
    progress: SyncObserver | None = None,
) -> dg.Definitions:
    """The definitions of a config (a file's path, or a parsed `Config`).

    `translator` decides asset keys, deps, groups, owners, tags, kinds and automation;
    `resource_prefix` names our resources; `executor` is none unless given (`build_executor`
    gives the one a DuckDB file needs); `progress` hears each sync's batches."""
    if not isinstance(config, Config):
        config = load_config(os.fspath(config))
    translator = translator or KlaviyoTranslator()
    keys = ResourceKeys.with_prefix(resource_prefix)
    schedules = [build_schedule(config, s, translator) for s in config.syncs.values() if s.schedule]
    schedules += [
        build_verify_schedule(s, sync_spec(translator, config, s).key)
        for s in config.syncs.values()
        if s.verify.schedule
    ]
    sensors = [
        build_audience_sensor(config, m, translator, keys)
        for m in config.models.values()
        if m.audience is not None and audience_syncs(config, m)
    ]
    return dg.Definitions(
        assets=build_assets(config, translator, resource_prefix, progress),
        schedules=schedules,
        sensors=sensors,
        resources=build_resources(config, resource_prefix),
        executor=executor,
    )


def build_resources(
    config: Config, resource_prefix: str = DEFAULT_RESOURCE_PREFIX
) -> dict[str, dg.ConfigurableResource]:
    """The warehouse and the Klaviyo API.

    A URL from an environment variable goes as an `EnvVar` (config.py refuses a password
    anywhere else); a `${VAR:-default}` whose variable is unset goes as the default, which
    lives in the file and so holds no password."""
    keys = ResourceKeys.with_prefix(resource_prefix)
    return {
        keys.warehouse: WarehouseResource(
            url=dg.EnvVar(config.warehouse.url_env)
            if config.warehouse.url_env
            else config.warehouse.url,
            state_schema=config.warehouse.state_schema,
        ),
        keys.api: KlaviyoApiResource(
            api_key=dg.EnvVar(config.klaviyo.api_key.env_var),
            base_url=config.klaviyo.base_url,
            revision=config.klaviyo.revision,
            timeout_seconds=config.klaviyo.timeout_seconds,
            max_attempts=config.klaviyo.max_attempts,
        ),
    }


def build_assets(
    config: Config,
    translator: KlaviyoTranslator | None = None,
    resource_prefix: str = DEFAULT_RESOURCE_PREFIX,
    progress: SyncObserver | None = None,
) -> list[dg.AssetsDefinition]:
    """The snapshots, the syncs and each sync's `verify` check (a check definition is an
    `AssetsDefinition` too: whoever materializes these can select or leave out the check)."""
    translator = translator or KlaviyoTranslator()
    keys = ResourceKeys.with_prefix(resource_prefix)
    snapshots = [
        build_snapshot_asset(config, m, snapshot_spec(translator, config, m), keys)
        for m in config.models.values()
    ]
    syncs = [
        build_sync_asset(config, s, sync_spec(translator, config, s), keys, progress)
        for s in config.syncs.values()
    ]
    verify_checks = [
        build_verify_check(config, s, sync_spec(translator, config, s).key, keys)
        for s in config.syncs.values()
    ]
    return snapshots + syncs + verify_checks


def sync_selection(
    config: Config, sync: SyncSpec, translator: KlaviyoTranslator | None = None
) -> dg.AssetSelection:
    """A sync's asset and the snapshots it reads: what one run of the sync materializes (its
    verify check runs apart)."""
    translator = translator or KlaviyoTranslator()
    snapshots = [config.models[m] for m in (sync.model, *sync.extra_models)]
    key = sync_spec(translator, config, sync).key
    selection = dg.AssetSelection.assets(
        *(snapshot_spec(translator, config, m).key for m in snapshots), key
    )
    return without_verify(selection, [key])


def build_schedule(
    config: Config, sync: SyncSpec, translator: KlaviyoTranslator
) -> dg.ScheduleDefinition:
    """The sync's cron; a partitioned sync runs yesterday's and today's days on each tick,
    so late-arriving rows of yesterday are picked up too."""
    name, description = f"{sync.name}_schedule", f"Runs sync {sync.name!r} on its cron."
    target = sync_selection(config, sync, translator)
    partitions = partitions_of(config.models[sync.model])
    if partitions is None:
        return dg.ScheduleDefinition(
            name=name,
            target=target,
            cron_schedule=sync.schedule,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=description,
        )

    @dg.schedule(
        name=name,
        target=target,
        cron_schedule=sync.schedule,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=description,
    )
    def recent_days(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        keys = partitions.get_partition_keys(current_time=context.scheduled_execution_time)
        return [
            dg.RunRequest(run_key=f"{key}@{context.scheduled_execution_time}", partition_key=key)
            for key in keys[-2:]
        ]

    return recent_days


def build_executor(config: Config) -> dg.ExecutorDefinition | None:
    """Steps of one run in one process on DuckDB, which lets one process at a time open the
    file: the default executor runs independent steps (two snapshots, an audience's add and
    remove syncs) in parallel subprocesses, and one fails whenever two open the file at once.
    Our code location and the CLI use it; `build_defs` leaves the choice to its caller."""
    if config.warehouse.url.startswith("duckdb"):
        return dg.in_process_executor
    return None
