"""Run syncs through Dagster in-process, the way the CLI and the demo do.

Going through `materialize` rather than calling the runner directly means a CLI run leaves
the same materializations, metadata and checks in the Dagster instance as a UI run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg

from klaviyo_pipelines.config import Config, SyncSpec
from klaviyo_pipelines.dagster_defs.assets import SyncRunConfig, partitions_of, sync_key
from klaviyo_pipelines.dagster_defs.audience_sensor import INVALID_IN_KEYS, audience_syncs
from klaviyo_pipelines.definitions import build_assets, build_resources, sync_selection
from klaviyo_pipelines.warehouse.audiences import audience_statuses
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import run_report

SUMMED = ("added", "updated", "deleted", "delivered", "rejected", "requests", "duration_seconds")


def materialize_syncs(
    config: Config,
    syncs: Sequence[str],
    *,
    instance: dg.DagsterInstance | None = None,
    retry_rejected: bool = False,
    partitions: Sequence[str] = (),
    log_level: str = "WARNING",
) -> dict[str, dict[str, Any]]:
    """Materialize the syncs and the snapshots they read; return each sync's report.

    Unpartitioned syncs share one run. A partitioned sync runs once per partition key given
    (default: the latest day, today), and its report sums the days, each kept under
    `partitions`. The syncs of an audience model run once per audience whose members changed
    (as its sensor would), together, and their reports sum the audiences.
    """
    specs = [config.syncs[name] for name in syncs]
    plain = [s for s in specs if not config.models[s.model].partitioned]
    audiences = [s for s in specs if config.models[s.model].audience is not None]
    reports: dict[str, dict[str, Any]] = {}
    if plain:
        reports |= _run(config, plain, None, instance, retry_rejected, log_level)
    for model in dict.fromkeys(s.model for s in audiences):
        group = [s for s in audiences if s.model == model]
        reports |= _run_audiences(config, group, instance, retry_rejected, log_level)
    for spec in specs:
        if spec in plain or spec in audiences:
            continue
        partitions_def = partitions_of(config.models[spec.model])
        assert partitions_def is not None
        keys = list(partitions) or partitions_def.get_partition_keys()[-1:]
        days = {
            key: _run(config, [spec], key, instance, retry_rejected, log_level)[spec.name]
            for key in keys
        }
        reports[spec.name] = _sum_days(days)
    return reports


def _run(
    config: Config,
    specs: Sequence[SyncSpec],
    partition: str | None,
    instance: dg.DagsterInstance | None,
    retry_rejected: bool,
    log_level: str,
) -> dict[str, dict[str, Any]]:
    selection = dg.AssetSelection.assets()
    for spec in specs:
        selection = selection | sync_selection(spec)
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
        partition_key=partition,
        raise_on_error=False,
    )
    failures = [
        _root_message(event.step_failure_data.error)
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
                    **dict.fromkeys(SUMMED, 0),
                }
            reports[spec.name] = report
        return reports
    finally:
        wh.dispose()


def _run_audiences(
    config: Config,
    specs: Sequence[SyncSpec],
    instance: dg.DagsterInstance | None,
    retry_rejected: bool,
    log_level: str,
) -> dict[str, dict[str, Any]]:
    """One run per audience of the syncs' model that is out of sync, all `specs` in each."""
    model = config.models[specs[0].model]
    partitions_def = partitions_of(model)
    assert isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name
    wh = Warehouse(config.warehouse.url, config.warehouse.state_schema)
    try:
        statuses = audience_statuses(wh, model, audience_syncs(config, model), config.path)
    finally:
        wh.dispose()
    keys = [
        s.key for s in statuses if not s.in_sync and not any(b in s.key for b in INVALID_IN_KEYS)
    ]
    instance = instance or dg.DagsterInstance.ephemeral()  # holds the audiences' partitions
    known = set(instance.get_dynamic_partitions(partitions_def.name))
    instance.add_dynamic_partitions(partitions_def.name, [k for k in keys if k not in known])
    runs = {key: _run(config, specs, key, instance, retry_rejected, log_level) for key in keys}
    return {s.name: _sum_days({key: run[s.name] for key, run in runs.items()}) for s in specs}


def _root_message(error: Any) -> str:
    """The user's own error under Dagster's wrappers: once a step's retries are spent, the
    failure says only "Exceeded max_retries of 1" and holds the real error as its cause."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _sum_days(days: dict[str, dict[str, Any]]) -> dict[str, Any]:
    failed = [key for key, report in days.items() if report["status"] != "success"]
    errors = [f"{key}: {days[key].get('error')}" for key in failed]
    return {
        "status": "failed" if failed else "success",
        "error": "; ".join(errors) or None,
        **{name: sum(report.get(name, 0) for report in days.values()) for name in SUMMED},
        "partitions": days,
    }
