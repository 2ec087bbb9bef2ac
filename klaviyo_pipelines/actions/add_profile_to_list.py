"""Add Profile To List (Engage): members entering an audience join the audience's list.

Upsert Profile's delivery with the list chosen per audience: profiles that do not exist yet
are created, by a profile-bulk-import-job carrying `relationships.lists` (batch mode, default)
or POST /api/profiles, then one list call per 1,000 ids (single mode). The audience's list is
found by name or created on its first sync and remembered (see engage.py). A batch never
mixes audiences, since a bulk import names one list.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import groupby

from klaviyo_pipelines.actions.base import BatchResult, Prepared, check_settings
from klaviyo_pipelines.actions.engage import audience_list, configured_lists
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.actions.upsert_profile import UpsertProfile
from klaviyo_pipelines.config import SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.warehouse.audiences import RememberedList
from klaviyo_pipelines.warehouse.changes import ChangeSet
from klaviyo_pipelines.warehouse.engine import Warehouse

SETTINGS = {"lists", "batch", "batch_size", "nulls", "country_code", "job_timeout_seconds"}
PENDING_LIST = "<the audience's list>"  # what `plan` shows before the list is known


class AddProfileToList(UpsertProfile):
    info = ACTIONS["add_profile_to_list"]
    transport_settings = UpsertProfile.transport_settings | {"lists"}

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        check_settings(sync, SETTINGS, config_path)
        self.lists = configured_lists(sync, config_path)
        inherited = {k: v for k, v in sync.settings.items() if k != "lists"}
        super().__init__(replace(sync, settings=inherited), columns, config_path)
        self.sync = sync
        self.list_id = PENDING_LIST
        self.targets: dict[str, RememberedList] = {}
        self.wh: Warehouse | None = None
        self._targets_lock = threading.Lock()  # batches are sent from several threads

    def before_send(
        self,
        wh: Warehouse,
        client: KlaviyoClient,
        changes: ChangeSet,
        partition: str | None,
        *,
        override_exit_guard: bool = False,
    ) -> None:
        self.wh = wh
        if partition is not None:  # find or create the list before the first batch
            self.target(client, partition)

    def preflight(self, client: KlaviyoClient) -> None:
        """Nothing to check: `before_send` found or created the list."""

    def target(self, client: KlaviyoClient, audience: str) -> RememberedList:
        with self._targets_lock:  # two batches of a new audience must not both create its list
            return self._target(client, audience)

    def _target(self, client: KlaviyoClient, audience: str) -> RememberedList:
        if audience not in self.targets:
            assert self.wh is not None, "before_send runs before the first batch"
            found = audience_list(self.wh, client, self.sync, audience, self.lists, create=True)
            assert found is not None
            self.targets[audience] = found
        return self.targets[audience]

    def batches(self, items: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        for _, group in groupby(items, key=lambda item: item.row.partition):
            yield from super().batches(group)

    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        audience = batch[0].row.partition
        assert audience is not None, "rows without an audience key never enter a change set"
        self.target(client, audience)
        return super().send(client, batch)

    def list_for(self, batch: Sequence[Prepared]) -> str | None:
        found = self.targets.get(batch[0].row.partition or "") if batch else None
        return found.list_id if found else self.list_id


ACTION = AddProfileToList
