"""Klaviyo events from warehouse rows: what Track Event and Order Completed share.

One module decides what an event is on the wire, so both actions agree on:

- the profile: identifiers only (email, phone_number in E.164, external_id, anonymous_id).
  `country_code` only helps read phone numbers and is never sent (Segment leaked it).
- time: ISO-8601 in UTC, truncated to the second as Klaviyo stores it, and checked against
  Klaviyo's window (1990 or later, at most a year ahead) so a bad row is rejected on its own.
- unique_id: the mapped column, or one derived from the sync's namespace (its `namespace`,
  by default its name) and the row key. A retried or re-run batch is then deduplicated by
  Klaviyo instead of duplicated, and a renamed sync that keeps its namespace keeps its ids.
- batching: each row is one `event-bulk-create` entry (one profile, one or more events). Entries
  are packed by event count and bytes, and two events that share a metric and unique_id never go
  in the same request, because Klaviyo would refuse the whole request.
"""

from __future__ import annotations

import hashlib
import re
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import phonenumbers

from klaviyo_pipelines.actions.base import (
    Action,
    BatchResult,
    Prepared,
    Rejected,
    batch_size_setting,
    field_of_pointer,
    flag_setting,
    pointer_index,
)
from klaviyo_pipelines.actions.profile import (
    MAX_EXTERNAL_ID,
    InvalidRow,
    default_column,
    explicit_columns,
    normalise_email,
    normalise_phone,
)
from klaviyo_pipelines.actions.values import dumps, json_value
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import EVENT_BULK_CREATE, EVENTS, KB, EndpointClass
from klaviyo_pipelines.klaviyo.errors import AuthError, KlaviyoError, PermanentError
from klaviyo_pipelines.warehouse.changes import ChangeRow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import resolve_column

IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id")
BULK_PATH = "/api/event-bulk-create-jobs"
SINGLE_PATH = "/api/events"
ENTRIES_POINTER = "/data/attributes/events-bulk-create/data"
MAX_METRIC_NAME = 127  # Klaviyo: "less than 128 characters"
MAX_PROPERTIES = 400
MAX_STRING_BYTES = 100 * KB
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
MAX_AHEAD = timedelta(days=365)
SINGLE_GROUP = 100  # single mode: rows whose outcome is committed together
MAPPING_KEYS = frozenset(
    {*IDENTIFIERS, "country_code", "properties", "time", "value", "value_currency", "unique_id"}
)
SETTING_KEYS = frozenset({"batch", "batch_size", "backfill", "country_code", "value_currency"})

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_BULK_HEAD = b'{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":['
_BULK_TAIL = b"]}}}}"
_BULK_ENVELOPE = len(_BULK_HEAD) + len(_BULK_TAIL)


class SyncKeys:
    """Reads a sync's mapping and settings against the model, naming the key that is wrong."""

    def __init__(
        self,
        sync: SyncSpec,
        columns: Sequence[str],
        config_path: str,
        mapping_keys: Iterable[str],
        setting_keys: Iterable[str],
    ) -> None:
        self.sync, self.columns, self.config_path = sync, list(columns), config_path
        self.explicit = explicit_columns(sync, columns)
        self.defaults: dict[str, str] = {}  # field -> column mapped by default, for `plan`
        for section, allowed in (("mapping", mapping_keys), ("settings", setting_keys)):
            allowed = sorted(allowed)
            for key in getattr(sync, section):
                if key not in allowed:
                    raise self.error(
                        f"{section}.{key}",
                        f"unknown key for {sync.action} ({section}: {', '.join(allowed)})",
                    )

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.config_path, f"syncs.{self.sync.name}.{key}", reason)

    def column(self, key: str, name: Any, hint: str = "") -> str:
        """The model column `name` (found at `key`) refers to."""
        if not isinstance(name, str):
            raise self.error(key, f"must name a model column, got {name!r}{hint}")
        found = resolve_column(self.columns, name)
        if found is None:
            raise self.error(
                key,
                f"column {name!r} is not in model {self.sync.model!r} "
                f"(columns: {', '.join(self.columns)}){hint}",
            )
        return found

    def mapped(self, key: str, by_name: bool = False, hint: str = "") -> str | None:
        """The column mapped to `key`; with `by_name`, a column called `key` maps by default
        (by the rule of `profile.default_column`: `key: null` turns that off)."""
        if key in self.sync.mapping:
            name = self.sync.mapping[key]
            return None if name is None else self.column(f"mapping.{key}", name, hint)
        if not by_name:
            return None
        found = default_column(self.sync, self.columns, key, False, self.explicit)
        if found:
            self.defaults[key] = found
        return found

    def mapped_section(self, key: str) -> dict[str, str]:
        raw = self.sync.mapping.get(key) or {}
        if not isinstance(raw, dict):
            raise self.error(f"mapping.{key}", "must be a mapping of name: column")
        return {str(name): self.column(f"mapping.{key}.{name}", col) for name, col in raw.items()}

    def flag(self, key: str, default: bool) -> bool:
        return flag_setting(self.sync, key, default, self.config_path)

    def metric_name(self, key: str, default: str | None = None) -> str | None:
        """A metric name given literally in the settings, checked as Klaviyo would."""
        value = self.sync.settings.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_METRIC_NAME:
            raise self.error(
                f"settings.{key}",
                f"must be a metric name of 1 to {MAX_METRIC_NAME} characters, got {value!r}",
            )
        return value


