"""Remove Profile from List (Engage): members leaving an audience leave the audience's list.

Remove Profile's delivery with the list chosen per audience: identifiers resolved to profile
ids in bulk (every page read), then DELETE list relationships of up to 1,000 ids. Members
Klaviyo does not know are delivered and counted as `not_found`, not failed; so is every exit
of an audience that has no list yet (nobody can be in it). A list is never created here.

Before anything is sent, the exit guard refuses a run that would take more than
`max_exit_share` of an audience's members out of its list, when more than `min_exits_guarded`
leave (see engage.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import groupby

from klaviyo_pipelines.actions.base import BatchResult, Prepared, check_settings
from klaviyo_pipelines.actions.engage import (
    audience_list,
    check_exits,
    configured_lists,
    max_exit_share,
    min_exits_guarded,
)
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.actions.remove_profile import RemoveProfile
from klaviyo_pipelines.config import SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.warehouse.audiences import RememberedList, membership_changes
from klaviyo_pipelines.warehouse.changes import ChangeSet, changes_table
from klaviyo_pipelines.warehouse.engine import Warehouse

SETTINGS = {"lists", "max_exit_share", "min_exits_guarded", "batch", "batch_size", "country_code"}
PASSED_ON = {"batch", "batch_size", "country_code"}  # settings Remove Profile reads
PENDING_LIST = "<the audience's list>"  # what `plan` shows before the list is known


class RemoveProfileFromList(RemoveProfile):
    info = ACTIONS["remove_profile_from_list"]
    transport_settings = RemoveProfile.transport_settings | {
        "lists",
        "max_exit_share",
        "min_exits_guarded",
    }

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        check_settings(sync, SETTINGS, config_path)
        self.lists = configured_lists(sync, config_path)
        self.max_exit_share = max_exit_share(sync, config_path)
        self.min_exits_guarded = min_exits_guarded(sync, config_path)
        inherited = {k: v for k, v in sync.settings.items() if k in PASSED_ON}
        inherited["list_id"] = PENDING_LIST  # the list is chosen per audience
        super().__init__(replace(sync, settings=inherited), columns, config_path)
        self.sync = sync
        self.targets: dict[str, RememberedList | None] = {}
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
        if override_exit_guard:
            return
        table = wh.table(changes_table(self.sync.name, partition))
        for audience, change in membership_changes(wh, self.sync.model, table, partition).items():
            check_exits(
                self.sync,
                audience,
                change,
                self.max_exit_share,
                self.path,
                self.min_exits_guarded,
            )

    def preflight(self, client: KlaviyoClient) -> None:
        """Nothing to check: each audience's list is looked up when its exits are sent."""

    def target(self, client: KlaviyoClient, audience: str) -> RememberedList | None:
        with self._targets_lock:
            return self._target(client, audience)

    def _target(self, client: KlaviyoClient, audience: str) -> RememberedList | None:
        if audience not in self.targets:
            assert self.wh is not None, "before_send runs before the first batch"
            self.targets[audience] = audience_list(
                self.wh, client, self.sync, audience, self.lists, create=False
            )
        return self.targets[audience]

    def batches(self, items: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        for _, group in groupby(items, key=lambda item: item.row.partition):
            yield from super().batches(group)

    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        audience = batch[0].row.partition
        assert audience is not None, "rows without an audience key never enter a change set"
        found = self.target(client, audience)
        if found is None:  # the audience never got a list: none of its exits is in one
            return BatchResult(delivered=list(batch), not_found=list(batch))
        return super().send(client, batch)

    def path_for(self, batch: Sequence[Prepared]) -> str:
        found = self.targets.get(batch[0].row.partition or "") if batch else None
        return f"/api/lists/{found.list_id}/relationships/profiles" if found else self.path


ACTION = RemoveProfileFromList
