"""The `verify` asset check on each sync, and the `verify_schedule` that runs it alone.

The check reads Klaviyo back (`verify.verify_sync`, read quotas only, never `repair`) and
fails, with the sync's `verify.severity`, when the share of checked rows that drifted exceeds
`verify.max_drift_share`. It is kept out of sync runs (the CLI, sync schedules, audience
sensors): a sync spends write quotas and should not wait on reads; the check runs on its own
cron, or when picked in the UI.
"""

import re
from collections.abc import Iterable
from typing import Any

import dagster as dg

from klaviyo_pipelines.config import Config, SyncSpec
from klaviyo_pipelines.dagster_defs.resources import (
    KlaviyoApiResource,
    ResourceKeys,
    WarehouseResource,
)
from klaviyo_pipelines.klaviyo.errors import redact_json
from klaviyo_pipelines.verify import VerifyReport, verify_sync

VERIFY_CHECK = "verify"
SAMPLE_COLUMNS = ("key", "kind", "field", "warehouse", "klaviyo")
SEVERITIES = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR}
# An address anywhere in a text: its local part is masked, its domain kept (it helps to see
# which domain drifts, and names no one).
_EMAIL = re.compile(r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*(@[\w.-]+)")


def verify_check_key(sync_asset: dg.AssetKey) -> dg.AssetCheckKey:
    return dg.AssetCheckKey(sync_asset, VERIFY_CHECK)


def without_verify(
    selection: dg.AssetSelection, sync_assets: Iterable[dg.AssetKey]
) -> dg.AssetSelection:
    """A run's selection without the syncs' verify checks, which Dagster would otherwise run
    with their asset."""
    return selection - dg.AssetSelection.checks(*(verify_check_key(k) for k in sync_assets))


def build_verify_check(
    app: Config, sync: SyncSpec, sync_asset: dg.AssetKey, keys: ResourceKeys
) -> dg.AssetChecksDefinition:
    settings = sync.verify
    rows = (
        "every delivered row" if settings.sample is None else f"{settings.sample:,} delivered rows"
    )

    @dg.asset_check(
        asset=sync_asset,
        name=VERIFY_CHECK,
        description=(
            f"Reads {rows} back from Klaviyo; fails ({settings.severity}) when over "
            f"{settings.max_drift_share:.1%} of them drifted from what the sync delivered."
        ),
        blocking=settings.blocking,
        required_resource_keys={keys.warehouse, keys.api},
        pool=app.klaviyo.pool,  # the account's read quotas are shared with its syncs' lookups
    )
    def verify(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        warehouse: WarehouseResource = getattr(context.resources, keys.warehouse)
        klaviyo: KlaviyoApiResource = getattr(context.resources, keys.api)
        # Without a configured seed each run samples other rows; its seed is recorded so that
        # `klaviyo-pipelines verify --seed` can check the same rows again.
        seed = settings.seed if settings.seed is not None else int(context.run.run_id[:8], 16)
        wh = warehouse.open()
        try:
            with klaviyo.client() as client:
                report = verify_sync(app, sync.name, wh, client, sample=settings.sample, seed=seed)
        finally:
            wh.dispose()
        return verify_result(sync, report, seed)

    return verify


def verify_result(sync: SyncSpec, report: VerifyReport, seed: int) -> dg.AssetCheckResult:
    drifted = sum(report.drifted.values())
    share = drifted / report.checked if report.checked else 0.0
    return dg.AssetCheckResult(
        check_name=VERIFY_CHECK,
        passed=share <= sync.verify.max_drift_share,
        severity=SEVERITIES[sync.verify.severity],
        metadata=verify_metadata(report, share, seed),
        description=f"{report.checked:,} checked, {report.in_step:,} in step, {drifted:,} drifted",
    )


def verify_metadata(report: VerifyReport, share: float, seed: int) -> dict[str, Any]:
    """The counts, drift by kind, rows not checked by reason, and up to 20 sample drifts with
    emails masked (the API key never reaches a report)."""
    metadata: dict[str, Any] = {
        "verify/delivered": report.delivered,
        "verify/checked": report.checked,
        "verify/in_step": report.in_step,
        "verify/drifted": sum(report.drifted.values()),
        "verify/drift_share": dg.FloatMetadataValue(round(share, 4)),
        "verify/unchecked": sum(report.unchecked.values()),
        "verify/seed": seed,
        "verify/drifted_by_kind": dg.JsonMetadataValue(dict(report.drifted)),
        "verify/unchecked_by_reason": dg.JsonMetadataValue(masked(dict(report.unchecked))),
    }
    for kind, count in report.drifted.items():
        metadata[f"verify/drifted_{kind}"] = count
    samples = masked(report.to_dict()["samples"])
    metadata["verify/samples"] = dg.TableMetadataValue(
        records=[
            dg.TableRecord({c: "" if s[c] is None else str(s[c]) for c in SAMPLE_COLUMNS})
            for s in samples
        ],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, "string") for c in SAMPLE_COLUMNS]),
    )
    return metadata


def masked(value: Any) -> Any:
    """`value` with every email address in its texts (keys included) masked: ada@example.com
    becomes a***@example.com."""
    return redact_json(value, lambda text: _EMAIL.sub(r"\1***\2", text))


def build_verify_schedule(sync: SyncSpec, sync_asset: dg.AssetKey) -> dg.ScheduleDefinition:
    """The sync's `verify.schedule`: a run of its verify check alone, never the sync."""
    assert sync.verify.schedule is not None
    return dg.ScheduleDefinition(
        name=f"{sync.name}_verify_schedule",
        target=dg.AssetSelection.checks(verify_check_key(sync_asset)),
        cron_schedule=sync.verify.schedule,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Verifies sync {sync.name!r} against Klaviyo on its cron.",
    )
