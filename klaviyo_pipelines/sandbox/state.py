"""The emulated Klaviyo account: profiles, lists, memberships, events and their metrics, consent,
jobs, request log.

Why a separate module: tests inspect this object directly (``sb.state.profiles``, ``find_profile``,
``list_members``, ``requests``) to assert what actually reached "Klaviyo", so it must be plain data
with Klaviyo's semantics (upsert by identifiers, ``null`` clears, ``properties`` merge, 409 on
identifier collisions) and safe to read while request threads write. One re-entrant lock guards
everything; operations that read-then-write hold it across both steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from klaviyo_pipelines.sandbox.errors import ApiError, invalid, not_found
from klaviyo_pipelines.sandbox.ids import new_list_id, new_ulid, new_uuid
from klaviyo_pipelines.sandbox.profile_rules import IDENTIFIERS, MISSING_IDENTIFIER

SCALAR_FIELDS: tuple[str, ...] = (
    "email",
    "phone_number",
    "external_id",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
LOCATION_FIELDS: tuple[str, ...] = (
    "address1",
    "address2",
    "city",
    "country",
    "latitude",
    "longitude",
    "region",
    "zip",
    "timezone",
    "ip",
)
DUPLICATE_DETAIL = "A profile already exists with one of these identifiers."

RejectHook = Callable[[dict[str, Any]], str | None]


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """Klaviyo's timestamp rendering: ISO 8601 with offset."""
    return value.isoformat() if value is not None else None


@dataclass
class Profile:
    """A Klaviyo profile. ``attributes`` holds every scalar field (None when unset), plus
    ``location`` and ``properties`` dicts holding only the keys that are set."""

    id: str
    attributes: dict[str, Any]
    created: datetime
    updated: datetime
    last_event_date: datetime | None = None

    @property
    def email(self) -> str | None:
        return self.attributes.get("email")

    @property
    def phone_number(self) -> str | None:
        return self.attributes.get("phone_number")

    @property
    def external_id(self) -> str | None:
        return self.attributes.get("external_id")


@dataclass
class KList:
    """A static Klaviyo list."""

    id: str
    name: str
    opt_in_process: str
    created: datetime
    updated: datetime


@dataclass
class ImportErrorRecord:
    """A profile a bulk import job refused; ``index`` is its position in the request's array."""

    id: str
    index: int
    code: str
    title: str
    detail: str
    original_payload: dict[str, Any] | None

    @property
    def pointer(self) -> str:
        return f"/data/attributes/profiles/data/{self.index}"


@dataclass
class BulkImportJob:
    """A ``profile-bulk-import-job``; ``rows`` is the submitted profile array until processed."""

    id: str
    created_at: datetime
    total_count: int
    list_ids: list[str]
    rows: list[dict[str, Any]]
    status: str = "queued"
    completed_count: int = 0
    failed_count: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    next_index: int = 0
    profile_ids: list[str] = field(default_factory=list)  # imported profiles, first-seen order
    profile_ids_set: set[str] = field(default_factory=set, repr=False)
    errors: list[ImportErrorRecord] = field(default_factory=list)


@dataclass
class Event:
    """One accepted (not deduplicated) event."""

    id: str
    metric: str
    profile_id: str
    properties: dict[str, Any]
    time: datetime
    value: float | None = None
    value_currency: str | None = None
    unique_id: str | None = None
    backfill: bool = False
    received: datetime = field(default_factory=utcnow)


@dataclass
class Metric:
    """A metric, created by its first event: events name metrics, reads filter by their id."""

    id: str
    name: str
    created: datetime


