"""The Dagster code location: `Definitions` built from the user's YAML config.

`workspace.yaml` loads this module. With no config file it serves the bundled demo config,
so `dagster dev` in a fresh clone shows working assets.
"""

from __future__ import annotations

import dagster as dg

from klaviyo_pipelines.config import Config, load_config
from klaviyo_pipelines.dagster_defs.assets import (
    build_snapshot_asset,
    build_sync_asset,
    snapshot_key,
    sync_key,
)
from klaviyo_pipelines.dagster_defs.resources import KlaviyoApiResource, WarehouseResource


def build_resources(config: Config) -> dict[str, dg.ConfigurableResource]:
    return {
        "warehouse": WarehouseResource(
            url=config.warehouse.url, state_schema=config.warehouse.state_schema
        ),
        "klaviyo": KlaviyoApiResource(
            api_key=dg.EnvVar(config.klaviyo.api_key.env_var),
            base_url=config.klaviyo.base_url,
            revision=config.klaviyo.revision,
            timeout_seconds=config.klaviyo.timeout_seconds,
            max_attempts=config.klaviyo.max_attempts,
        ),
    }


def build_assets(config: Config) -> list[dg.AssetsDefinition]:
    return [build_snapshot_asset(config, m) for m in config.models.values()] + [
        build_sync_asset(config, s) for s in config.syncs.values()
    ]


def build_definitions(config: Config) -> dg.Definitions:
    schedules = [
        dg.ScheduleDefinition(
            name=f"{sync.name}_schedule",
            target=dg.AssetSelection.assets(snapshot_key(sync.model), sync_key(sync.name)),
            cron_schedule=sync.schedule,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Runs sync {sync.name!r} on its configured cron.",
        )
        for sync in config.syncs.values()
        if sync.schedule
    ]
    return dg.Definitions(
        assets=build_assets(config), schedules=schedules, resources=build_resources(config)
    )


defs = build_definitions(load_config())
