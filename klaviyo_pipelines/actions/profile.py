"""Klaviyo profile fields: resolving a sync's mapping and turning a row into profile attributes.

Shared by every action that sends a profile (upsert, subscribe, events' profile). A value
that Klaviyo would refuse is caught here, per row, with the field and the reason, so the row
is rejected on its own and the rest of its batch still goes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import phonenumbers

from klaviyo_pipelines.actions.phone import e164
from klaviyo_pipelines.actions.values import json_value
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.warehouse.snapshot import resolve_column

IDENTIFIERS = ("email", "phone_number", "external_id")
TEXT_FIELDS = ("first_name", "last_name", "organization", "locale", "title", "image")
LOCATION_FIELDS = (
    "address1",
    "address2",
    "city",
    "country",
    "region",
    "zip",
    "timezone",
    "ip",
    "latitude",
    "longitude",
)
MAX_EXTERNAL_ID = 255
_IDENTIFIER_SET = frozenset(IDENTIFIERS)
_COORDINATES = frozenset({"latitude", "longitude"})

# Deliberately strict: one @, a dotted domain, a TLD of 2+ letters (Klaviyo refuses `a@b.c`),
# and no dot leading, trailing or doubled in the local part (Klaviyo refuses `a.@b.co`).
_EMAIL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,63}$"
)
MAX_EMAIL = 254


class InvalidRow(ValueError):
    """A row Klaviyo would refuse: which field, and why, in words a user can act on."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


@dataclass(frozen=True)
class ProfileMapping:
    """Klaviyo profile field -> model column, after defaults and validation against the model."""

    fields: Mapping[str, str]
    location: Mapping[str, str]
    properties: Mapping[str, str]
    country_code_column: str | None
    default_country_code: str | None
    clear_nulls: bool
    defaults: Mapping[str, str]  # field -> column, for the fields mapped by default (`plan`)

    @property
    def columns(self) -> set[str]:
        used = {*self.fields.values(), *self.location.values(), *self.properties.values()}
        if self.country_code_column:
            used.add(self.country_code_column)
        return used


