"""The audience sensor: notices audiences whose membership changed and runs just those.

One sensor per audience model, running by default. Each tick reads a window of audiences
(at most `audience.max_per_tick`, after the one the cursor names) in one warehouse query that
compares the model's members with what every sync delivered; it adds a Dagster partition for
each new audience and requests a run for each audience out of sync.

The run key is the audience and a digest of its members, so one membership is requested
once: a tick that finds nothing new requests nothing, and an audience already being synced is
left alone until its run ends. A run that fails for good (after Dagster's step retries, or
stopped by the exit guard) is not requested again until the membership changes; materialize
the partition, or run `klaviyo-pipelines sync`, to try it again sooner.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import dagster as dg

from klaviyo_pipelines.config import Config, ModelSpec, SyncSpec
from klaviyo_pipelines.dagster_defs.assets import partitions_of
from klaviyo_pipelines.dagster_defs.resources import ResourceKeys, WarehouseResource
from klaviyo_pipelines.dagster_defs.translator import KlaviyoTranslator, snapshot_spec, sync_spec
from klaviyo_pipelines.dagster_defs.verify_check import without_verify
from klaviyo_pipelines.warehouse.audiences import AudienceStatus, audience_statuses

RUN_KEY_TAG = "dagster/run_key"
PARTITION_TAG = "dagster/partition"
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
# Dagster refuses partition keys containing these.
INVALID_IN_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


def audience_syncs(config: Config, model: ModelSpec) -> list[SyncSpec]:
    return [s for s in config.syncs.values() if s.model == model.name]


def audience_selection(
    config: Config, model: ModelSpec, translator: KlaviyoTranslator | None = None
) -> dg.AssetSelection:
    """What one audience's run materializes: the snapshot and every sync of the model (their
    verify checks run apart)."""
    translator = translator or KlaviyoTranslator()
    syncs = audience_syncs(config, model)
    models = dict.fromkeys([model.name, *(m for s in syncs for m in s.extra_models)])
    sync_keys = [sync_spec(translator, config, s).key for s in syncs]
    selection = dg.AssetSelection.assets(
        *(snapshot_spec(translator, config, config.models[m]).key for m in models), *sync_keys
    )
    return without_verify(selection, sync_keys)


def sensor_name(model: ModelSpec) -> str:
    return f"{model.name}_audiences"


def run_key(status: AudienceStatus) -> str:
    return f"{status.key}@{status.fingerprint}"


def runs_to_request(
    instance: dg.DagsterInstance, statuses: Sequence[AudienceStatus]
) -> list[AudienceStatus]:
    """The audiences out of sync that have no run in progress and no run for this state yet."""
    changed = [s for s in statuses if not s.in_sync]
    if not changed:
        return []
    keys = [run_key(s) for s in changed]
    done = {
        record.dagster_run.tags.get(RUN_KEY_TAG)
        for record in instance.get_run_records(filters=dg.RunsFilter(tags={RUN_KEY_TAG: keys}))
    }
    busy = {
        record.dagster_run.tags.get(PARTITION_TAG)
        for record in instance.get_run_records(
            filters=dg.RunsFilter(
                tags={PARTITION_TAG: [s.key for s in changed]}, statuses=IN_PROGRESS
            )
        )
    }
    return [s for s in changed if run_key(s) not in done and s.key not in busy]


def build_audience_sensor(
    config: Config, model: ModelSpec, translator: KlaviyoTranslator, keys: ResourceKeys
) -> dg.SensorDefinition:
    spec = model.audience
    assert spec is not None
    partitions = partitions_of(model)
    assert isinstance(partitions, dg.DynamicPartitionsDefinition)
    syncs = audience_syncs(config, model)

    @dg.sensor(
        name=sensor_name(model),
        target=audience_selection(config, model, translator),
        required_resource_keys={keys.warehouse},
        minimum_interval_seconds=spec.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Runs the syncs of audience model {model.name!r} for each audience whose members "
            "changed since its last sync; adds a partition for each new audience."
        ),
    )
    def audiences(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        warehouse: WarehouseResource = getattr(context.resources, keys.warehouse)
        after = json.loads(context.cursor).get("after") if context.cursor else None
        wh = warehouse.open()
        try:
            statuses = audience_statuses(
                wh, model, syncs, config.path, after=after, limit=spec.max_per_tick
            )
        finally:
            wh.dispose()
        usable = []
        for status in statuses:
            if any(bad in status.key for bad in INVALID_IN_KEYS):
                context.log.warning(
                    f"audience {status.key!r} of model {model.name!r} is not synced: Dagster "
                    "partition keys cannot contain '...', tabs, newlines or control characters"
                )
            else:
                usable.append(status)
        assert partitions.name is not None
        known = set(context.instance.get_dynamic_partitions(partitions.name))
        new = [s.key for s in usable if s.key not in known]
        requests = [
            dg.RunRequest(partition_key=s.key, run_key=run_key(s))
            for s in runs_to_request(context.instance, usable)
        ]
        # A full window means more audiences may follow: the next tick starts after this one.
        cursor = {"after": statuses[-1].key} if len(statuses) >= spec.max_per_tick else {}
        checked = f"{len(statuses)} audience(s) checked"
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[partitions.build_add_request(new)] if new else [],
            cursor=json.dumps(cursor),
            skip_reason=None if requests else f"{checked}; none changed since its last sync",
        )

    return audiences