@dataclass
class Subscription:
    """Consent of one profile on one channel, e.g. ``email.marketing`` -> ``SUBSCRIBED``."""

    profile_id: str
    channel: str
    consent: str
    updated: datetime
    consented_at: datetime | None = None
    list_id: str | None = None
    custom_source: str | None = None
    historical_import: bool = False


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the sandbox received and answered (or dropped, for timeout/reset faults).

    ``status`` is 0 when no response was sent; ``fault`` names the injected fault, if any;
    ``endpoint`` is the endpoint class name from ``klaviyo.endpoints``; ``items`` counts the
    profiles/events/ids in the body (1 for single-resource writes, 0 for reads)."""

    method: str
    path: str
    status: int
    endpoint: str
    items: int
    bytes: int
    operation: str | None = None
    fault: str | None = None
    at: float = field(default_factory=time.time)


class SandboxState:
    """Everything the emulated account holds. All mutation goes through methods holding ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reject_profile: RejectHook | None = None
        self._clear()

    def _clear(self) -> None:
        self.profiles: dict[str, Profile] = {}
        self.lists: dict[str, KList] = {}
        self.memberships: dict[str, dict[str, datetime]] = {}
        self.events: list[Event] = []
        self.metrics: dict[str, Metric] = {}  # by name
        self.subscriptions: dict[str, dict[str, Subscription]] = {}
        self.jobs: dict[str, BulkImportJob] = {}
        self.requests: list[RequestRecord] = []
        self._by_email: dict[str, str] = {}
        self._by_phone: dict[str, str] = {}
        self._by_external_id: dict[str, str] = {}
        self._event_keys: set[tuple[str, str, str]] = set()

    def reset(self) -> None:
        """Forget all data (the ``reject_profile`` hook stays)."""
        with self.lock:
            self._clear()

    # ---- lookups -------------------------------------------------------------------------

    def _index(self, name: str) -> dict[str, str]:
        if name == "email":
            return self._by_email
        if name == "phone_number":
            return self._by_phone
        return self._by_external_id

    @staticmethod
    def _key(name: str, value: str) -> str:
        return value.lower() if name == "email" else value  # emails match case-insensitively

    def owner_of(self, name: str, value: str | None) -> str | None:
        """Id of the profile holding identifier ``name`` = ``value``."""
        if value is None:
            return None
        return self._index(name).get(self._key(name, value))

    def find_profile(
        self,
        email: str | None = None,
        phone_number: str | None = None,
        external_id: str | None = None,
    ) -> Profile | None:
        """The profile matching the first given identifier (email, then phone, then external id)."""
        with self.lock:
            for name, value in (("email", email), ("phone_number", phone_number)):
                owner = self.owner_of(name, value)
                if owner:
                    return self.profiles[owner]
            owner = self.owner_of("external_id", external_id)
            return self.profiles[owner] if owner else None

    def list_members(self, list_id: str) -> set[str]:
        with self.lock:
            return set(self.memberships.get(list_id, {}))

    def consent(self, profile_id: str, channel: str) -> str | None:
        """Consent recorded for ``channel`` (e.g. ``email.marketing``), None if never set."""
        with self.lock:
            record = self.subscriptions.get(profile_id, {}).get(channel)
            return record.consent if record else None

    def record_request(self, record: RequestRecord) -> None:
        with self.lock:
            self.requests.append(record)

    # ---- profiles ------------------------------------------------------------------------

    def get_profile(self, profile_id: str) -> Profile:
        profile = self.profiles.get(profile_id)
        if profile is None:
            raise not_found(f"A profile with id {profile_id} does not exist.")
        return profile

    def _owners(self, attrs: dict[str, Any]) -> list[tuple[str, str]]:
        """(identifier name, owning profile id) for each non-null identifier in ``attrs``."""
        owners = []
        for name in IDENTIFIERS:
            owner = self.owner_of(name, attrs.get(name))
            if owner:
                owners.append((name, owner))
        return owners

    def create_profile(self, attrs: dict[str, Any], meta: dict[str, Any] | None = None) -> Profile:
        """``POST /api/profiles``: 409 ``duplicate_profile`` if any identifier is taken."""
        with self.lock:
            owners = self._owners(attrs)
            if owners:
                raise duplicate_profile(owners[0][1])
            return self._new_profile(attrs, meta)

    def update_profile(
        self, profile_id: str, attrs: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Profile:
        """``PATCH /api/profiles/{id}``: 404 if unknown, 409 if identifiers belong to another."""
        with self.lock:
            profile = self.get_profile(profile_id)
            for _, owner in self._owners(attrs):
                if owner != profile.id:
                    raise duplicate_profile(owner)
            self._apply(profile, attrs, meta)
            return profile

    def delete_profile(self, profile_id: str) -> None:
        """Delete a profile as someone in Klaviyo's UI would: its identifiers, list memberships
        and consent go with it (for tests of drift behind the project's back)."""
        with self.lock:
            profile = self.profiles.pop(profile_id)
            for name in IDENTIFIERS:
                value = profile.attributes.get(name)
                if value is not None:
                    self._index(name).pop(self._key(name, value), None)
            for members in self.memberships.values():
                members.pop(profile_id, None)
            self.subscriptions.pop(profile_id, None)

    def resolve(self, attrs: dict[str, Any], profile_id: str | None = None) -> str | None:
        """Dry run of :meth:`upsert_profile`: the id it would update (None: it would create).

        Raises the same 404/409 errors, without changing anything."""
        with self.lock:
            owners = self._owners(attrs)
            if profile_id:
                self.get_profile(profile_id)
                primary = profile_id
            elif not owners:
                return None
            else:
                primary = owners[0][1]
            for _, owner in owners:
                if owner != primary:
                    raise duplicate_profile(owner)
            return primary

    def upsert_profile(
        self,
        attrs: dict[str, Any],
        profile_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> tuple[Profile, bool]:
        """``POST /api/profile-import`` semantics; returns (profile, created).

        Matches on ``profile_id`` if given, else on the identifiers. Identifiers that resolve
        to two different profiles are a 409 naming the other profile."""
        with self.lock:
            existing = self.resolve(attrs, profile_id)
            if existing is None:
                return self._new_profile(attrs, meta), True
            profile = self.profiles[existing]
            self._apply(profile, attrs, meta)
            return profile, False

    def _new_profile(self, attrs: dict[str, Any], meta: dict[str, Any] | None) -> Profile:
        now = utcnow()
        blank: dict[str, Any] = dict.fromkeys(SCALAR_FIELDS)
        blank["location"] = {}
        blank["properties"] = {}
        profile = Profile(new_ulid(), blank, now, now)
        self._apply(profile, attrs, meta, is_new=True)
        self.profiles[profile.id] = profile
        return profile

    def _apply(
        self,
        profile: Profile,
        attrs: dict[str, Any],
        meta: dict[str, Any] | None,
        is_new: bool = False,
    ) -> None:
        current = profile.attributes
        merged_ids = {n: attrs[n] if n in attrs else current.get(n) for n in IDENTIFIERS}
        if not any(merged_ids.values()):
            raise invalid(MISSING_IDENTIFIER, pointer="/data/attributes")
        for name in IDENTIFIERS:
            if name not in attrs or attrs[name] == current.get(name):
                continue
            index = self._index(name)
            old = current.get(name)
            if old is not None and not is_new:
                index.pop(self._key(name, old), None)
            if attrs[name] is not None:
                index[self._key(name, attrs[name])] = profile.id
            current[name] = attrs[name]
        for name in SCALAR_FIELDS:
            if name in attrs and name not in IDENTIFIERS:
                current[name] = attrs[name]
        _merge_object(current, "location", attrs, drop_nulls=True)
        _merge_object(current, "properties", attrs, drop_nulls=False)
        if meta and meta.get("patch_properties"):
            _patch_properties(current["properties"], meta["patch_properties"])
        if not is_new:
            profile.updated = utcnow()

    # ---- lists ---------------------------------------------------------------------------

    def get_list(self, list_id: str) -> KList:
        klist = self.lists.get(list_id)
        if klist is None:
            raise not_found(f"A list with id {list_id} does not exist.")
        return klist

    def create_list(
        self, name: str, opt_in_process: str | None = None, list_id: str | None = None
    ) -> KList:
        """A new list; `list_id` fixes its id (the demo's list must be known in advance)."""
        with self.lock:
            if list_id is None:
                list_id = new_list_id()
                while list_id in self.lists:
                    list_id = new_list_id()
            now = utcnow()
            klist = KList(list_id, name, opt_in_process or "single_opt_in", now, now)
            self.lists[list_id] = klist
            self.memberships[list_id] = {}
            return klist

    def add_members(self, list_id: str, profile_ids: Iterable[str]) -> None:
        with self.lock:
            self.get_list(list_id)
            members = self.memberships[list_id]
            now = utcnow()
            for profile_id in profile_ids:
                members.setdefault(profile_id, now)

    def remove_members(self, list_id: str, profile_ids: Iterable[str]) -> None:
        with self.lock:
            self.get_list(list_id)
            members = self.memberships[list_id]
            for profile_id in profile_ids:
                members.pop(profile_id, None)

    # ---- events --------------------------------------------------------------------------

    def event_key(
        self, profile_id: str, metric: str, unique_id: str | None, when: datetime
    ) -> tuple[str, str, str]:
        """Klaviyo's dedup key: unique_id, or the event time to the second when absent."""
        return (profile_id, metric, unique_id or when.replace(microsecond=0).isoformat())

    def record_event(self, event: Event) -> bool:
        """Store ``event`` unless an event with the same dedup key exists; True if stored."""
        with self.lock:
            key = self.event_key(event.profile_id, event.metric, event.unique_id, event.time)
            if key in self._event_keys:
                return False
            self._event_keys.add(key)
            self.events.append(event)
            if event.metric not in self.metrics:
                taken = {metric.id for metric in self.metrics.values()}
                metric_id = new_list_id()
                while metric_id in taken:
                    metric_id = new_list_id()
                self.metrics[event.metric] = Metric(metric_id, event.metric, utcnow())
            profile = self.profiles.get(event.profile_id)
            if profile and (
                profile.last_event_date is None or event.time > profile.last_event_date
            ):
                profile.last_event_date = event.time
            return True

    def delete_events(self, metric: str, unique_ids: Iterable[str]) -> int:
        """Make events as if Klaviyo never stored them (for tests of drift behind the
        project's back): gone, and their dedup keys too, so sending them again records them."""
        wanted = set(unique_ids)
        with self.lock:
            gone = [e for e in self.events if e.metric == metric and e.unique_id in wanted]
            for event in gone:
                self.events.remove(event)
                self._event_keys.discard(
                    self.event_key(event.profile_id, event.metric, event.unique_id, event.time)
                )
            return len(gone)

    # ---- consent -------------------------------------------------------------------------

    def set_consent(self, record: Subscription) -> None:
        with self.lock:
            self.subscriptions.setdefault(record.profile_id, {})[record.channel] = record

    # ---- bulk import jobs ----------------------------------------------------------------

    def add_job(self, rows: list[dict[str, Any]], list_ids: list[str]) -> BulkImportJob:
        with self.lock:
            job = BulkImportJob(new_ulid(), utcnow(), len(rows), list_ids, rows)
            self.jobs[job.id] = job
            return job

    def get_job(self, job_id: str) -> BulkImportJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise not_found(f"A profile bulk import job with id {job_id} does not exist.")
        return job


def duplicate_profile(existing_id: str) -> ApiError:
    """Klaviyo's 409 body, verbatim in shape (klaviyo-api-node #75)."""
    return ApiError.single(
        409,
        "duplicate_profile",
        DUPLICATE_DETAIL,
        title="Conflict.",
        pointer="/data/attributes",
        meta={"duplicate_profile_id": existing_id},
    )


def _merge_object(
    current: dict[str, Any], name: str, attrs: dict[str, Any], drop_nulls: bool
) -> None:
    """``null`` clears the whole object; a dict merges key by key (nested nulls clear a key in
    ``location``; in ``properties`` they are stored, as Klaviyo stores null property values)."""
    if name not in attrs:
        return
    incoming = attrs[name]
    if incoming is None:
        current[name] = {}
        return
    target = current[name]
    for key, value in incoming.items():
        if value is None and drop_nulls:
            target.pop(key, None)
        else:
            target[key] = value


def _patch_properties(properties: dict[str, Any], patch: dict[str, Any]) -> None:
    """``meta.patch_properties``: ``append``/``unappend`` values of array properties, ``unset`` keys."""
    for key, value in (patch.get("append") or {}).items():
        values = value if isinstance(value, list) else [value]
        existing = properties.get(key)
        if existing is None:
            properties[key] = list(values)
        elif isinstance(existing, list):
            existing.extend(values)
        else:
            properties[key] = [existing, *values]
    for key, value in (patch.get("unappend") or {}).items():
        values = value if isinstance(value, list) else [value]
        existing = properties.get(key)
        if isinstance(existing, list):
            properties[key] = [v for v in existing if v not in values]
    unset = patch.get("unset")
    for key in [unset] if isinstance(unset, str) else unset or []:
        properties.pop(key, None)


_IMPORT_ERROR_TITLES = {"invalid": "Invalid input.", "duplicate_profile": "Conflict."}


def new_import_error(index: int, code: str, detail: str, payload: Any) -> ImportErrorRecord:
    """An import error for row ``index`` of a bulk job, keeping the refused row as sent."""
    return ImportErrorRecord(
        id=new_uuid(),
        index=index,
        code=code,
        title=_IMPORT_ERROR_TITLES.get(code, "Error."),
        detail=detail,
        original_payload=payload if isinstance(payload, dict) else None,
    )
