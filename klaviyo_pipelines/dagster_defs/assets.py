"""Assets built from the config: `warehouse/<model>` snapshots and `klaviyo/<sync>` deliveries.

Each sync asset depends on its model's snapshot, records its report as metadata, and carries
an asset check on its rejected-row share; each snapshot checks its primary key. Keys, deps,
groups and automation come from the translator's spec; resources are read by their keys
(`ResourceKeys`), which a user's project may choose.
"""

import dagster as dg
import sqlalchemy as sa

from klaviyo_pipelines.actions.base import BatchResult
from klaviyo_pipelines.config import Config, ModelSpec, SyncSpec
from klaviyo_pipelines.dagster_defs.metadata import (
    audience_metadata,
    snapshot_metadata,
    sync_metadata,
)
from klaviyo_pipelines.dagster_defs.resources import (
    KlaviyoApiResource,
    ResourceKeys,
    WarehouseResource,
)
from klaviyo_pipelines.dagster_defs.translator import snapshot_key as snapshot_key  # re-export
from klaviyo_pipelines.dagster_defs.translator import sync_key as sync_key  # re-export
from klaviyo_pipelines.progress import SyncObserver
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.warehouse.audiences import audience_summary
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.errors import WarehouseError
from klaviyo_pipelines.warehouse.snapshot import snapshot_table, take_snapshot

KLAVIYO_POOL = "klaviyo"  # the default account's (config.KlaviyoSpec.pool)
PRIMARY_KEY_CHECK = "primary_key_unique_and_not_null"
REJECTED_SHARE_CHECK = "rejected_share_under_threshold"
COLUMN_TYPES = sa.text(
    "SELECT column_name, data_type FROM information_schema.columns"
    " WHERE table_schema = :schema AND table_name = :table ORDER BY ordinal_position"
)


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


def _asset_args(spec: dg.AssetSpec) -> dict[str, object]:
    """The translator's decisions, as `@dg.asset` takes them."""
    return {
        "key": spec.key,
        "deps": list(spec.deps),
        "group_name": spec.group_name,
        "description": spec.description,
        "kinds": spec.kinds,
        "owners": spec.owners,
        "tags": spec.tags,
        "metadata": spec.metadata,
        "automation_condition": spec.automation_condition,
    }


def build_snapshot_asset(
    app: Config, model: ModelSpec, spec: dg.AssetSpec, keys: ResourceKeys
) -> dg.AssetsDefinition:
    @dg.asset(
        **_asset_args(spec),
        partitions_def=partitions_of(model),
        required_resource_keys={keys.warehouse},
        check_specs=[
            dg.AssetCheckSpec(
                PRIMARY_KEY_CHECK,
                asset=spec.key,
                description="Rows with a NULL or duplicated primary key cannot be synced.",
            )
        ],
    )
    def snapshot(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        warehouse: WarehouseResource = getattr(context.resources, keys.warehouse)
        partition = partition_of(context)
        wh = warehouse.open()
        try:
            stats = take_snapshot(wh, model, app.path, partition)
            table, columns = _snapshot_columns(context, wh, model)
        finally:
            wh.dispose()
        return dg.MaterializeResult(
            # "direct": the table is the model's own, read by each change set, never copied
            metadata=snapshot_metadata(stats, partition, table, columns)
            | {"warehouse/snapshot": model.snapshot},
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


def _snapshot_columns(
    context: dg.AssetExecutionContext, wh: Warehouse, model: ModelSpec
) -> tuple[str, list[tuple[str, str]]]:
    """The snapshot table's name (a direct model's own table) and its columns' types from
    `information_schema` (SQLAlchemy's reflection fails on DuckDB). Where the engine cannot
    say, the run goes on without them."""
    schema, name = wh.state_schema, wh.fit(snapshot_table(model.name))
    if model.snapshot == "direct" and model.table is not None:
        schema, _, name = model.table.rpartition(".")
    try:
        with wh.connect(f"reading the column types of the snapshot of {model.name!r}") as conn:
            schema = schema or str(sa.inspect(conn).default_schema_name)
            columns = conn.execute(COLUMN_TYPES, {"schema": schema, "table": name})
            types = [(column, str(type_)) for column, type_ in columns]
    except WarehouseError as exc:
        context.log.warning(f"no column schema recorded: {exc}")
        types = []
    return (f"{schema}.{name}" if schema else name), types


def build_sync_asset(
    app: Config,
    sync: SyncSpec,
    spec: dg.AssetSpec,
    keys: ResourceKeys,
    progress: SyncObserver | None = None,
) -> dg.AssetsDefinition:
    """`progress` hears the run's batches (the CLI's bars), in the process the step runs in."""
    observer = progress or SyncObserver()
    retry = (
        dg.RetryPolicy(max_retries=sync.retry.max_retries, delay=sync.retry.delay_seconds)
        if sync.retry.max_retries
        else None
    )

    @dg.asset(
        **_asset_args(spec),
        partitions_def=partitions_of(app.models[sync.model]),
        pool=app.klaviyo.pool,
        retry_policy=retry,
        required_resource_keys={keys.warehouse, keys.api},
        check_specs=[
            dg.AssetCheckSpec(
                REJECTED_SHARE_CHECK,
                asset=spec.key,
                description=f"At most {sync.max_rejected_share:.0%} of the rows sent are rejected.",
            )
        ],
    )
    def deliver(context: dg.AssetExecutionContext, config: SyncRunConfig) -> dg.MaterializeResult:
        warehouse: WarehouseResource = getattr(context.resources, keys.warehouse)
        klaviyo: KlaviyoApiResource = getattr(context.resources, keys.api)
        partition = partition_of(context)
        observer.started(sync.name, partition)
        wh = warehouse.open()
        try:
            with klaviyo.client() as client:

                def on_batch(report: SyncReport, batch: BatchResult) -> None:
                    context.log.info(
                        f"batch: {len(batch.delivered)} delivered, {len(batch.rejected)} "
                        f"rejected, {len(batch.unsent)} to retry; "
                        f"{sum(report.delivered.values())} delivered so far"
                    )
                    observer.batch(report, client.stats)

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
            observer.finished(report)
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
