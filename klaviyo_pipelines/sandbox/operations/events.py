"""Event operations: ``POST /api/events`` and ``POST /api/event-bulk-create-jobs`` (202, no body).

Klaviyo's rules emulated here: metric names under 128 characters, at most 400 event properties,
no string over 100 KB, ``time`` after 1990 and at most a year ahead. An event with a ``unique_id``
already seen for the same profile and metric (or, without ``unique_id``, the same time to the
second) is accepted but kept only once. In a bulk request, a ``unique_id`` repeated for the same
profile and metric fails the whole request with 400 and nothing is processed. The profile each
event names is created or updated like ``profile-import`` would; unlike a profile write, an event
may name its profile by ``anonymous_id`` alone, as Segment's Klaviyo integration relies on. The
sandbox keeps such a profile and joins it to the first identifiers sent with the same
``anonymous_id`` (a simplification of Klaviyo's own merging).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from klaviyo_pipelines.sandbox.errors import ApiError, invalid
from klaviyo_pipelines.sandbox.filters import parse_datetime
from klaviyo_pipelines.sandbox.ids import new_ulid
from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import Ctx, check_profile, writable_attributes
from klaviyo_pipelines.sandbox.profile_rules import IDENTIFIERS, has_identifier
from klaviyo_pipelines.sandbox.state import SCALAR_FIELDS, Event, Profile, SandboxState, utcnow

MAX_METRIC_NAME = 127
MAX_PROPERTIES = 400
MAX_STRING_BYTES = 100 * 1024
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
LATEST_AHEAD = timedelta(days=365)


@dataclass
class _PlannedEvent:
    metric: str
    properties: dict[str, Any]
    time: datetime
    value: float | None
    value_currency: str | None
    unique_id: str | None
    backfill: bool


@dataclass
class _PlannedProfile:
    attributes: dict[str, Any]
    profile_id: str | None
    meta: dict[str, Any] | None
    anonymous_id: str | None = None


def _long_string(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > MAX_STRING_BYTES // 4 and len(value.encode()) > MAX_STRING_BYTES
    if isinstance(value, dict):
        return any(_long_string(v) for v in value.values())
    if isinstance(value, list):
        return any(_long_string(v) for v in value)
    return False


def _plan_event(attrs: dict[str, Any], pointer: str, now: datetime) -> _PlannedEvent:
    """Check one event's attributes (``pointer`` is their JSON pointer); 400 on a violation."""
    metric = attrs["metric"]["data"]["attributes"]["name"]
    if len(metric) > MAX_METRIC_NAME:
        raise invalid(
            "Metric name must be less than 128 characters.",
            pointer=f"{pointer}/metric/data/attributes/name",
        )
    properties = attrs["properties"]
    if len(properties) > MAX_PROPERTIES:
        raise invalid(
            f"An event may have at most {MAX_PROPERTIES} properties, got {len(properties)}.",
            pointer=f"{pointer}/properties",
        )
    if _long_string(properties):
        raise invalid(
            "Event property strings must be at most 100KB.", pointer=f"{pointer}/properties"
        )
    when = now
    if attrs.get("time") is not None:
        parsed = parse_datetime(attrs["time"])
        if parsed is None or not EARLIEST <= parsed <= now + LATEST_AHEAD:
            raise invalid(
                "Event time must be after 1990 and at most one year in the future.",
                pointer=f"{pointer}/time",
            )
        when = parsed.replace(microsecond=0)
    return _PlannedEvent(
        metric=metric,
        properties=properties,
        time=when,
        value=attrs.get("value"),
        value_currency=attrs.get("value_currency"),
        unique_id=attrs.get("unique_id"),
        backfill=bool(attrs.get("backfill")),
    )


def _plan_profile(state: SandboxState, data: dict[str, Any], pointer: str) -> _PlannedProfile:
    raw = data.get("attributes") or {}
    attrs = writable_attributes(raw)
    profile_id = data.get("id")
    anonymous_id = raw.get("anonymous_id") or None
    check_profile(
        state, attrs, f"{pointer}/attributes", require_identifier=not (profile_id or anonymous_id)
    )
    meta = raw.get("meta") or data.get("meta")
    return _PlannedProfile(attrs, profile_id, meta, anonymous_id)


def _anonymous_owner(state: SandboxState, anonymous_id: str) -> Profile | None:
    return next(
        (p for p in state.profiles.values() if p.attributes.get("anonymous_id") == anonymous_id),
        None,
    )


