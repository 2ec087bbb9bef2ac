"""Run syncs through Dagster in-process, the way the CLI and the demo do.

Going through `materialize` rather than calling the runner directly means a CLI run leaves
the same materializations, metadata and checks in the Dagster instance as a UI run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg

from klaviyo_pipelines.config import Config
from klaviyo_pipelines.dagster_defs.assets import SyncRunConfig, snapshot_key, sync_key
from klaviyo_pipelines.definitions import build_assets, build_resources
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import run_report


def materialize_syncs(
    config: Config,
    syncs: Sequence[str],
    *,
    instance: dg.DagsterInstance | None = None,
    retry_rejected: bool = False,
    log_level: str = "WARNING",
) -> dict[str, dict[str, Any]]:
    """Materialize the syncs (and their snapshots) in one run; return each sync's report."""
    specs = [config.syncs[name] for name in syncs]
    selection = [snapshot_key(s.model) for s in specs] + [sync_key(s.name) for s in specs]
    run_config = dg.RunConfig(
        ops={
            sync_key(s.name).to_python_identifier(): SyncRunConfig(retry_rejected=retry_rejected)
            for s in specs
        },
        loggers={"console": {"config": {"log_level": log_level}}},
    )
    result = dg.materialize(
        build_assets(config),
        selection=selection,
        resources=build_resources(config),
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )
    failures = [
        event.step_failure_data.error.message.strip()
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data.error
    ]
    wh = Warehouse(config.warehouse.url, config.warehouse.state_schema)
    try:
        reports = {}
        for spec in specs:
            report = run_report(wh, spec.name, result.run_id)
            if report is None:  # the step never ran: a failed snapshot, say
                report = {
                    "status": "failed",
                    "error": "; ".join(failures) or "the sync step did not run",
                    "added": 0,
                    "updated": 0,
                    "deleted": 0,
                    "delivered": 0,
                    "rejected": 0,
                    "requests": 0,
                }
            reports[spec.name] = report
        return reports
    finally:
        wh.dispose()
