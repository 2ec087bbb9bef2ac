"""Namespaced materialization metadata, in one place so the UI's plots keep stable names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg

from klaviyo_pipelines.runner import SyncReport
from klaviyo_pipelines.warehouse.audiences import RememberedList
from klaviyo_pipelines.warehouse.snapshot import SnapshotStats

KINDS = ("added", "updated", "deleted")


def sync_metadata(report: SyncReport) -> dict[str, Any]:
    """Counts per change kind, traffic, timing and a sample table of failures."""
    metadata: dict[str, Any] = {
        "klaviyo/status": report.status,
        "klaviyo/planned": sum(report.planned.values()),
        "klaviyo/delivered": sum(report.delivered.values()),
        "klaviyo/rejected": sum(report.rejected.values()),
        "klaviyo/retryable": sum(report.retryable.values()),
        "klaviyo/not_found": sum(report.not_found.values()),
        "klaviyo/not_attempted": report.not_attempted,
        "klaviyo/held_invalid": report.held_invalid,
        "klaviyo/acknowledged": report.acknowledged,
        "klaviyo/key_rejected": report.key_rejected,
        "klaviyo/requests": report.requests,
        "klaviyo/retries": report.retries,
        "klaviyo/rate_limited_429": report.rate_limited,
        "klaviyo/waited_seconds": dg.FloatMetadataValue(round(report.waited_seconds, 3)),
        "klaviyo/duration_seconds": dg.FloatMetadataValue(round(report.duration_seconds, 3)),
        "klaviyo/rows_per_second": dg.FloatMetadataValue(round(report.rows_per_second, 1)),
        "klaviyo/job_ids": dg.JsonMetadataValue(report.job_ids[:50]),
    }
    metadata[row_count_key(report.partition)] = sum(report.delivered.values())
    for kind in KINDS:
        metadata[f"klaviyo/planned_{kind}"] = report.planned.get(kind, 0)
        metadata[f"klaviyo/delivered_{kind}"] = report.delivered.get(kind, 0)
        metadata[f"klaviyo/rejected_{kind}"] = report.rejected.get(kind, 0)
    if report.error:
        metadata["klaviyo/error"] = report.error
    metadata["klaviyo/failures"] = dg.TableMetadataValue(
        records=[
            dg.TableRecord({k: "" if v is None else str(v) for k, v in sample.items()})
            for sample in report.samples
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("key", "string"),
                dg.TableColumn("kind", "string"),
                dg.TableColumn("field", "string"),
                dg.TableColumn("reason", "string"),
            ]
        ),
    )
    return metadata


def row_count_key(partition: str | None) -> str:
    """Dagster's name for the rows of a run: a partitioned run counts only its partition."""
    return "dagster/partition_row_count" if partition else "dagster/row_count"


def snapshot_metadata(
    stats: SnapshotStats,
    partition: str | None = None,
    table_name: str = "",
    column_types: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The counts, and the snapshot table with its columns under Dagster's table keys."""
    return {
        row_count_key(partition): stats.rows,
        "dagster/table_name": table_name,
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(name, type_) for name, type_ in column_types]
        ),
        "warehouse/null_keys": stats.null_keys,
        "warehouse/duplicate_keys": stats.duplicate_keys,
        "warehouse/duplicate_rows": stats.duplicate_rows,
        "warehouse/columns": dg.JsonMetadataValue(list(stats.columns)),
        "warehouse/seconds": dg.FloatMetadataValue(round(stats.seconds, 3)),
    }


def audience_metadata(
    report: SyncReport, members: int, remembered: RememberedList | None
) -> dict[str, Any]:
    """An audience partition's membership change and the Klaviyo list it syncs to."""
    return {
        "audience/key": report.partition or "",
        "audience/members": members,
        "audience/entered": report.found.get("added", 0),
        "audience/exited": report.found.get("deleted", 0),
        "audience/list_id": remembered.list_id if remembered else "",
        "audience/list_name": (remembered.list_name or "") if remembered else "",
    }