def explicit_columns(sync: SyncSpec, columns: Sequence[str]) -> set[str]:
    """Every model column the sync's mapping names, at any depth: such a column is never also
    default-mapped to the field it is named like (a `country` mapped as country_code must not
    become location.country too)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and (column := resolve_column(list(columns), value)):
            found.add(column)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)

    walk(sync.mapping)
    return found


def default_column(
    sync: SyncSpec, columns: Sequence[str], field: str, written: bool, explicit: set[str]
) -> str | None:
    """The column `field` maps to by default, by the one rule every action follows: a column
    named like the field, unless the sync has `default_mappings: false`, the mapping names the
    field (`written`; `field: null` turns its default off) or maps that column explicitly."""
    if not sync.default_mappings or written:
        return None
    found = resolve_column(list(columns), field)
    return None if found is None or found in explicit else found


def resolve_profile_mapping(
    sync: SyncSpec, columns: Sequence[str], config_path: str, extra_keys: Sequence[str] = ()
) -> ProfileMapping:
    """Check the sync's mapping against the model's columns and fill in default mappings.

    A column named like a profile field (email, first_name, city, ...) maps to it by the rule
    of `default_column`. `extra_keys` are action-specific mapping keys the caller handles.
    """
    mapping = dict(sync.mapping)
    prefix = f"syncs.{sync.name}.mapping"
    known = {*IDENTIFIERS, *TEXT_FIELDS, "location", "properties", "country_code", *extra_keys}
    for key in mapping:
        if key not in known:
            raise ConfigError(
                config_path,
                f"{prefix}.{key}",
                f"unknown Klaviyo profile field (fields: {', '.join(sorted(known))})",
            )

    def column(key: str, name: Any) -> str:
        if not isinstance(name, str):
            raise ConfigError(config_path, key, f"must name a model column, got {name!r}")
        found = resolve_column(columns, name)
        if found is None:
            raise ConfigError(
                config_path,
                key,
                f"column {name!r} is not in model {sync.model!r} (columns: {', '.join(columns)})",
            )
        return found

    def section(name: str, allowed: Sequence[str] | None) -> dict[str, str]:
        """Its `key: column` entries; a `key: null` (location only) just turns a default off."""
        raw = mapping.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(config_path, f"{prefix}.{name}", "must be a mapping of key: column")
        result = {}
        for key, col in raw.items():
            if allowed is not None and key not in allowed:
                raise ConfigError(
                    config_path,
                    f"{prefix}.{name}.{key}",
                    f"unknown location field (fields: {', '.join(allowed)})",
                )
            if col is not None or allowed is None:
                result[str(key)] = column(f"{prefix}.{name}.{key}", col)
        return result

    fields = {
        key: column(f"{prefix}.{key}", mapping[key])
        for key in (*IDENTIFIERS, *TEXT_FIELDS)
        if mapping.get(key) is not None
    }
    location = section("location", LOCATION_FIELDS)
    explicit = explicit_columns(sync, columns)
    written_location = mapping.get("location") or {}
    defaults: dict[str, str] = {}
    for key in (*IDENTIFIERS, *TEXT_FIELDS):
        if found := default_column(sync, columns, key, key in mapping, explicit):
            fields[key] = defaults[key] = found
    for key in LOCATION_FIELDS:
        if found := default_column(sync, columns, key, key in written_location, explicit):
            location[key] = defaults[f"location.{key}"] = found
    country_column = (
        column(f"{prefix}.country_code", mapping["country_code"])
        if mapping.get("country_code") is not None
        else default_column(sync, columns, "country_code", "country_code" in mapping, explicit)
    )
    if country_column and "country_code" not in mapping:
        defaults["country_code"] = country_column
    default_country = sync.settings.get("country_code")
    if default_country is not None and (
        not isinstance(default_country, str)
        or default_country.upper() not in phonenumbers.SUPPORTED_REGIONS
    ):
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.country_code",
            f"{default_country!r} is not an ISO 3166 alpha-2 region phone numbers are known for",
        )
    nulls = sync.settings.get("nulls", "omit")
    if nulls not in ("omit", "clear"):
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.nulls",
            f"must be 'omit' (keep Klaviyo's value) or 'clear' (erase it), got {nulls!r}",
        )
    if not any(key in fields for key in IDENTIFIERS):
        raise ConfigError(
            config_path,
            prefix,
            "no identifier is mapped: map at least one of email, phone_number, external_id",
        )
    return ProfileMapping(
        fields=fields,
        location=location,
        properties=section("properties", None),
        country_code_column=country_column,
        default_country_code=default_country.upper() if default_country else None,
        clear_nulls=nulls == "clear",
        defaults=defaults,
    )


def normalise_email(value: Any) -> str:
    text = str(value).strip()
    if len(text) > MAX_EMAIL or not _EMAIL.match(text):
        raise InvalidRow("email", f"{text!r} is not a valid email address")
    return text


def normalise_phone(value: Any, country: str | None) -> str:
    """E.164 with libphonenumber's verdict (`phone.e164`); unlike Segment, a '+' number must
    also be a real number."""
    text = str(value).strip()
    plus = text.startswith("+")
    number = e164(text, None if plus else country)
    if number is None:
        hint = "" if plus or country else " (no country_code to read it with)"
        raise InvalidRow("phone_number", f"{text!r} cannot be converted to E.164{hint}")
    return number


def profile_attributes(mapping: ProfileMapping, values: Mapping[str, Any]) -> dict[str, Any]:
    """The `attributes` of a Klaviyo profile for one row; raises InvalidRow with the reason."""
    attributes: dict[str, Any] = {}
    clear = mapping.clear_nulls
    get = values.get
    identified = False
    for field, col in mapping.fields.items():
        value = json_value(get(col))
        if field not in _IDENTIFIER_SET:
            if value is None or value == "":
                if clear:
                    attributes[field] = None
            else:
                attributes[field] = str(value)
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # Klaviyo refuses a blank identifier
        if field == "email":
            value = normalise_email(value)
        elif field == "phone_number":
            country = get(mapping.country_code_column) if mapping.country_code_column else None
            value = normalise_phone(
                value, str(country).upper() if country else mapping.default_country_code
            )
        else:
            value = str(value)
            if len(value) > MAX_EXTERNAL_ID:
                raise InvalidRow(
                    "external_id", f"is {len(value)} characters; Klaviyo allows {MAX_EXTERNAL_ID}"
                )
        attributes[field] = value
        identified = True
    if not identified:
        raise InvalidRow(None, "no identifier: email, phone_number and external_id are all empty")
    location = {}
    for field, col in mapping.location.items():
        value = json_value(get(col))
        if value is None:
            if clear:
                location[field] = None
        elif field in _COORDINATES:
            location[field] = _coordinate(field, value)
        else:
            location[field] = str(value)
    if location:
        attributes["location"] = location
    properties = {}
    for name, col in mapping.properties.items():
        value = json_value(get(col))
        if value is not None or clear:
            properties[name] = value
    if properties:
        attributes["properties"] = properties
    return attributes


def _coordinate(field: str, value: Any) -> int | float | str:
    """Klaviyo takes a number or numeric text; anything else would fail the whole request."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            if math.isfinite(float(value)):
                return value
        except ValueError:
            pass
    raise InvalidRow(f"location.{field}", f"{value!r:.60} is not a number")
