"""Track Event: one Klaviyo event per added row (a metric on a profile).

The metric name is a column (`mapping.metric_name`) or a literal (`settings.metric_name`).
Each row's event carries a deterministic unique_id, so resending it never duplicates it.
Batch mode packs up to 1,000 events / 5 MB per `event-bulk-create-jobs` request; single mode
posts each event to `/api/events`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from klaviyo_pipelines.actions.events import (
    MAPPING_KEYS,
    SETTING_KEYS,
    EventAction,
    SyncKeys,
    bulk_entry,
    event_profile,
    event_properties,
    new_event,
    resolve_event_mapping,
    row_unique_id,
)
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.config import SyncSpec
from klaviyo_pipelines.warehouse.changes import ChangeRow


class TrackEvent(EventAction):
    info = ACTIONS["track_event"]

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        keys = SyncKeys(
            sync,
            columns,
            config_path,
            mapping_keys=MAPPING_KEYS | {"metric_name"},
            setting_keys=SETTING_KEYS | {"metric_name"},
        )
        super().__init__(sync, resolve_event_mapping(keys))
        self.metric_column = keys.mapped(
            "metric_name", hint="; for one fixed metric name use settings.metric_name"
        )
        self.metric_name = keys.metric_name("metric_name")
        if (self.metric_column is None) == (self.metric_name is None):
            raise keys.error(
                "mapping.metric_name",
                "give the metric name either as a column (mapping.metric_name) or as a literal "
                "(settings.metric_name), exactly one of them",
            )

    @property
    def columns(self) -> set[str]:
        extra = {self.metric_column} if self.metric_column else set()
        return self.mapping.columns | extra

    def entry(self, row: ChangeRow) -> dict[str, Any]:
        metric = self.metric_name or row.values.get(self.metric_column or "")
        profile = event_profile(self.mapping, row.values)
        event = new_event(
            metric,
            event_properties(self.mapping, row.values),
            row_unique_id(self.mapping, row),
            **self.event_fields(row),
        )
        return bulk_entry(profile, [event])


ACTION = TrackEvent
