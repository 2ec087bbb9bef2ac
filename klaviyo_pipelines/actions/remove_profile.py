"""Remove Profile: take the rows' profiles out of one Klaviyo list (consent stays as it was).

Batch mode (default) resolves a batch's identifiers to profile ids in bulk (`lookup.py`, every
page read), then sends `DELETE /api/lists/{id}/relationships/profiles` with up to 1,000 ids a
call. Single mode (`batch: false`) makes one lookup and one DELETE per row. A row whose
identifiers match no Klaviyo profile is delivered with nothing to do and counted in
`BatchResult.not_found`, not failed: the profile is not in the list either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from klaviyo_pipelines.actions.base import (
    Action,
    BatchResult,
    Prepared,
    Rejected,
    batch_size_setting,
    check_settings,
    flag_setting,
    pointer_index,
)
from klaviyo_pipelines.actions.lists import require_list
from klaviyo_pipelines.actions.lookup import (
    LOOKUP_FIELDS,
    Identifiers,
    default_country,
    lookup_profile_ids,
    lookup_requests,
    mapped_columns,
    read_identifiers,
)
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.actions.values import dumps
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import LIST_MEMBERSHIP
from klaviyo_pipelines.klaviyo.errors import (
    AuthError,
    KlaviyoError,
    PermanentError,
)
from klaviyo_pipelines.warehouse.changes import ChangeRow

SETTINGS = {"list_id", "batch", "batch_size", "country_code"}
MAX_IDS = LIST_MEMBERSHIP.max_items or 1000
SINGLE_PAGE = 100  # rows handed to one `send` in single mode (each still its own requests)


class RemoveProfile(Action):
    info = ACTIONS["remove_profile"]

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        super().__init__(sync)
        settings = dict(sync.settings)
        prefix = f"syncs.{sync.name}.settings"
        check_settings(sync, SETTINGS, config_path)
        list_id = settings.get("list_id")
        if not isinstance(list_id, str | int) or not str(list_id).strip():
            raise ConfigError(
                config_path, f"{prefix}.list_id", "required: the id of the list to remove from"
            )
        self.list_id = str(list_id).strip()
        self.mapping = mapped_columns(sync, columns, config_path, (*LOOKUP_FIELDS, "country_code"))
        if not any(key in self.mapping for key in LOOKUP_FIELDS):
            raise ConfigError(
                config_path,
                f"syncs.{sync.name}.mapping",
                "no identifier is mapped: map at least one of email, phone_number, external_id",
            )
        self.country = default_country(sync, config_path)
        self.batch_mode = flag_setting(sync, "batch", True, config_path)
        self._batch_size = batch_size_setting(sync, MAX_IDS, config_path)

    @property
    def columns(self) -> set[str]:
        return set(self.mapping.values())

    @property
    def default_mappings(self) -> Mapping[str, str]:
        return {k: c for k, c in self.mapping.items() if k not in self.sync.mapping}

    @property
    def endpoint(self):  # type: ignore[override]
        return LIST_MEMBERSHIP

    @property
    def batch_size(self) -> int:
        return self._batch_size if self.batch_mode else SINGLE_PAGE

    @property
    def path(self) -> str:
        return f"/api/lists/{self.list_id}/relationships/profiles"

    def path_for(self, batch: Sequence[Prepared]) -> str:
        """Where a batch's removals go (Engage picks the list per audience); read per batch,
        never from a field set by `send`, since batches are sent from several threads."""
        return self.path

    def prepare(self, row: ChangeRow) -> Prepared:
        identifiers = read_identifiers(row.values, self.mapping, self.country)
        item = identifiers.present()
        return Prepared(row=row, item=item, body=dumps(item))

    def batches(self, items: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        listed = list(items)
        for start in range(0, len(listed), self.batch_size):
            yield listed[start : start + self.batch_size]

    def request_body(self, batch: Sequence[Prepared]) -> bytes:
        """What `plan` shows: the lookups, then the DELETE with ids the lookups will resolve."""
        wanted = [Identifiers(**item.item) for item in batch]
        lookups = [
            {"method": "GET", "path": "/api/profiles", "params": params}
            for _, params in lookup_requests(wanted)
        ]
        placeholders = [
            {"type": "profile", "id": f"<profile with {', '.join(item.item.values())}>"}
            for item in batch
        ]
        return dumps(
            {
                "lookup": lookups,
                "remove": {
                    "method": "DELETE",
                    "path": self.path_for(batch),
                    "body": {"data": placeholders},
                },
            }
        )

    def preflight(self, client: KlaviyoClient) -> None:
        require_list(client, self.list_id, f"syncs.{self.sync.name}.settings.list_id")

    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        if self.batch_mode:
            return self._send_bulk(client, batch)
        return self._send_single(client, batch)

    def _send_bulk(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        # A lookup error raises: the runner retries the rows, or finds a bad one by halving.
        found = lookup_profile_ids(client, [Identifiers(**item.item) for item in batch])
        ids = list(dict.fromkeys(pid for row_ids in found for pid in row_ids))
        done: set[str] = set()
        gone: set[str] = set()
        result = BatchResult()
        try:
            for start in range(0, len(ids), MAX_IDS):
                chunk = ids[start : start + MAX_IDS]
                gone |= self._remove(client, self.path_for(batch), chunk)
                done.update(chunk)
        except KlaviyoError as exc:
            result.error = exc
        # Outcomes follow each row's own ids, never its position among the valid rows.
        for item, row_ids in zip(batch, found, strict=True):
            if not set(row_ids) <= done:
                result.unsent.append(item)
                continue
            result.delivered.append(item)
            if not set(row_ids) - gone:
                result.not_found.append(item)
        return result

    def _send_single(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        result = BatchResult()
        for index, item in enumerate(batch):
            try:
                (row_ids,) = lookup_profile_ids(client, [Identifiers(**item.item)])
                gone = self._remove(client, self.path_for([item]), row_ids) if row_ids else set()
            except AuthError as exc:
                result.unsent += list(batch[index:])
                result.error = exc
                break
            except PermanentError as exc:
                result.rejected.append(Rejected(item, None, f"Klaviyo: {_reason(exc)}"))
                continue
            except KlaviyoError as exc:
                result.unsent += list(batch[index:])
                result.error = exc
                break
            result.delivered.append(item)
            if not set(row_ids) - gone:
                result.not_found.append(item)
        return result

    def _remove(self, client: KlaviyoClient, path: str, ids: list[str]) -> set[str]:
        """DELETE `ids` from the list; returns those Klaviyo says no longer exist.

        A profile can be deleted or merged between the lookup and the DELETE: Klaviyo then
        refuses the call with a pointer at its id, so it is left out and the rest sent again.
        """
        pending, gone = list(ids), set()
        while pending:
            try:
                client.delete(path, {"data": [{"type": "profile", "id": p} for p in pending]})
                break
            except PermanentError as exc:
                bad = {
                    pending[i]
                    for detail in exc.errors
                    if (i := pointer_index(detail.pointer, "/data")) is not None
                    and i < len(pending)
                }
                if exc.status != 400 or not bad:
                    raise
                gone |= bad
                pending = [p for p in pending if p not in bad]
        return gone


def _reason(exc: PermanentError) -> str:
    detail = exc.errors[0] if exc.errors else None
    return (detail and (detail.detail or detail.title)) or str(exc)


ACTION = RemoveProfile
