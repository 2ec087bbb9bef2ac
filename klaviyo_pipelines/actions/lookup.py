"""Klaviyo profiles by identifier: the columns holding a row's identifiers, reading and checking
them, and resolving many rows to Klaviyo profile ids at once.

The list-membership endpoints take profile ids only, so an action that removes rows from a list
first asks `GET /api/profiles?filter=any(email,[...])` (and phone_number, external_id). Unlike
Segment, which reads only the first page (20 profiles) of each lookup, every `links.next` page
is followed, 100 profiles a page, and long identifier lists are split so no URL grows too long.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import phonenumbers

from klaviyo_pipelines.actions.profile import (
    MAX_EXTERNAL_ID,
    InvalidRow,
    default_column,
    explicit_columns,
    normalise_email,
    normalise_phone,
)
from klaviyo_pipelines.actions.values import json_value
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.warehouse.snapshot import resolve_column

LOOKUP_FIELDS = ("email", "phone_number", "external_id")
PAGE_SIZE = 100  # Klaviyo's largest page of GET /api/profiles
# URL-encoded characters of one `filter` value: with the rest of the URL this stays well below
# the 8 KB request line that proxies commonly accept (Klaviyo states no limit of its own).
MAX_FILTER_CHARS = 6_000


@dataclass(frozen=True)
class Identifiers:
    """A row's validated identifiers (email and E.164 phone normalised), None where empty."""

    email: str | None = None
    phone_number: str | None = None
    external_id: str | None = None

    def present(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def mapped_columns(
    sync: SyncSpec,
    columns: Sequence[str],
    config_path: str,
    keys: Sequence[str],
    by_name: Sequence[str] = (*LOOKUP_FIELDS, "country_code"),
) -> dict[str, str]:
    """Mapping key -> model column for `keys`; keys in `by_name` default to a same-named
    column by the rule every action follows (`profile.default_column`).

    Unknown mapping keys and columns the model lacks are ConfigErrors naming the key.
    """
    prefix = f"syncs.{sync.name}.mapping"
    for key in sync.mapping:
        if key not in keys:
            raise ConfigError(
                config_path,
                f"{prefix}.{key}",
                f"not a field of {sync.action} (fields: {', '.join(keys)})",
            )
    found: dict[str, str] = {}
    explicit = explicit_columns(sync, columns)
    for key in keys:
        name = sync.mapping.get(key)
        if name is None:
            written = key in sync.mapping
            if key in by_name and (column := default_column(sync, columns, key, written, explicit)):
                found[key] = column
            continue
        if not isinstance(name, str):
            raise ConfigError(config_path, f"{prefix}.{key}", f"must name a column, got {name!r}")
        column = resolve_column(list(columns), name)
        if column is None:
            raise ConfigError(
                config_path,
                f"{prefix}.{key}",
                f"column {name!r} is not in model {sync.model!r} (columns: {', '.join(columns)})",
            )
        found[key] = column
    return found


def default_country(sync: SyncSpec, config_path: str) -> str | None:
    """`settings.country_code`: the region local phone numbers are read in, checked."""
    value = sync.settings.get("country_code")
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.country_code",
            f"{value!r} is not an ISO 3166 alpha-2 region phone numbers are known for",
        )
    return value.upper()


def read_identifiers(
    values: Mapping[str, Any],
    columns: Mapping[str, str],
    country: str | None,
    fields: Sequence[str] = LOOKUP_FIELDS,
) -> Identifiers:
    """The row's identifiers among `fields`; InvalidRow names a bad one, or says none is set.

    A bad identifier rejects the row even when another one is good: the row is sent as mapped
    or not at all, never half of it.
    """
    found: dict[str, str] = {}
    for field in fields:
        column = columns.get(field)
        value = json_value(values.get(column)) if column else None
        if value is None or str(value).strip() == "":
            continue
        if field == "email":
            found[field] = normalise_email(value)
        elif field == "phone_number":
            row_country = values.get(columns["country_code"]) if "country_code" in columns else None
            region = str(row_country).strip().upper() if row_country else country
            found[field] = normalise_phone(value, region)
        else:
            text = str(value)
            if len(text) > MAX_EXTERNAL_ID:
                raise InvalidRow(
                    field, f"is {len(text)} characters; Klaviyo allows {MAX_EXTERNAL_ID}"
                )
            found[field] = text
    if not found:
        raise InvalidRow(None, f"no identifier: {', '.join(fields)} are all empty")
    return Identifiers(**found)


def lookup_profile_ids(client: KlaviyoClient, wanted: Sequence[Identifiers]) -> list[list[str]]:
    """For each entry of `wanted`, the ids of the Klaviyo profiles its identifiers name.

    An empty list means no profile has any of them. Identifiers naming different profiles
    (email of one, external_id of another) give both ids, as Segment does. Errors are the
    client's typed errors; nothing is partially returned.
    """
    owners: dict[tuple[str, str], str] = {}
    for field, params in lookup_requests(wanted):
        for profile in client.paginate("/api/profiles", params):
            found = (profile.get("attributes") or {}).get(field)
            if isinstance(found, str) and profile.get("id"):
                owners[(field, _match_key(field, found))] = str(profile["id"])
    results = []
    for entry in wanted:
        ids = [
            owners[(field, _match_key(field, value))]
            for field, value in entry.present().items()
            if (field, _match_key(field, value)) in owners
        ]
        results.append(list(dict.fromkeys(ids)))
    return results


def lookup_requests(wanted: Sequence[Identifiers]) -> list[tuple[str, dict[str, Any]]]:
    """(identifier field, GET /api/profiles query) for every filter the lookup sends."""
    requests = []
    for field in LOOKUP_FIELDS:
        values = list(dict.fromkeys(v for w in wanted if (v := getattr(w, field)) is not None))
        for expression in filter_expressions(field, values):
            params = {
                "filter": expression,
                "page[size]": PAGE_SIZE,
                "fields[profile]": ",".join(LOOKUP_FIELDS),
            }
            requests.append((field, params))
    return requests


def filter_expressions(field: str, values: Sequence[str]) -> Iterator[str]:
    """`any(field,["a","b",...])` filters covering `values`, each within MAX_FILTER_CHARS and
    at most a page of values: lookups share a tight rate limit, and a filter of 147 values
    would cost two requests (100 + 47) where 100 values cost one."""
    head = f"any({field},["
    chunk: list[str] = []
    size = len(quote(head + "])", safe=""))
    for value in values:
        literal = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        cost = len(quote(literal, safe="")) + len(quote(",", safe=""))
        if chunk and (size + cost > MAX_FILTER_CHARS or len(chunk) >= PAGE_SIZE):
            yield head + ",".join(chunk) + "])"
            chunk, size = [], len(quote(head + "])", safe=""))
        chunk.append(literal)
        size += cost
    if chunk:
        yield head + ",".join(chunk) + "])"


def _match_key(field: str, value: str) -> str:
    return value.lower() if field == "email" else value  # Klaviyo matches emails ignoring case