@dataclass(frozen=True)
class EventMapping:
    """What every event of a sync is built from: columns, literals and transport settings."""

    sync: str  # the namespace of derived unique_ids: `namespace`, else the sync's name
    identifiers: Mapping[str, str]  # profile identifier -> column
    country_code_column: str | None
    default_country_code: str | None
    properties: Mapping[str, str]  # event property name -> column
    time: str | None
    value: str | None
    value_currency_column: str | None
    value_currency: str | None
    unique_id: str | None
    backfill: bool
    batch_mode: bool
    batch_size: int
    defaults: Mapping[str, str]  # field -> column, for the fields mapped by default (`plan`)

    @property
    def columns(self) -> set[str]:
        optional = (
            self.country_code_column,
            self.time,
            self.value,
            self.value_currency_column,
            self.unique_id,
        )
        return {*self.identifiers.values(), *self.properties.values()} | {c for c in optional if c}


def resolve_event_mapping(keys: SyncKeys) -> EventMapping:
    """Check the mapping keys and settings both event actions share, with default mappings."""
    identifiers = {k: col for k in IDENTIFIERS if (col := keys.mapped(k, by_name=True))}
    if not identifiers:
        raise keys.error(
            "mapping",
            "no identifier is mapped: map at least one of " + ", ".join(IDENTIFIERS),
        )
    settings = keys.sync.settings
    country = settings.get("country_code")
    if country is not None and (
        not isinstance(country, str) or country.upper() not in phonenumbers.SUPPORTED_REGIONS
    ):
        raise keys.error(
            "settings.country_code",
            f"{country!r} is not an ISO 3166 alpha-2 region phone numbers are known for",
        )
    currency_column = keys.mapped("value_currency")
    currency = settings.get("value_currency")
    if currency is not None:
        if currency_column:
            raise keys.error(
                "settings.value_currency", "give value_currency as a column or a setting, not both"
            )
        if not isinstance(currency, str) or not _CURRENCY.match(currency.upper()):
            raise keys.error(
                "settings.value_currency", f"must be an ISO 4217 code like USD, got {currency!r}"
            )
        currency = currency.upper()
    batch_mode = keys.flag("batch", True)
    size = batch_size_setting(keys.sync, EVENT_BULK_CREATE.max_items or 1000, keys.config_path)
    country_column = keys.mapped("country_code", by_name=True)
    return EventMapping(
        sync=keys.sync.identity,
        identifiers=identifiers,
        country_code_column=country_column,
        default_country_code=country.upper() if country else None,
        properties=keys.mapped_section("properties"),
        time=keys.mapped("time"),
        value=keys.mapped("value"),
        value_currency_column=currency_column,
        value_currency=currency,
        unique_id=keys.mapped("unique_id"),
        backfill=keys.flag("backfill", False),
        batch_mode=batch_mode,
        batch_size=size,
        defaults=dict(keys.defaults),
    )


# ---- one row's values ------------------------------------------------------------------------


def event_profile(mapping: EventMapping, values: Mapping[str, Any]) -> dict[str, str]:
    """The profile's identifiers; raises InvalidRow naming the bad identifier."""
    profile: dict[str, str] = {}
    for field, col in mapping.identifiers.items():
        value = json_value(values.get(col))
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if field == "email":
            profile[field] = normalise_email(value)
        elif field == "phone_number":
            country = (
                values.get(mapping.country_code_column) if mapping.country_code_column else None
            )
            region = str(country).strip().upper() if country else mapping.default_country_code
            profile[field] = normalise_phone(value, region)
        else:
            text = str(value)
            if field == "external_id" and len(text) > MAX_EXTERNAL_ID:
                raise InvalidRow(
                    field, f"is {len(text)} characters; Klaviyo allows {MAX_EXTERNAL_ID}"
                )
            profile[field] = text
    if not profile:
        raise InvalidRow(None, "no identifier: " + ", ".join(IDENTIFIERS) + " are all empty")
    return profile


