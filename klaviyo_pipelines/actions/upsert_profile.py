"""Upsert Profile: create or update Klaviyo profiles, optionally adding them to a list.

Batch mode (default) sends profile-bulk-import-jobs of up to 10,000 profiles / 5 MB; `settle`
awaits each job while later ones are submitted, and maps its import errors back to rows. Single mode POSTs /api/profiles, PATCHes
the existing profile on a 409 duplicate, and adds the batch's profiles to the list in one call
per 1,000 ids (Segment adds them one request per profile).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from klaviyo_pipelines.actions.base import (
    Action,
    BatchResult,
    Prepared,
    Rejected,
    batch_size_setting,
    check_settings,
    field_of_pointer,
    flag_setting,
    pointer_index,
    seconds_setting,
)
from klaviyo_pipelines.actions.engage import audience_list
from klaviyo_pipelines.actions.job_watch import JobWatch
from klaviyo_pipelines.actions.lists import require_list
from klaviyo_pipelines.actions.open_job import OpenJob
from klaviyo_pipelines.actions.profile import (
    IDENTIFIERS,
    InvalidRow,
    ProfileMapping,
    profile_attributes,
    resolve_profile_mapping,
)
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.actions.values import dumps
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import LIST_MEMBERSHIP, PROFILE_BULK_IMPORT, PROFILES
from klaviyo_pipelines.klaviyo.errors import (
    AuthError,
    ConflictError,
    KlaviyoError,
    PermanentError,
    TransientError,
)
from klaviyo_pipelines.warehouse.changes import ChangeRow, ChangeSet
from klaviyo_pipelines.warehouse.engine import Warehouse

PROFILES_POINTER = "/data/attributes/profiles/data"
SETTINGS = {
    "list_id",
    "list_name",
    "batch",
    "batch_size",
    "nulls",
    "country_code",
    "job_timeout_seconds",
}


# A job open this long is likely to stay open a while (Klaviyo under load): its rows are
# compressed, which costs more CPU than holding them for a job that ends sooner. Not 1 s:
# jobs of 0.1 s were often seen ended only after a second (the job list is read at most
# twice a second), and compressing them took 2% of the client's CPU.
COMPRESS_AFTER_SECONDS = 2.0


class JobTimeout(TransientError):
    """A bulk import job did not finish in time; its rows are retried on the next run."""


class UpsertProfile(Action):
    info = ACTIONS["upsert_profile"]

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        super().__init__(sync)
        settings = dict(sync.settings)
        check_settings(sync, SETTINGS, config_path)
        self.mapping: ProfileMapping = resolve_profile_mapping(sync, columns, config_path)
        self.list_id: str | None = settings.get("list_id") or None
        self.list_name = _list_name(sync, config_path)
        if self.list_name is not None:
            if self.list_id:
                raise ConfigError(
                    config_path,
                    f"syncs.{sync.name}.settings.list_name",
                    "give the list by list_id or by list_name, not both",
                )
            self.list_id = f"<the list named {self.list_name!r}>"  # what `plan` shows
        self.batch_mode = flag_setting(sync, "batch", True, config_path)
        self._batch_size = batch_size_setting(
            sync, PROFILE_BULK_IMPORT.max_items or 10_000, config_path
        )
        self.job_timeout = seconds_setting(sync, "job_timeout_seconds", 900, config_path)
        self._jobs = JobWatch("/api/profile-bulk-import-jobs")

    @property
    def columns(self) -> set[str]:
        return self.mapping.columns

    @property
    def default_mappings(self) -> Mapping[str, str]:
        return self.mapping.defaults

    @property
    def endpoint(self):  # type: ignore[override]
        return PROFILE_BULK_IMPORT if self.batch_mode else PROFILES

    @property
    def batch_size(self) -> int:
        return self._batch_size if self.batch_mode else 1000

    def prepare(self, row: ChangeRow) -> Prepared:
        item = {"type": "profile", "attributes": profile_attributes(self.mapping, row.values)}
        body = dumps(item)
        limit = PROFILE_BULK_IMPORT.max_item_bytes or 0
        if len(body) > limit:
            raise InvalidRow(
                None, f"profile is {len(body):,} bytes; Klaviyo accepts at most {limit:,}"
            )
        return Prepared(row, item, body)  # by position: 0.2 µs against 0.35

    def batches(self, items):  # type: ignore[no-untyped-def]
        if self.batch_mode:
            return super().batches(items)
        # Single mode sends one request per row; batches only group the list additions.
        return _chunks(list(items), self.batch_size)

    def list_for(self, batch: Sequence[Prepared]) -> str | None:
        """The list a batch's profiles join (Engage picks one per audience); read per batch,
        never from a field set by `send`, since batches are sent from several threads."""
        return self.list_id

    def request_body(self, batch: Sequence[Prepared]) -> bytes:
        if not self.batch_mode:
            return dumps({"data": batch[0].item}) if batch else b""
        list_id = self.list_for(batch)
        relationships = (
            b',"relationships":{"lists":{"data":[' + dumps({"type": "list", "id": list_id}) + b"]}}"
            if list_id
            else b""
        )
        return (
            b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
            + b",".join(item.body for item in batch)
            + b"]}}"
            + relationships
            + b"}}"
        )

    def item_index(self, pointer: str | None) -> int | None:
        return pointer_index(pointer, PROFILES_POINTER) if self.batch_mode else None

    def before_send(
        self,
        wh: Warehouse,
        client: KlaviyoClient,
        changes: ChangeSet,
        partition: str | None,
        *,
        override_exit_guard: bool = False,
    ) -> None:
        """With `list_name`, find the list (or create it once) as Engage finds an audience's:
        remembered in `audience_lists`, so renaming it in Klaviyo never makes a second one."""
        if self.list_name is not None:
            setting = f"syncs.{self.sync.name}.settings.list_id (in place of list_name)"
            found = audience_list(
                wh, client, self.sync, self.list_name, {}, create=True, setting=setting
            )
            assert found is not None  # create=True
            self.list_id = found.list_id

    def preflight(self, client: KlaviyoClient) -> None:
        if self.list_id and self.list_name is None:  # a list found by name was just checked
            require_list(client, self.list_id, f"syncs.{self.sync.name}.settings.list_id")

    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        if self.batch_mode:
            return self._send_bulk(client, batch)
        return self._send_single(client, batch)

    def _send_bulk(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        """Submit the import and return at once: `settle` awaits the job while more batches go
        out, holding its rows packed (a sixth of their memory)."""
        created = client.post("/api/profile-bulk-import-jobs", content=self.request_body(batch))
        job_id = created["data"]["id"] if created else None
        if not job_id:
            raise TransientError(
                method="POST",
                path="/api/profile-bulk-import-jobs",
                reason="Klaviyo accepted the bulk import job but returned no job id",
            )
        return BatchResult(opened=[OpenJob(job_id, batch, IDENTIFIERS)])

    def settle(self, client: KlaviyoClient, job: OpenJob) -> BatchResult:
        state = self._wait_for_job(client, job)
        batch = job.rows()  # unpacked only now: a waiting job holds its rows packed
        result = BatchResult(job_ids=[job.job_id])
        if state["status"] != "complete":
            result.unsent = list(batch)
            result.error = TransientError(
                method="GET",
                path=f"/api/profile-bulk-import-jobs/{job.job_id}",
                reason=f"bulk import job {job.job_id} ended {state['status']!r}",
            )
            return result
        failed = self._import_errors(client, job) if state.get("failed_count") else {}
        for index, item in enumerate(batch):
            if index in failed:
                result.rejected.append(Rejected(item, *failed[index]))
            else:
                result.delivered.append(item)
        return result

    def _wait_for_job(self, client: KlaviyoClient, job: OpenJob) -> dict[str, Any]:
        """The ended job's attributes, watched with the run's other jobs (`JobWatch`: one
        list request tells up to 100 jobs' status). A job still open after
        `COMPRESS_AFTER_SECONDS` holds its rows compressed for the rest of its wait."""
        started = time.monotonic()
        deadline = started + self.job_timeout
        ended = self._jobs.wait(client, job.job_id, min(deadline, started + COMPRESS_AFTER_SECONDS))
        if ended is None:
            job.compress()
            ended = self._jobs.wait(client, job.job_id, deadline)
        if ended is None:
            raise JobTimeout(
                method="GET",
                path="/api/profile-bulk-import-jobs",
                reason=f"bulk import job {job.job_id} had not ended after {self.job_timeout:g} s",
            )
        return ended

    def _import_errors(
        self, client: KlaviyoClient, job: OpenJob
    ) -> dict[int, tuple[str | None, str]]:
        """Map each import error to the row it is about: by pointer, else by identifiers."""
        by_identifier = {
            (key, value): index
            for index, named in enumerate(job.identifiers())
            for key, value in named.items()
        }
        failed: dict[int, tuple[str | None, str]] = {}
        path = f"/api/profile-bulk-import-jobs/{job.job_id}/import-errors"
        for error in client.paginate(path, {"page[size]": 100}):
            attributes = error.get("attributes", {})
            pointer = (attributes.get("source") or {}).get("pointer")
            index = pointer_index(pointer, PROFILES_POINTER)
            if index is None:
                original = attributes.get("original_payload") or {}
                original = original.get("attributes", original)
                index = next(
                    (
                        by_identifier[(k, original.get(k))]
                        for k in IDENTIFIERS
                        if (k, original.get(k)) in by_identifier
                    ),
                    None,
                )
            if index is not None and 0 <= index < len(job):
                reason = (
                    attributes.get("detail") or attributes.get("title") or "rejected by Klaviyo"
                )
                failed[index] = (field_of_pointer(pointer), f"Klaviyo: {reason}")
        return failed

    def _send_single(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        result = BatchResult()
        profile_ids: dict[int, str] = {}
        for index, item in enumerate(batch):
            try:
                profile_ids[index] = self._upsert_one(client, item)
            except AuthError as exc:
                result.unsent += list(batch[index:])
                result.error = exc
                break
            except PermanentError as exc:
                detail = exc.errors[0] if exc.errors else None
                reason = detail.detail if detail and detail.detail else str(exc)
                result.rejected.append(
                    Rejected(
                        item,
                        field_of_pointer(detail.pointer if detail else None),
                        f"Klaviyo: {reason}",
                    )
                )
            except KlaviyoError as exc:
                result.unsent += list(batch[index:])
                result.error = exc
                break
        sent = {i: batch[i] for i in profile_ids}
        list_id = self.list_for(batch)
        if list_id and profile_ids:
            try:
                for chunk in _chunks(list(profile_ids.items()), LIST_MEMBERSHIP.max_items or 1000):
                    client.post(
                        f"/api/lists/{list_id}/relationships/profiles",
                        json={"data": [{"type": "profile", "id": pid} for _, pid in chunk]},
                    )
            except KlaviyoError as exc:
                # The profiles exist but are not all in the list: send them again next run.
                result.unsent = list(sent.values()) + result.unsent
                result.error = result.error or exc
                return result
        result.delivered = list(sent.values())
        return result

    def _upsert_one(self, client: KlaviyoClient, item: Prepared) -> str:
        try:
            created = client.post("/api/profiles", content=dumps({"data": item.item}))
            return created["data"]["id"]
        except ConflictError as exc:
            if not exc.duplicate_profile_id:
                raise
            profile_id = exc.duplicate_profile_id
            client.patch(f"/api/profiles/{profile_id}", {"data": {**item.item, "id": profile_id}})
            return profile_id


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


ACTION = UpsertProfile


def _list_name(sync: SyncSpec, config_path: str) -> str | None:
    """`settings.list_name`: the exact name of the list profiles join (created if missing)."""
    value = sync.settings.get("list_name")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.list_name",
            f"must be the name of a Klaviyo list, got {value!r}",
        )
    return value
