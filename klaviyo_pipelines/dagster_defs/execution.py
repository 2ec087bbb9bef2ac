"""Run syncs through Dagster in-process, the way the CLI and the demo do.

Going through `materialize` rather than calling the runner directly means a CLI run leaves
the same materializations, metadata and checks in the Dagster instance as a UI run. The
definitions are `build_defs(config)`'s, with the caller's `SyncObserver` as their
`progress`, so it hears every batch the runner commits inside the run (the steps run in this
process). SIGINT / SIGTERM stop the syncs (`interrupt`): the running one stops sending and reports, and no further run starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg

from klaviyo_pipelines import interrupt
from klaviyo_pipelines.config import Config, ConfigError, ModelSpec, SyncSpec
from klaviyo_pipelines.dagster_defs.assets import SyncRunConfig, partitions_of
from klaviyo_pipelines.dagster_defs.audience_sensor import INVALID_IN_KEYS, audience_syncs
from klaviyo_pipelines.dagster_defs.build import build_defs, sync_selection
from klaviyo_pipelines.dagster_defs.translator import KlaviyoTranslator, sync_spec
from klaviyo_pipelines.progress import SyncObserver
from klaviyo_pipelines.runner import MAX_SAMPLES
from klaviyo_pipelines.warehouse.audiences import audience_statuses
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import run_report

# Counts a sync's report sums over its partitions (days, audiences); `--output json` keys.
SUMMED = (
    "added",
    "updated",
    "deleted",
    "delivered",
    "rejected",
    "retryable",
    "not_found",
    "requests",
    "retries",
    "rate_limited",
    "waited_seconds",
    "duration_seconds",
)


@dataclass(frozen=True)
class Launch:
    """What every run of one `materialize_syncs` call shares: the definitions (their syncs
    telling the caller's observer), instance and run config."""

    defs: dg.Definitions
    instance: dg.DagsterInstance | None = None
    retry_rejected: bool = False
    override_exit_guard: bool = False
    log_level: str = "WARNING"


def materialize_syncs(
    config: Config,
    syncs: Sequence[str],
    *,
    instance: dg.DagsterInstance | None = None,
    retry_rejected: bool = False,
    override_exit_guard: bool = False,
    partitions: Sequence[str] = (),
    audiences: Sequence[str] = (),
    observer: SyncObserver | None = None,
    log_level: str = "WARNING",
) -> dict[str, dict[str, Any]]:
    """Materialize the syncs and the snapshots they read; return each sync's report.

    Unpartitioned syncs share one run. A partitioned sync runs once per partition key given
    (default: the latest day, today), and its report sums the days, each kept under
    `partitions`. The syncs of an audience model run once per audience whose members changed
    (as its sensor would), or once per audience named in `audiences`, together, and their
    reports sum the audiences. An unknown audience is a ConfigError, raised before any run.
    After SIGINT / SIGTERM no further run starts and the reports say interrupted
    (`interrupt.signal_number()` tells which signal).
    """
    with interrupt.on_signals():  # between runs; each run's sync sets its own
        defs = build_defs(config, progress=observer)
        launch = Launch(defs, instance, retry_rejected, override_exit_guard, log_level)
        specs = [config.syncs[name] for name in syncs]
        plain = [s for s in specs if not config.models[s.model].partitioned]
        by_audience = [s for s in specs if config.models[s.model].audience is not None]
        audience_models = [config.models[m] for m in dict.fromkeys(s.model for s in by_audience)]
        audience_keys = _audience_keys(config, audience_models, audiences)
        reports: dict[str, dict[str, Any]] = {}
        if plain:
            reports |= _run(config, plain, None, launch)
        for model in audience_models:
            group = [s for s in by_audience if s.model == model.name]
            reports |= _run_audiences(config, group, audience_keys[model.name], launch)
        for spec in specs:
            if spec in plain or spec in by_audience:
                continue
            partitions_def = partitions_of(config.models[spec.model])
            assert partitions_def is not None
            keys = list(partitions) or partitions_def.get_partition_keys()[-1:]
            days = {key: _run(config, [spec], key, launch)[spec.name] for key in keys}
            reports[spec.name] = _sum_partitions(days)
        return reports


def _run(
    config: Config, specs: Sequence[SyncSpec], partition: str | None, launch: Launch
) -> dict[str, dict[str, Any]]:
    if interrupt.requested():
        name = interrupt.signal_name()
        return {
            spec.name: {
                "status": "interrupted",
                "interrupted_by": name,
                "error": f"interrupted by {name} before it started; the next run sends its rows",
                **dict.fromkeys(SUMMED, 0),
            }
            for spec in specs
        }
    translator = KlaviyoTranslator()  # build_defs' default, as in materialize_syncs
    selection = dg.AssetSelection.assets()
    for spec in specs:
        selection = selection | sync_selection(config, spec, translator)
    run_config = dg.RunConfig(
        ops={
            sync_spec(translator, config, s).key.to_python_identifier(): SyncRunConfig(
                retry_rejected=launch.retry_rejected,
                override_exit_guard=launch.override_exit_guard,
            )
            for s in specs
        },
        loggers={"console": {"config": {"log_level": launch.log_level}}},
    )
    result = dg.materialize(
        list(launch.defs.assets or []),
        selection=selection,
        resources=launch.defs.resources,
        instance=launch.instance,
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
            reports[spec.name] = _with_totals(report)
        return reports
    finally:
        wh.dispose()


def _with_totals(report: dict[str, Any]) -> dict[str, Any]:
    """The report with every SUMMED key, the per-kind counts added up where it has only those."""
    totals = {
        "retryable": sum(report.get("retryable_by_kind", {}).values()),
        "not_found": sum(report.get("not_found_by_kind", {}).values()),
    }
    return report | totals


def _audience_keys(
    config: Config, models: Sequence[ModelSpec], wanted: Sequence[str]
) -> dict[str, list[str]]:
    """Per audience model, the audiences to run: those named in `wanted`, else every one out
    of sync. A wanted audience no model has (or one Dagster cannot key) is a ConfigError."""
    keys: dict[str, list[str]] = {}
    wh = Warehouse(config.warehouse.url, config.warehouse.state_schema)
    try:
        for model in models:
            statuses = audience_statuses(wh, model, audience_syncs(config, model), config.path)
            usable = [s for s in statuses if not any(b in s.key for b in INVALID_IN_KEYS)]
            keys[model.name] = [
                s.key for s in usable if (s.key in wanted if wanted else not s.in_sync)
            ]
    finally:
        wh.dispose()
    found = {key for model_keys in keys.values() for key in model_keys}
    unknown = [key for key in wanted if key not in found]
    if unknown:
        names = ", ".join(repr(m.name) for m in models) or "(none selected)"
        raise ConfigError(
            config.path,
            "--audience",
            f"no audience {', '.join(map(repr, unknown))} in the audience model(s) {names} "
            "of the selected syncs (an audience is a value of the model's audience.column)",
        )
    return keys


def _run_audiences(
    config: Config, specs: Sequence[SyncSpec], keys: Sequence[str], launch: Launch
) -> dict[str, dict[str, Any]]:
    """One run per audience in `keys`, all `specs` (the syncs of one model) in each."""
    partitions_def = partitions_of(config.models[specs[0].model])
    assert isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name
    instance = launch.instance or dg.DagsterInstance.ephemeral()  # holds the partitions
    known = set(instance.get_dynamic_partitions(partitions_def.name))
    instance.add_dynamic_partitions(partitions_def.name, [k for k in keys if k not in known])
    launch = replace(launch, instance=instance)
    runs = {key: _run(config, specs, key, launch) for key in keys}
    return {s.name: _sum_partitions({key: run[s.name] for key, run in runs.items()}) for s in specs}


def _root_message(error: Any) -> str:
    """The first error under Dagster's wrappers (a step's execution error; once its retries
    are spent, "Exceeded max_retries of 1"): ours, such as a WarehouseError naming the step,
    not the driver's text it wraps, and without its class path."""
    while error.cause is not None and (error.cls_name.startswith(("Dagster", "RetryRequested"))):
        error = error.cause
    message = error.message.strip()
    head, _, rest = message.partition(": ")
    return rest if rest and head.rsplit(".", 1)[-1] == error.cls_name else message


def _sum_partitions(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One report for a sync run once per day or audience: counts summed, each run kept."""
    failed = [key for key, report in runs.items() if report["status"] != "success"]
    errors = [f"{key}: {runs[key].get('error')}" for key in failed]
    samples = [s for report in runs.values() for s in report.get("samples") or []]
    statuses = {report["status"] for report in runs.values()}
    return {
        "status": "interrupted" if "interrupted" in statuses else "failed" if failed else "success",
        "error": "; ".join(errors) or None,
        **{name: sum(report.get(name, 0) for report in runs.values()) for name in SUMMED},
        "samples": samples[:MAX_SAMPLES],
        "partitions": runs,
    }