def event_time(value: Any, now: datetime | None = None) -> str | None:
    """ISO-8601 UTC to the second (Klaviyo drops sub-seconds; Segment sent milliseconds).

    Naive datetimes are taken as UTC, as warehouses store them; a date is its midnight UTC.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidRow("time", f"{value!r} is not an ISO-8601 date or time") from None
    else:
        raise InvalidRow(
            "time", f"must be a timestamp, a date or an ISO-8601 string, got {type(value).__name__}"
        )
    try:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC).replace(microsecond=0)
    except (OverflowError, ValueError):
        raise InvalidRow("time", f"{value!r} cannot be expressed in UTC") from None
    if not EARLIEST <= moment <= (now or datetime.now(UTC)) + MAX_AHEAD:
        text = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        raise InvalidRow(
            "time", f"{text} is outside Klaviyo's range: from 1990 to one year from now"
        )
    return moment.isoformat()[:19] + "Z"  # 4-digit year from 1990: strftime's text, faster


def event_value(value: Any) -> int | float | None:
    """A finite number (numeric text is read as a number); anything else is refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise InvalidRow("value", f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise InvalidRow("value", f"must be a number, got {type(value).__name__}")
    number = json_value(value)
    if number is None:
        raise InvalidRow("value", f"{value} is not a finite number")
    return number


def value_currency(mapping: EventMapping, values: Mapping[str, Any]) -> str | None:
    if not mapping.value_currency_column:
        return mapping.value_currency
    raw = values.get(mapping.value_currency_column)
    if raw is None or not str(raw).strip():
        return None
    code = str(raw).strip().upper()
    if not _CURRENCY.match(code):
        raise InvalidRow("value_currency", f"{raw!r} is not an ISO 4217 currency code")
    return code


def derived_unique_id(sync: str, key: str) -> str:
    """Stable across runs and retries for one namespace and row key, distinct between them."""
    return hashlib.sha256(f"{sync}\x1f{key}".encode()).hexdigest()[:40]


def row_unique_id(mapping: EventMapping, row: ChangeRow) -> str:
    """The mapped unique_id, else (also for a NULL in that column) the derived one."""
    if mapping.unique_id:
        value = json_value(row.values.get(mapping.unique_id))
        if value is not None and str(value).strip():
            return str(value)
    return derived_unique_id(mapping.sync, row.key)


def event_properties(mapping: EventMapping, values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: json_value(values.get(col)) for name, col in mapping.properties.items()}


def new_event(
    metric: Any,
    properties: dict[str, Any],
    unique_id: str,
    *,
    time: str | None = None,
    value: int | float | None = None,
    currency: str | None = None,
    backfill: bool = False,
) -> dict[str, Any]:
    """One `event` resource, checked against Klaviyo's per-event rules."""
    name = "" if metric is None else str(json_value(metric))
    if not name.strip():
        raise InvalidRow("metric_name", "is empty; every event needs a metric name")
    if len(name) > MAX_METRIC_NAME:
        raise InvalidRow(
            "metric_name", f"is {len(name)} characters; Klaviyo allows {MAX_METRIC_NAME}"
        )
    if len(properties) > MAX_PROPERTIES:
        raise InvalidRow(
            "properties", f"has {len(properties)} properties; Klaviyo allows {MAX_PROPERTIES}"
        )
    for key, item in properties.items():
        if _has_long_string(item):
            raise InvalidRow(
                f"properties.{key}", "holds a string over 100 KB; Klaviyo refuses such events"
            )
    attributes: dict[str, Any] = {
        "properties": properties,
        "metric": {"data": {"type": "metric", "attributes": {"name": name}}},
        "unique_id": unique_id,
    }
    if time is not None:
        attributes["time"] = time
    if value is not None:
        attributes["value"] = value
    if currency is not None:
        attributes["value_currency"] = currency
    if backfill:
        attributes["backfill"] = True
    return {"type": "event", "attributes": attributes}


def _has_long_string(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > MAX_STRING_BYTES // 4 and len(value.encode()) > MAX_STRING_BYTES
    if isinstance(value, dict):
        return any(_has_long_string(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_long_string(v) for v in value)
    return False


def bulk_entry(profile: dict[str, str], events: list[dict[str, Any]]) -> dict[str, Any]:
    """One `event-bulk-create` entry: a profile and its events, sent and refused as a unit."""
    return {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {"data": {"type": "profile", "attributes": profile}},
            "events": {"data": events},
        },
    }


def entry_events(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    return entry["attributes"]["events"]["data"]


def event_key(event: Mapping[str, Any]) -> tuple[str, str]:
    """(metric, unique_id): what must not repeat within one bulk request."""
    attributes = event["attributes"]
    return attributes["metric"]["data"]["attributes"]["name"], attributes["unique_id"]


def single_bodies(entry: Mapping[str, Any]) -> list[bytes]:
    """The `POST /api/events` bodies of an entry, one per event, in order."""
    profile = entry["attributes"]["profile"]
    return [
        dumps(
            {"data": {"type": "event", "attributes": {**event["attributes"], "profile": profile}}}
        )
        for event in entry_events(entry)
    ]


def bulk_body(batch: Sequence[Prepared]) -> bytes:
    return _BULK_HEAD + b",".join(item.body for item in batch) + _BULK_TAIL


# ---- within one change set -------------------------------------------------------------------


class DuplicateGuard:
    """Rows of one page that reuse another row's metric and unique_id.

    Klaviyo keeps only the first event per profile, metric and unique_id. A later row with the
    same identifiers (any one in common) and a *different* event would be dropped silently, so
    it is rejected here with the reason. A row with the same event (a true duplicate) or with
    other identifiers (another profile) is sent, in a later request (see `pack_entries`), and
    counts as delivered once Klaviyo accepts it. The guard spans one page of the change set
    (the rows batched together, reset by `enrich`); across pages, and across runs, Klaviyo's
    own deduplication applies.
    """

    def __init__(self) -> None:
        # (metric, unique_id) -> (row key, profile identifiers, digest of the event)
        self._first: dict[tuple[str, str], tuple[str, set[tuple[str, str]], bytes]] = {}

    def reset(self) -> None:
        self._first.clear()

    def admit(self, row_key: str, entry: Mapping[str, Any]) -> None:
        """Remember the row's events, or raise InvalidRow if one conflicts with an earlier row."""
        profile = entry["attributes"]["profile"]["data"]["attributes"]
        identity = {(k, v.lower() if k == "email" else v) for k, v in profile.items()}
        events = [
            (event_key(event), hashlib.blake2b(dumps(event), digest_size=16).digest())
            for event in entry_events(entry)
        ]
        for key, digest in events:
            first = self._first.get(key)
            if first and first[1] & identity and first[2] != digest:
                metric, unique_id = key
                raise InvalidRow(
                    "unique_id",
                    f"duplicate unique_id {unique_id!r} for metric {metric!r}: row {first[0]!r} "
                    "of the same change set sends a different event with it to the same "
                    "profile, and Klaviyo keeps only the first",
                )
        for key, digest in events:
            self._first.setdefault(key, (row_key, identity, digest))


def pack_entries(
    items: Iterable[Prepared], max_events: int, max_bytes: int
) -> Iterator[list[Prepared]]:
    """Fewest bulk requests within the event and byte limits, keeping each row's events together.

    An entry whose (metric, unique_id) is already in the request being filled waits for a later
    request, so no request repeats one (Klaviyo refuses the whole request if it does), and the
    first occurrence is always sent first.
    """
    pending = list(items)
    envelope = len(bulk_body([]))
    while pending:
        deferred: list[Prepared] = []
        batch: list[Prepared] = []
        keys: set[tuple[str, str]] = set()
        events, size = 0, envelope
        for item in pending:
            item_keys = [event_key(event) for event in entry_events(item.item)]
            if not keys.isdisjoint(item_keys):
                deferred.append(item)
                continue
            count = len(item_keys)
            added = len(item.body) + (1 if batch else 0)
            if batch and (events + count > max_events or size + added > max_bytes):
                yield batch
                batch, keys, events, size = [], set(), 0, envelope
                added = len(item.body)
            batch.append(item)
            keys.update(item_keys)
            events += count
            size += added
        if batch:
            yield batch
        pending = deferred


# ---- the shared action -----------------------------------------------------------------------


class EventAction(Action):
    """Batch mode: `POST /api/event-bulk-create-jobs`, one entry per row. Klaviyo answers 202
    with no job to poll, so a 202 means every entry was accepted; a 400 names the refused entry
    by pointer, and the runner rejects that row and resends the rest.
    Single mode (`batch: false`): one `POST /api/events` per event, per-row outcomes.
    """

    def __init__(self, sync: SyncSpec, mapping: EventMapping) -> None:
        super().__init__(sync)
        self.mapping = mapping
        self._guard = DuplicateGuard()

    @property
    def default_mappings(self) -> Mapping[str, str]:
        return self.mapping.defaults

    @abstractmethod
    def entry(self, row: ChangeRow) -> dict[str, Any]:
        """The row's profile and events; raises InvalidRow naming the field and the reason."""

    @property
    def columns(self) -> set[str]:
        return self.mapping.columns

    @property
    def endpoint(self) -> EndpointClass:
        return EVENT_BULK_CREATE if self.mapping.batch_mode else EVENTS

    @property
    def batch_size(self) -> int:
        return self.mapping.batch_size if self.mapping.batch_mode else SINGLE_GROUP

    def enrich(self, wh: Warehouse, rows: list[ChangeRow]) -> list[ChangeRow]:
        self._guard.reset()  # duplicates are looked for within a page
        return rows

    def event_fields(self, row: ChangeRow) -> dict[str, Any]:
        """The keyword arguments of `new_event` that come from the mapping."""
        values = row.values
        return {
            "time": event_time(values.get(self.mapping.time)) if self.mapping.time else None,
            "value": event_value(values.get(self.mapping.value)) if self.mapping.value else None,
            "currency": value_currency(self.mapping, values),
            "backfill": self.mapping.backfill,
        }

    def prepare(self, row: ChangeRow) -> Prepared:
        entry = self.entry(row)
        body = dumps(entry)
        if self.mapping.batch_mode:
            limit = (EVENT_BULK_CREATE.max_bytes or 0) - _BULK_ENVELOPE
            if len(body) > limit:
                raise InvalidRow(
                    None, f"events are {len(body):,} bytes; one Klaviyo request takes {limit:,}"
                )
        else:
            limit = EVENTS.max_bytes or 0
            largest = max(len(b) for b in single_bodies(entry))
            if largest > limit:
                raise InvalidRow(
                    None, f"an event is {largest:,} bytes; Klaviyo accepts at most {limit:,}"
                )
        self._guard.admit(row.key, entry)
        return Prepared(row, entry, body)

    def batches(self, items: Iterable[Prepared]) -> Iterator[list[Prepared]]:
        if self.mapping.batch_mode:
            return pack_entries(items, self.batch_size, EVENT_BULK_CREATE.max_bytes or 0)
        listed = list(items)
        return iter([listed[i : i + SINGLE_GROUP] for i in range(0, len(listed), SINGLE_GROUP)])

    def request_body(self, batch: Sequence[Prepared]) -> bytes:
        """Batch mode: the bulk request. Single mode: a JSON array of every `POST /api/events`
        body the batch becomes, in the order they are sent."""
        if self.mapping.batch_mode:
            return bulk_body(batch)
        return b"[" + b",".join(b for item in batch for b in single_bodies(item.item)) + b"]"

    def item_index(self, pointer: str | None) -> int | None:
        return pointer_index(pointer, ENTRIES_POINTER) if self.mapping.batch_mode else None

    def send(self, client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
        if self.mapping.batch_mode:
            client.post(BULK_PATH, content=bulk_body(batch))
            return BatchResult(delivered=list(batch))
        return _send_single(client, batch)


def _send_single(client: KlaviyoClient, batch: Sequence[Prepared]) -> BatchResult:
    """Each row's events in order. A refused event rejects its row; a failure that may pass
    (outage, timeout) leaves the row and the rest unsent and stops, so the next run resends
    them and Klaviyo drops the events it already has by unique_id."""
    result = BatchResult()
    for index, item in enumerate(batch):
        bodies = single_bodies(item.item)
        try:
            for number, body in enumerate(bodies):
                try:
                    client.post(SINGLE_PATH, content=body)
                except AuthError:
                    raise
                except PermanentError as exc:
                    result.rejected.append(_refusal(item, exc, number, len(bodies)))
                    break
            else:
                result.delivered.append(item)
        except KlaviyoError as exc:
            result.unsent += list(batch[index:])
            result.error = exc
            break
    return result


def _refusal(item: Prepared, exc: PermanentError, number: int, total: int) -> Rejected:
    detail = exc.errors[0] if exc.errors else None
    reason = (detail.detail or detail.title) if detail else None
    text = f"Klaviyo: {reason or exc}"
    if total > 1:
        metric = entry_events(item.item)[number]["attributes"]["metric"]["data"]["attributes"]
        text += f" (event {number + 1} of {total}, {metric['name']!r})"
    return Rejected(item, field_of_pointer(detail.pointer if detail else None), text)