def _store_profile(state: SandboxState, profile: _PlannedProfile) -> Profile:
    """Upsert like ``profile-import``; a profile named only by ``anonymous_id`` is found or
    created by it, and an anonymous profile takes the first identifiers sent with its id."""
    anonymous = _anonymous_owner(state, profile.anonymous_id) if profile.anonymous_id else None
    if profile.profile_id is None and not has_identifier(profile.attributes):
        if anonymous is None:
            now = utcnow()
            attributes: dict[str, Any] = dict.fromkeys(SCALAR_FIELDS)
            attributes.update(location={}, properties={}, anonymous_id=profile.anonymous_id)
            anonymous = Profile(new_ulid(), attributes, now, now)
            state.profiles[anonymous.id] = anonymous
        return anonymous
    profile_id = profile.profile_id
    if profile_id is None and anonymous is not None and state.resolve(profile.attributes) is None:
        profile_id = anonymous.id
    stored, _ = state.upsert_profile(profile.attributes, profile_id, profile.meta)
    if profile.anonymous_id:
        stored.attributes.setdefault("anonymous_id", profile.anonymous_id)
    return stored


def _record(state: SandboxState, profile: _PlannedProfile, events: list[_PlannedEvent]) -> None:
    stored = _store_profile(state, profile)
    for planned in events:
        state.record_event(
            Event(
                id=new_ulid(),
                metric=planned.metric,
                profile_id=stored.id,
                properties=planned.properties,
                time=planned.time,
                value=planned.value,
                value_currency=planned.value_currency,
                unique_id=planned.unique_id,
                backfill=planned.backfill,
            )
        )


def create_event(ctx: Ctx) -> ApiResponse:
    attrs = ctx.body["data"]["attributes"]
    event = _plan_event(attrs, "/data/attributes", utcnow())
    profile = _plan_profile(ctx.state, attrs["profile"]["data"], "/data/attributes/profile/data")
    with ctx.state.lock:
        _record(ctx.state, profile, [event])
    return ApiResponse(202)


def _profile_key(state: SandboxState, profile: _PlannedProfile, pointer: str) -> str:
    """Who an entry's events belong to, for duplicate detection before anything is written."""
    try:
        existing = state.resolve(profile.attributes, profile.profile_id)
    except ApiError as error:
        for entry in error.errors:
            entry["source"] = {"pointer": f"{pointer}/attributes"}
        raise
    if existing:
        return existing
    for name in IDENTIFIERS:
        value = profile.attributes.get(name)
        if value:
            return f"new:{name}:{value.lower() if name == 'email' else value}"
    if profile.anonymous_id:
        anonymous = _anonymous_owner(state, profile.anonymous_id)
        return anonymous.id if anonymous else f"new:anonymous_id:{profile.anonymous_id}"
    return f"new:{id(profile)}"


def bulk_create_events(ctx: Ctx) -> ApiResponse:
    entries = ctx.body["data"]["attributes"]["events-bulk-create"]["data"]
    now = utcnow()
    with ctx.state.lock:
        plans: list[tuple[_PlannedProfile, list[_PlannedEvent]]] = []
        seen: set[tuple[str, str, str]] = set()
        for i, entry in enumerate(entries):
            base = f"/data/attributes/events-bulk-create/data/{i}/attributes"
            entry_attrs = entry["attributes"]
            profile = _plan_profile(
                ctx.state, entry_attrs["profile"]["data"], f"{base}/profile/data"
            )
            key = _profile_key(ctx.state, profile, f"{base}/profile/data")
            events = []
            for j, raw in enumerate(entry_attrs["events"]["data"]):
                pointer = f"{base}/events/data/{j}/attributes"
                event = _plan_event(raw["attributes"], pointer, now)
                event.backfill = event.backfill or bool(entry_attrs.get("backfill"))
                if event.unique_id is not None:
                    dedup = (key, event.metric, event.unique_id)
                    if dedup in seen:
                        raise invalid(
                            f"Duplicate unique_id {event.unique_id!r} for the same profile and "
                            "metric in one request; no events were processed.",
                            pointer=f"{pointer}/unique_id",
                        )
                    seen.add(dedup)
                events.append(event)
            plans.append((profile, events))
        for profile, events in plans:
            _record(ctx.state, profile, events)
    return ApiResponse(202)


HANDLERS = {"create_event": create_event, "bulk_create_events": bulk_create_events}
