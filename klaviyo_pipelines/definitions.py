"""The Dagster code location: `Definitions` built from the user's YAML config.

`workspace.yaml` loads this module. With no config file it serves the bundled demo config,
so `dagster dev` in a fresh clone shows working assets.
"""

from __future__ import annotations

import dagster as dg

from klaviyo_pipelines.config import Config, SyncSpec, load_config
from klaviyo_pipelines.dagster_defs.assets import (
    build_snapshot_asset,
    build_sync_asset,
    partitions_of,
    snapshot_key,
    sync_key,
)
from klaviyo_pipelines.dagster_defs.audience_sensor import audience_syncs, build_audience_sensor
from klaviyo_pipelines.dagster_defs.resources import KlaviyoApiResource, WarehouseResource
from klaviyo_pipelines.progress import SyncObserver


def build_resources(config: Config) -> dict[str, object]:
    """The warehouse, the Klaviyo API, and a silent progress observer (the CLI brings its own).

    A URL from an environment variable goes as an `EnvVar` (config.py refuses a password
    anywhere else); a `${VAR:-default}` whose variable is unset goes as the default, which
    lives in the file and so holds no password."""
    return {
        "warehouse": WarehouseResource(
            url=dg.EnvVar(config.warehouse.url_env)
            if config.warehouse.url_env
            else config.warehouse.url,
            state_schema=config.warehouse.state_schema,
        ),
        "klaviyo": KlaviyoApiResource(
            api_key=dg.EnvVar(config.klaviyo.api_key.env_var),
            base_url=config.klaviyo.base_url,
            revision=config.klaviyo.revision,
            timeout_seconds=config.klaviyo.timeout_seconds,
            max_attempts=config.klaviyo.max_attempts,
        ),
        "progress": SyncObserver(),
    }


def build_assets(config: Config) -> list[dg.AssetsDefinition]:
    return [build_snapshot_asset(config, m) for m in config.models.values()] + [
        build_sync_asset(config, s) for s in config.syncs.values()
    ]


def sync_selection(sync: SyncSpec) -> dg.AssetSelection:
    """A sync's asset and the snapshots it reads: what one run of the sync materializes."""
    models = (sync.model, *sync.extra_models)
    return dg.AssetSelection.assets(*(snapshot_key(m) for m in models), sync_key(sync.name))


def build_schedule(config: Config, sync: SyncSpec) -> dg.ScheduleDefinition:
    """The sync's cron; a partitioned sync runs yesterday's and today's days on each tick,
    so late-arriving rows of yesterday are picked up too."""
    name, description = f"{sync.name}_schedule", f"Runs sync {sync.name!r} on its cron."
    partitions = partitions_of(config.models[sync.model])
    if partitions is None:
        return dg.ScheduleDefinition(
            name=name,
            target=sync_selection(sync),
            cron_schedule=sync.schedule,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=description,
        )

    @dg.schedule(
        name=name,
        target=sync_selection(sync),
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
    remove syncs) in parallel subprocesses, and one fails whenever two open the file at once."""
    if config.warehouse.url.startswith("duckdb"):
        return dg.in_process_executor
    return None


def build_definitions(config: Config) -> dg.Definitions:
    schedules = [build_schedule(config, s) for s in config.syncs.values() if s.schedule]
    sensors = [
        build_audience_sensor(config, m)
        for m in config.models.values()
        if m.audience is not None and audience_syncs(config, m)
    ]
    return dg.Definitions(
        assets=build_assets(config),
        schedules=schedules,
        sensors=sensors,
        resources=build_resources(config),
        executor=build_executor(config),
    )


defs = build_definitions(load_config())
