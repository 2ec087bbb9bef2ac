"""Assets built from the config: `warehouse/<model>` snapshots and `klaviyo/<sync>` deliveries.

Each sync asset depends on its model's snapshot, records its report as metadata, and carries
an asset check on its rejected-row share; each snapshot checks its primary key.
"""

import dagster as dg

from klaviyo_pipelines.actions.base import BatchResult
from klaviyo_pipelines.config import Config, ModelSpec, SyncSpec
from klaviyo_pipelines.dagster_defs.metadata import (
    audience_metadata,
    snapshot_metadata,
    sync_metadata,
)
from klaviyo_pipelines.dagster_defs.resources import KlaviyoApiResource, WarehouseResource
from klaviyo_pipelines.progress import SyncObserver
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.warehouse.audiences import audience_summary
from klaviyo_pipelines.warehouse.snapshot import take_snapshot

KLAVIYO_POOL = "klaviyo"
PRIMARY_KEY_CHECK = "primary_key_unique_and_not_null"
REJECTED_SHARE_CHECK = "rejected_share_under_threshold"


def snapshot_key(model: str) -> dg.AssetKey:
    return dg.AssetKey(["warehouse", model])


def sync_key(sync: str) -> dg.AssetKey:
    return dg.AssetKey(["klaviyo", sync])


def partitions_of(
    model: ModelSpec,
) -> dg.DailyPartitionsDefinition | dg.DynamicPartitionsDefinition | None:
    """Daily partitions for a partitioned model, today's included (events arrive all day);
    one dynamic partition per audience for an audience model, added by its sensor."""
    if model.audience is not None:
        return dg.DynamicPartitionsDefinition(name=f"audiences_{model.name}")
    if model.partition is None:
        return None
    return dg.DailyPartitionsDefinition(start_date=model.partition.start, end_offset=1)


def partition_of(context: dg.AssetExecutionContext) -> str | None:
    """The day this asset materializes; None for an unpartitioned asset, even when it runs
    in a partitioned run (line items joined to a day of orders)."""
    partitioned = context.assets_def.partitions_def is not None
    return context.partition_key if partitioned and context.has_partition_key else None


class SyncRunConfig(dg.Config):
    """Per-run options, settable from the launchpad or `klaviyo-pipelines sync`."""

    retry_rejected: bool = False  # also re-send unchanged rows rejected as invalid before
    override_exit_guard: bool = False  # let an audience lose more members than its guard allows


def build_snapshot_asset(app: Config, model: ModelSpec) -> dg.AssetsDefinition:
    key = snapshot_key(model.name)

    @dg.asset(
        key=key,
        group_name="warehouse",
        description=f"Snapshot of model {model.name!r} (primary key {model.primary_key}).",
        kinds={"sql"},
        partitions_def=partitions_of(model),
        check_specs=[
            dg.AssetCheckSpec(
                PRIMARY_KEY_CHECK,
                asset=key,
                description="Rows with a NULL or duplicated primary key cannot be synced.",
            )
        ],
    )
    def snapshot(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        wh = warehouse.open()
        try:
            stats = take_snapshot(wh, model, app.path, partition_of(context))
        finally:
            wh.dispose()
        return dg.MaterializeResult(
            metadata=snapshot_metadata(stats),
            check_results=[
                dg.AssetCheckResult(
                    check_name=PRIMARY_KEY_CHECK,
                    passed=stats.null_keys == 0 and stats.duplicate_keys == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"null_keys": stats.null_keys, "duplicate_keys": stats.duplicate_keys},
                )
            ],
        )

    return snapshot


def build_sync_asset(app: Config, sync: SyncSpec) -> dg.AssetsDefinition:
    key = sync_key(sync.name)
    retry = (
        dg.RetryPolicy(max_retries=sync.retry.max_retries, delay=sync.retry.delay_seconds)
        if sync.retry.max_retries
        else None
    )

    @dg.asset(
        key=key,
        deps=[snapshot_key(m) for m in (sync.model, *sync.extra_models)],
        partitions_def=partitions_of(app.models[sync.model]),
        group_name="klaviyo",
        description=f"{sync.action} of model {sync.model!r} on {', '.join(sync.on)} rows.",
        kinds={"klaviyo"},
        pool=KLAVIYO_POOL,
        retry_policy=retry,
        check_specs=[
            dg.AssetCheckSpec(
                REJECTED_SHARE_CHECK,
                asset=key,
                description=f"At most {sync.max_rejected_share:.0%} of the rows sent are rejected.",
            )
        ],
    )
    def deliver(
        context: dg.AssetExecutionContext,
        config: SyncRunConfig,
        warehouse: WarehouseResource,
        klaviyo: KlaviyoApiResource,
        progress: dg.ResourceParam[SyncObserver],
    ) -> dg.MaterializeResult:
        partition = partition_of(context)
        progress.started(sync.name, partition)
        wh = warehouse.open()
        try:
            with klaviyo.client() as client:

                def on_batch(report: SyncReport, batch: BatchResult) -> None:
                    context.log.info(
                        f"batch: {len(batch.delivered)} delivered, {len(batch.rejected)} "
                        f"rejected, {len(batch.unsent)} to retry; "
                        f"{sum(report.delivered.values())} delivered so far"
                    )
                    progress.batch(report, client.stats)

                report = run_sync(
                    app,
                    sync.name,
                    wh,
                    client,
                    run_id=context.run_id,
                    retry_rejected=config.retry_rejected,
                    partition=partition,
                    override_exit_guard=config.override_exit_guard,
                    on_batch=on_batch,
                )
            progress.finished(report)
            if app.models[sync.model].audience is not None and report.partition is not None:
                audience = audience_metadata(
                    report, *audience_summary(wh, sync.model, report.partition)
                )
            else:
                audience = {}
        finally:
            wh.dispose()
        metadata = sync_metadata(report) | audience
        if report.status == "failed":
            raise dg.Failure(
                description=f"{sync.name}: {report.error}",
                metadata=metadata,
                allow_retries=report.error_is_transient,  # a bad key will not fix itself
            )
        return dg.MaterializeResult(metadata=metadata, check_results=[rejected_check(sync, report)])

    return deliver


def rejected_check(sync: SyncSpec, report: SyncReport) -> dg.AssetCheckResult:
    attempted = sum(report.delivered.values()) + sum(report.rejected.values())
    share = sum(report.rejected.values()) / attempted if attempted else 0.0
    return dg.AssetCheckResult(
        check_name=REJECTED_SHARE_CHECK,
        passed=share <= sync.max_rejected_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"rejected_share": dg.FloatMetadataValue(round(share, 4))},
    )
